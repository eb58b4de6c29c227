"""Classifier-free guidance and sync-free sampling, shared by every decoding method.

Everything here is static-shape and host-sync-free, so it runs inside a compiled step:

* top-k keeps every logit >= the k-th largest (ties at the threshold survive, as in LlamaGen);
* top-p keeps the smallest prefix of the sorted distribution whose mass reaches p (the first token that
  crosses p is kept, the top-1 is never removed), applied after top-k;
* a draw inverts the cumulative distribution: one u ~ U[0, 1) per drawn code picks the code i with
  cdf(i - 1) <= u * total < cdf(i), that is with probability p_i. The uniforms are drawn by the caller from
  a seeded ``torch.Generator`` (one call per step, outside the compiled step), so eager and compiled runs
  draw exactly the same codes; the running sum is taken in float64 so that the two (whose float32 sums
  may differ in the last bit) land on the same side of every boundary. One number per code drawn, not one
  per code of the vocabulary: a FlashAR step drawing 32 codes from 16,384 used to spend ~3 ms on CPU
  generating its noise.

CFG rows are always ``[cond; uncond]`` inside flashar.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashar.config import SamplingConfig


def cfg_mix(logits: Tensor, scale: float, space: str = "logits") -> Tensor:
    """(2B, ..., V) rows [cond; uncond] -> (B, ..., V) guided logits uncond + scale * (cond - uncond).

    ``space="log_softmax"`` mixes log-probabilities instead of raw logits (Emu3.5's native CFG).
    """
    if space == "log_softmax":
        logits = torch.log_softmax(logits, dim=-1)
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def filter_logits(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """Temperature, then top-k, then top-p; removed codes become -inf. (..., V) float32."""
    if sampling.temperature > 0:
        logits = logits / max(sampling.temperature, 1e-5)
    if sampling.top_k > 0:
        k = min(sampling.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # unsorted: cheaper
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of everything ranked above
        remove_sorted = mass_before > sampling.top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def processed_probs(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """The distribution a code is actually drawn from (after filtering); one-hot when greedy. (..., V)."""
    if sampling.is_greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return torch.softmax(filter_logits(logits, sampling), dim=-1)


def sample(logits: Tensor, uniform: Tensor | None, sampling: SamplingConfig) -> Tensor:
    """Draw one code per row of logits (..., V) with u ~ U[0, 1) of shape (...) -> (...) int64."""
    if sampling.is_greedy:
        return logits.argmax(dim=-1)
    assert uniform is not None, "sampling draws with uniforms (only greedy decoding passes none)"
    return draw(torch.softmax(filter_logits(logits, sampling), dim=-1), uniform)


def draw(weights: Tensor, uniform: Tensor) -> Tensor:
    """Code i with probability weights_i / sum(weights), for non-negative weights (..., V) and u (...) -> (...).

    A code of weight 0 is never drawn, also when u * total rounds up to the total; u = 0 draws the first
    code of positive weight (the argmax of a one-hot distribution). All-zero weights draw code 0."""
    cdf = weights.double().cumsum(-1)
    total = cdf[..., -1:]
    drawn = (cdf <= uniform.double().unsqueeze(-1) * total).sum(-1)
    last = (cdf < total).sum(-1)  # the last code of positive weight (every later cdf equals the total)
    return torch.minimum(drawn, last)


def ar1_mixing(length: int, rho: float) -> Tensor:
    """(length, length) lower-triangular L with z = L @ eps a stationary AR(1) of unit variance and lag-1
    correlation ``rho`` for eps ~ N(0, I): z_0 = eps_0, z_k = rho z_(k-1) + sqrt(1 - rho^2) eps_k."""
    k = torch.arange(length)
    lag = (k[:, None] - k[None, :]).clamp(min=0).double()
    mixing = torch.where(k[:, None] >= k[None, :], rho ** lag, torch.zeros(()).double())
    mixing[:, 1:] *= (1 - rho * rho) ** 0.5
    return mixing.float()


def new_uniform(shape: tuple[int, ...], device: torch.device | str) -> Tensor:
    """A buffer of uniforms, one per code a step draws; refill it before each step with :func:`refill_uniform`.

    Zeros until refilled: greedy decoding never refills, and u = 0 draws the argmax of a one-hot distribution."""
    return torch.zeros(shape, dtype=torch.float32, device=device)


def refill_uniform(uniform: Tensor, sampling: SamplingConfig, generator: torch.Generator | None,
                   mixing: Tensor | None = None) -> None:
    """Draw fresh U[0, 1) into ``uniform`` from ``generator`` (nothing to draw when greedy or teacher forcing).

    The one random draw of a decode step, done by the plain loop outside the compiled step. With ``mixing``
    L (from :func:`ar1_mixing`), the uniforms of neighbouring rows of a slot-first buffer (T, B) are coupled
    by a Gaussian copula, u = Phi(L @ eps): each u is still U[0, 1), so every code keeps its own
    distribution, and where code ids are ordered (gray levels) neighbouring draws land on the same side of
    their distributions more often."""
    if generator is None or sampling.is_greedy:
        return
    if mixing is None:
        uniform.uniform_(generator=generator)
    else:
        eps = torch.empty_like(uniform).normal_(generator=generator)
        length = uniform.shape[0]
        uniform.copy_(torch.special.ndtr(mixing[:length, :length] @ eps))


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A seeded generator on ``device`` (CUDA generators for uniforms on CUDA)."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator
