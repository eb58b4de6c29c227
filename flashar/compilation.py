"""The one place where flashar configures torch.compile.

Decode steps are compiled with ``fullgraph=True, dynamic=False``: a graph break or a recompile is a bug.
On CUDA the mode is ``reduce-overhead`` (CUDA graphs). Tests pass ``backend="eager"`` to check tracing
without inductor. A method whose per-step work varies in size (FlashAR's diagonals) may mark that one
dimension dynamic off CUDA (:func:`mark_dynamic_length`): still one graph, without padded compute.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch


def compile_step(fn: Callable, device: torch.device | str, backend: str | Callable = "inductor") -> Callable:
    """Compile a decode step once; CUDA graphs on GPU."""
    device = torch.device(device)
    # One graph per static shape per method instance, and every instance of a method class shares the code
    # object dynamo caches on (e.g. flashar with --buckets 16 beside flashar in a comparison). That a
    # generation compiles once is checked by counting compilations, not by this limit.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if backend != "inductor":
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)
    if device.type == "cuda":
        return torch.compile(fn, fullgraph=True, dynamic=False, mode="reduce-overhead")
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    if os.environ.get("FLASHAR_FREEZE_WEIGHTS", "1") == "0":
        return compiled

    @functools.wraps(fn)
    def frozen(*args, **kwargs):
        # Dynamo reads this flag while tracing (with grad off, which every decode loop has), so it must be
        # set around the call, not passed as a backend option. Weights become constants of the graph.
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return frozen


class CompileCounter:
    """A torch.compile backend that counts compilations and runs the graph eagerly (for tests)."""

    def __init__(self):
        self.frames = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.frames += 1
        return gm.forward


def mark_static(*tensors: torch.Tensor) -> None:
    """Mark decode-state buffers that a compiled step mutates in place, or that the loop refills between
    steps, as static addresses: CUDA graphs then replay into them instead of copying or skipping the graph.
    A no-op off CUDA."""
    for tensor in tensors:
        if tensor.device.type == "cuda":
            torch._dynamo.mark_static_address(tensor)


def mark_dynamic_length(tensors, dim: int, longest: int, shortest: int = 2) -> None:
    """Let ``dim`` of these tensors take any size in [shortest, longest] within one compiled graph, off CUDA.

    CUDA graphs need static shapes, so there (and for sizes below 2, which dynamo specialises) the caller
    pads instead. Tensors are index tables a step receives; everything sized from them follows (a size
    derived from them must not reach 1 either: ``shortest`` says how far the caller keeps it away)."""
    shortest = max(shortest, 2)
    for tensor in tensors:
        if tensor.device.type != "cuda" and shortest <= tensor.shape[dim] <= longest and longest > shortest:
            torch._dynamo.mark_dynamic(tensor, dim, min=shortest, max=longest)
