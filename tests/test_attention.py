"""flashar.attention: every path computes SDPA's function, the path is chosen per device, dtype and
shape, a dynamic decode length adds no guard, and a backbone decodes the same codes through either path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_gpt

from flashar import attention as A
from flashar.compilation import CompileCounter
from flashar.config import SamplingConfig
from flashar.errors import FlashARError
from flashar.methods.raster import Raster
from flashar.sampling import make_generator


def qkv(batch=2, heads=4, kv_heads=4, queries=3, keys=11, head_dim=8, dtype=torch.float32, mask_batch=1):
    g = torch.Generator().manual_seed(0)
    # strided, as backends make it
    q = torch.randn(batch, queries, heads, head_dim, generator=g).transpose(1, 2).to(dtype)
    k, v = (torch.randn(batch, kv_heads, keys, head_dim, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(mask_batch, 1, queries, keys, generator=g) < 0.6
    mask[..., -1] = True  # every query sees at least one key
    return q, k, v, mask


def reference(q, k, v, mask, scale=None):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale)


# flex's eager fallback says it is unfused, as intended here
EAGER_FLEX = "ignore:flex_attention called without torch.compile"


@pytest.mark.filterwarnings(EAGER_FLEX)
@pytest.mark.parametrize("path", [A.math_attention, A.sdpa_attention, A.flex_attention])
@pytest.mark.parametrize("kv_heads, mask_batch, scale", [(4, 1, None), (4, 2, 0.3), (2, 2, None), (1, 1, 0.5)])
def test_every_path_computes_masked_grouped_attention(path, kv_heads, mask_batch, scale):
    q, k, v, mask = qkv(kv_heads=kv_heads, mask_batch=mask_batch)
    out = path(q, k, v, mask, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, scale), atol=1e-5, rtol=1e-5)


def test_math_path_in_bf16_keeps_scores_in_float32():
    q, k, v, mask = qkv(dtype=torch.bfloat16, keys=300)
    out = A.math_attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=2e-2, rtol=0)


def test_math_path_returns_no_nan_for_a_query_that_sees_nothing():
    q, k, v, mask = qkv()
    mask[..., 1, :] = False
    assert torch.isfinite(A.math_attention(q, k, v, mask)).all()


def test_the_path_follows_device_dtype_shape_and_the_override(monkeypatch):
    q32, k32, *_ = qkv(queries=32)
    q65, k65, *_ = qkv(queries=65)
    bf16 = [t.bfloat16() for t in (q32, k32)]
    monkeypatch.setattr(A, "CPU_AMX", False)
    monkeypatch.setitem(A.CPU_NATIVE, torch.bfloat16, True)
    assert A.attention_path(*bf16) == "math"  # no AMX: SDPA's bf16 kernel is slow at decode shapes
    assert A.attention_path(q65.bfloat16(), k65.bfloat16()) == "math"  # 65 rows: within the native limit
    assert A.attention_path(q32, k32) == "sdpa"  # fp32
    grouped = qkv(queries=20, kv_heads=1)  # 4 heads per KV head x 20 queries = 80 rows per KV head
    assert A.attention_path(grouped[0].bfloat16(), grouped[1].bfloat16()) == "math"  # native bf16: up to 256 rows
    assert A.attention_path(*grouped[:2]) == "sdpa"  # fp32: up to 64
    wide = qkv(queries=65, kv_heads=1)  # 260 rows per KV head
    assert A.attention_path(wide[0].bfloat16(), wide[1].bfloat16()) == "sdpa"
    small = qkv(queries=16, kv_heads=1)  # 64 rows per KV head, fp32: the math path reads each KV head once
    assert A.attention_path(*small[:2]) == "math"
    monkeypatch.setitem(A.CPU_NATIVE, torch.bfloat16, False)  # emulated bf16 (AVX2): math's matmuls cost per row
    assert A.attention_path(*bf16) == "sdpa"
    one = qkv(queries=1)
    assert A.attention_path(one[0].bfloat16(), one[1].bfloat16()) == "math"
    assert A.attention_path(*[t.bfloat16() for t in qkv(queries=1, kv_heads=1)[:2]]) == "sdpa"  # 4 rows per KV head
    monkeypatch.setattr(A, "CPU_AMX", True)
    assert A.attention_path(*bf16) == "sdpa"  # with AMX the stock kernel reads the cache near its bound
    monkeypatch.setattr(A, "ATTENTION", "math")
    assert A.attention_path(q65, k65) == "math"


def test_a_dynamic_decode_length_compiles_once_on_either_path(monkeypatch):
    monkeypatch.setattr(A, "CPU_AMX", False)
    monkeypatch.setitem(A.CPU_NATIVE, torch.bfloat16, True)
    _, k, v, _ = qkv(dtype=torch.bfloat16, keys=40)
    counter = CompileCounter()
    step = torch.compile(lambda q, m: A.attention(q, k, v, m), backend=counter, fullgraph=True, dynamic=False)
    for length in (2, 7, 32):
        q = torch.randn(2, 4, length, 8, dtype=torch.bfloat16)
        mask = torch.ones(1, 1, length, 40, dtype=torch.bool)
        torch._dynamo.mark_dynamic(q, 2, min=2, max=32)
        torch._dynamo.mark_dynamic(mask, 2, min=2, max=32)
        torch.testing.assert_close(step(q, mask), A.math_attention(q, k, v, mask))
    assert counter.frames == 1


@pytest.mark.filterwarnings(EAGER_FLEX)
@pytest.mark.parametrize("path", ["math", "sdpa", "flex"])
def test_raster_decodes_the_same_codes_through_every_path(monkeypatch, path):
    backbone = random_gpt(0, n_head=4, n_kv_head=2)  # grouped heads
    sampling = SamplingConfig(cfg_scale=2.0, top_k=8)
    codes = {}
    for chosen in ("sdpa", path):
        monkeypatch.setattr(A, "ATTENTION", chosen)
        with torch.no_grad():
            codes[chosen] = Raster(backbone).generate([1, 2], (3, 4), sampling, make_generator(0, "cpu")).codes
    assert torch.equal(codes["sdpa"], codes[path])


def test_flex_is_refused_in_one_line_for_a_compiled_cpu_step(monkeypatch):
    """torch's CPU FlexAttention template does not compile a dynamic diagonal length: a clear error, not a C++ one."""
    monkeypatch.setattr(A, "ATTENTION", "flex")
    with pytest.raises(FlashARError, match="FLASHAR_ATTENTION=flex runs eager or compiled on CUDA only"):
        Raster(random_gpt(0), compile=True)
