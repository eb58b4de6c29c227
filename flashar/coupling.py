"""Coupled draws along an anti-diagonal: a Gaussian copula fitted to the FlashAR decoder's held-out grids.

FlashAR draws the cells of one anti-diagonal independently, each from its own distribution given the
diagonals before it. Neighbouring cells of a diagonal ((r, c) and (r + 1, c - 1)) are not independent
given that context: in a smooth image both are bright or both dark more often than their own
distributions say. Every draw inverts a cumulative distribution with a uniform u (``flashar.sampling``),
so the uniforms of one diagonal can be made dependent without changing any cell's distribution: u_k =
Phi(z_k) for a stationary Gaussian AR(1) z along the diagonal with lag-1 correlation rho (a Gaussian copula).

rho is fitted by maximum pairwise likelihood on teacher-forced held-out grids. A cell's observed code x
under its decoded distribution F is the latent interval [Phi^-1(F(x - 1)), Phi^-1(F(x))]; a pair of
diagonal neighbours has the probability that a bivariate normal of correlation rho falls in both intervals.
Where code ids carry no order (a learned VQ codebook), the fit finds rho near 0 and decoding stays
independent; for ordered codes (the digits' gray levels) it finds the coupling the data has. Cells the
decoder is sure of contribute the same likelihood for every rho, so they do not dilute the estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flashar import geometry

RHOS = tuple(round(0.05 * i, 2) for i in range(20))  # 0, 0.05, ..., 0.95: the candidates the fit compares
_NODES, _WEIGHTS = (torch.from_numpy(x) for x in np.polynomial.legendre.leggauss(32))  # quadrature on [-1, 1]
_SPAN = 8.0  # integrals over an interval reaching past +-8 stop there (the mass beyond is < 1e-15)
_TAIL = 1e-300  # the smallest cell probability represented (|z| <= 37)


@dataclass(frozen=True)
class CouplingFit:
    rho: float  # the fitted lag-1 correlation (one of RHOS)
    gain: float  # pairwise log-likelihood gain over independence at rho, nats per neighbour pair
    pairs: int  # neighbour pairs the fit used


def latent_intervals(logits: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """Standard-normal interval (lo, hi), each (B, H, W) float64 on CPU, of every cell's observed code under
    its distribution softmax(logits): logits (B, H*W, V) in raster order, codes (B, H, W).

    [Phi^-1(P(code < x)), Phi^-1(P(code <= x))], each end computed from the tail where its probability is
    small, so a code far in a tail keeps the interval of its own probability (to about 1 % at 1e-25; much
    further out the interval is narrower than float64 resolves at its place)."""
    probs = torch.softmax(logits.double(), dim=-1)
    target = codes.flatten(1).to(probs.device)[..., None]
    own = probs.gather(-1, target)[..., 0]
    below = (probs.cumsum(-1) - probs).gather(-1, target)[..., 0]
    above = (probs.flip(-1).cumsum(-1).flip(-1) - probs).gather(-1, target)[..., 0]
    z = lambda u: torch.special.ndtri(u.clamp(_TAIL, 1.0))  # accurate in the tails (erfinv(2u - 1) is not)
    upper = above < below  # the code sits in the upper half: measure from the top
    lo = torch.where(upper, -z(above + own), z(below))
    hi = torch.where(upper, -z(above), z(below + own))
    return lo.view(codes.shape).cpu(), hi.view(codes.shape).cpu()


def interval_mass(lo: Tensor, hi: Tensor) -> Tensor:
    """P(z in [lo, hi]) for z ~ N(0, 1): on the side of 0 where it does not cancel, by the midpoint rule
    where the interval is too narrow for a difference of two Phi values."""
    ndtr = torch.special.ndtr
    mid, width = (lo + hi) / 2, hi - lo
    narrow = _density(mid) * width * (1 + (mid * mid - 1) * width * width / 24)
    return torch.where(width < 1e-4, narrow, torch.where(lo > 0, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo)))


def _density(z: Tensor) -> Tensor:
    return torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _nodes(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and weights (..., Q) on [lo, hi], cut at +-_SPAN where the interval reaches past it."""
    lo = torch.where(hi > -_SPAN, lo.clamp(min=-_SPAN), lo)
    hi = torch.where(lo < _SPAN, hi.clamp(max=_SPAN), hi)
    half, mid = (hi - lo) / 2, (hi + lo) / 2
    return mid[..., None] + half[..., None] * _NODES.to(mid), half[..., None] * _WEIGHTS.to(mid)


