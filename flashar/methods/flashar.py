"""FlashAR anti-diagonal decoding (Zhou et al., arXiv 2605.09430; reference/flashar_method.md §8).

After adaptation the model predicts every cell of anti-diagonal s + 1 from diagonals <= s: the
horizontal head reads the left neighbour's final hidden state, the vertical branch the upper neighbour's,
and a learned gate mixes the two logit vectors. Decoding prefills the prefix (which predicts the corner),
then each step appends the diagonal just sampled (one backbone forward over its cells, with the branch
run on the layer-b hidden states) and samples the whole next diagonal, every cell independently.
An H x W grid costs 1 prefill + (H + W - 2) steps = H + W - 1 forward passes.

An adapter trained with a row lag k > 1 (``BranchConfig.row_lag``) decodes the diagonals s = k*r + c
instead, k*(H-1) + W passes: each row starts k steps after the row above, so a cell's left neighbour is on
the diagonal before and its upper neighbour k diagonals before (its vertical output waits in ``vertical``),
and every cell also sees the k-1 cells above and to its right. Nothing below depends on k but the tables.

Both caches store cells diagonal by diagonal (a cell's place i in diagonal order is its branch slot, and
P + i its backbone slot), so the keys a query on diagonal s sees, those of diagonals
<= s, are a prefix of the cache.

Shapes: a step takes diagonal t at its own length and attends to that prefix only, eager or compiled
on CPU (where the two lengths are the dynamic dimensions of the one graph). CUDA graphs need static
shapes, so there every diagonal is padded to T = min(H, ceil(W / k)) slots and attention masks the whole cache;
padded slots read and write a scratch cell (index H*W) and a scratch cache slot that no query ever sees,
so one compiled step serves all steps (``buckets`` trades padded compute for graphs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor

from flashar import geometry
from flashar.backbone import KVCache, Prefix
from flashar.branch import CORNER, cell_kinds
from flashar.config import Config, SamplingConfig
from flashar.errors import FlashARError
from flashar.decoding import DecodeState, Generation, Method, feed, guided, image_key_valid, prefill
from flashar.hookspecs import hookimpl
from flashar.sampling import ar1_mixing, new_uniform, refill_uniform, sample


class FlashAROptions(Config):
    adapter: Path | None = Field(None,
        description="Adapter folder written by `flashar adapt` (or a released FlashAR checkpoint the backend can "
        "read).")
    buckets: int | None = Field(None, ge=1,
        description="Static diagonal sizes: 1 pads every diagonal to the longest (one compiled graph); "
        "N pads each to the nearest of N sizes, cutting padded compute at the cost of N graphs. "
        "Default: every diagonal at its own length (eager, or compiled on CPU with the length as the one dynamic "
        "dimension); 1 when compiled for CUDA graphs, which need static shapes.")
    diagonal_coupling: float | None = Field(None, ge=0.0, lt=1.0,
        description="Correlation of the Gaussian copula coupling the draws of "
        "neighbouring cells on one anti-diagonal (0: independent, as in the paper). Default: the "
        "value `flashar adapt` fitted on held-out grids and stored in the adapter (0 if none).")


NEVER = 1 << 30  # step id of scratch slots: never visible


@dataclass
class FlashARState(DecodeState):
    branch_cache: KVCache  # vertical blocks, N + 1 slots (the backbone cache has P + N + 1, the last scratch)
    slot: Tensor  # (N + 1,) place of each cell in diagonal order: its branch slot (backbone slot P + slot)
    positions: Tensor  # (N + 1, ...) position encoding of every cell (+ scratch)
    slot_step: Tensor  # (S,) diagonal of the cell stored in each backbone slot (ascending); -1 prefix, NEVER scratch
    branch_step: Tensor  # (S_v,) diagonal of the cell in each branch slot; NEVER for scratch
    left: Tensor  # (N + 1,) raster index of the left neighbour (N if none)
    up: Tensor  # (N + 1,) raster index of the upper neighbour (N if none)
    kind: Tensor  # (N + 1,) cell kind (interior, first row, first column, corner)
    hidden: Tensor  # (B', N + 1, D) final hidden state of every appended cell
    vertical: Tensor  # (B', N + 1, D) vertical-branch output of every appended cell
    tokens: Tensor  # (B, N + 1) sampled codes (index N is scratch)
    uniform: Tensor  # (T, B) U[0, 1) for the draws of a diagonal's cells (slot first: a diagonal's slice is contiguous)
    mixing: Tensor | None  # (T, T) the copula's AR(1) mixing along a diagonal (None: independent draws)


class FlashAR(Method[FlashARState]):
    id = "flashar"
    description = "FlashAR anti-diagonal decoding with an adapted vertical branch and gate: H+W-1 forward passes."
    Options = FlashAROptions
    options: FlashAROptions
    requires_adapter = True

    def __init__(self, backbone, options=None, *, compile=False, compile_backend="inductor", adapter=None,
                 own_backbone=False):
        if adapter is None:
            from flashar.adapter import load_adapter

            path = options.adapter if options is not None and options.adapter is not None else backbone.default_adapter
            if path is None:
                raise FlashARError(
                    "method 'flashar' needs an adapter; pass --adapter DIR (a folder written by `flashar adapt`)")
            adapter = load_adapter(path, backbone, copy_backbone=not own_backbone)
        super().__init__(adapter.backbone, options, compile=compile, compile_backend=compile_backend)
        self.adapter, self.head = adapter, adapter.head
        own = self.options.diagonal_coupling
        self.coupling = own if own is not None else adapter.metadata.diagonal_coupling

    @staticmethod
    def num_forward_passes(height: int, width: int, row_lag: int = 1) -> int:
        return geometry.num_diagonals(height, width, row_lag)

    def passes(self, grid: tuple[int, int]) -> int:
        return self.num_forward_passes(*grid, self.head.config.row_lag)

    def settings(self) -> dict:
        # the adapter's fitted value unless overridden
        return {**super().settings(), "diagonal_coupling": self.coupling}

    # --- setup: everything allocated once per shape ---------------------------------------------------
    def check_grid(self, grid: tuple[int, int]) -> None:
        self.adapter.check_grid(grid)

    def prefix(self, conditions, grid, sampling) -> Prefix:
        self.check_grid(grid)
        # the uncond rows the FlashAR parts are trained with (the conditional template around an empty condition)
        return self.backbone.prefix(conditions, cfg=sampling.use_cfg, grid=grid, unconditional="empty")

    def build(self, prefix: Prefix, batch: int, grid: tuple[int, int], sampling: SamplingConfig) -> FlashARState:
        bb, device = self.backbone, self.backbone.device
        height, width = grid
        num_cells, rows = height * width, prefix.batch_size
        cache = bb.new_cache(rows, prefix.length + num_cells + 1)
        lag = self.head.config.row_lag
        diagonals, valid = geometry.diagonal_slots(height, width, lag)
        counts = valid.sum(1).tolist()  # cells of diagonal t
        order = torch.cat([diagonals[valid], torch.tensor([num_cells])])  # raster index by slot, scratch last
        slot = torch.empty_like(order)
        slot[order] = torch.arange(num_cells + 1)
        steps = torch.cat([geometry.step_ids(height, width, lag), torch.tensor([NEVER])])[order]  # (N + 1,) by slot
        slot_step = torch.full((cache.length,), NEVER)
        slot_step[: prefix.length] = -1
        slot_step[prefix.length : prefix.length + num_cells + 1] = steps
        branch_cache = self.head.new_cache(bb, rows, num_cells + 1)
        branch_step = torch.full((branch_cache.length,), NEVER)
        branch_step[: num_cells + 1] = steps
        # step t appends diagonal t-1 and predicts diagonal t: it reads the prefix and diagonals <= t-1 (2 at
        # least: the branch's window is this without the prefix), and needs a diagonal table that wide
        seen = torch.tensor(counts).cumsum(0).tolist()
        ts = range(1, len(counts))
        plan = self.shapes.plan(torch.arange(len(counts), device=device)[1:], slot_step.to(device),
                                [prefix.length + seen[t - 1] for t in ts], draws=counts[1:], first_draws=1,
                                table=diagonals.to(device), widths=[max(counts[t - 1], counts[t]) for t in ts],
                                buckets=self.options.buckets, shortest=prefix.length + 2)
        cells = torch.cat([geometry.raster_cells(height, width), torch.zeros(1, 2, dtype=torch.long)])
        left, up = geometry.neighbour_index(height, width)
        scratch = torch.tensor([num_cells])
        return FlashARState(
            prefix=prefix, grid=grid, sampling=sampling, cache=cache, key_valid=image_key_valid(prefix, cache.length),
            plan=plan, branch_cache=branch_cache, slot=slot.to(device),
            positions=bb.cell_positions(cells.to(device), prefix.length, grid=grid),
            slot_step=slot_step.to(device), branch_step=branch_step.to(device),
            left=torch.cat([left, scratch]).to(device), up=torch.cat([up, scratch]).to(device),
            kind=torch.cat([cell_kinds(height, width), torch.tensor([CORNER])]).to(device),
            hidden=torch.zeros(rows, num_cells + 1, bb.dim, dtype=bb.dtype, device=device),
            vertical=torch.zeros(rows, num_cells + 1, bb.dim, dtype=bb.dtype, device=device),
            tokens=torch.zeros(batch, num_cells + 1, dtype=torch.long, device=device),
            uniform=new_uniform((diagonals.shape[1], batch), device),
            mixing=ar1_mixing(diagonals.shape[1], self.coupling).to(device) if self.coupling > 0 else None,
        )

    def reset(self, state: FlashARState) -> None:
        for buffer in (state.hidden, state.vertical, state.tokens, state.uniform):
            buffer.zero_()

    def refill(self, state: FlashARState, draws: int, generator: torch.Generator | None) -> None:
        refill_uniform(state.uniform[:draws] if draws else state.uniform, state.sampling, generator, state.mixing)

    # --- the compiled step --------------------------------------------------------------------------
    def _append(self, state: FlashARState, cells: Tensor, s: Tensor, keys: Tensor) -> None:
        """One backbone forward over the cells (T,) of diagonal s, then the branch; store h and v.

        ``keys`` (S',) is the window of ``slot_step`` attention reads, P + the cells of diagonals <= s at least."""
        bb = self.backbone
        positions, slots = state.positions.index_select(0, cells), state.slot.index_select(0, cells)
        visible = (keys <= s)[None, :].expand(len(cells), -1)
        ids = bb.code_ids(state.tokens.index_select(1, cells))
        h, h_tap = feed(bb, state, ids, positions, visible, state.prefix.length + slots, tap=self.head.branch_layer)
        branch_keys = state.branch_step[: keys.shape[0] - state.prefix.length]
        branch_mask = (branch_keys <= s)[None, None, None, :].expand(1, 1, len(cells), -1)  # broadcast over rows
        v = self.head.vertical(bb, h_tap, positions, branch_mask, state.branch_cache, slots)
        state.hidden.index_copy_(1, cells, h)
        state.vertical.index_copy_(1, cells, v)

    def _predict(self, state: FlashARState, cells: Tensor) -> Tensor:
        """Fused logits (B', T, V) for the cells (T,) of a diagonal, from their neighbours."""
        h_left = state.hidden.index_select(1, state.left.index_select(0, cells))  # (B', T, D)
        v_up = state.vertical.index_select(1, state.up.index_select(0, cells))
        return self.head.fuse(self.backbone, h_left, v_up, state.kind.index_select(0, cells))[0]

    def _store(self, state: FlashARState, cells: Tensor, logits: Tensor) -> None:
        """Sample codes for ``cells`` (T,) from their fused logits (B', T, V)."""
        uniform = state.uniform[: cells.shape[0]].transpose(0, 1)  # (B, T)
        codes = sample(guided(logits, state.sampling), uniform, state.sampling)
        state.tokens.index_copy_(1, cells, codes)

    def _advance(self, state: FlashARState, t: Tensor, diagonals: Tensor, keys: Tensor) -> Tensor:
        """Append diagonal t-1 (t is a 0-d tensor); return the cells (T',) of diagonal t.

        ``diagonals`` (D, T') is the diagonal table of the width this step uses, ``keys`` the window of
        ``slot_step`` its attention reads."""
        previous, current = diagonals.index_select(0, torch.stack([t - 1, t])).unbind(0)  # (T',) each
        self._append(state, previous, t - 1, keys)
        return current

    def _step(self, state: FlashARState, t: Tensor, diagonals: Tensor, keys: Tensor) -> None:
        """Append diagonal t-1, predict and sample diagonal t."""
        current = self._advance(state, t, diagonals, keys)
        self._store(state, current, self._predict(state, current))

    # --- the loop's ends ----------------------------------------------------------------------------
    def _corner(self, state: FlashARState) -> tuple[Tensor, Tensor]:
        """The prefix predicts the corner: horizontal on its final state, vertical on its layer-b state (§4)."""
        h, h_tap = prefill(self.backbone, state.prefix, state.cache, tap=self.head.branch_layer)
        assert h_tap is not None  # prefill returns the tapped state when given a tap
        corner = torch.zeros(1, dtype=torch.long, device=h.device)
        return corner, self.head.fuse(self.backbone, h[:, None], h_tap[:, None], state.kind[corner])[0]

    def start(self, state: FlashARState) -> None:
        self._store(state, *self._corner(state))

    def codes(self, state: FlashARState) -> Generation:
        codes = state.tokens[:, :-1].reshape(-1, *state.grid).to("cpu", copy=True)  # a copy: the state is reused
        return Generation(codes, len(state.plan.args) + 1)

    def teacher_logits(self, conditions, codes: Tensor, sampling: SamplingConfig) -> Tensor:
        """Teacher forcing: run the cached decoder (eagerly) on given codes (B, H, W) and return the fused
        logits (B', N, V) it computes for every cell, instead of sampling."""
        state = self.setup(conditions, (codes.shape[1], codes.shape[2]), sampling)
        state.tokens[:, :-1] = codes.flatten(1).to(state.tokens.device)
        tokens = state.tokens
        logits = torch.zeros(
            state.prefix.batch_size, tokens.shape[1], self.backbone.codebook_size, device=tokens.device)
        with torch.no_grad():
            corner, corner_logits = self._corner(state)
            logits[:, :1] = corner_logits
            for args in state.plan.args:
                current = self._advance(state, *args)
                logits.index_copy_(1, current, self._predict(state, current))
        return logits[:, :-1]


@hookimpl
def flashar_register_methods(register):
    register(FlashAR)
