"""A method keeps its decode state per shape: a later generation allocates nothing and draws the same tokens."""

from __future__ import annotations

import pytest
import torch
from helpers import random_gpt
from method_helpers import row_end_backbone

from flashar.adapter import Adapter, new_metadata
from flashar.backbone import KVCache
from flashar.branch import FlashARHead
from flashar.compilation import CompileCounter
from flashar.config import BranchConfig, SamplingConfig
from flashar.methods.flashar import FlashAR
from flashar.methods.gsd import GSD
from flashar.methods.raster import Raster
from flashar.methods.sjd import SJD
from flashar.methods.zipar import ZipAR
from flashar.sampling import make_generator

GRID = (3, 4)


def flashar(backbone, **kwargs):
    head = FlashARHead(backbone, BranchConfig(gate="hidden"))
    return FlashAR(backbone, adapter=Adapter(new_metadata(backbone, head, GRID), head, backbone), **kwargs)


METHODS = {
    "raster": lambda bb, **kw: Raster(bb, **kw),
    "flashar": flashar,
    "zipar": lambda bb, **kw: ZipAR(bb, ZipAR.Options(window=2), **kw),
    "zipar-official": lambda bb, **kw: ZipAR(bb, ZipAR.Options(window=2, mask_unwritten=False), **kw),
    "sjd": lambda bb, **kw: SJD(bb, SJD.Options(draft_length=3), **kw),
    "gsd": lambda bb, **kw: GSD(bb, GSD.Options(draft_length=3), **kw),
}


def storage(state) -> list[int]:
    """Data pointers of every buffer a state holds (its caches' included)."""
    pointers = []
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            pointers.append(value.data_ptr())
        elif isinstance(value, KVCache):
            pointers += [t.data_ptr() for t in value.k + value.v]
    return pointers


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("seed", [0, 1])
def test_second_generation_reuses_the_state_and_matches_a_fresh_instance(name, seed):
    backbone = random_gpt() if name != "zipar-official" else row_end_backbone()
    sampling = SamplingConfig(cfg_scale=2.0, top_k=8)
    method = METHODS[name](backbone)
    method.generate([3, 7], GRID, sampling, make_generator(100 + seed, "cpu"))  # a different first generation
    (first,) = method._states.values()
    before = storage(first)
    again = method.generate([1, 2], GRID, sampling, make_generator(seed, "cpu"))
    (second,) = method._states.values()
    assert second is first and storage(second) == before  # no new cache, no new buffer
    fresh = METHODS[name](backbone).generate([1, 2], GRID, sampling, make_generator(seed, "cpu"))
    assert torch.equal(again.codes, fresh.codes) and again.num_forward_passes == fresh.num_forward_passes


def test_other_shapes_get_their_own_state_least_recently_used_first():
    method = Raster(random_gpt())
    method.MAX_STATES = 2
    sampling = SamplingConfig(top_k=4)
    for batch in (1, 2, 3, 1):
        method.generate(list(range(batch)), (2, 2), sampling, make_generator(0, "cpu"))
    assert [key[2] for key in method._states] == [3, 1]  # batch sizes kept, most recent last


def test_compiled_step_is_reused_across_generations():
    torch._dynamo.reset()
    counter = CompileCounter()
    method = flashar(random_gpt(), compile=True, compile_backend=counter)
    sampling = SamplingConfig(cfg_scale=2.0, top_k=8)
    with torch._dynamo.config.patch(error_on_recompile=True):
        codes = [method.generate([1, 2], GRID, sampling, make_generator(seed, "cpu")).codes for seed in (0, 1, 0)]
    assert counter.frames == 1 and torch.equal(codes[0], codes[2]) and not torch.equal(codes[0], codes[1])


@pytest.mark.parametrize("name", ["raster", "flashar", "zipar", "gsd"])
def test_every_state_tensor_is_marked_static_once_and_reused_graphs_still_compile_once(name, monkeypatch):
    """On CUDA every state tensor is a static address (CUDA graphs read it in place). Marked here on CPU too,
    the graph of a kept state guards on those addresses: later generations must reuse it, not recompile."""
    import flashar.decoding as decoding

    marked = []

    def mark(*tensors):
        marked.extend(tensors)
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)

    monkeypatch.setattr(decoding, "mark_static", mark)
    torch._dynamo.reset()
    counter = CompileCounter()
    method = METHODS[name](random_gpt(), compile=True, compile_backend=counter)
    sampling = SamplingConfig(cfg_scale=2.0, top_k=8)
    with torch._dynamo.config.patch(error_on_recompile=True):
        codes = [method.generate([1, 2], GRID, sampling, make_generator(seed, "cpu")).codes for seed in (0, 1, 0)]
    (state,) = method._states.values()
    tensors = [value for value in vars(state).values() if isinstance(value, torch.Tensor)]
    assert len(marked) == len(tensors) and all(any(m is t for m in marked) for t in tensors)  # all, once
    assert counter.frames == 1 and torch.equal(codes[0], codes[2])


def test_guards_are_skipped_from_a_kept_states_second_generation_on(monkeypatch):
    """A state's first generation runs every step shape with guards on (building every graph); later
    generations with the same state skip them, and a new shape starts guarded again."""
    import flashar.decoding as decoding

    skipped = []
    guards_skipped = decoding.guards_skipped
    monkeypatch.setattr(decoding, "guards_skipped", lambda skip: skipped.append(skip) or guards_skipped(skip))
    torch._dynamo.reset()
    method = flashar(random_gpt(), compile=True, compile_backend=CompileCounter())
    sampling = SamplingConfig(cfg_scale=2.0, top_k=8)
    for batch in (2, 2, 1, 2):
        method.generate(list(range(batch)), GRID, sampling, make_generator(0, "cpu"))
    assert skipped == [False, True, False, True]
    eager = flashar(random_gpt())
    eager.generate([1, 2], GRID, sampling, make_generator(0, "cpu"))
    assert [s.generations for s in method._states.values()] == [1, 3] and skipped[-1] is False  # eager: never skipped
    sjd = METHODS["sjd"](random_gpt(), compile=True, compile_backend=CompileCounter())
    for _ in range(2):
        sjd.generate([1, 2], GRID, sampling, make_generator(0, "cpu"))
    assert skipped[-2:] == [False, False]  # data-dependent steps keep their guards


@pytest.mark.parametrize("name", ["raster", "flashar", "sjd"])
def test_unguarded_generations_draw_the_tokens_of_guarded_ones(name, monkeypatch):
    torch._dynamo.reset()
    sampling = SamplingConfig(cfg_scale=2.0, top_k=8)
    runs = {}
    for setting in ("1", "0"):  # FLASHAR_SKIP_GUARDS: on (the default), then off
        monkeypatch.setenv("FLASHAR_SKIP_GUARDS", setting)
        method = METHODS[name](random_gpt(), compile=True, compile_backend=CompileCounter())
        runs[setting] = [
            method.generate([1, 2], GRID, sampling, make_generator(seed, "cpu")).codes for seed in (0, 1, 2)]
    assert all(torch.equal(a, b) for a, b in zip(runs["1"], runs["0"]))
