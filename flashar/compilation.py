"""The one place where flashar configures torch.compile.

Decode steps are compiled with ``fullgraph=True, dynamic=False``: a graph break or a recompile is a bug.
On CUDA the mode is ``reduce-overhead`` (CUDA graphs). Tests pass ``backend="eager"`` to check tracing
without inductor. ``mode="max-autotune"`` also autotunes every matmul shape at the first compile: on CPU
against inductor's C++ GEMM templates (AMX / AVX-512 micro-kernels on the frozen weights), on CUDA
against Triton templates (still with CUDA graphs). A method whose per-step work varies in size (FlashAR's
diagonals) may mark that one dimension dynamic off CUDA (``flashar.shapes``): still one graph, without padded
compute. Off Intel CPUs, frozen fp32 linears are packed for oneDNN rather than MKL
(:func:`onednn_fp32_linears`).
"""

from __future__ import annotations

import contextlib
import functools
import types
import typing
from pathlib import Path
from typing import Any, Callable

import torch

from flashar.config import CompileMode, CompileSettings

COMPILE_MODES: tuple[str, ...] = typing.get_args(CompileMode)



def compile_step(fn: Callable, device: torch.device | str, backend: str | Callable = "inductor",
                 mode: CompileMode = "default") -> Callable:
    """Compile a decode step once; CUDA graphs on GPU."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
    device, fn = torch.device(device), own_code(fn)
    # One graph per static shape (e.g. flashar --buckets N builds N). That a generation compiles once is
    # checked by counting compilations, not by this limit.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if backend != "inductor":
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)
    if device.type == "cuda":
        cuda_mode = "max-autotune" if mode == "max-autotune" else "reduce-overhead"  # both with CUDA graphs
        return torch.compile(fn, fullgraph=True, dynamic=False, mode=cuda_mode)
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    # Dynamo reads `freezing` while tracing (with grad off, which every decode loop has), so the flags are
    # set around each call, not passed as backend options.
    settings = CompileSettings.from_env()  # freezing and the C++ wrapper, each on unless switched off
    switches = (("freezing", settings.freeze_weights), ("cpp_wrapper", settings.cpp_wrapper))
    flags: dict[str, Any] = {flag: True for flag, on in switches if on}
    if mode == "max-autotune":
        flags |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                  "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}  # not on stderr
    onednn = settings.freeze_weights and onednn_fp32_wanted()
    if not flags and not onednn:
        return compiled

    @functools.wraps(fn)
    def configured(*args, **kwargs):
        with torch._inductor.config.patch(**flags), onednn_fp32_linears(onednn):
            return compiled(*args, **kwargs)

    return configured


def cpuinfo(field: str) -> str:
    """A field of the first CPU in ``/proc/cpuinfo`` ("vendor_id", "model name"); "" where it cannot be read
    (not Linux, or no such field)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(field))
    except (OSError, StopIteration):
        return ""


def cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD"), "" where it cannot be read."""
    return cpuinfo("vendor_id")


def onednn_fp32_wanted() -> bool:
    """Whether compiled steps pack their frozen fp32 linears for oneDNN where inductor would pick MKL: on x86 CPUs
    not made by Intel (MKL is Intel's library), unless FLASHAR_ONEDNN_FP32=0.

    Inductor packs a linear with a static row count (raster's steps) for MKL, and one with a dynamic row count
    (FlashAR's diagonals) or in bf16 for oneDNN. On an AVX2 AMD EPYC, compiled raster GPT-B 32x32 fp32 ran 1.77x
    faster packed for oneDNN (``benchmarks/fp32_packing.py``, receipt ``fp32_packing_avx2.json``)."""
    return torch._C.has_mkl and cpu_vendor() not in ("GenuineIntel", "") and CompileSettings.from_env().onednn_fp32


@contextlib.contextmanager
def onednn_fp32_linears(on: bool = True):
    """Within it (when ``on``), inductor's weight freezing packs fp32 linears for oneDNN, as it packs bf16 ones.

    Inductor has no setting for this. Its freezing pass picks oneDNN over MKL where oneDNN runs on Arm's
    compute library (``_is_mkldnn_acl_supported``), so the pass is told so while it runs. The pass asks it
    once more, whether an fp32 linear may be packed at all, which on a CPU with MKL it already may.
    ``tests/test_compilation.py`` checks the kernels a compiled linear then calls."""
    from torch._inductor.fx_passes import mkldnn_fusion

    ops = getattr(mkldnn_fusion, "mkldnn", None)
    if not on or ops is None:
        yield
        return
    mkldnn_fusion.mkldnn = _OneDNNEverywhere(ops)  # type: ignore[assignment]  # the same ops, one answer changed
    try:
        yield
    finally:
        mkldnn_fusion.mkldnn = ops


class _OneDNNEverywhere:
    """``torch.ops.mkldnn`` as inductor's freezing pass sees it in :func:`onednn_fp32_linears`."""

    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        return getattr(self._ops, name)

    @staticmethod
    def _is_mkldnn_acl_supported() -> bool:
        return True


def guards_skipped(skip: bool) -> contextlib.AbstractContextManager:
    """Within it, compiled steps run without evaluating their guards when ``skip`` (and FLASHAR_SKIP_GUARDS is
    not 0): for a decode state whose every step shape has already run, so no step can need a new graph."""
    if skip and CompileSettings.from_env().skip_guards:
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
    return contextlib.nullcontext()


def own_code(fn: Callable) -> Callable:
    """``fn`` (a function or bound method) over a copy of its code object.

    Dynamo caches graphs on the code object, so without this every instance of a method class would share
    one cache: a second instance (another compile mode, other options) would silently run the graph the
    first one built whenever its guards pass, and report no compilation of its own."""
    func = getattr(fn, "__func__", fn)
    copy = types.FunctionType(
        func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = func.__kwdefaults__, func.__qualname__
    owner = getattr(fn, "__self__", None)
    return types.MethodType(copy, owner) if owner is not None else copy


class CompileCounter:
    """A torch.compile backend that counts compilations and runs the graph eagerly (for tests)."""

    def __init__(self):
        self.frames = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.frames += 1
        return gm.forward


def mark_static(*tensors: torch.Tensor) -> None:
    """Mark tensors that outlive a compiled step (a decode state's tables, the buffers it mutates or the loop
    refills, KV caches) as static addresses: CUDA graphs then read and replay into them in place instead of
    copying them in (or skipping the graph). They must outlive the graph: methods keep their states across
    generations. A no-op off CUDA."""
    for tensor in tensors:
        if tensor.device.type == "cuda":
            torch._dynamo.mark_static_address(tensor)
