"""KID's spread says how far the KID of another draw of generated images could land."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch_fidelity")

from flashar.compare.metrics import kernel_inception_distance, kid_subset_size  # noqa: E402


def test_subsets_hold_at_most_half_of_either_set():
    assert kid_subset_size(1000, 10000) == 500
    assert kid_subset_size(10000, 1000) == 500
    assert kid_subset_size(50000, 50000) == 1000  # torch-fidelity's default above 2,000 images


def draws(samples: int, reference: int, count: int = 12) -> tuple[float, float]:
    """KIDs of ``count`` generated feature sets drawn independently from one distribution, against one reference
    set drawn from another: the standard deviation of those KIDs, and the mean spread they report."""
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(reference, 16, generator=gen)
    kids = [kernel_inception_distance(torch.randn(samples, 16, generator=gen) * 1.2 + 0.1, real) for _ in range(count)]
    return torch.tensor([kid for kid, _ in kids]).std().item(), sum(spread for _, spread in kids) / count


@pytest.mark.parametrize("reference", [400, 480, 2000])
def test_the_spread_does_not_understate_the_variation_between_generated_sets(reference):
    """400 generated against 400, 480 (the digits default's proportions: 1,000 per seed against 1,200) and 2,000
    reference images. With subsets as large as the generated set, the spread was 0, 0.37 and 0.79 times the
    deviation between the sets' KIDs; with half-sets it is 1.1-1.9 times it."""
    between, spread = draws(400, reference)
    assert 0.9 < spread / between < 2.6, (spread, between)
