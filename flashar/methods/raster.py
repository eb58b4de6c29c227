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

from flashar.backbone import Prefix
from flashar.config import SamplingConfig
from flashar.decoding import (Generation, Method, SequenceState, causal_chunk, commit, guided, image_key_valid,
                              sequence_codes, sequence_fields, start_sequence)
from flashar.hookspecs import hookimpl
from flashar.sampling import new_uniform, sample


@dataclass
class RasterState(SequenceState):
    uniform: Tensor  # (B,) U[0, 1) for the step's draw, refilled every step


class Raster(Method[RasterState]):
    id = "raster"
    description = "Raster-order next-token decoding (the baseline): H*W forward passes."

    @staticmethod
    def num_forward_passes(height: int, width: int) -> int:
        return height * width

    def build(self, prefix: Prefix, batch: int, grid: tuple[int, int], sampling: SamplingConfig) -> RasterState:
        bb, device = self.backbone, self.backbone.device
        _, sequence = sequence_fields(bb, prefix, grid, batch)
        num_entries = sequence["num_entries"]
        cache = bb.new_cache(prefix.batch_size, prefix.length + num_entries)
        # step j feeds entry j-1 and reads the P + j slots written so far
        plan = self.shapes.plan(torch.arange(num_entries, device=device)[1:], torch.arange(cache.length, device=device),
                                [prefix.length + j for j in range(1, num_entries)])
        return RasterState(prefix=prefix, grid=grid, sampling=sampling, cache=cache, plan=plan,
                           key_valid=image_key_valid(prefix, cache.length), **sequence,
                           uniform=new_uniform((batch,), device))

    def reset(self, state: RasterState) -> None:
        state.tokens.zero_()
        state.uniform.zero_()

    def start(self, state: RasterState) -> None:
        start_sequence(self.backbone, state, state.uniform)

    def _step(self, state: RasterState, j: Tensor, keys: Tensor) -> None:
        """Feed entry j-1, predict entry j (0-d), write it into ``state.tokens``.

        ``keys`` (S',) are the cache slots attention reads: a window of the slot indices, at least the
        P + j slots written so far."""
        h = causal_chunk(self.backbone, state, (j - 1).view(1), keys)  # (B', 1, D)
        logits = guided(self.backbone.logits(h[:, 0]), state.sampling, self.backbone.native_cfg, entries=j)
        commit(self.backbone, state, j.view(1), sample(logits, state.uniform, state.sampling)[:, None])

    def codes(self, state: RasterState) -> Generation:
        return Generation(sequence_codes(self.backbone, state), state.num_entries)


@hookimpl
def flashar_register_methods(register):
    register(Raster)
