"""FlashAR anti-diagonal decoding (Zhou et al., arXiv 2605.09430; reference/flashar_method.md §8).

After adaptation the model predicts every cell of anti-diagonal s + 1 from diagonals <= s: the
horizontal head reads the left neighbour's final hidden state, the vertical branch the upper neighbour's,
and a learned gate mixes the two logit vectors. Decoding prefills the prefix (which predicts the corner),
then each step appends the diagonal just sampled (one backbone forward over its cells, with the branch
run on the layer-b hidden states) and samples the whole next diagonal, every cell independently.
An H x W grid costs 1 prefill + (H + W - 2) steps = H + W - 1 forward passes.

Both caches store cells diagonal by diagonal (the backbone at slot P + rank, the branch at slot rank,
rank = a cell's place in diagonal order), so the keys a query on diagonal s sees, those of diagonals
<= s, are a prefix of the cache.

Shapes: a step takes diagonal t at its own length and attends to that prefix only, eager or compiled
on CPU (where the two lengths are the dynamic dimensions of the one graph). CUDA graphs need static
shapes, so there every diagonal is padded to T = min(H, W) slots and attention masks the whole cache;
padded slots read and write a scratch cell (index H*W) and a scratch cache slot that no query ever sees,
so one compiled step serves all steps (``buckets`` trades padded compute for graphs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import Field
from torch import Tensor

from flashar import grid as G
from flashar.backbone import KVCache, Prefix
from flashar.branch import CORNER, cell_kinds
from flashar.compilation import mark_static
from flashar.config import Config, SamplingConfig
from flashar.errors import FlashARError
from flashar.decoding import Generation, Method, guided, image_key_valid, key_mask, prefill, state_nbytes
from flashar.hookspecs import hookimpl
from flashar.sampling import new_uniform, refill_uniform, sample


class FlashAROptions(Config):
    adapter: Path | None = Field(None, description="Adapter folder written by `flashar adapt` (or a released FlashAR checkpoint the backend can read).")
    buckets: int | None = Field(None, ge=1, description="Static diagonal sizes: 1 pads every diagonal to min(H, W) (one compiled graph); "
                                "N pads each to the nearest of N sizes, cutting padded compute at the cost of N graphs. "
                                "Default: every diagonal at its own length (eager, or compiled on CPU with the length as the one dynamic "
                                "dimension); 1 when compiled for CUDA graphs, which need static shapes.")


NEVER = 1 << 30  # step id of scratch slots: never visible


@dataclass
class FlashARState:
    prefix: Prefix
    sampling: SamplingConfig
    cache: KVCache  # backbone, S >= P + N + 1 slots (the last image slot is scratch)
    branch_cache: KVCache  # vertical blocks, N + 1 slots
    diagonals: dict[int, Tensor]  # size -> (D, size) raster index of each slot of each diagonal, scratch N where padded
    sizes: list[int]  # the padded size used by step t (python ints, chosen in setup)
    counts: list[int]  # the number of cells of diagonal t (the uniforms a step needs)
    key_lengths: list[int]  # backbone slots step t reads: P + the cells of diagonals <= t - 1 (2 at least, so
    # that no window has one slot, a size torch.compile would specialise on; the mask hides the extra one)
    rank: Tensor  # (N + 1,) place of each cell in diagonal order (its branch slot; backbone slot P + rank)
    positions: Tensor  # (N + 1, ...) position encoding of every cell (+ scratch)
    slot_step: Tensor  # (S,) diagonal of the cell stored in each backbone slot (ascending); -1 prefix, NEVER scratch
    branch_step: Tensor  # (S_v,) diagonal of the cell in each branch slot; NEVER for scratch
    key_valid: Tensor  # (1 or B', S) valid prefix slots and all other slots
    left: Tensor  # (N + 1,) raster index of the left neighbour (N if none)
    up: Tensor  # (N + 1,) raster index of the upper neighbour (N if none)
    kind: Tensor  # (N + 1,) cell kind (interior, first row, first column, corner)
    hidden: Tensor  # (B', N + 1, D) final hidden state of every appended cell
    vertical: Tensor  # (B', N + 1, D) vertical-branch output of every appended cell
    tokens: Tensor  # (B, N + 1) sampled codes (index N is scratch)
    steps: Tensor  # (D,) arange
    uniform: Tensor  # (T, B) U[0, 1) for the draws of a diagonal's cells (slot first: a diagonal's slice is contiguous)
    teacher: bool = False  # teacher forcing: keep given tokens and record logits
    logits: Tensor | None = None  # (B', N + 1, V) fused logits per cell, in teacher forcing


class FlashAR(Method):
    id = "flashar"
    description = "FlashAR anti-diagonal decoding with an adapted vertical branch and gate: H+W-1 forward passes."
    Options = FlashAROptions
    requires_adapter = True

    def __init__(self, backbone, options=None, *, compile=False, compile_backend="inductor", adapter=None,
                 own_backbone=False):
        if adapter is None:
            from flashar.adapter import load_adapter

            path = options.adapter if options is not None and options.adapter is not None else backbone.default_adapter
            if path is None:
                raise FlashARError("method 'flashar' needs an adapter; pass --adapter DIR (a folder written by `flashar adapt`)")
            adapter = load_adapter(path, backbone, copy_backbone=not own_backbone)
        super().__init__(adapter.backbone, options, compile=compile, compile_backend=compile_backend, adapter=adapter,
                         own_backbone=own_backbone)
        self.head = adapter.head

    @staticmethod
    def num_forward_passes(height: int, width: int) -> int:
        return height + width - 1

    # --- setup: everything allocated once -------------------------------------------------------
    def setup(self, conditions: Sequence[Any], grid: tuple[int, int], sampling: SamplingConfig) -> FlashARState:
        bb, device = self.backbone, self.backbone.device
        height, width = grid
        self.adapter.check_grid(grid)
        num_cells = height * width
        # the uncond rows the FlashAR parts are trained with (the conditional template around an empty condition)
        prefix = bb.prefix(conditions, cfg=sampling.use_cfg, grid=grid, unconditional="empty")
        rows = prefix.batch_size
        cache = bb.new_cache(rows, prefix.length + num_cells + 1)
        diagonals, valid = G.diagonal_slots(height, width)
        buckets = self.options.buckets or (1 if self.static_shapes else min(height, width))
        counts = valid.sum(1).tolist()
        order = torch.cat([diagonals[valid], torch.tensor([num_cells])])  # raster index by slot, scratch last
        rank = torch.empty_like(order)
        rank[order] = torch.arange(num_cells + 1)
        tables, step_sizes = bucket_tables(diagonals.to(device), counts, buckets)
        if self.compiled and self.options.buckets is None:
            self.mark_dynamic(tables.values(), 1, min(height, width))
        steps = torch.cat([G.step_ids(height, width), torch.tensor([NEVER])])[order]  # (N + 1,) by slot
        slot_step = torch.full((cache.length,), NEVER)
        slot_step[: prefix.length] = -1
        slot_step[prefix.length : prefix.length + num_cells + 1] = steps
        key_valid = image_key_valid(prefix, cache.length)
        branch_cache = self.head.new_cache(bb, rows, num_cells + 1)
        branch_step = torch.full((branch_cache.length,), NEVER)
        branch_step[: num_cells + 1] = steps
        seen = torch.tensor(counts).cumsum(0).tolist()  # cells on diagonals <= s
        key_lengths = [prefix.length + max(seen[max(t - 1, 0)], 2) for t in range(len(counts))]
        cells = torch.cat([G.raster_cells(height, width), torch.zeros(1, 2, dtype=torch.long)])
        left, up = G.neighbour_index(height, width)
        scratch = torch.tensor([num_cells])
        state = FlashARState(
            prefix=prefix, sampling=sampling, cache=cache,
            branch_cache=branch_cache,
            diagonals=tables, sizes=step_sizes, counts=counts, key_lengths=key_lengths, rank=rank.to(device),
            positions=bb.cell_positions(cells.to(device), prefix.length, grid=grid),
            slot_step=slot_step.to(device), branch_step=branch_step.to(device), key_valid=key_valid,
            left=torch.cat([left, scratch]).to(device), up=torch.cat([up, scratch]).to(device),
            kind=torch.cat([cell_kinds(height, width), torch.tensor([CORNER])]).to(device),
            hidden=torch.zeros(rows, num_cells + 1, bb.dim, dtype=bb.dtype, device=device),
            vertical=torch.zeros(rows, num_cells + 1, bb.dim, dtype=bb.dtype, device=device),
            tokens=torch.zeros(len(conditions), num_cells + 1, dtype=torch.long, device=device),
            steps=torch.arange(G.num_diagonals(height, width), device=device),
            uniform=new_uniform((diagonals.shape[1], len(conditions)), device),
        )
        mark_static(state.hidden, state.vertical, state.tokens, state.uniform)  # mutated by the step / the loop
        return state

    # --- the compiled step --------------------------------------------------------------------------
    def _append(self, st: FlashARState, cells: Tensor, s: Tensor, keys: Tensor) -> None:
        """One backbone forward over the cells (T,) of diagonal s, then the branch; store h and v.

        ``keys`` (S',) is the window of ``slot_step`` attention reads, P + the cells of diagonals <= s at least."""
        bb = self.backbone
        ids = bb.code_ids(st.tokens.index_select(1, cells))  # (B, T)
        if st.sampling.use_cfg:
            ids = torch.cat([ids, ids])  # both CFG halves see the same tokens
        positions = st.positions.index_select(0, cells)
        slots = st.rank.index_select(0, cells)
        length = keys.shape[0]
        mask = key_mask(st.key_valid[:, :length], (keys <= s)[None, :].expand(len(cells), -1))
        h, h_tap = bb(bb.embed(ids), positions, mask, st.cache, st.prefix.length + slots, tap=self.head.branch_layer)
        branch_keys = st.branch_step[: length - st.prefix.length]
        branch_mask = (branch_keys <= s)[None, None, None, :].expand(1, 1, len(cells), -1)  # broadcast over rows
        v = self.head.vertical(bb, h_tap, positions, branch_mask, st.branch_cache, slots)
        st.hidden.index_copy_(1, cells, h)
        st.vertical.index_copy_(1, cells, v)

    def _predict(self, st: FlashARState, cells: Tensor, t: Tensor) -> None:
        """Fused logits for the cells (T,) of diagonal t from their neighbours; sample and store codes."""
        h_left = st.hidden.index_select(1, st.left.index_select(0, cells))  # (B', T, D)
        v_up = st.vertical.index_select(1, st.up.index_select(0, cells))
        logits, _ = self.head.fuse(self.backbone, h_left, v_up, st.kind.index_select(0, cells))
        self._store(st, cells, logits)

    def _store(self, st: FlashARState, cells: Tensor, logits: Tensor) -> None:
        """Sample codes for ``cells`` from fused logits (B', T, V), or record the logits when teacher forcing."""
        if st.teacher:
            st.logits.index_copy_(1, cells, logits)
            return
        codes = sample(guided(logits, st.sampling), st.uniform[: cells.shape[0]].transpose(0, 1), st.sampling)  # (B, T)
        st.tokens.index_copy_(1, cells, codes)

    def _step(self, st: FlashARState, t: Tensor, diagonals: Tensor, keys: Tensor) -> None:
        """Append diagonal t-1, predict diagonal t (t is a 0-d tensor).

        ``diagonals`` (D, T') is the diagonal table of the size this step uses, ``keys`` the window of
        ``slot_step`` its attention reads."""
        previous, current = diagonals.index_select(0, torch.stack([t - 1, t])).unbind(0)  # (T',) each
        self._append(st, previous, t - 1, keys)
        self._predict(st, current, t)

    # --- the loop -----------------------------------------------------------------------------------
    def _prefill(self, st: FlashARState) -> None:
        """The prefix predicts the corner: horizontal on its final state, vertical on its layer-b state (§4)."""
        h, h_tap = prefill(self.backbone, st.prefix, st.cache, tap=self.head.branch_layer)
        corner = torch.zeros(1, dtype=torch.long, device=h.device)
        logits, _ = self.head.fuse(self.backbone, h[:, None], h_tap[:, None], st.kind[corner])
        self._store(st, corner, logits)

    def _run(self, st: FlashARState, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            refill_uniform(st.uniform[:1], st.sampling, generator)
            self._prefill(st)
            bounds = (st.key_lengths[1], st.key_lengths[-1])
            for t in range(1, len(st.steps)):
                refill_uniform(st.uniform[: st.counts[t]], st.sampling, generator)  # padded cells are scratch
                keys = self.key_window(st.slot_step, st.key_lengths[t], bounds)
                self.step(st, st.steps[t], st.diagonals[st.sizes[t]], keys)

    def generate(self, conditions, grid, sampling, generator) -> Generation:
        st = self.setup(conditions, grid, sampling)
        self._run(st, generator)
        codes = st.tokens[:, :-1].reshape(len(conditions), *grid)
        return Generation(codes.cpu(), len(st.steps), state_nbytes(st))

    def teacher_logits(self, conditions, codes: Tensor, sampling: SamplingConfig) -> Tensor:
        """Run the cached decoder on given codes (B, H, W); return the fused logits (B', N, V) it computes."""
        st = self.setup(conditions, tuple(codes.shape[1:]), sampling)
        st.teacher = True
        st.tokens[:, :-1] = codes.flatten(1).to(st.tokens.device)
        st.logits = torch.zeros(st.prefix.batch_size, st.tokens.shape[1], self.backbone.codebook_size, device=st.tokens.device)
        mark_static(st.logits)
        self._run(st, None)
        return st.logits[:, :-1]


def bucket_tables(diagonals: Tensor, lengths: list[int], buckets: int) -> tuple[dict[int, Tensor], list[int]]:
    """Padded diagonal tables per static size, and the size step t uses (it appends t-1 and predicts t).

    Sizes are ceil(T * i / buckets) for i = 1..buckets with T = min(H, W); the valid cells of each
    diagonal come first, so a table of size n is the first n columns of the full one.
    """
    full = diagonals.shape[1]
    sizes = sorted({-(-full * i // buckets) for i in range(1, buckets + 1)})
    need = [max(lengths[max(t - 1, 0)], lengths[t]) for t in range(len(lengths))]
    chosen = [next(size for size in sizes if size >= n) for n in need]
    return {size: diagonals[:, :size].contiguous() for size in set(chosen)}, chosen


@hookimpl
def flashar_register_methods(register):
    register(FlashAR)
