"""ZipAR: He et al., ICML 2025, arXiv 2412.04062 (peer_methods.md §4.5; code ThisisBillhe/ZipAR).

Training-free spatially parallel decoding. Row 0 is decoded in raster order; row 1 starts once row 0 is
complete, and every later row starts once the row above has ``window`` (w) tokens. From then on each
forward pass feeds, for every active row, its newest token and samples that row's next token, so several
rows advance together with no verification (lossy). A row's first token is predicted from the last
entry of the row above: its real token once that row is complete, otherwise a provisional stand-in at
that position (the newest token of the row above, or its forced row-end token, as in the official
LlamaGen and Lumina-mGPT code). When that row completes, its last token is fed once more at its own slot,
so the rows below attend to the real token.

Cache slots are written at explicit indices and each query sees the slots at raster positions up to its
own. The cache holds the prefix, then one scratch slot per chunk position, then the entries in raster
order, so the slots a step can see are a prefix of the cache that attention reads alone (its length is the
dynamic dimension of the one compiled graph off CUDA, ``flashar.shapes``). With ``mask_unwritten``
(default) only slots that have already been written are visible and a provisional stand-in lives in a
scratch slot that only its own query sees; without it the step reproduces the official code, which also
attends to unwritten (zero) slots and leaves the stand-in in the real slot until the row above completes.
The whole schedule is fixed by (H, W, w), so the step is sync-free and compiled once. A chunk's tokens come
first in its row of the schedule's (K, T) tables; the step feeds as many of them as the chunk has (at least
2): off CUDA that width is the second dynamic dimension of the one graph, under CUDA graphs every chunk is
padded to T (``flashar.shapes``).

Forward passes: 2W + (H - 2)·w for H >= 2 rows of W cells (W when H = 1; w is capped at W, where it
becomes raster order), the prefill included; rows with a forced row-end token count it as a column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from pydantic import Field
from torch import Tensor

from flashar.backbone import Prefix
from flashar.config import Config, SamplingConfig
from flashar.decoding import (Generation, Method, TokenState, commit, feed, guided, image_key_valid, native_sequence,
                              sequence_codes, start_sequence)
from flashar.hookspecs import hookimpl
from flashar.sampling import new_uniform, sample


class ZipAROptions(Config):
    """ZipAR."""

    window: int = Field(8, ge=1,
        description="w: a row starts once the row above has w tokens (official LlamaGen c2i script: 8); w >= W is "
        "raster order.")
    mask_unwritten: bool = Field(
        True, description="Hide cache slots not yet written and keep provisional row-start tokens out of the cache; "
        "--no-mask-unwritten reproduces the official code, which attends to unwritten (zero) slots.")


class Feed(NamedTuple):
    """One token of a forward chunk."""

    src: int  # entry whose token is fed
    at: int  # entry whose position (and, unless provisional, cache slot) the token takes
    dst: int  # entry predicted from its output, -1 for none
    provisional: bool = False  # a stand-in for the last entry of an incomplete row


def row_starts(row_lengths: Sequence[int], window: int) -> list[int]:
    """The step at which each row predicts its first entry (step 0 is the prefill, which predicts (0, 0))."""
    starts = [0]
    for r in range(1, len(row_lengths)):
        lead = row_lengths[0] if r == 1 else min(window, row_lengths[r - 1])  # row 1 waits for all of row 0
        starts.append(starts[-1] + lead)
    return starts


def schedule(row_lengths: Sequence[int], is_cell: Sequence[bool], window: int) -> list[list[Feed]]:
    """The chunk fed at each step 1..K: rows in flight, row starts and row finishers (module docstring)."""
    firsts = [sum(row_lengths[:r]) for r in range(len(row_lengths))]
    starts = row_starts(row_lengths, window)
    steps = []
    for k in range(1, starts[-1] + row_lengths[-1]):
        chunk = []
        for r, (first, length, begin) in enumerate(zip(firsts, row_lengths, starts)):
            col = k - begin
            if 0 < col < length:
                chunk.append(Feed(first + col - 1, first + col - 1, first + col))
            elif col == 0 and r > 0:
                chunk.append(_bridge(k, firsts[r - 1], row_lengths[r - 1], starts[r - 1], first, is_cell))
            elif col == length and r + 1 < len(starts) and starts[r + 1] < k:
                last = first + length - 1  # the real last token, for the rows below
                chunk.append(Feed(last, last, -1))
        steps.append(chunk)
    return steps


def _bridge(k: int, above_first: int, above_length: int, above_start: int, dst: int, is_cell: Sequence[bool]) -> Feed:
    """The token that predicts a row's first entry at step k: the row above's last entry, or a stand-in."""
    last = above_first + above_length - 1
    if above_start + above_length - 1 < k:
        return Feed(last, last, dst)  # the row above is complete: this is raster's own input
    newest = above_first + k - 1 - above_start  # the row above's newest token (predicted at step k - 1)
    return Feed(last if not is_cell[last] else newest, last, dst, provisional=True)


def num_passes(row_lengths: Sequence[int], window: int) -> int:
    """Forward passes of the schedule, prefill included."""
    return row_starts(row_lengths, window)[-1] + row_lengths[-1]


def _tables(steps: list[list[Feed]], num_entries: int, width: int, prefix_length: int,
            mask_unwritten: bool) -> dict[str, Tensor]:
    """(K, T) tensors of the schedule; padding feeds a scratch entry into a scratch slot that only it sees.

    Slots: the prefix, then the T scratch slots (P + i), then entry j at P + T + j."""
    shape = (len(steps), width)
    position = torch.arange(width).expand(shape)
    scratch = num_entries + position  # (K, T) one scratch entry per chunk position
    table = {"src": scratch.clone(), "at": scratch.clone(), "dst": scratch.clone(), "slot": prefix_length + position,
             "raster": torch.full(shape, -1), "real": torch.zeros(shape, dtype=torch.bool)}
    for k, chunk in enumerate(steps):
        for i, fed in enumerate(chunk):
            table["src"][k, i], table["at"][k, i], table["raster"][k, i] = fed.src, fed.at, fed.at
            table["real"][k, i] = True
            if fed.dst >= 0:
                table["dst"][k, i] = fed.dst
            if not (fed.provisional and mask_unwritten):
                table["slot"][k, i] = prefix_length + width + fed.at
    return table


def _slot_tables(table: dict[str, Tensor], cache_length: int, num_entries: int, width: int, prefix_length: int,
                 mask_unwritten: bool) -> tuple[Tensor, Tensor]:
    """Per slot: the raster index it holds (prefix -1, scratch past everything) and the step it appears."""
    slot = torch.arange(cache_length)
    first = prefix_length + width  # the slot of entry 0
    grid_slot = (slot >= first) & (slot < first + num_entries)
    raster = torch.where(grid_slot, slot - first, num_entries + width + cache_length)
    raster[:prefix_length] = -1
    never = len(table["src"]) + 1
    written = torch.full((cache_length,), -1 if not mask_unwritten else never)
    written[:prefix_length] = -1
    if mask_unwritten:  # a slot becomes visible at the step its real token is fed (each is written once)
        real_slot = table["real"] & (table["slot"] >= first)
        steps = torch.arange(len(table["src"]))[:, None].expand_as(table["slot"])
        written.scatter_reduce_(0, table["slot"][real_slot], steps[real_slot], reduce="amin")
    return raster, written


@dataclass
class ZipARState(TokenState):  # entries [M, M + T) are scratch, one per chunk position
    src: Tensor  # (K, T) entry whose token each chunk position feeds
    dst: Tensor  # (K, T) entry each chunk position predicts (a scratch entry when none)
    slots: Tensor  # (K, T) cache slot each chunk position writes
    query_raster: Tensor  # (K, T) raster index each chunk position sees up to (-1 for padding)
    positions: Tensor  # (K*T, ...) position encoding of every chunk position
    slot_raster: Tensor  # (S,) raster index held by each slot: -1 prefix, M + T + S scratch
    slot_written: Tensor  # (S,) step from which a slot is visible (-1: always)
    initial: Tensor  # (M + T,) token ids before decoding: forced ones, the first code elsewhere
    uniform: Tensor  # (B, T) U[0, 1) for the step's draws, refilled every step


class ZipAR(Method[ZipARState]):
    id = "zipar"
    description = "ZipAR (lossy, training-free): rows start w tokens behind the row above and decode in parallel."
    Options = ZipAROptions
    options: ZipAROptions

    @staticmethod
    def num_forward_passes(height: int, width: int, window: int | None = None) -> int:
        return num_passes([width] * height, ZipAROptions().window if window is None else window)

    def passes(self, grid: tuple[int, int]) -> int:
        return self.num_forward_passes(*grid, self.options.window)

    def build(self, prefix: Prefix, batch: int, grid: tuple[int, int], sampling: SamplingConfig) -> ZipARState:
        bb, device = self.backbone, self.backbone.device
        cells, forced = native_sequence(bb, grid)
        row_lengths = torch.bincount(cells[:, 0]).tolist()
        steps = schedule(row_lengths, (forced < 0).tolist(), self.options.window)
        num_entries, width = len(cells), max(len(chunk) for chunk in steps) if steps else 1
        cache = bb.new_cache(prefix.batch_size, prefix.length + width + num_entries + 1)  # the last slot is never read
        table = _tables(steps, num_entries, width, prefix.length, self.options.mask_unwritten)
        slot_raster, slot_written = _slot_tables(
            table, cache.length, num_entries, width, prefix.length, self.options.mask_unwritten)
        forced = torch.cat([forced, forced.new_full((width,), -1)])  # the scratch entries are never forced
        at_cells = torch.where(table["real"][..., None], cells[table["at"].clamp(max=num_entries - 1)], 0)
        # step k reads the prefix, the T scratch slots and the entries up to its last query's raster index
        # and feeds its chunk's tokens, the first columns of its row of the tables (padding past them)
        position_index = torch.arange(len(steps) * width, device=device).view(len(steps), width)
        plan = self.shapes.plan(torch.arange(len(steps), device=device), torch.arange(cache.length, device=device),
                                (prefix.length + width + 1 + table["raster"].amax(1)).tolist(), table=position_index,
                                widths=[len(chunk) for chunk in steps])
        return ZipARState(
            prefix=prefix, grid=grid, sampling=sampling, cache=cache, key_valid=image_key_valid(prefix, cache.length),
            plan=plan, num_entries=num_entries,
            src=table["src"].to(device), dst=table["dst"].to(device), slots=table["slot"].to(device),
            query_raster=table["raster"].to(device),
            positions=bb.cell_positions(at_cells.view(-1, 2).to(device), prefix.length, native=True, grid=grid),
            slot_raster=slot_raster.to(device), slot_written=slot_written.to(device),
            forced=forced.to(device), initial=torch.where(forced >= 0, forced, bb.code_offset).to(device),
            tokens=torch.empty(batch, num_entries + width, dtype=torch.long, device=device),
            uniform=new_uniform((batch, width), device),
        )

    def reset(self, state: ZipARState) -> None:
        state.tokens.copy_(state.initial.expand_as(state.tokens))
        state.uniform.zero_()

    def start(self, state: ZipARState) -> None:
        start_sequence(self.backbone, state, state.uniform[:, 0])  # the prefill predicts entry 0

    def _step(self, state: ZipARState, k: Tensor, chunks: Tensor, keys: Tensor) -> None:
        """Feed chunk k, sample every row's next token, write them into ``state.tokens`` (no host sync).

        ``chunks`` (K, T') holds the flat index (k * T + i) of each of the T' chunk positions fed, of every
        step; ``keys`` (S',) is the window of slot indices attention reads (the plan's key length at least)."""
        bb, sampling = self.backbone, state.sampling
        fed = chunks.index_select(0, k.view(1))[0]  # (T',) index_select, not t[k]: a 0-d index would become an int
        src, dst, slots, raster = (
            t.view(-1).index_select(0, fed) for t in (state.src, state.dst, state.slots, state.query_raster))
        length = keys.shape[0]
        visible = (state.slot_raster[None, :length] <= raster[:, None]) & (state.slot_written[None, :length] <= k)
        positions = state.positions.index_select(0, fed)
        h, _ = feed(
            bb, state, state.tokens.index_select(1, src), positions, visible | (keys[None, :] == slots[:, None]), slots)
        # chunk position i draws with uniform i (gathered: a slice as wide as the buffer would be specialised on)
        uniform = state.uniform.index_select(1, fed - k * state.uniform.shape[1])
        codes = sample(guided(bb.logits(h), sampling, bb.native_cfg, entries=dst), uniform, sampling)  # (B, T')
        commit(bb, state, dst, codes)

    def codes(self, state: ZipARState) -> Generation:
        return Generation(sequence_codes(self.backbone, state), num_forward_passes=1 + len(state.plan.args))


@hookimpl
def flashar_register_methods(register):
    register(ZipAR)
