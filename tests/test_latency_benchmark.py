"""benchmarks/latency.py: the pass counter records the bound's bytes and FLOPs and the kernels it replays."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import torch
from helpers import random_gpt

from flashar.config import SamplingConfig
from flashar.methods.raster import Raster

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"


def load_latency():
    spec = importlib.util.spec_from_file_location("latency_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert {shape for shape, _, _ in steps} == {(2, backbone.dim // backbone.head_dim, 1, backbone.head_dim)}  # CFG rows
    assert all(kv is not None and mask.shape[-1] <= kv[0].shape[2] for _, mask, kv in steps)

    seconds = counter.kernel_seconds(repeats=1)
    assert seconds > 0 and counter.kernels == []  # the record (and the caches it holds) is freed
    assert counter.ideal_seconds(1e9, 1e9) > 0
