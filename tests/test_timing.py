"""The timing harness counts what torch.compile built: once while warming up, nothing while timed."""

from __future__ import annotations

import torch
from helpers import random_gpt

from flashar.compare.timing import time_methods
from flashar.compilation import CompileCounter
from flashar.config import SamplingConfig
from flashar.methods.raster import Raster


def test_compiled_step_counts_one_graph_and_no_recompiles():
    torch._dynamo.reset()
    backbone = random_gpt(0)
    methods = {"eager": Raster(backbone), "compiled": Raster(backbone, compile=True, compile_backend=CompileCounter())}
    sampling = SamplingConfig(cfg_scale=2.0, top_k=5)
    timings = time_methods(methods, [1, 2], (3, 3), {name: sampling for name in methods}, repeats=2, warmup=1)
    assert (timings["compiled"].graphs, timings["compiled"].recompiles) == (1, 0)
    assert (timings["eager"].graphs, timings["eager"].recompiles) == (0, 0)
    assert len(timings["compiled"].seconds) == 2 and timings["compiled"].forward_passes == 9
