"""Raster decoding: the baseline every acceleration method is compared against.

The model's own next-token loop (LlamaGen ``generate``, Emu3.5 native layout): prefill the prefix, then
one token per forward pass in raster order on a static KV cache, so an H x W grid costs H * W passes
(plus one per row-end token on backbones whose native layout has them, e.g. Emu3.5's EOL, which are
forced rather than sampled). CFG runs both halves in one batch, mixed in the backbone's native space.
The step always feeds exactly one token and its attention reads only the slots written so far (their
count is the one dynamic dimension of the compiled graph off CUDA; CUDA graphs mask the whole cache), so one
compiled graph serves the whole generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flashar import grid as G
from flashar.backbone import Prefix
from flashar.compilation import mark_static
from flashar.config import SamplingConfig
from flashar.decoding import DecodeState, Generation, Method, guided, image_key_valid, key_mask, prefill
from flashar.hookspecs import hookimpl
from flashar.sampling import new_uniform, sample


@dataclass
class RasterState(DecodeState):
    positions: Tensor  # (M, ...) native position encoding of every sequence entry
    slots: Tensor  # (M,) cache slot of every sequence entry: P + j
    forced: Tensor  # (M,) token id forced at entry j (row ends), -1 where sampled
    is_cell: Tensor  # (M,) bool, True for grid cells
    tokens: Tensor  # (B, M) generated token ids (model vocabulary)
    uniform: Tensor  # (B,) U[0, 1) for the step's draw, refilled every step


class Raster(Method):
    id = "raster"
    description = "Raster-order next-token decoding (the baseline): H*W forward passes."

    @staticmethod
    def num_forward_passes(height: int, width: int) -> int:
        return height * width

    def build(self, prefix: Prefix, batch: int, grid: tuple[int, int], sampling: SamplingConfig) -> RasterState:
        bb, device = self.backbone, self.backbone.device
        cells, is_cell = G.raster_sequence(*grid, bb.row_end_token is not None)
        num_entries = len(cells)
        cache = bb.new_cache(prefix.batch_size, prefix.length + num_entries)
        forced = torch.where(is_cell, -1, bb.row_end_token if bb.row_end_token is not None else -1)
        # step j feeds entry j-1 and reads the P + j slots written so far
        plan = self.shapes.plan(torch.arange(num_entries, device=device)[1:], torch.arange(cache.length, device=device),
                                [prefix.length + j for j in range(1, num_entries)])
        state = RasterState(
            prefix=prefix, grid=grid, sampling=sampling, cache=cache, key_valid=image_key_valid(prefix, cache.length), plan=plan,
            positions=bb.cell_positions(cells.to(device), prefix.length, native=True, grid=grid),
            slots=prefix.length + torch.arange(num_entries, device=device),
            forced=forced.to(device), is_cell=is_cell.to(device),
            tokens=torch.zeros(batch, num_entries, dtype=torch.long, device=device),
            uniform=new_uniform((batch,), device),
        )
        mark_static(state.tokens, state.uniform)  # mutated by the step / refilled by the loop
        return state

    def reset(self, state: RasterState) -> None:
        state.tokens.zero_()
        state.uniform.zero_()

    def _draw(self, state: RasterState, logits: Tensor, j: Tensor) -> Tensor:
        """Guided, sampled code for sequence entry j (0-d), as a token id, forced tokens respected."""
        sampling = state.sampling
        use_cfg = (j <= sampling.cfg_interval + 1) | (sampling.cfg_interval < 0)
        code = sample(guided(logits, sampling, self.backbone.native_cfg, use_cfg), state.uniform, sampling)
        forced = state.forced.index_select(0, j.view(1))  # (1,); not forced[j], which torch may read as an int
        return torch.where(forced >= 0, forced, self.backbone.code_ids(code))

    def start(self, state: RasterState) -> None:
        h, _ = prefill(self.backbone, state.prefix, state.cache)
        state.tokens[:, 0] = self._draw(state, self.backbone.logits(h), state.slots.new_zeros(()))

    def _step(self, state: RasterState, j: Tensor, keys: Tensor) -> None:
        """Feed entry j-1, predict entry j, write it into ``state.tokens``.

        ``keys`` (S',) are the cache slots attention reads: a window of the slot indices, at least the
        P + j slots written so far."""
        prev = (j - 1).view(1)
        ids = state.tokens.index_select(1, prev)  # (B, 1)
        if state.sampling.use_cfg:
            ids = torch.cat([ids, ids])  # both CFG halves consume the same token
        slot = state.slots.index_select(0, prev)
        mask = key_mask(state.key_valid[:, : keys.shape[0]], keys[None, :] <= slot[:, None])
        h, _ = self.backbone(self.backbone.embed(ids), state.positions.index_select(0, prev), mask, state.cache, slot)
        token = self._draw(state, self.backbone.logits(h[:, 0]), j)
        state.tokens.index_copy_(1, j.view(1), token[:, None])

    def codes(self, state: RasterState) -> Generation:
        codes = state.tokens[:, state.is_cell] - self.backbone.code_offset
        return Generation(codes.view(-1, *state.grid).cpu(), len(state.slots))


@hookimpl
def flashar_register_methods(register):
    register(Raster)
