"""Attention at decode shapes: each path of ``flashar.attention``, side by side, eager and compiled.

    python benchmarks/attention.py                                  # CPU, torch's threads, bf16 and fp32
    python benchmarks/attention.py --device cuda --dtypes bfloat16  # on a GPU

Paths: ``sdpa`` (``flashar.attention.sdpa_attention``, PyTorch's fused ``scaled_dot_product_attention``: on
CPU its flash kernel, grouped heads native), ``math`` (the explicit matmul -> float32 masked softmax ->
matmul of ``flashar.attention.math_attention``), ``sdpa_math`` (SDPA forced onto its math backend, which
inductor decomposes into its own kernels), ``flex`` (``flashar.attention.flex_attention``, FlexAttention with
the mask read by a score modifier; compiled mode only, as it is fused only there) and, for grouped heads only,
``sdpa_repeat`` (SDPA over KV heads copied per query head, as the backends called it before). Shapes
are the attention calls of LlamaGen GPT-B decode steps with CFG (2 rows, 12 heads, head dim 64: raster's
one query, FlashAR's diagonals of 32 and 64 cells, a 1,025-token prefill) and of an Emu3.5-shaped grouped-query
stack scaled to 8 heads per KV head. Every call times all paths in turn (interleaved), ``--repeats`` times;
on CPU with one thread the clock is the calling thread's CPU time (robust to a shared machine's
descheduling), with more threads and on CUDA wall time between synchronisations (pin threads).

Cold caches (``--cold-mib``, default 1024): a decode step reads each layer's KV cache after the weights of
the layers before have streamed through the last-level cache, so each timed call reads a copy of the KV
cache that no call has touched within the last ``--cold-mib`` MiB of copies (several times the 300 MiB L3
of the receipts' Xeon). A single cache re-read call after call stays in that L3 and flatters the paths that
re-read it (the two matmuls of ``math``); ``--cold-mib 0`` measures that warm case.

Medians; ``x sdpa`` = sdpa's median / the path's; ``auto`` is the path ``attention_path`` picks, ``best``
the fastest measured. The JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashar.attention import PATHS as LIBRARY_PATHS
from flashar.attention import attention_path, sdpa_attention
from flashar.compare import cpu_model
from flashar.batches import synchronize

RESULTS = Path(__file__).resolve().parent / "results"

# label: (batch rows, heads, KV heads, queries T, keys S, head dim)
SHAPES = {
    "raster 16x16": (2, 12, 12, 1, 257, 64),
    "raster 32x32": (2, 12, 12, 1, 1025, 64),
    "flashar T=32": (2, 12, 12, 32, 1057, 64),
    "flashar T=64": (2, 12, 12, 64, 1057, 64),
    "T=128": (2, 12, 12, 128, 1057, 64),
    "prefill 1025": (2, 12, 12, 1025, 1025, 64),
    "gqa x8 T=1": (2, 16, 2, 1, 1025, 128),
    "gqa x8 T=8": (2, 16, 2, 8, 1057, 128),
    "gqa x8 T=32": (2, 16, 2, 32, 1057, 128),
}


def sdpa_math(q, k, v, mask):
    with sdpa_kernel(SDPBackend.MATH):
        return sdpa_attention(q, k, v, mask)


def sdpa_repeated(q, k, v, mask):
    """SDPA over KV heads copied per query head (what the backends did before grouped heads went native)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


PATHS = {**LIBRARY_PATHS, "sdpa_math": sdpa_math, "sdpa_repeat": sdpa_repeated}
COMPILED_ONLY = {"flex"}


def inputs(shape, dtype, device):
    """q (B, H, T, hd), a KV cache (B, H_kv, S, hd) and a causal-style mask (1, 1, T, S) over its last T slots."""
    batch, heads, kv_heads, queries, keys, head_dim = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, h, n, head_dim, generator=g).to(device, dtype)
               for h, n in ((heads, queries), (kv_heads, keys), (kv_heads, keys)))
    mask = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)[None, None].to(device)
    return q, k, v, mask


