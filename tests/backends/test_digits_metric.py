"""The digits quality metric agrees with what a person sees: it gets worse, rung by rung, as real held-out
digits are damaged the way a generator damages them, and does not mind the shifts the training data has."""

from __future__ import annotations

import pytest
import torch

from flashar import api
from flashar.backends.digits.data import load_splits
from flashar.backends.digits.ladder import INK, blobs, breaks, ladder

torch_fidelity = pytest.importorskip("torch_fidelity")


@pytest.fixture(scope="module")
def scores():
    from flashar.compare.metrics import Extractor, quality, to_uint8
    from flashar.plugins import get_registry

    backbone = api.load_backbone("digits", {})
    spec = get_registry().metrics["fid-digits"]
    extractor = Extractor(spec.register(), spec.label, {}, spec.classify)
    reference = backbone.reference_images()
    splits = load_splits()
    held_out = torch.cat([splits.val[0]] * 3)  # not in the reference (test) nor in training (train)
    labels = splits.val[1].tolist() * 3
    rungs = {"unshifted": held_out, **ladder(held_out)}
    return {
        name: quality(to_uint8(backbone.decode(codes)), reference, extractor, labels) for name, codes in rungs.items()}


@pytest.mark.parametrize("kind", ["blob", "break"])
@pytest.mark.parametrize("metric", ["fid", "kid", "two_sample_accuracy"])
def test_the_metric_worsens_monotonically_with_damage(scores, kind, metric):
    values = [scores["shifted"][metric]] + [scores[f"{n} {kind}{'s' if n > 1 else ''}"][metric] for n in (1, 2, 4)]
    assert values == sorted(values) and values[-1] > values[0], values


def test_shifted_real_digits_score_near_the_floor(scores):
    assert scores["1 blob"]["fid"] > 1.3 * scores["shifted"]["fid"]  # one blob per image is already visible
    assert scores["shifted"]["two_sample_accuracy"] < 0.56  # a classifier cannot tell them from the reference
    assert scores["shifted"]["class_accuracy"] > 0.95
    # the generator never saw only centred digits: position is part of the distribution it must match
    assert scores["unshifted"]["fid"] > scores["shifted"]["fid"]


def test_damage_is_what_it_says():
    codes = load_splits().val[0][:20]
    gen = lambda: torch.Generator().manual_seed(0)
    assert ((blobs(codes, 1, gen()) == 16) & (codes != 16)).sum((1, 2)).max() <= 4
    assert (blobs(codes, 2, gen()) >= codes).all()
    broken = breaks(codes, 1, gen())
    assert (broken <= codes).all() and ((codes >= INK) & (broken == 0)).flatten(1).any(1).all()


@pytest.mark.parametrize("offset", [0.0, 0.1, 0.3, 1.0])
def test_two_sample_accuracy_reaches_the_best_possible_accuracy(offset):
    """Two unit Gaussians in 16-d whose means differ by ``offset`` per axis: no classifier beats
    Phi(distance / 2) on average; the test's logistic regression should come close to it."""
    from flashar.compare.metrics import two_sample_accuracy

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 16, generator=gen), torch.randn(1000, 16, generator=gen)
    best = torch.distributions.Normal(0.0, 1.0).cdf(torch.tensor(offset * 16**0.5 / 2)).item()
    assert abs(two_sample_accuracy(a + offset, b) - best) < 0.03
