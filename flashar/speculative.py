"""The speculative Jacobi loop shared by SJD and GSD (peer_methods.md §4.1-4.3), on the Backbone protocol.

The native raster sequence has M entries (H*W cells, plus the row-end slots of backbones that have a
``row_end_token``, which are forced and always accepted). Entries ``[0, n)`` are committed; a window of L
draft tokens covers entries ``[n, n + L)``, each with the distribution q it was drawn from (one-hot for
initialised drafts, the model's processed p for Jacobi-updated ones). One iteration (:meth:`SpeculativeMethod._step`):

1. feed ``[entry n-1, drafts n .. n+L-1]`` (T = L + 1 tokens) under the raster-causal mask, giving the
   processed distribution p (CFG, temperature, top-k/top-p) for entries ``n .. n+L``;
2. verify draft i with ``u_i * q_mass < p_mass`` (u ~ U[0, 1)); SJD's masses are p(x_i), q(x_i); GSD's
   are summed over a group of tokens (a ``rule`` argument);
3. a = accepted leading drafts, minimised over the batch as in the official code (rows share cache slots);
   commit entries ``n .. n+a``: accepted drafts, then at position a the accepted draft or a draw from the
   residual max(0, p - q) (plain p when a = L: the bonus token);
4. the Jacobi update: every later position gets a fresh draw from its p (or, with the SCD maximal
   coupling, keeps its draft with probability min(1, p/q) and otherwise draws from the residual), and
   the a + 1 new window slots are initialised (``repeat_horizon``: the token to the left in the same row;
   ``random``: a uniform code).

Rows that accepted beyond the batch minimum redraw (or couple) those drafts rather than carry them over
with a stale q, so every row stays exactly distributed as raster decoding.

KV rollback needs no copying: entry j always lives in cache slot P + j, the window rewrites slots
``P+n-1 .. P+n-1+L`` before attending, and the causal mask hides every later (stale) slot. Attention
reads only the slots before ``P+n+L`` (the loop knows n from its one read-back per iteration; off CUDA
that length is the dynamic dimension of the one compiled graph, ``flashar.shapes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from flashar.backbone import Prefix
from flashar.config import Config, SamplingConfig
from flashar.decoding import (Generation, Method, SequenceState, causal_chunk, commit, guided, image_key_valid,
                              sequence_codes, sequence_fields, start_sequence)
from flashar.sampling import draw, new_uniform, processed_probs, refill_uniform


class SpeculativeOptions(Config):
    """The window every method on this loop has (SJD's and GSD's options add to it)."""

    draft_length: int = Field(16, ge=1, le=256,
        description="L: draft tokens verified per forward pass (the Jacobi window; official default 16).")
    draft_init: Literal["repeat_horizon", "random"] = Field("repeat_horizon",
        description="How new draft tokens start: copy the token to their left in the row (SJD's official LlamaGen "
        "default) or a uniform random code (the GSD script's).")


@dataclass
class SpeculativeState(SequenceState):  # the sequence padded by 2L entries that repeat the last cell's position
    auto_accept: Tensor  # (M + 2L,) bool: forced entries and the padding past M always pass verification
    row_start: Tensor  # (M + 2L,) first entry of each entry's row (padding: itself)
    offsets: Tensor  # (T,) arange(L + 1), window positions
    draft_probs: Tensor  # (B, L, V) q of the drafts in the window
    accepted: Tensor  # 0-d int64: n, committed entries
    uniform: Tensor  # (B, L) U[0, 1) for verification, refilled every iteration
    init_codes: Tensor  # (B, L) uniform random codes for new drafts, refilled every iteration
    draw_uniform: Tensor  # (B, T) U[0, 1) for the residual / Jacobi draws, refilled every iteration
    embeddings: Tensor | None = None  # (V, D) input embeddings of the image codes, for GSD's rule
    progress: list[int] = field(default_factory=list)  # n after each iteration (read back by the loop)

    @property
    def draft_length(self) -> int:
        return self.draft_probs.shape[1]


def _row_starts(cells: Tensor, padded: int) -> Tensor:
    """(padded,) index of the first entry of every entry's row; padding past the sequence points to itself."""
    starts = torch.arange(padded)
    rows = cells[:, 0].contiguous()
    first = torch.searchsorted(rows, rows)  # rows are sorted, so this is the first entry of the same row
    starts[: len(cells)] = first
    return starts