def clock_for(device) -> Callable[[], float]:
    """Wall time between synchronisations on CUDA or with several threads (the thread's CPU time would miss
    the other threads' work); the calling thread's CPU time with one thread."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time

    def wall() -> float:
        synchronize(device)
        return time.perf_counter()

    return wall


def cold_caches(k: Tensor, v: Tensor, cold_mib: int) -> list[tuple[Tensor, Tensor]]:
    """Copies of the KV cache (k, v), as many as it takes to pass ``cold_mib`` MiB of them (one if 0), so that
    cycling through them reads each one after the others have pushed it out of the last-level cache."""
    nbytes = (k.numel() + v.numel()) * k.element_size()
    copies = max(1, -(-cold_mib * 2**20 // nbytes)) if cold_mib else 1
    return [(k, v)] + [(k.clone(), v.clone()) for _ in range(copies - 1)]


def measure(
    fns: dict, q: Tensor, caches: list[tuple[Tensor, Tensor]], mask: Tensor, device, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, called in turn ``repeats`` times after two warm-ups, every
    call on the next of ``caches`` in turn."""
    clock, turn = clock_for(device), itertools.cycle(caches)
    for fn in fns.values():
        fn(q, *next(turn), mask), fn(q, *next(turn), mask)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            kv = next(turn)
            began = clock()
            fn(q, *kv, mask)
            times[name].append(clock() - began)
    return {name: statistics.median(t) for name, t in times.items()}


def run(args) -> dict:
    device = torch.device(args.device)
    report = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(), "cpu": cpu_model(),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "clock": "thread CPU time" if clock_for(device) is time.thread_time else "wall",
              "cold_mib": args.cold_mib, "rows": []}
    shapes = {k: v for k, v in SHAPES.items() if not args.shapes or k in args.shapes.split(",")}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for label, shape in shapes.items():
            q, k, v, mask = inputs(shape, dtype, device)
            reference = sdpa_repeated(q.float(), k.float(), v.float(), mask)
            caches = cold_caches(k, v, args.cold_mib)
            for mode in args.modes.split(","):
                torch._dynamo.reset()
                paths = [p for p in args.paths.split(",") if (p != "sdpa_repeat" or shape[1] != shape[2])
                         and (p not in COMPILED_ONLY or mode != "eager")]
                fns = {p: PATHS[p] if mode == "eager" else torch.compile(PATHS[p], fullgraph=True, dynamic=False)
                       for p in paths}
                medians = measure(fns, q, caches, mask, device, args.repeats)
                error = {p: (fn(q, k, v, mask).float() - reference).abs().max().item() for p, fn in fns.items()}
                row = {"dtype": dtype_name, "shape": label, "sizes": shape, "mode": mode,
                       "us": {p: t * 1e6 for p, t in medians.items()},
                       "x_sdpa": {p: medians["sdpa"] / t for p, t in medians.items()} if "sdpa" in medians else {},
                       "max_abs_error_vs_fp32": error, "auto": attention_path(q, k),
                       "best": min(medians, key=medians.get)}
                report["rows"].append(row)
                print(line(row), flush=True)
    return report


def line(row: dict) -> str:
    times = "  ".join(f"{p} {us:9.1f} us ({row['x_sdpa'].get(p, float('nan')):5.2f}x)" for p, us in row["us"].items())
    return f"{row['dtype']:9} {row['mode']:8} {row['shape']:14} {times}  auto {row['auto']}, best {row['best']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--paths", default="sdpa,math,sdpa_math,flex,sdpa_repeat",
                        help=f"of {', '.join(PATHS)}; sdpa first for the ratios")
    parser.add_argument("--shapes", default="", help=f"labels to run (default all): {', '.join(SHAPES)}")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (CPU; default: torch's, as decoding runs); the receipt records it")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cold-mib", type=int, default=1024,
                        help="MiB of KV-cache copies cycled through, so each call reads a cold "
                        "cache as a decode step does (0: one cache, warm)")
    parser.add_argument("--out", default=str(RESULTS / "attention_cpu.json"))
    args = parser.parse_args()
    if args.cold_mib < 0:
        parser.error(f"--cold-mib must be 0 (one warm cache) or more, not {args.cold_mib}")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch._dynamo.config.cache_size_limit = 256  # a graph per shape, path and dtype
    report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
