"""Running a method over many conditions, batch by batch: one seeded generator, wall time per batch with the
device synchronised at its edges, and progress reported from inside a batch (used by ``api.generate`` and
``compare``)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from flashar.config import SamplingConfig
from flashar.decoding import Method
from flashar.sampling import make_generator


@dataclass
class GenerateResult:
    codes: Tensor  # (N, H, W) int64
    num_forward_passes: int  # per batch
    seconds: float  # wall time of decoding (tokenizer decode excluded)
    batch_seconds: list[float] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA): the edge of every timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_batches(method: Method, conditions: Sequence[Any], grid: tuple[int, int], sampling: SamplingConfig,
                     batch_size: int, seed: int = 0, on_batch: Callable[[int], None] | None = None,
                     progress: Callable[[float], None] | None = None) -> GenerateResult:
    """One token grid per condition, ``batch_size`` at a time, from one generator seeded with ``seed``.

    ``on_batch(n)`` after every batch of n images; ``progress(images)`` also during a batch, with the
    fraction of images its decode steps have made (increments summing to the number of conditions)."""
    device = method.backbone.device
    generator = make_generator(seed, device)
    codes, times, passes = [], [], 0
    expected = _expected_steps(method, grid)
    for start in range(0, len(conditions), batch_size):
        batch = list(conditions[start : start + batch_size])
        began = time.perf_counter()
        with _step_progress(method, len(batch), expected, progress) as reported:
            result = method.generate(batch, grid, sampling, generator)
            synchronize(device)
        times.append(time.perf_counter() - began)
        codes.append(result.codes)
        passes = result.num_forward_passes
        expected = max(1, passes - 1)  # the steps of this grid, for the next batch's progress
        if progress:
            progress(len(batch) - reported[0])
        if on_batch:
            on_batch(len(batch))
    return GenerateResult(torch.cat(codes), passes, sum(times), times)


PROGRESS_INTERVAL = 0.1  # seconds between progress reports during a batch


def _expected_steps(method: Method, grid: tuple[int, int]) -> int:
    """Decode steps of one batch (forward passes less the prefill), as far as the method says up front."""
    try:
        return max(1, method.passes(grid) - 1)
    except (NotImplementedError, TypeError):
        return max(1, grid[0] * grid[1])


@contextmanager
def _step_progress(method: Method, images: int, steps: int, progress: Callable[[float], None] | None):
    """Report ``images`` x (steps done / ``steps``) while the method decodes, at most ten times a second,
    by counting calls of its ``step`` (the one call per step of :meth:`Method.decode`'s loop, from outside
    the compiled region). Yields a one-item list holding what was reported."""
    reported = [0.0]
    own = vars(method).get("step")
    if progress is None or own is None:
        yield reported
        return
    done, last = [0], [time.monotonic()]

    def counted(*args, **kwargs):
        out = own(*args, **kwargs)
        done[0] += 1
        now = time.monotonic()
        if now - last[0] >= PROGRESS_INTERVAL:
            last[0] = now
            share = images * min(done[0] / steps, 0.99)  # the step count is an estimate (SJD, GSD)
            progress(share - reported[0])
            reported[0] = share
        return out

    method.step = counted
    try:
        yield reported
    finally:
        method.step = own
