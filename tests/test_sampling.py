"""Sampling: the inverse-CDF draw picks codes with the filtered distribution; filters follow LlamaGen."""

from __future__ import annotations

import torch

from flashar.config import SamplingConfig
from flashar.sampling import cfg_mix, draw, filter_logits, processed_probs, sample


def test_draws_match_the_filtered_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, -3.0])
    n = 40_000
    gen = torch.Generator().manual_seed(0)
    uniform = torch.rand(n, generator=gen)
    draws = sample(logits.expand(n, 5), uniform, SamplingConfig(top_k=4))
    freq = torch.bincount(draws, minlength=5).float() / n
    expected = torch.softmax(logits.masked_fill(logits < -1.0, float("-inf")), -1)
    assert freq[4] == 0  # filtered out by top-k
    # 5 standard errors: fails by chance with probability ~1e-6 per code
    assert torch.all((freq - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt())


def test_draw_never_picks_a_code_of_weight_zero():
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.5, 0.0]])
    # cdf 1, 4, 4.5 of 4.5
    edges = torch.tensor([0.0, 2 / 9 - 1e-7, 2 / 9 + 1e-7, 8 / 9 - 1e-7, 8 / 9 + 1e-7, 1 - 2**-24])
    assert draw(weights.expand(6, -1), edges).tolist() == [1, 1, 3, 3, 4, 4]
    # u * total rounding up to the total still draws the last code of positive weight
    assert draw(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([1.0])).tolist() == [1]
    assert draw(torch.zeros(1, 4), torch.tensor([0.5])).tolist() == [0]  # nothing to draw from: code 0


def test_top_k_keeps_ties_and_top_p_keeps_the_crossing_token():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]])
    kept = filter_logits(logits, SamplingConfig(top_k=2)).isfinite()
    assert kept.tolist() == [[True, True, True, False, False]]
    logits = torch.tensor([[3.0, 2.0, 1.5, 1.0, 0.0]])
    probs = torch.softmax(logits, -1)[0]
    p = float(probs[0] + probs[1] / 2)  # crossed inside the second token: it is kept, the rest go
    kept = filter_logits(logits, SamplingConfig(top_p=p)).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]]
    assert filter_logits(logits, SamplingConfig(top_p=1e-9)).isfinite().sum() == 1  # never removes the top-1


def test_greedy_ignores_noise_and_processed_probs_is_one_hot():
    logits = torch.randn(6, 10)
    assert torch.equal(sample(logits, None, SamplingConfig(top_k=1)), logits.argmax(-1))
    assert torch.equal(sample(logits, None, SamplingConfig(temperature=0)), logits.argmax(-1))
    assert torch.equal(processed_probs(logits, SamplingConfig(top_k=1)).argmax(-1), logits.argmax(-1))


def test_cfg_order_is_cond_then_uncond():
    cond, uncond = torch.randn(2, 5), torch.randn(2, 5)
    mixed = cfg_mix(torch.cat([cond, uncond]), 3.0)
    torch.testing.assert_close(mixed, uncond + 3.0 * (cond - uncond))
    logp = cfg_mix(torch.cat([cond, uncond]), 2.0, "log_softmax")
    torch.testing.assert_close(
        logp, torch.log_softmax(uncond, -1) + 2.0 * (torch.log_softmax(cond, -1) - torch.log_softmax(uncond, -1)))
