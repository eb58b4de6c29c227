"""Controlled damage to real digits, the yardstick a quality metric is checked against.

A metric that sees what a person sees must score real held-out digits worse, step by step, as they get
more of the artefacts a generator leaves (bright blobs, broken strokes), and must not mind what the
generator's training data has anyway (small shifts). ``tests/test_digits_metric.py`` checks FID-digits
on this ladder; ``benchmarks/digits_quality.py`` prints it beside the methods.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashar.backends.digits.data import GRID, LEVELS, shift

INK = LEVELS // 2  # a cell at least half bright is part of a stroke


def blobs(codes: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` bright 2 x 2 blobs per grid at random places."""
    out = codes.clone()
    for _ in range(count):
        y, x = torch.randint(0, GRID - 1, (2, len(codes)), generator=generator)
        for dy in (0, 1):
            for dx in (0, 1):
                out[torch.arange(len(codes)), y + dy, x + dx] = LEVELS - 1
    return out


def breaks(codes: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` gaps per grid: a 3 x 3 square around a random stroke cell set to background."""
    out = codes.clone()
    for _ in range(count):
        for i in range(len(codes)):
            ink = (out[i] >= INK).nonzero()
            if len(ink) == 0:
                continue
            y, x = ink[torch.randint(0, len(ink), (1,), generator=generator)].squeeze(0).tolist()
            out[i, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] = 0
    return out


def ladder(codes: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """name -> real ``codes`` shifted as the training data is (the undamaged rung), then damaged: the
    rungs the metric test and the benchmark score, in order of damage within each kind."""
    gen = lambda: torch.Generator().manual_seed(seed)
    real = shift(codes, gen())
    rungs = {"shifted": real}
    for n in (1, 2, 4):
        rungs[f"{n} blob{'s' if n > 1 else ''}"] = blobs(real, n, gen())
    for n in (1, 2, 4):
        rungs[f"{n} break{'s' if n > 1 else ''}"] = breaks(real, n, gen())
    return rungs
