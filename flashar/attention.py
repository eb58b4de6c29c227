"""Attention at decode shapes: one function for every backend, its kernel picked per device, dtype and
chunk size by measurement (``benchmarks/attention.py``, receipts ``attention_cpu*.json``).

Backends call :func:`attention` from ``layer_forward`` (also as ``flashar.backbone.attention``). Every path
computes the same function: PyTorch's fused SDPA, an explicit matmul -> float32 softmax -> matmul that
inductor fuses, or FlexAttention; :func:`attention_path` chooses, ``FLASHAR_ATTENTION`` forces one.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from flashar.errors import FlashARError

# Which kernel :func:`attention` runs: "auto" (per device, dtype and shape: :func:`attention_path`), or
# "math", "sdpa" or "flex" everywhere. Read once; benchmarks compare the paths by setting FLASHAR_ATTENTION.
ATTENTION = os.environ.get("FLASHAR_ATTENTION", "auto")
# CPUs whose bf16 matmuls run on AMX tiles. There the stock SDPA kernel is the fastest bf16 path at GPT-B's
# decode shapes; without AMX (an AVX512-BF16 AMD EPYC) it ran 2.5x slower than the math path eager and 4.1x
# compiled at one query (receipt attention_cpu_avx512.json). benchmarks/attention.py measures both anywhere.
CPU_AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def _cpu_multiplies(kind: str) -> bool:
    try:
        return torch.backends.mkldnn.is_available() and bool(
            getattr(torch.ops.mkldnn, f"_is_mkldnn_{kind}_supported")())
    except (AttributeError, RuntimeError):
        return False


# Whether oneDNN multiplies bf16 / fp16 matrices natively on this CPU (AVX512 or AMX). An AVX2-only CPU
# emulates them: on an AVX2 AMD EPYC a bf16 batched matmul of GPT-B's 24 heads x 1,025 keys took ~0.65 ms
# per query row (fp32: 0.05-0.08), so the math path's two matmuls cost 95 ms at a 32-query diagonal
# against SDPA's 4 ms. There the math path is taken for one query row per KV head only.
CPU_NATIVE = {torch.bfloat16: _cpu_multiplies("bf16"), torch.float16: _cpu_multiplies("fp16")}
# The math path materialises float32 scores, so it is chosen only for decode-sized chunks: at most this
# many query rows per KV head (heads per KV head x T); with native bf16/fp16 matmuls but no AMX, up to
# MATH_ROWS_NATIVE, where it was still as fast as SDPA or faster (Emu3.5's 8 query heads x a 32-cell diagonal).
MATH_ROWS, MATH_ROWS_NATIVE = 64, 256


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """softmax(q kᵀ · scale, masked) v: q (B, H, T, hd), k and v (B, H_kv, S, hd), bool mask (B or 1, 1, T, S).

    H may be a multiple of H_kv (grouped queries: query head h reads KV head h // (H / H_kv)). Returns
    (B, H, T, hd) in q's dtype, through the path :func:`attention_path` picks (module docstring).
    """
    return PATHS[attention_path(q, k)](q, k, v, mask, scale)


def attention_path(q: Tensor, k: Tensor) -> str:
    """"math" or "sdpa" for these shapes on this device; ``ATTENTION`` overrides "auto" (with "flex" too).

    By measurement (benchmarks/attention.py, cold KV caches as in a decode step), on CPU for decode-sized
    chunks (at most ``MATH_ROWS`` query rows per KV head, or ``MATH_ROWS_NATIVE`` where stated):

    * bf16/fp16 with AMX: SDPA (the fastest multi-head path; grouped, math gains 1.1x compiled, loses 1.3x eager);
    * bf16/fp16 multiplied natively without AMX (an AVX512 EPYC): math up to ``MATH_ROWS_NATIVE`` rows (SDPA
      2.5x / 4.1x slower eager / compiled at one query, 5.4x / 7.3x with 8 grouped heads; compiled, math is
      1.1-1.7x faster from 32 to 256 rows; eager, 0.75-1.0x SDPA's speed at 32-128 multi-head rows);
    * bf16/fp16 emulated (AVX2 only, ``CPU_NATIVE``): math at one row per KV head (3.4x faster compiled,
      1.14x slower eager), SDPA beyond it (math 17-23x slower at 32 rows);
    * fp32: math with grouped heads (1.0-1.3x faster on an AMX Xeon, 1.7-2.3x at one query on an AVX2
      EPYC, 1.25-1.7x on an AVX512 one), SDPA without (ties at one query, 1.2-1.5x faster at 32).

    Everything else (prefill-sized chunks; CUDA, until a GPU receipt says otherwise) takes SDPA. Only sizes
    provably in range count, so that under torch.compile a dynamic diagonal length adds no guard.
    """
    if attention_setting() != "auto":
        return ATTENTION
    rows = q.shape[1] // k.shape[1] * q.shape[2]  # query rows per KV head
    if q.device.type != "cpu":
        return "sdpa"
    if q.dtype in (torch.bfloat16, torch.float16):
        if CPU_AMX:
            return "sdpa"
        if CPU_NATIVE[q.dtype]:
            return "math" if statically_known_true(rows <= MATH_ROWS_NATIVE) else "sdpa"
        return "math" if statically_known_true(rows == 1) else "sdpa"
    return "math" if q.shape[1] > k.shape[1] and statically_known_true(rows <= MATH_ROWS) else "sdpa"


def attention_setting() -> str:
    """``ATTENTION``, checked: a path name, or "auto"."""
    if ATTENTION != "auto" and ATTENTION not in PATHS:
        raise FlashARError(f"FLASHAR_ATTENTION={ATTENTION!r} names no attention path; set it to one of "
                           f"{', '.join(['auto', *PATHS])}, or unset it")
    return ATTENTION


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """:func:`attention` through ``F.scaled_dot_product_attention`` (grouped heads natively on CPU)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and q.device.type != "cpu":  # CUDA's fused kernels take no grouped heads together with a mask
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def flex_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """:func:`attention` through FlexAttention, the mask read by a score modifier (no block mask: a decode
    step reads its whole key window anyway). Only ever chosen by ``FLASHAR_ATTENTION=flex``: it is fused
    under ``torch.compile`` alone, and on CPU it ran 2-3x slower than SDPA at FlashAR's diagonals (ad hoc,
    cold caches); ``benchmarks/attention.py`` and ``gpu_ladder.py --attention flex`` measure it anywhere."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    rows = mask[:, 0] if mask.shape[0] > 1 else mask[0, 0].expand(q.shape[0], -1, -1)  # (B, T, S)

    def masked(score, b, h, query, key):
        return torch.where(rows[b, query, key], score, float("-inf"))

    return flex(q, k, v, score_mod=masked, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """:func:`attention` as matmul -> float32 masked softmax -> matmul (scores and weights in float32,
    the two matmuls in the inputs' dtype, as the fused kernels do). A row with no visible key averages all
    keys instead of returning NaN."""
    batch, heads, length, head_dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    q = q.reshape(batch, kv_heads, groups * length, head_dim)  # a KV head's query heads side by side
    scores = (q @ k.transpose(-1, -2)).view(batch, kv_heads, groups, length, keys)
    scores = scores.float().mul(scale).masked_fill(~mask.unsqueeze(2), torch.finfo(torch.float32).min)
    weights = scores.softmax(-1).to(v.dtype).view(batch, kv_heads, groups * length, keys)
    return (weights @ v).view(batch, heads, length, head_dim)


PATHS = {"math": math_attention, "sdpa": sdpa_attention, "flex": flex_attention}  # what FLASHAR_ATTENTION may name
