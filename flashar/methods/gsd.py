"""Grouped speculative decoding (GSD): So et al., ICCV 2025, arXiv 2508.07747 (peer_methods.md §4.3).

Training-free and lossy: speculative Jacobi decoding (the loop of ``flashar.speculative``, shared with SJD)
with a relaxed verification rule, because many image tokens are interchangeable. For a draft x at a
window position, its group C(x) is built from the target model's guided logits there: the ``group_size``
tokens nearest to x in rank (x included; the released script takes ranks x-6 .. x+7, i.e. 14), minus
those whose processed probability differs from p(x) by ``group_prob_margin`` (δ) or more, minus those
whose squared L2 distance to x in the backbone's input-embedding table is ``group_embed_distance`` (d) or
more. x is accepted with probability min(1, Σ_C p / Σ_C q); on rejection a token is drawn from the
residual max(0, p - q), as in SJD. With ``group_size=1`` the group is {x} and GSD is exactly SJD. Only
the G candidates' embeddings are compared (no V x V distance matrix), over image codes only, and the
vocabulary is never sorted (a count and two top-k find the window of ranks, :func:`group_members`).

Forward passes: data-dependent, as SJD's (between 1 + ceil((M - 1) / (L + 1)) and M). For a one-hot
draft q the grouped acceptance probability is at least SJD's token-wise one; the paper argues the
acceptance rate never drops. One scalar, the committed count, is read back per iteration.
"""

from __future__ import annotations


import torch
from pydantic import Field
from torch import Tensor

from flashar import speculative
from flashar.backbone import Prefix
from flashar.config import SamplingConfig
from flashar.hookspecs import hookimpl


class GSDOptions(speculative.SpeculativeOptions):
    """Grouped speculative decoding."""

    group_size: int = Field(14, ge=1,
        description="G: candidates nearest to the draft in the target's logit ranking, the draft included (released "
        "script: 14; 1 = SJD).")
    group_prob_margin: float = Field(
        0.15, gt=0, description="δ: drop candidates whose probability differs from the draft's by this much or more.")
    group_embed_distance: float = Field(0.5, gt=0, allow_inf_nan=True,
        description="d: drop candidates at this squared L2 distance or more from the draft in the input-embedding "
        "table (inf = off).")


def grouped_mass(logits: Tensor, probs: Tensor, draft_probs: Tensor, codes: Tensor, embeddings: Tensor,
                 group_size: int, prob_margin: float, embed_distance: float) -> tuple[Tensor, Tensor]:
    """Σ_C p and Σ_C q over each draft's group C(x) (§4.3 step 1-2).

    logits, probs, draft_probs (B, L, V): guided logits, processed p, draft q; codes (B, L); embeddings
    (V, D) the input embeddings of the image codes. Returns two (B, L) tensors.
    """
    members = group_members(logits, codes, min(group_size, logits.shape[-1]))  # (B, L, G), x included
    p_members, q_members = probs.gather(-1, members), draft_probs.gather(-1, members)
    p_draft = probs.gather(-1, codes[..., None])  # (B, L, 1)
    offsets = embeddings[members].float() - embeddings[codes].float()[..., None, :]  # (B, L, G, D)
    keep = ((p_members - p_draft).abs() < prob_margin) & (offsets.pow(2).sum(-1) < embed_distance)
    keep = keep | (members == codes[..., None])  # x is always in its own group
    return (p_members * keep).sum(-1), (q_members * keep).sum(-1)


def group_members(logits: Tensor, codes: Tensor, size: int) -> Tensor:
    """The ``size`` codes (..., G) nearest in rank to each code (...) in its logits (..., V): ranks first ..
    first + G - 1 with first = clamp(rank - (G - 1) // 2, 0, V - G), a full window even at the ends.

    Ranks are a stable descending sort's (ties: the lower code first), found without sorting V codes: the
    code's rank is a count, and its G - 1 nearest codes on either side come from two top-k over a distinct
    integer key (:func:`rank_key`)."""
    vocab, reach = logits.shape[-1], size - 1
    key = rank_key(logits)  # (..., V)
    own = key.gather(-1, codes[..., None])  # (..., 1)
    rank = (key > own).sum(-1, keepdim=True)
    limits = torch.iinfo(torch.int64)
    above = torch.where(key > own, key, limits.max).topk(reach, dim=-1, largest=False).indices  # nearest first
    below = torch.where(key < own, key, limits.min).topk(reach, dim=-1).indices
    nearby = torch.cat([above.flip(-1), codes[..., None], below], dim=-1)  # (..., 2G - 1) by rank, the code at G - 1
    first = (rank - reach // 2).clamp(0, vocab - size)  # never reaches past the codes that exist on a side
    return nearby.gather(-1, first - rank + reach + torch.arange(size, device=codes.device))


def rank_key(logits: Tensor) -> Tensor:
    """(..., V) int64 keys, all distinct, larger for a higher rank: the logit's float32 bits made
    order-preserving (0.0 and -0.0 alike), then the code, lower first among equal logits."""
    bits = torch.where(logits == 0, 0.0, logits.float()).view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip the magnitude's order
    return ordered * 2**32 - torch.arange(logits.shape[-1], device=logits.device)


class GSD(speculative.SpeculativeMethod):
    id = "gsd"
    description = ("Grouped speculative decoding (lossy, training-free): SJD that accepts a draft when its group of "
                   "similar tokens is likely.")
    Options = GSDOptions
    options: GSDOptions

    def build(self, prefix: Prefix, batch: int, grid: tuple[int, int],
              sampling: SamplingConfig) -> speculative.SpeculativeState:
        bb, state = self.backbone, super().build(prefix, batch, grid, sampling)
        codes = torch.arange(bb.codebook_size, device=bb.device)
        with torch.no_grad():
            state.embeddings = bb.embed(bb.code_ids(codes)[None])[0]  # (V, D) image codes only
        return state

    def _rule(self, state: speculative.SpeculativeState, logits: Tensor, probs: Tensor, draft_probs: Tensor,
              codes: Tensor) -> tuple[Tensor, Tensor]:
        opts = self.options
        assert state.embeddings is not None  # build sets them
        return grouped_mass(logits, probs, draft_probs, codes, state.embeddings, opts.group_size,
                            opts.group_prob_margin, opts.group_embed_distance)


@hookimpl
def flashar_register_methods(register):
    register(GSD)
