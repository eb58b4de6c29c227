"""The diagonal copula: coupled uniforms keep every draw's distribution, and the fit recovers a known
coupling from grids drawn under it (and finds none where there is none)."""

import math

import pytest
import torch

from flashar import geometry
from flashar.config import SamplingConfig
from flashar.coupling import (RHOS, chain_log_likelihood, fit_coupling, grid_log_likelihood, latent_intervals,
                              pair_log_likelihood)
from flashar.sampling import ar1_mixing, draw, refill_uniform

SAMPLING = SamplingConfig()


def latent_grids(count: int, height: int, width: int, rho: float, seed: int, lag: int = 1) -> torch.Tensor:
    """(count, H, W) standard normals, an AR(1) of lag-1 correlation rho along each diagonal of row lag
    ``lag`` (rows ascending) and independent across diagonals: what :func:`refill_uniform` feeds the draws
    with a mixing."""
    generator = torch.Generator().manual_seed(seed)
    slots, valid = geometry.diagonal_slots(height, width, lag)
    z = torch.zeros(count, height * width + 1)
    for cells, ok in zip(slots, valid):
        cells = cells[ok]
        uniform = torch.zeros(len(cells), count)
        refill_uniform(uniform, SAMPLING, generator, ar1_mixing(len(cells), rho))
        z[:, cells] = math.sqrt(2) * torch.erfinv(2 * uniform.double().clamp(1e-7, 1 - 1e-7) - 1).float().T
    return z[:, :-1].view(count, height, width)


def ordinal_grids(z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Codes drawn by inverting each cell's distribution softmax(logits) (N, V) at u = Phi(z)."""
    codes = draw(torch.softmax(logits, -1)[None].expand(len(z), -1, -1), torch.special.ndtr(z.flatten(1)))
    return codes.view(z.shape)


def test_mixing_is_a_unit_variance_ar1():
    mixing = ar1_mixing(6, 0.6).double()
    covariance = mixing @ mixing.T
    lags = (torch.arange(6)[:, None] - torch.arange(6)[None]).abs()
    assert torch.allclose(covariance, 0.6 ** lags.double(), atol=1e-6)
    assert torch.equal(ar1_mixing(4, 0.0), torch.eye(4))


def test_coupled_uniforms_are_uniform_and_correlated():
    uniform = torch.zeros(8, 20000)
    refill_uniform(uniform, SAMPLING, torch.Generator().manual_seed(0), ar1_mixing(8, 0.7))
    assert 0 <= uniform.min() and uniform.max() < 1
    counts = torch.histc(uniform.flatten(), bins=10, min=0, max=1)
    assert (counts / counts.sum() - 0.1).abs().max() < 0.005  # each u is U[0, 1): marginals unchanged
    z = math.sqrt(2) * torch.erfinv(2 * uniform.double() - 1)
    lag1 = torch.corrcoef(torch.stack([z[:-1].flatten(), z[1:].flatten()]))[0, 1]
    lag2 = torch.corrcoef(torch.stack([z[:-2].flatten(), z[2:].flatten()]))[0, 1]
    assert abs(lag1 - 0.7) < 0.02 and abs(lag2 - 0.49) < 0.02


def test_greedy_and_teacher_forcing_draw_nothing():
    uniform = torch.zeros(4, 3)
    refill_uniform(uniform, SamplingConfig(temperature=0), torch.Generator().manual_seed(0), ar1_mixing(4, 0.5))
    refill_uniform(uniform, SAMPLING, None, ar1_mixing(4, 0.5))
    assert not uniform.any()


def test_pair_likelihood_is_the_bivariate_normal_probability():
    # the orthant P(z1 < 0, z2 < 0) = 1/4 + asin(rho) / (2 pi); the full square is 1; independence factorises
    inf, zero = torch.tensor([-8.0]), torch.tensor([0.0])
    for rho in (0.0, 0.3, 0.8):
        orthant = pair_log_likelihood(inf, zero, inf, zero, rho).exp().item()
        assert orthant == pytest.approx(0.25 + math.asin(rho) / (2 * math.pi), abs=1e-6)
    whole = pair_log_likelihood(inf, -inf, inf, -inf, 0.5).exp().item()
    assert whole == pytest.approx(1.0, abs=1e-6)
    lo1, hi1, lo2, hi2 = (torch.tensor([v]) for v in (-0.3, 1.1, 0.2, 0.9))
    nd = torch.special.ndtr
    assert pair_log_likelihood(lo1, hi1, lo2, hi2, 0.0).exp().item() == pytest.approx(
        ((nd(hi1) - nd(lo1)) * (nd(hi2) - nd(lo2))).item(), abs=1e-7)


@pytest.mark.parametrize("rho", [0.0, 0.4, 0.75])
def test_fit_recovers_the_coupling_the_grids_were_drawn_with(rho):
    """Grids of ordered codes drawn from fixed per-cell distributions with uniforms coupled at ``rho``; the
    fit, given those distributions, finds rho within one grid step."""
    height, width, vocab = 10, 12, 9
    logits = torch.randn(height * width, vocab, generator=torch.Generator().manual_seed(1)) * 1.5
    codes = ordinal_grids(latent_grids(300, height, width, rho, seed=2), logits)
    lo, hi = latent_intervals(logits[None].expand(len(codes), -1, -1), codes)
    fit = fit_coupling(lo, hi)
    assert abs(fit.rho - rho) <= 0.05 + 1e-9
    assert fit.pairs == 300 * (height - 1) * (width - 1)
    assert (fit.gain > 0.01) == (rho > 0)


def test_a_row_lag_fits_the_coupling_along_its_own_diagonals():
    """Grids coupled along the diagonals 2r + c: the lag-2 fit finds rho, the anti-diagonal fit nothing;
    the lag-2 grid likelihood prefers the true rho to independence."""
    height, width, vocab = 10, 12, 9
    logits = torch.randn(height * width, vocab, generator=torch.Generator().manual_seed(1)) * 1.5
    codes = ordinal_grids(latent_grids(300, height, width, 0.6, seed=5, lag=2), logits)
    lo, hi = latent_intervals(logits[None].expand(len(codes), -1, -1), codes)
    fit = fit_coupling(lo, hi, lag=2)
    assert abs(fit.rho - 0.6) <= 0.05 + 1e-9 and fit.pairs == 300 * (height - 1) * (width - 2)
    assert fit_coupling(lo, hi).rho <= 0.1
    assert grid_log_likelihood(lo, hi, 0.6, lag=2).sum() > grid_log_likelihood(lo, hi, 0.0, lag=2).sum() + 100


def test_unordered_codes_fit_no_coupling():
    """The same coupled latent, but the code ids shuffled per cell (a codebook whose ids mean nothing):
    no rho explains the pairs better than independence."""
    height, width, vocab = 10, 12, 9
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(height * width, vocab, generator=generator) * 1.5
    codes = ordinal_grids(latent_grids(300, height, width, 0.75, seed=4), logits)
    shuffle = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(height * width)])
    relabelled = shuffle.gather(1, codes.flatten(1).T).T.reshape(codes.shape)
    permuted_logits = torch.empty_like(logits).scatter_(1, shuffle, logits)  # code shuffle[i, k] has logit k's
    lo, hi = latent_intervals(permuted_logits[None].expand(len(codes), -1, -1), relabelled)
    assert fit_coupling(lo, hi).rho <= 0.1


