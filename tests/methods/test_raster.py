"""Raster decoding reads only the cache slots written so far."""

from __future__ import annotations

from helpers import random_gpt

from flashar.config import SamplingConfig
from flashar.methods.raster import Raster
from flashar.sampling import make_generator


def test_each_step_attends_to_the_slots_written_so_far():
    backbone = random_gpt()
    spans = []
    forward = backbone.forward

    def record(x, positions, mask, cache=None, slots=None, tap=None):
        spans.append((mask.shape[-1], cache.length))
        return forward(x, positions, mask, cache, slots, tap)

    backbone.forward = record
    Raster(backbone).generate([1], (2, 3), SamplingConfig(cfg_scale=2.0), make_generator(0, "cpu"))
    prefix, cells = 1, 6
    assert [span for span, _ in spans] == [prefix + j for j in range(cells)]  # prefill, then P + j at step j
    assert len({length for _, length in spans}) == 1 and spans[0][1] >= prefix + cells  # one static cache