def token_mass(state: SpeculativeState, logits: Tensor, probs: Tensor, draft_probs: Tensor,
               codes: Tensor) -> tuple[Tensor, Tensor]:
    """SJD's rule (§4.1 step 2): p(x_i) and q(x_i) for draft codes (B, L) -> two (B, L) tensors."""
    return probs.gather(-1, codes[..., None])[..., 0], draft_probs.gather(-1, codes[..., None])[..., 0]


def jacobi_update(state: SpeculativeState, probs: Tensor, drafts: Tensor, accept: Tensor, num_accepted: Tensor,
                  coupled: bool) -> Tensor:
    """Codes (B, T) for window positions 0..L: committed up to a, then next iteration's drafts (§4.1-4.2);
    ``coupled``: the SCD maximal coupling instead of fresh draws."""
    batch = drafts.shape[0]
    no_draft = torch.zeros_like(probs[:, :1])  # the bonus position L has no draft: residual = p
    residual = (probs - torch.cat([state.draft_probs, no_draft], dim=1)).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, probs)  # §4.1 pitfall: empty residual -> p
    accept = torch.cat([accept, accept.new_zeros(batch, 1)], dim=1)  # (B, T)
    drafts = torch.cat([drafts, drafts.new_zeros(batch, 1)], dim=1)
    kept = torch.where(accept, drafts, draw(residual, state.draw_uniform))  # accept-or-residual: marginal p
    if coupled:
        return kept  # SCD: every later position keeps its draft with probability min(1, p/q)
    fresh = draw(probs, state.draw_uniform)  # plain Jacobi update; position a uses `kept`, so one uniform each
    return torch.where(state.offsets[None, :] <= num_accepted, kept, fresh)


def initial_drafts(state: SpeculativeState, first: Tensor, left: Tensor, draft_init: str) -> Tensor:
    """Codes (B, L) for new drafts at entries first .. first+L-1; ``left`` (B,) is the code at entry first-1.

    ``repeat_horizon`` copies the nearest known token to the left in the same row (a row that starts inside
    the block repeats the random code drawn for its first entry); ``random`` takes uniform codes (§4.1).
    """
    if draft_init == "random":
        return state.init_codes
    entries = first + state.offsets[:-1]  # (L,)
    row_start = state.row_start.index_select(0, entries)
    own_start = (row_start - first).clamp(min=0)  # block index of the row's first entry when it is inside
    return torch.where((row_start < first)[None, :], left[:, None], state.init_codes.index_select(1, own_start))