def diagonal_pairs(lo: Tensor, hi: Tensor, lag: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The intervals of every pair of diagonal neighbours (r, c), (r + 1, c - k) for row lag k, flattened."""
    first = (slice(None), slice(None, -1), slice(lag, None))
    second = (slice(None), slice(1, None), slice(None, -lag))
    return lo[first].flatten(), hi[first].flatten(), lo[second].flatten(), hi[second].flatten()


def pair_log_likelihood(lo1: Tensor, hi1: Tensor, lo2: Tensor, hi2: Tensor, rho: float) -> Tensor:
    """log P(z1 in [lo1, hi1], z2 in [lo2, hi2]) for (z1, z2) standard bivariate normal with correlation rho:
    the integral over z1 of phi(z1) * P(z2 in [lo2, hi2] | z1), by Gauss-Legendre quadrature."""
    z1, weights = _nodes(lo1, hi1)
    spread = math.sqrt(1 - rho * rho)
    given = interval_mass((lo2[:, None] - rho * z1) / spread, (hi2[:, None] - rho * z1) / spread)
    return (weights * _density(z1) * given).sum(-1).clamp(min=_TAIL).log()


def chain_log_likelihood(lo: Tensor, hi: Tensor, rho: float) -> Tensor:
    """log P(z_k in [lo_k, hi_k] for every k) for z a stationary AR(1) of lag-1 correlation rho (the latent
    of one diagonal's draws, in slot order): lo, hi (B, n) -> (B,). A forward recursion over quadrature
    nodes inside each interval, rescaled at every cell."""
    if rho == 0:
        return interval_mass(lo, hi).clamp(min=_TAIL).log().sum(-1)
    spread = math.sqrt(1 - rho * rho)
    z, weights = _nodes(lo, hi)  # (B, n, Q)
    alpha, log_scale = _density(z[:, 0]), torch.zeros(lo.shape[0], dtype=lo.dtype)
    for k in range(1, lo.shape[1]):
        step = _density((z[:, k, None, :] - rho * z[:, k - 1, :, None]) / spread) / spread  # (B, Q_prev, Q)
        alpha = torch.einsum("bi,bij->bj", weights[:, k - 1] * alpha, step)
        peak = alpha.amax(-1, keepdim=True).clamp(min=1e-300)
        alpha, log_scale = alpha / peak, log_scale + peak[:, 0].log()
    return (weights[:, -1] * alpha).sum(-1).clamp(min=_TAIL).log() + log_scale


def grid_log_likelihood(lo: Tensor, hi: Tensor, rho: float, lag: int = 1) -> Tensor:
    """log-likelihood (B,) of whole grids under the coupled sampler: each cell's distribution is the
    decoder's (given the diagonals before it, which the intervals (B, H, W) already condition on), and the
    draws of one diagonal (of row lag ``lag``) are coupled at rho. rho = 0 gives the sum of the cells' own
    log-probabilities."""
    height, width = lo.shape[1:]
    slots, valid = geometry.diagonal_slots(height, width, lag)
    flat_lo, flat_hi = lo.flatten(1), hi.flatten(1)
    total = torch.zeros(lo.shape[0], dtype=lo.dtype)
    for cells, ok in zip(slots, valid):
        total += chain_log_likelihood(flat_lo[:, cells[ok]], flat_hi[:, cells[ok]], rho)
    return total


def fit_coupling(lo: Tensor, hi: Tensor, lag: int = 1, chunk: int = 65536) -> CouplingFit:
    """The rho of RHOS with the highest pairwise likelihood of the diagonal neighbours (row lag ``lag``) in
    the intervals (B, H, W) from :func:`latent_intervals`; 0 when the grid has no diagonal neighbours."""
    pairs = diagonal_pairs(lo, hi, lag)
    count = pairs[0].numel()
    if count == 0:
        return CouplingFit(0.0, 0.0, 0)
    totals = [
        sum(pair_log_likelihood(*(p[i : i + chunk] for p in pairs), rho).sum().item() for i in range(0, count, chunk))
        for rho in RHOS]
    best = max(range(len(RHOS)), key=totals.__getitem__)
    return CouplingFit(RHOS[best], (totals[best] - totals[0]) / count, count)
