"""The latency benchmarks: latency.py's pass counter and prepacked kernel replay, tables.py's machine-relative
targets, and gpu_ladder.py's Emu3.5-shaped stack, analytic bound and whole flow (tiny models on CPU)."""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import random_gpt

from flashar.compilation import CompileCounter
from flashar.config import SamplingConfig
from flashar.methods.raster import Raster
from flashar.sampling import make_generator

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    """A script of benchmarks/ imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_latency():
    return load_script("latency")


def test_pass_counter_records_every_matmul_and_attention_call_and_replays_them():
    latency = load_latency()
    backbone = random_gpt(0)
    with torch.no_grad():
        counter = latency.count_passes(Raster(backbone), [1], (3, 3), SamplingConfig(cfg_scale=2.0, top_k=5))
    assert len(counter.passes) == 9  # the prefill and 8 steps
    kinds = Counter(kind for kind, *_ in counter.kernels)
    layers = backbone.num_layers
    assert kinds["attention"] == 9 * layers
    assert kinds["linear"] == 9 * layers * 5 + 9  # wqkv, wo, w1, w3, w2 per layer; the head once per pass
    steps = [args for kind, *args in counter.kernels if kind == "attention"][layers:]  # after the prefill
    # CFG rows
    assert {shape for shape, _, _ in steps} == {(2, backbone.dim // backbone.head_dim, 1, backbone.head_dim)}
    assert all(kv is not None and mask.shape[-1] <= kv[0].shape[2] for _, mask, kv in steps)

    # the bound, whole and per kind: bandwidth-bound at 1 byte/s, so each is its kind's bytes and they add up
    ideal = {kinds: counter.ideal_seconds(1.0, 1e30, kinds) for kinds in (("linear",), ("attention",), latency.KINDS)}
    weights = sum(p.numel() * p.element_size() for layer in backbone.layers for p in layer.parameters() if p.ndim > 1)
    head = backbone.codebook_size * backbone.dim * 4
    assert ideal[("linear",)] == pytest.approx(9 * (weights + head))
    assert ideal[("attention",)] > 0
    assert ideal[latency.KINDS] == pytest.approx(ideal[("linear",)] + ideal[("attention",)])

    seconds = counter.kernel_seconds(repeats=1)
    assert set(seconds) == {"all", *latency.KINDS} and all(t > 0 for t in seconds.values())
    assert seconds["linear"] + seconds["attention"] == pytest.approx(seconds["all"])  # shares of one replay
    assert counter.kernels == []  # the record (and the caches it holds) is freed


def test_each_kind_is_timed_inside_the_in_order_replay(monkeypatch):
    """Every call is timed where it runs, between the calls around it, and charged to its own kind."""
    latency = load_latency()
    clock, order = [0.0], []

    def call(name, seconds):
        def run():
            order.append(name)
            clock[0] += seconds
        return run

    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock[0])
    calls = [("linear", call("wqkv", 3.0)), ("attention", call("sdpa", 2.0)), ("linear", call("wo", 0.5)),
             ("attention", call("sdpa", 0.25))]
    times = latency.replay_by_kind(calls, torch.device("cpu"))
    assert order == ["wqkv", "sdpa", "wo", "sdpa"]  # one run, in the recorded order
    assert times == {"all": 5.75, "linear": 3.5, "attention": 2.25}


def test_on_cuda_each_call_is_timed_between_events(monkeypatch):
    """The CUDA branch of the in-order replay (with events faked: no GPU here), in seconds from milliseconds."""
    latency = load_latency()
    clock = [0.0]  # milliseconds of GPU time

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = clock[0]

        def elapsed_time(self, end):
            return end.at - self.at

    def call(milliseconds):
        return lambda: clock.__setitem__(0, clock[0] + milliseconds)

    monkeypatch.setattr(latency.torch.cuda, "Event", Event)
    monkeypatch.setattr(latency, "synchronize", lambda device: None)
    calls = [("attention", call(4.0)), ("linear", call(1.0)), ("attention", call(2.0))]
    times = latency.replay_by_kind(calls, torch.device("cuda"))
    assert times == pytest.approx({"all": 0.007, "linear": 0.001, "attention": 0.006})


def test_replayed_linears_are_the_prepacked_kernels_and_compute_f_linear(monkeypatch):
    import functools

    latency = load_latency()
    for dtype, onednn in itertools.product((torch.float32, torch.bfloat16), (False, True)):
        monkeypatch.setattr(latency, "onednn_fp32_wanted", lambda: onednn)  # fp32 static rows: MKL (Intel) or oneDNN
        weight, x = torch.randn(48, 32, dtype=dtype), torch.randn(5, 32, dtype=dtype)
        for varying in (False, True):
            out = latency.packed_linear(weight, 5, varying)(x)
            torch.testing.assert_close(out, torch.nn.functional.linear(x, weight), atol=1e-4, rtol=1e-2)
    monkeypatch.setitem(latency.CPU_NATIVE, torch.bfloat16, False)  # an AVX2-only CPU: inductor packs no bf16 weight
    assert isinstance(latency.packed_linear(torch.randn(4, 4, dtype=torch.bfloat16), 2), functools.partial)


@pytest.mark.skipif(
    not (torch._C.has_mkl and torch.backends.mkldnn.is_available()), reason="needs MKL and oneDNN (x86)")
def test_the_packing_ab_compiles_each_arm_once_with_its_own_kernel(tmp_path, monkeypatch):
    """fp32_packing.py: MKL against oneDNN on any x86 CPU, whichever the vendor rule picks here."""
    from torch._inductor.utils import run_and_get_code

    script = load_script("fp32_packing")
    monkeypatch.setattr(script, "random_backbone", lambda *args: random_gpt(0))
    monkeypatch.setenv("FLASHAR_CPP_WRAPPER", "0")  # only slows compiling here
    monkeypatch.setenv("FLASHAR_ONEDNN_FP32", "1")  # the script switches it off for both arms; restored after
    torch._dynamo.reset()
    out = tmp_path / "packing.json"
    args = script.argparse.Namespace(model="tiny", grid=3, batch=2, class_id=3, repeats=1, out=str(out))
    report, (onednn, mkl) = run_and_get_code(script.run, args)  # the oneDNN arm compiles first
    assert "mkldnn._linear_pointwise" in onednn and "mkl._mkl_linear" not in onednn
    assert "mkl._mkl_linear" in mkl and "mkldnn._linear_pointwise" not in mkl
    assert report["passes"] == 9 and report["graphs"] == {"mkl": 1, "onednn": 0}  # oneDNN's compiled before timing
    assert report["onednn_speedup"] > 0 and 0.0 <= report["same_codes"] <= 1.0 and out.exists()
    assert torch.is_grad_enabled(), "the benchmark turns gradients off for itself only"


def test_the_matmul_probe_shrinks_where_one_product_would_be_slow(monkeypatch):
    """bf16 emulated on an AVX2 CPU multiplies at ~19 GFLOP/s: 2,048-side products would take 17 s a probe."""
    latency = load_latency()
    sides, randn = [], torch.randn
    monkeypatch.setattr(latency.torch, "randn", lambda *size, **kw: sides.append(size[0]) or randn(*size, **kw))
    assert latency.measure_matmul(torch.device("cpu"), torch.float32, n=768, budget_s=1e9) > 0
    assert latency.measure_matmul(torch.device("cpu"), torch.float32, n=768, budget_s=1e-9) > 0
    assert sides == [512, 768, 512, 512]  # the 512-side timing probe, then the side used


def test_step_costs_time_every_step_call_and_profile_a_window_of_them():
    latency = load_latency()
    method = Raster(random_gpt(0))
    with torch.no_grad():
        costs = latency.step_costs(method, [1], (3, 4), SamplingConfig(cfg_scale=2.0, top_k=5), first=2, count=4)
    assert costs["kernels_per_step"] == 0 and costs["host_us_per_step"] > 0  # CUDA kernels only; none on CPU
    assert method.step == method._step  # the wrapper is gone


def test_guarded_host_time_is_measured_with_guards_on_and_the_setting_restored(monkeypatch):
    import flashar.decoding as decoding

    latency = load_latency()
    calls = []
    guards_skipped = decoding.guards_skipped

    def recorded(skip):
        calls.append((skip, os.environ.get("FLASHAR_SKIP_GUARDS")))
        return guards_skipped(skip)

    monkeypatch.setattr(decoding, "guards_skipped", recorded)
    monkeypatch.setenv("FLASHAR_SKIP_GUARDS", "1")
    torch._dynamo.reset()
    method = Raster(random_gpt(0), compile=True, compile_backend=CompileCounter())
    sampling = SamplingConfig(cfg_scale=2.0, top_k=5)
    with torch.no_grad():
        method.generate([1], (3, 4), sampling, make_generator(0, "cpu"))  # the first generation: guarded
        assert latency.guarded_host_us(method, [1], (3, 4), sampling) > 0
    assert calls == [(False, "1"), (True, "0")]  # a warm state, with the setting off while measured
    assert os.environ["FLASHAR_SKIP_GUARDS"] == "1"  # and restored


def load_tables():
    return load_script("tables")


def test_targets_are_judged_against_the_receipts_own_bounds():
    def row(method, median, ideal, **extra):
        return {"model": "GPT-B", "dtype": "bfloat16", "grid": "32x32", "batch": 1, "method": method,
                "median_s": median, "ideal_s": ideal, "graphs": 1, "recompiles": 0, **extra}

    report = {"cpu": "Some CPU", "threads": 1, "rows": [
        row("raster/eager", 30.0, 10.0), row("raster/compiled", 19.0, 10.0),
        row("flashar/eager", 3.0, 2.0), row("flashar/compiled", 2.0, 2.0),
        # a GPU-style row: its launch floor, not the roofline, is the bound
        row("zipar/compiled", 0.5, 0.01, bound_s=0.3)]}
    text = load_tables().targets(report)
    assert "met      GPT-B bfloat16 32x32 batch 1: raster/compiled at 1.90x its bound" in text
    assert "NOT met  GPT-B bfloat16 32x32 batch 1: flashar/compiled 1.50x faster than eager" not in text  # 1.5 >= 1.2
    assert "met      GPT-B bfloat16 32x32 batch 1: zipar/compiled at 1.67x its bound" in text
    # ideal ratio 10 / 2 = 5x on this machine; measured 9.5x >= 0.8 x 5x
    assert "flashar/compiled vs raster/compiled 9.50x; this machine's ideal 5.00x, target >= 4.00x" in text
    assert text.splitlines()[-1] == "7 of 7 targets met on Some CPU, 1 threads"


def test_the_latency_table_sets_each_kind_of_replayed_kernel_against_its_own_bound():
    row = {"model": "GPT-B", "dtype": "float32", "grid": "32x32", "batch": 1, "forward_passes": 63, "median_s": 3.0,
           "vs_raster": 6.0, "ideal_s": 1.0, "vs_roofline": 3.0, "kernel_s": 2.5, "vs_kernels": 1.2, "compile_s": 9.0,
           "graphs": 1, "kernel_s_by_kind": {"linear": 1.5, "attention": 0.9},
           "ideal_s_by_kind": {"linear": 0.75, "attention": 0.3}}
    report = {"cpu": "Some CPU", "threads": 2, "torch": "2.x", "bandwidth_gbs": 20.0,
              "matmul_gflops": {"float32": 300.0},
              "rows": [row | {"method": "flashar/eager"}, row | {"method": "flashar/compiled"}]}
    text = load_tables().latency(report)
    split = [line for line in text.splitlines() if line.startswith("| GPT-B | float32 | 32x32 | 1 | flashar |")]
    # once per method
    assert split == ["| GPT-B | float32 | 32x32 | 1 | flashar | 1.500 | 0.750 | 2.00 | 0.900 | 0.300 | 3.00 |"]


def test_the_receipt_plot_draws_each_rows_median_beside_its_bound_and_the_target(tmp_path):
    rows = [{"model": "GPT-B", "dtype": "float32", "grid": "32x32", "batch": 1, "method": method, "median_s": median,
             "ideal_s": 2.0, **extra}
            for method, median, extra in (("raster/eager", 9.0, {}), ("raster/compiled", 3.0, {"bound_s": 2.5}))]
    fig = load_tables().plot({"cpu": "Some CPU", "threads": 2, "rows": rows}, tmp_path / "receipt.png")
    assert (tmp_path / "receipt.png").read_bytes().startswith(b"\x89PNG")
    ax = fig.axes[0]
    assert sorted(bar.get_width() for bar in ax.patches) == [3.0, 9.0]
    bounds, targets = (sorted(points.get_offsets()[:, 0].tolist()) for points in ax.collections)
    assert bounds == [2.0, 2.5] and targets == [4.0, 5.0]  # the launch floor where a row has one


LADDER = BENCHMARKS / "gpu_ladder.py"


def load_ladder():
    return load_script("gpu_ladder")


def test_the_emu35_shaped_stack_runs_the_real_qwen3_layers_with_a_stub_prompt():
    ladder = load_ladder()
    backbone = ladder.emu35_stack(torch.device("cpu"), layers=2, tiny=True)
    assert backbone.backend_id == "emu35" and backbone.num_layers == 2 and backbone.dtype == torch.bfloat16
    assert (backbone.num_kv_heads, backbone.layers[0].self_attn.q_proj.weight.shape) == (2, (128, 64))  # grouped heads
    with torch.no_grad():
        codes = Raster(backbone).generate(["a photo"], (2, 2), SamplingConfig(cfg_scale=2.0, top_k=5),
                                         make_generator(0, "cpu")).codes
    assert codes.shape == (1, 2, 2)


def test_the_analytic_bound_is_weight_bound_for_raster_and_counts_flashars_extra_reads():
    ladder = load_ladder()
    latency = load_latency()
    backbone = random_gpt(0)
    peaks = latency.Peaks(torch.device("cpu"))
    peaks.bandwidth, peaks.matmul = 1e9, {"bfloat16": 1e15}  # bandwidth-bound
    raster = ladder.analytic_ideal(backbone, False, (4, 4), 16, peaks)
    flashar = ladder.analytic_ideal(backbone, True, (4, 4), 7, peaks)
    per_layer = sum(p.numel() for p in backbone.layers[0].parameters() if p.ndim > 1)
    weights = 2 * (backbone.num_layers * per_layer + backbone.codebook_size * backbone.dim)
    assert 16 * weights / 1e9 < raster < 1.5 * 16 * weights / 1e9
    assert flashar < raster and flashar > 7 * weights / 1e9  # fewer passes, each reading more


@pytest.mark.slow
def test_the_gpu_script_runs_end_to_end_on_cpu_with_tiny_models(tmp_path):
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "ladder.json"
    # the C++ wrapper only slows compiling here
    subprocess.run(
        [sys.executable, str(LADDER), "--tiny", "--device", "cpu", "--methods", "raster,flashar", "--ladder", "GPT-L",
         "--grids", "4", "--emu35-layers", "2", "--repeats", "1", "--budget-s", "1e9", "--out", str(out)],
        check=True,
        timeout=3600,  # 2 Emu3.5 layers: compiling all 64 tiny ones took 4 of 11 minutes on an AVX2 CPU
        env={**os.environ, "FLASHAR_CPP_WRAPPER": "0"},
    )
    report = json.loads(out.read_text())
    assert {r["method"] for r in report["rows"]} == {"raster/eager", "raster/compiled", "flashar/eager",
                                                     "flashar/compiled"}
    assert [(r["model"], r["method"]) for r in report["ladder"]] == [
        ("GPT-B", "raster/compiled"), ("GPT-B", "flashar:buckets=1/compiled"),  # through the other attention path
        ("Emu3.5-34B", "raster/compiled"), ("Emu3.5-34B", "flashar:buckets=1/compiled"),
        ("GPT-L", "raster/compiled"), ("GPT-L", "flashar:buckets=1/compiled")]
    assert all(r["graphs"] == 1 and r["recompiles"] == 0 for r in report["ladder"])
    assert report["skipped"] == report["failed"] == [] and report["ladder"][0]["attention"] == "math"
    assert "Emu3.5-34B" in load_tables().ladder(report)


def test_a_failing_ladder_arm_costs_only_itself_and_the_budget_skips_the_rest():
    ladder = load_ladder()
    report, saved, clock = {"ladder": [], "skipped": [], "failed": []}, [], iter(range(10))

    def arm(model, side, attention):
        if model == "GPT-3B":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return [{"model": model}]

    configs = [("GPT-B", 32, "math"), ("GPT-3B", 32, None), ("GPT-L", 24, None), ("GPT-XL", 24, None)]
    ladder.run_arms(
        configs, arm, report, over=lambda: next(clock) >= 3, save=lambda: saved.append(len(report["ladder"])))
    assert report["ladder"] == [{"model": "GPT-B"}, {"model": "GPT-L"}]
    assert report["failed"] == ["GPT-3B 32x32: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"]
    assert report["skipped"] == ["GPT-XL 24x24"] and saved == [1, 1, 2]
    text = load_tables().ladder({**report, "ladder": [], "gpu": "a GPU", "torch": "2", "options": {}, "node_us": 1.0})
    assert text.endswith("Skipped for time: GPT-XL 24x24. Failed: GPT-3B 32x32: OutOfMemoryError: CUDA out of memory. "
                         "Tried to allocate 2.00 GiB.")


def test_the_digits_table_speaks_for_every_timed_flashar_adapter():
    """tables.py digits: each timed FlashAR variant gets its own time and speedup, and each checks block a line
    (a receipt from before row lag, with flashar's speedup only at the top, still renders)."""
    metrics = {"fid": 1.0, "kid": 1.0, "inception_score": 1.0, "precision": 0.5, "recall": 0.5, "class_accuracy": 0.5,
               "two_sample_accuracy": 0.5, "held_out_nll": 0.5, "forward_passes": 31}
    timing = {"latency": {"batch": 1, "speedup": 4.0, "raster": {"median_seconds": 0.4, "speedup": 1.0},
                          "flashar": {"median_seconds": 0.1, "speedup": 4.0},
                          "flashar (row lag 2)": {"median_seconds": 0.125, "speedup": 3.2}}}
    report = {"environment": {"cpu": "Some CPU", "threads": 2, "torch": "2"}, "samples_per_seed": 10, "seeds": [0],
              "sampling": {}, "methods": {"raster": metrics, "flashar": metrics}, "real": {}, "timing": timing,
              "checks": {"at_least_4x_faster": True}, "checks_row_lag_2": {"at_least_4x_faster": False}}
    text = load_tables().digits(report)
    assert "raster 0.400 s, flashar 0.100 s (4.00x), flashar (row lag 2) 0.125 s (3.20x)" in text
    assert text.splitlines()[-2:] == ["Checks: at_least_4x_faster yes.", "Checks (row lag 2): at_least_4x_faster NO."]
    lag1 = {**report, "checks_row_lag_1": report["checks_row_lag_2"]}  # today's receipts: the default is lag 2
    del lag1["checks_row_lag_2"]
    assert load_tables().digits(lag1).splitlines()[-1] == "Checks (row lag 1): at_least_4x_faster NO."
    old = {**report, "timing": {"latency": {"batch": 1, "speedup": 4.0, "raster": {"median_seconds": 0.4},
                                            "flashar": {"median_seconds": 0.1}}}}
    del old["checks_row_lag_2"]
    assert "raster 0.400 s, flashar 0.100 s (4.00x)" in load_tables().digits(old)
