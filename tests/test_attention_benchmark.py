"""benchmarks/attention.py: every timed call reads a cold KV cache, and the whole flow on a tiny shape."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from test_latency_benchmark import load_script


def test_cold_caches_pass_the_budget_and_every_call_reads_the_next_one():
    bench = load_script("attention")
    k, v = torch.zeros(1, 2, 64, 8), torch.zeros(1, 2, 64, 8)  # 8 KiB together in float32
    caches = bench.cold_caches(k, v, cold_mib=1)
    assert len(caches) == 128 and caches[0] == (k, v)
    assert len({t.data_ptr() for pair in caches for t in pair}) == 256  # distinct memory, not views
    assert bench.cold_caches(k, v, cold_mib=0) == [(k, v)]

    seen = []
    bench.measure({"a": lambda q, k, v, mask: seen.append(k), "b": lambda q, k, v, mask: seen.append(k)}, None,
                  caches[:3], None, torch.device("cpu"), repeats=2)
    assert [id(t) for t in seen] == [id(caches[i % 3][0]) for i in range(8)]  # warm-ups, then one cache per call


def test_a_thread_clock_only_when_one_thread_does_all_the_work():
    bench = load_script("attention")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert bench.clock_for(torch.device("cpu")) is bench.time.thread_time
        torch.set_num_threads(2)
        assert bench.clock_for(torch.device("cpu")) is not bench.time.thread_time
    finally:
        torch.set_num_threads(threads)


def test_the_benchmark_times_every_path_on_cold_copies(monkeypatch):
    bench = load_script("attention")
    monkeypatch.setattr(bench, "SHAPES", {"tiny gqa": (2, 4, 2, 3, 17, 8)})
    args = argparse.Namespace(device="cpu", dtypes="float32", modes="eager,compiled",
                              paths="sdpa,math,flex,sdpa_repeat", shapes="", repeats=2, cold_mib=1)
    report = bench.run(args)
    assert torch.is_grad_enabled()  # the script's global settings stay in its main()
    assert report["cold_mib"] == 1
    eager, compiled = report["rows"]
    assert set(eager["us"]) == {"sdpa", "math", "sdpa_repeat"}  # flex is fused only when compiled
    assert set(compiled["us"]) == {"sdpa", "math", "flex", "sdpa_repeat"}
    for row in (eager, compiled):
        assert all(t > 0 for t in row["us"].values())
        assert max(row["max_abs_error_vs_fp32"].values()) < 1e-5  # the paths compute the same attention


def test_a_negative_cold_budget_is_refused_in_one_line_before_anything_is_written(tmp_path):
    out = tmp_path / "attention.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"
    done = subprocess.run(
        [sys.executable, str(script), "--cold-mib", "-5", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 2 and not out.exists()
    assert (done.stderr.strip().splitlines()[-1]
            == "attention.py: error: --cold-mib must be 0 (one warm cache) or more, not -5")