def test_a_grid_without_diagonal_neighbours_fits_zero():
    lo = hi = torch.zeros(5, 1, 7)
    assert fit_coupling(lo, hi).rho == 0.0 and fit_coupling(lo, hi).pairs == 0
    assert RHOS[0] == 0.0


def test_chain_likelihood_of_two_cells_is_the_pair_likelihood():
    generator = torch.Generator().manual_seed(5)
    lo = torch.randn(200, 2, generator=generator, dtype=torch.float64)
    hi = lo + torch.rand(200, 2, generator=generator, dtype=torch.float64) * 2
    for rho in (0.3, 0.7):
        chain = chain_log_likelihood(lo, hi, rho)
        pair = pair_log_likelihood(lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1], rho)
        torch.testing.assert_close(chain, pair, atol=1e-6, rtol=1e-6)


def test_chain_likelihood_agrees_with_monte_carlo():
    """P(z in a box) for a 4-cell AR(1), against the fraction of 2 million simulated chains in the box."""
    lo = torch.tensor([[-0.5, 0.0, -1.0, 0.3]], dtype=torch.float64)
    hi = torch.tensor([[0.8, 1.5, 0.2, 2.0]], dtype=torch.float64)
    rho, n = 0.6, 2_000_000
    eps = torch.randn(4, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    z = ar1_mixing(4, rho).double() @ eps
    inside = ((z >= lo.T) & (z <= hi.T)).all(0).double().mean().item()
    exact = chain_log_likelihood(lo, hi, rho).exp().item()
    assert exact == pytest.approx(inside, abs=4 * math.sqrt(inside * (1 - inside) / n))


def test_uncoupled_grid_likelihood_is_the_sum_of_the_cells_log_probabilities():
    """Also for a code deep in a tail (probability 2e-25): each interval keeps its own probability."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 20, 5, generator=generator, dtype=torch.float64) * 3
    logits[0, 0] = torch.tensor([0.0, 30.0, -27.0, 0.0, 0.0])  # code 2 has probability ~2e-25
    codes = torch.randint(0, 5, (3, 4, 5), generator=generator)
    codes[0, 0, 0] = 2
    lo, hi = latent_intervals(logits, codes)
    expected = torch.log_softmax(logits, -1).gather(-1, codes.flatten(1)[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(grid_log_likelihood(lo, hi, 0.0)[1:], expected[1:], atol=1e-6, rtol=1e-9)
    assert grid_log_likelihood(lo, hi, 0.0)[0].item() == pytest.approx(expected[0].item(), abs=0.02)  # the tail code
    assert grid_log_likelihood(lo, hi, 0.5)[0].item() > expected[0].item() - 20  # coupled: not lost to the tail either


def test_grids_drawn_coupled_are_likelier_under_their_coupling():
    """The exact likelihood prefers the coupling the grids were drawn with, and at rho -> 0 it tends to the
    independent likelihood."""
    height, width, vocab = 6, 7, 9
    logits = torch.randn(height * width, vocab, generator=torch.Generator().manual_seed(8)).double() * 1.5
    codes = ordinal_grids(latent_grids(200, height, width, 0.6, seed=9), logits.float())
    lo, hi = latent_intervals(logits[None].expand(len(codes), -1, -1), codes)
    totals = {rho: grid_log_likelihood(lo, hi, rho).sum().item() for rho in (0.0, 0.3, 0.6, 0.9)}
    assert max(totals, key=totals.get) == 0.6
    assert grid_log_likelihood(lo, hi, 1e-4).sum().item() == pytest.approx(totals[0.0], rel=1e-4)
