"""The timing harness shared by ``flashar compare`` and the benchmarks.

Methods are warmed up (compilation happens there and is reported separately), then timed in
``repeats`` rounds; each round runs every method once in a rotated order, so a noisy neighbour hurts
all methods alike. Only the decode is timed (tokenizer decoding is excluded), with a device
synchronisation at each boundary. Medians are reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from flashar.config import SamplingConfig
from flashar.batches import synchronize
from flashar.decoding import Method
from flashar.sampling import make_generator


@dataclass
class Timing:
    batch: int = 0  # images per timed run
    seconds: list[float] = field(default_factory=list)  # per timed run
    warmup_seconds: list[float] = field(default_factory=list)
    forward_passes: int = 0
    state_bytes: int = 0
    peak_bytes: int | None = None  # CUDA only
    graphs: int = 0  # graphs torch.compile built while warming up (a compiled step: 1 per static shape)
    recompiles: int = 0  # graphs built during the timed runs (should be 0: a step compiles once)
    codes: torch.Tensor | None = None  # (batch, H, W) token grids of the last timed run

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def compile_seconds(self) -> float:
        """First warm-up run minus the median run: the one-off cost of compiling (and allocating)."""
        return max(0.0, self.warmup_seconds[0] - self.median) if self.warmup_seconds else 0.0


def timed_run(method: Method, conditions: Sequence[Any], grid: tuple[int, int], sampling: SamplingConfig, seed: int):
    device = method.backbone.device
    generator = make_generator(seed, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    began = time.perf_counter()
    result = method.generate(list(conditions), grid, sampling, generator)
    synchronize(device)
    elapsed = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return result, elapsed, peak


def _graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def time_methods(methods: dict[str, Method], conditions: Sequence[Any], grid: tuple[int, int],
                 sampling: dict[str, SamplingConfig], repeats: int, warmup: int, seed: int = 0,
                 on_run: Callable[[str], None] | None = None) -> dict[str, Timing]:
    """Warm up each method, then time ``repeats`` interleaved rounds; returns per-method timings.
    ``on_run(method)`` after every run, warm-up or timed (for progress)."""
    timings = {name: Timing(batch=len(conditions)) for name in methods}
    for name, method in methods.items():
        for _ in range(warmup):
            before = _graphs()
            result, elapsed, _ = timed_run(method, conditions, grid, sampling[name], seed)
            timings[name].warmup_seconds.append(elapsed)
            timings[name].graphs += _graphs() - before
            if on_run:
                on_run(name)
    names = list(methods)
    for round_index in range(repeats):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            before = _graphs()
            result, elapsed, peak = timed_run(methods[name], conditions, grid, sampling[name], seed)
            t = timings[name]
            t.recompiles += _graphs() - before
            t.seconds.append(elapsed)
            t.forward_passes, t.state_bytes, t.codes = result.num_forward_passes, result.state_bytes, result.codes
            t.peak_bytes = peak if peak is None or t.peak_bytes is None else max(peak, t.peak_bytes)
            if on_run:
                on_run(name)
    return timings
