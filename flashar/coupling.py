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

RHOS = tuple(round(0.05 * i, 2) for i in range(20))  # 0, 0.05, ..., 0.95: the candidates the fit compares
_NODES, _WEIGHTS = (torch.from_numpy(x) for x in np.polynomial.legendre.leggauss(32))  # quadrature on [-1, 1]
_CLIP = 8.0  # |z| beyond this has probability < 1e-15: the intervals are clipped there


@dataclass(frozen=True)
class CouplingFit:
    rho: float  # the fitted lag-1 correlation (one of RHOS)
    gain: float  # pairwise log-likelihood gain over independence at rho, nats per neighbour pair
    pairs: int  # neighbour pairs the fit used


def latent_intervals(logits: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """Standard-normal interval (lo, hi), each (B, H, W) float64 on CPU, of every cell's observed code under
    its distribution softmax(logits): logits (B, H*W, V) in raster order, codes (B, H, W)."""
    probs = torch.softmax(logits.double(), dim=-1)
    target = codes.flatten(1).to(probs.device)[..., None]
    upper = probs.cumsum(-1).gather(-1, target)[..., 0].clamp(0, 1)
    lower = (upper - probs.gather(-1, target)[..., 0]).clamp(0, 1)
    normal = torch.distributions.Normal(0.0, 1.0)
    to_z = lambda u: normal.icdf(u.clamp(1e-300, 1.0)).clamp(-_CLIP, _CLIP)  # icdf(1) = inf -> the clip
    return tuple(to_z(u).view(codes.shape).cpu() for u in (lower, upper))


def diagonal_pairs(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The intervals of every pair of diagonal neighbours (r, c), (r + 1, c - 1), flattened."""
    first = (slice(None), slice(None, -1), slice(1, None))
    second = (slice(None), slice(1, None), slice(None, -1))
    return lo[first].flatten(), hi[first].flatten(), lo[second].flatten(), hi[second].flatten()


def pair_log_likelihood(lo1: Tensor, hi1: Tensor, lo2: Tensor, hi2: Tensor, rho: float) -> Tensor:
    """log P(z1 in [lo1, hi1], z2 in [lo2, hi2]) for (z1, z2) standard bivariate normal with correlation rho:
    the integral over z1 of phi(z1) * P(z2 in [lo2, hi2] | z1), by Gauss-Legendre quadrature."""
    half, mid = (hi1 - lo1) / 2, (hi1 + lo1) / 2
    z1 = mid[:, None] + half[:, None] * _NODES.to(mid)[None]
    spread = math.sqrt(1 - rho * rho)
    ndtr = torch.special.ndtr
    given = ndtr((hi2[:, None] - rho * z1) / spread) - ndtr((lo2[:, None] - rho * z1) / spread)
    density = torch.exp(-z1 * z1 / 2) / math.sqrt(2 * math.pi)
    return (half * (_WEIGHTS.to(mid)[None] * density * given).sum(-1)).clamp(min=1e-300).log()


def fit_coupling(lo: Tensor, hi: Tensor, chunk: int = 65536) -> CouplingFit:
    """The rho of RHOS with the highest pairwise likelihood of the diagonal neighbours in the intervals
    (B, H, W) from :func:`latent_intervals`; 0 when the grid has no diagonal neighbours."""
    pairs = diagonal_pairs(lo, hi)
    count = pairs[0].numel()
    if count == 0:
        return CouplingFit(0.0, 0.0, 0)
    totals = [sum(pair_log_likelihood(*(p[i : i + chunk] for p in pairs), rho).sum().item() for i in range(0, count, chunk))
              for rho in RHOS]
    best = max(range(len(RHOS)), key=totals.__getitem__)
    return CouplingFit(RHOS[best], (totals[best] - totals[0]) / count, count)