class SpeculativeMethod(Method[SpeculativeState]):
    """A method on this loop: a subclass gives its verification rule ``_rule`` (see :meth:`_step`)."""

    options: SpeculativeOptions

    @property
    def coupled(self) -> bool:
        """Whether the Jacobi update keeps drafts under the SCD maximal coupling (SJD's ``coupling`` option)."""
        return False

    def _rule(self, state: SpeculativeState, logits: Tensor, probs: Tensor, draft_probs: Tensor,
              codes: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def build(self, prefix: Prefix, batch: int, grid: tuple[int, int], sampling: SamplingConfig) -> SpeculativeState:
        """Allocate every buffer of a speculative generation (cache, window, randomness)."""
        bb, length, device = self.backbone, self.options.draft_length, self.backbone.device
        # the window and the next one may run past the last entry
        cells, sequence = sequence_fields(bb, prefix, grid, batch, pad=2 * length)
        num_entries = sequence["num_entries"]
        cache = bb.new_cache(prefix.batch_size, prefix.length + num_entries + length)
        entry = torch.arange(num_entries + 2 * length, device=device)
        # a window reads the slots before P + n + L, for n committed entries, 1 <= n < M
        plan = self.shapes.plan(None, torch.arange(cache.length, device=device),
                                [prefix.length + length + 1, prefix.length + length + num_entries - 1])
        return SpeculativeState(
            prefix=prefix, grid=grid, sampling=sampling, cache=cache, key_valid=image_key_valid(prefix, cache.length),
            plan=plan, **sequence,
            auto_accept=(sequence["forced"] >= 0) | (entry >= num_entries),
            row_start=_row_starts(cells, len(entry)).to(device),
            offsets=torch.arange(length + 1, device=device),
            draft_probs=torch.zeros(batch, length, bb.codebook_size, device=device),
            accepted=torch.zeros((), dtype=torch.long, device=device),
            uniform=torch.zeros(batch, length, device=device),
            init_codes=torch.zeros(batch, length, dtype=torch.long, device=device),
            draw_uniform=new_uniform((batch, length + 1), device),  # zeros when greedy: one-hot p draws its argmax
        )

    def reset(self, state: SpeculativeState) -> None:
        state.tokens.fill_(self.backbone.code_offset)
        for buffer in (state.draft_probs, state.accepted, state.uniform, state.init_codes, state.draw_uniform):
            buffer.zero_()
        state.progress.clear()

    def refill(self, state: SpeculativeState, draws: int, generator: torch.Generator | None) -> None:
        """Draw this iteration's randomness from the seeded generator, outside the compiled step."""
        state.uniform.uniform_(generator=generator)
        state.init_codes.random_(0, state.draft_probs.shape[-1], generator=generator)
        refill_uniform(state.draw_uniform, state.sampling, generator)

    def start(self, state: SpeculativeState) -> None:
        """Prefill and commit entry 0, then fill the first window with initial drafts."""
        bb = self.backbone
        start_sequence(bb, state, state.draw_uniform[:, 0])
        one = torch.ones((), dtype=torch.long, device=bb.device)
        init = initial_drafts(state, one, state.tokens[:, 0] - bb.code_offset, self.options.draft_init)  # entries 1..L
        commit(bb, state, one + state.offsets[:-1], init)
        state.draft_probs.zero_().scatter_(-1, init[..., None], 1.0)
        state.accepted.fill_(1)

    def _step(self, state: SpeculativeState, keys: Tensor) -> None:
        """One speculative Jacobi iteration (module docstring, steps 1-4); static shapes, no host sync.

        ``keys`` (S',) are the cache slots attention reads, at least up to the window's last slot."""
        bb, vocab = self.backbone, self.backbone.codebook_size
        entries = state.accepted - 1 + state.offsets  # (T,) last committed entry, then the L drafts
        h = causal_chunk(bb, state, entries, keys)  # both CFG halves see the same drafts (C7)
        logits = guided(bb.logits(h), state.sampling, bb.native_cfg, entries=entries + 1)  # (B, T, V)
        probs = processed_probs(logits, state.sampling)  # (B, T, V) the target p of entries n .. n+L
        drafts = (state.tokens.index_select(1, entries[1:]) - bb.code_offset).clamp(0, vocab - 1)  # (B, L)
        p_mass, q_mass = self._rule(state, logits[:, :-1], probs[:, :-1], state.draft_probs, drafts)
        accept = (state.uniform * q_mass < p_mass) | state.auto_accept.index_select(0, entries[1:])  # (B, L)
        num_accepted = accept.long().cumprod(1).sum(1).min()  # 0-d a, the batch minimum (official SJD)
        codes = jacobi_update(state, probs, drafts, accept, num_accepted, self.coupled)  # (B, T) entries n .. n+L
        first_new = state.accepted + state.draft_length + 1  # entries past the window need initial drafts
        init = initial_drafts(state, first_new, codes[:, -1], self.options.draft_init)  # (B, L) n+L+1 .. n+2L
        commit(bb, state, state.accepted + torch.arange(2 * state.draft_length + 1, device=codes.device),
               torch.cat([codes, init], dim=1))
        source = num_accepted + 1 + state.offsets[:-1]  # (L,) next window j <- this window position a+1+j
        from_probs = (source <= state.draft_length)[None, :, None]
        one_hot = torch.zeros_like(state.draft_probs).scatter_(-1, init[..., None], 1.0)
        shifted_init = one_hot.index_select(1, (source - state.draft_length - 1).clamp(min=0))
        state.draft_probs.copy_(
            torch.where(from_probs, probs.index_select(1, source.clamp(max=state.draft_length)), shifted_init))
        state.accepted.add_(num_accepted + 1)

    def steps(self, state: SpeculativeState):
        """Steps until every entry is committed: the window grows with the count read back after each."""
        committed, length = 1, state.prefix.length + state.draft_length  # a window reads slots < P + n + L
        while committed < state.num_entries:
            yield 0, (state.plan.window(length + committed),)
            committed = int(state.accepted)  # the one host sync per iteration: the loop's stopping test
            state.progress.append(committed)

    def codes(self, state: SpeculativeState) -> Generation:
        return Generation(sequence_codes(self.backbone, state), num_forward_passes=1 + len(state.progress))
