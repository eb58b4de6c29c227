"""How flashar compiles decode steps: inductor on CPU runs with frozen weights behind a C++ wrapper (each
switchable off), max-autotune tunes matmuls, and every method instance compiles its own step."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import random_gpt

from flashar.compilation import CompileCounter, compile_step, guards_skipped
from flashar.config import RuntimeConfig, SamplingConfig
from flashar.errors import FlashARError
from flashar.sampling import make_generator


SWITCHES = ("FLASHAR_FREEZE_WEIGHTS", "FLASHAR_CPP_WRAPPER")


@pytest.mark.slow
@pytest.mark.parametrize("off", [(), ("FLASHAR_FREEZE_WEIGHTS",), ("FLASHAR_CPP_WRAPPER",), SWITCHES])
def test_cpu_steps_are_built_frozen_behind_a_cpp_wrapper_unless_switched_off(monkeypatch, off):
    """What inductor builds for a compiled CPU step: frozen weights packed into a oneDNN or MKL linear, called from
    a C++ wrapper; each environment switch turns its part off, the numbers stay the same, and the inductor
    settings are set around the step only, never left on."""
    from torch._inductor.utils import run_and_get_code

    for switch in SWITCHES:
        if switch in off:
            monkeypatch.setenv(switch, "0")
        else:
            monkeypatch.delenv(switch, raising=False)
    linear, x = torch.nn.Linear(64, 48).eval(), torch.randn(2, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        out, codes = run_and_get_code(compile_step(linear.forward, "cpu"), x)
    code = "\n".join(codes)
    assert ("_linear_pointwise" in code or "_mkl_linear" in code) == ("FLASHAR_FREEZE_WEIGHTS" not in off)
    assert ("inductor_entry_impl" in code and "def call(" not in code) == ("FLASHAR_CPP_WRAPPER" not in off)
    torch.testing.assert_close(out, linear(x))
    assert not torch._inductor.config.freezing and not torch._inductor.config.cpp_wrapper


def test_max_autotune_tunes_matmuls_quietly_on_cpu(monkeypatch):
    monkeypatch.delenv("FLASHAR_FREEZE_WEIGHTS", raising=False)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    config = torch._inductor.config
    seen = []
    step = compile_step(lambda: seen.append((config.freezing, config.max_autotune, config.max_autotune_gemm_backends,
                                             config.autotune_num_choices_displayed)), "cpu", mode="max-autotune")
    step()
    assert seen == [(True, True, "CPP,ATEN", 0)]
    assert not config.max_autotune


@pytest.mark.skipif(
    not (torch._C.has_mkl and torch.backends.mkldnn.is_available()), reason="needs MKL and oneDNN (x86)")
def test_frozen_fp32_linears_are_packed_for_onednn_off_intel_cpus(monkeypatch):
    """Inductor packs a static-row fp32 linear for MKL; off Intel CPUs (raster 1.77x faster on an AVX2 EPYC)
    compiled steps get oneDNN's kernel instead, the same numbers, and the switch is not left on."""
    from torch._inductor.fx_passes import mkldnn_fusion
    from torch._inductor.utils import run_and_get_code

    import flashar.compilation as compilation

    linear = torch.nn.Linear(64, 48).eval()
    x = torch.randn(2, 64)
    mkl, onednn = "mkl._mkl_linear", "mkldnn._linear_pointwise"
    for vendor, setting, kernel, other in [("GenuineIntel", "1", mkl, onednn), ("AuthenticAMD", "1", onednn, mkl),
                                           ("AuthenticAMD", "0", mkl, onednn)]:
        torch._dynamo.reset()
        monkeypatch.setattr(compilation, "cpu_vendor", lambda: vendor)
        monkeypatch.setenv("FLASHAR_ONEDNN_FP32", setting)
        monkeypatch.setenv("FLASHAR_CPP_WRAPPER", "0")  # only slows compiling here
        with torch.no_grad():
            out, (code, *_) = run_and_get_code(compile_step(linear.forward, "cpu"), x)
        assert kernel in code and other not in code, (vendor, setting)
        torch.testing.assert_close(out, linear(x))
    assert mkldnn_fusion.mkldnn is torch.ops.mkldnn


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        compile_step(lambda: None, "cpu", mode="fast")


def test_every_method_instance_compiles_its_own_step():
    """Dynamo caches on code objects: without a copy per instance, a second instance would run the first's graph."""
    from flashar.methods.raster import Raster

    torch._dynamo.reset()
    backbone = random_gpt()
    counter = CompileCounter()
    for _ in range(2):
        Raster(backbone, compile=True, compile_backend=counter).generate(
            [1], (2, 3), SamplingConfig(), make_generator(0, "cpu"))
    assert counter.frames == 2


def test_compile_mode_needs_compile():
    from flashar.api import validated

    assert RuntimeConfig(compile=True, compile_mode="max-autotune").compile_as == "max-autotune"
    assert RuntimeConfig().compile_as is False
    with pytest.raises(FlashARError, match="add --compile"):
        validated(RuntimeConfig, {"compile_mode": "max-autotune"}, "runtime")


def test_max_autotune_tunes_dynamic_lengths_for_the_longest(monkeypatch):
    """Autotuning picks kernels for the size hint: the longest diagonal, not the first (shortest) one."""
    from flashar.methods.raster import Raster

    seen = []
    monkeypatch.setattr(torch._dynamo, "mark_dynamic", lambda t, dim, **kwargs: seen.append(kwargs["hint_override"]))
    backbone = random_gpt()
    for compile in (True, "max-autotune"):
        Raster(backbone, compile=compile).shapes.mark_dynamic([torch.zeros(5)], 0, 9, 3)
    assert seen == [None, 9]


SCALE = 2.0  # read by the compiled function below: dynamo guards on its value


def scaled(x):
    return x * SCALE


def test_guards_skipped_runs_the_graph_it_has_without_checking_its_guards(monkeypatch):
    torch._dynamo.reset()
    step = torch.compile(scaled, backend=CompileCounter(), fullgraph=True)
    x = torch.ones(3)
    assert step(x).tolist() == [2.0] * 3
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)
    with guards_skipped(True):
        assert step(x).tolist() == [2.0] * 3  # the guard on SCALE is not evaluated: the old graph runs
    monkeypatch.setenv("FLASHAR_SKIP_GUARDS", "0")
    with guards_skipped(True):
        assert step(x).tolist() == [3.0] * 3  # switched off: guarded, so it recompiles
    monkeypatch.delenv("FLASHAR_SKIP_GUARDS")
    with guards_skipped(False):
        assert step(x).tolist() == [3.0] * 3
