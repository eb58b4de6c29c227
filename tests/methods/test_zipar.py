"""ZipAR: the step-count formula, a schedule that fills every cell once, masking, raster at w = W, CLI."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from click.testing import CliRunner
from helpers import cli_args, random_gpt, write_llamagen
from method_helpers import compile_and_compare, row_end_backbone

from flashar.cli import cli
from flashar.config import SamplingConfig
from flashar.methods.raster import Raster
from flashar.methods.zipar import ZipAR, schedule
from flashar.sampling import make_generator
from flashar.testing import greedy_reference


def formula(height: int, width: int, window: int) -> int:
    """peer_methods.md §6: 2W + (H - 2)·w forward passes (prefill included), w capped at W."""
    return width if height == 1 else 2 * width + (height - 2) * min(window, width)


@pytest.mark.parametrize("grid", [(4, 5), (5, 3), (2, 4), (1, 4), (4, 1), (1, 1)])
@pytest.mark.parametrize("window", [1, 2, 3, 8])
def test_step_count_matches_the_formula(grid, window):
    backbone = random_gpt()
    method = ZipAR(backbone, ZipAR.Options(window=window))
    result = method.generate([3], grid, SamplingConfig(top_k=4), make_generator(0, "cpu"))
    assert (result.num_forward_passes == formula(*grid, window) == ZipAR.num_forward_passes(*grid, window)
            == method.passes(grid))
    assert result.codes.shape == (1, *grid)


def test_official_step_counts_for_a_32x32_grid():
    assert [ZipAR.num_forward_passes(32, 32, w) for w in (16, 8, 4)] == [544, 304, 184]  # peer_methods.md §6


@pytest.mark.parametrize("row_lengths", [[5, 5, 5, 5], [4, 4, 4, 3], [3, 3, 3, 3, 3, 3], [6]])
@pytest.mark.parametrize("window", [1, 2, 4, 9])
def test_schedule_predicts_every_cell_once_from_finished_tokens(row_lengths, window):
    num_entries = sum(row_lengths)
    is_cell = [True] * num_entries
    if row_lengths[-1] < row_lengths[0]:  # the last entry of every row but the last is a forced row end
        for r in range(len(row_lengths) - 1):
            is_cell[sum(row_lengths[: r + 1]) - 1] = False
    steps = schedule(row_lengths, is_cell, window)
    predicted_at = {0: 0}  # entry 0 comes from the prefill (step 0)
    for k, chunk in enumerate(steps, start=1):
        for feed in chunk:
            assert feed.src in predicted_at or not is_cell[feed.src], (
                f"step {k} reads entry {feed.src} before it exists")
            assert feed.provisional or feed.src == feed.at, "only a provisional stand-in moves a token"
        for feed in chunk:
            if feed.dst >= 0:
                assert feed.dst not in predicted_at, f"entry {feed.dst} predicted twice"
                predicted_at[feed.dst] = k
    assert sorted(predicted_at) == list(range(num_entries))
    real_writes = Counter(feed.at for chunk in steps for feed in chunk if not feed.provisional)
    assert max(real_writes.values(), default=1) == 1
    assert all(real_writes[e] == 1 for e, k in predicted_at.items() if k < len(steps)), (
        "a finished token reaches its slot")


@pytest.mark.parametrize("mask_unwritten", [True, False])
def test_window_of_a_full_row_is_raster_decoding(mask_unwritten):
    backbone = random_gpt()
    sampling = SamplingConfig(cfg_scale=3.0, top_k=1)
    expected = Raster(backbone).generate([3, 7], (4, 5), sampling, make_generator(0, "cpu"))
    got = ZipAR(backbone, ZipAR.Options(window=5, mask_unwritten=mask_unwritten)).generate(
        [3, 7], (4, 5), sampling, make_generator(0, "cpu"))
    assert torch.equal(got.codes, expected.codes) and got.num_forward_passes == 20


@pytest.mark.parametrize("mask_unwritten", [True, False])
def test_row_end_tokens_are_forced(mask_unwritten):
    backbone = row_end_backbone()
    sampling = SamplingConfig(cfg_scale=3.0, top_k=1)
    raster_like = ZipAR(backbone, ZipAR.Options(window=5, mask_unwritten=mask_unwritten)).generate(
        [1, 2], (3, 4), sampling, make_generator(0, "cpu"))
    with torch.no_grad():
        assert torch.equal(raster_like.codes, greedy_reference(backbone, [1, 2], (3, 4), 3.0))
    parallel = ZipAR(backbone, ZipAR.Options(window=2, mask_unwritten=mask_unwritten)).generate(
        [1, 2], (3, 4), SamplingConfig(top_k=5), make_generator(0, "cpu"))
    assert parallel.num_forward_passes == 5 + 2 + 4  # rows of 5 native entries (4 cells + row end), then 4
    assert parallel.codes.shape == (2, 3, 4) and parallel.codes.max() < 64


def dirty_run(method, conditions, grid, sampling, seed):
    state = method.setup(conditions, grid, sampling)
    for buffer in state.cache.k + state.cache.v:  # unwritten slots hold garbage instead of zeros
        buffer.normal_(0, 100.0)
    return method.decode(state, make_generator(seed, "cpu"))


def test_masked_mode_never_reads_unwritten_slots():
    backbone, sampling = random_gpt(), SamplingConfig(cfg_scale=2.0, top_k=8)
    method = ZipAR(backbone, ZipAR.Options(window=1))
    clean = method.generate([3, 7], (4, 5), sampling, make_generator(4, "cpu"))
    assert torch.equal(dirty_run(method, [3, 7], (4, 5), sampling, 4).codes, clean.codes)


def test_official_mode_attends_to_unwritten_slots():
    backbone, sampling = random_gpt(), SamplingConfig(cfg_scale=2.0, top_k=8)
    official = ZipAR(backbone, ZipAR.Options(window=1, mask_unwritten=False))
    clean = official.generate([3, 7], (4, 5), sampling, make_generator(4, "cpu"))
    assert not torch.equal(dirty_run(official, [3, 7], (4, 5), sampling, 4).codes, clean.codes)
    masked = ZipAR(backbone, ZipAR.Options(window=1)).generate([3, 7], (4, 5), sampling, make_generator(4, "cpu"))
    assert not torch.equal(masked.codes, clean.codes)  # zero keys still take attention weight


@pytest.mark.parametrize("mask_unwritten", [True, False])
def test_zipar_step_compiles_once(mask_unwritten):
    options = ZipAR.Options(window=2, mask_unwritten=mask_unwritten)
    got, eager, frames = compile_and_compare(ZipAR, options, SamplingConfig(cfg_scale=3.0, top_k=4, cfg_interval=4))
    assert frames == 1
    assert torch.equal(got.codes, eager.codes)


def test_cli_generates_with_zipar_and_lists_its_passes(tmp_path, registry):
    options = write_llamagen(tmp_path / "model")
    args = ["generate", "-b", "llamagen", *cli_args(options), "--image-size", 8, "--classes", "3,7", "--method",
            "zipar", "--window", 2, "--no-mask-unwritten", "--top-k", 5, "--cfg-scale", 2.0, "--json"]
    result = CliRunner().invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["forward_passes_per_batch"] == formula(4, 4, 2)
    listing = {m["id"]: m for m in json.loads(CliRunner().invoke(cli, ["methods", "--json"], obj=registry).output)}
    assert listing["zipar"]["forward_passes_32x32"] == 304
    assert listing["sjd"]["forward_passes_32x32"] is None and listing["gsd"]["forward_passes_32x32"] is None


@pytest.mark.parametrize("mask_unwritten", [True, False])
def test_chunks_padded_as_under_cuda_graphs_give_the_same_tokens(mask_unwritten):
    """CUDA graphs replay fixed shapes, so there every chunk is padded to the widest and attention reads the
    whole cache (``flashar.shapes``); the padding must not change a token. Run here by planning eagerly as
    CUDA graphs would."""
    from flashar.shapes import Shapes

    backbone, options = random_gpt(), ZipAR.Options(window=2, mask_unwritten=mask_unwritten)
    sampling, grid = SamplingConfig(cfg_scale=2.0, top_k=5), (5, 6)
    exact = ZipAR(backbone, options).generate([3, 8], grid, sampling, make_generator(0, "cpu"))
    padded = ZipAR(backbone, options)
    padded.shapes = Shapes(static=True)
    state = padded.state_for([3, 8], grid, sampling)
    assert set(state.plan.widths) == {state.src.shape[1]} and state.src.shape[1] > 2
    assert torch.equal(padded.generate([3, 8], grid, sampling, make_generator(0, "cpu")).codes, exact.codes)


def test_steps_attend_to_a_growing_prefix_of_the_cache():
    backbone = random_gpt()
    spans = []
    forward = backbone.forward

    def record(x, positions, mask, cache=None, slots=None, tap=None):
        spans.append((mask.shape[-1], x.shape[1], cache.length))
        return forward(x, positions, mask, cache, slots, tap)

    backbone.forward = record
    ZipAR(backbone, ZipAR.Options(window=2)).generate([3], (4, 5), SamplingConfig(top_k=5), make_generator(0, "cpu"))
    prefix, width, entries = 1, max(fed for _, fed, _ in spans[1:]), 20
    keys = [span for span, _, _ in spans[1:]]
    # each step feeds its own chunk, at least 2 tokens, not the widest one
    assert [fed for _, fed, _ in spans[1:]] == [max(2, len(chunk)) for chunk in schedule([5] * 4, [True] * 20, 2)]
    assert spans[0][0] == prefix and keys == sorted(keys) and keys[0] < keys[-1]
    assert keys[-1] == prefix + width + entries - 1  # the last step sees every entry but the one it predicts
    assert keys[-1] < spans[-1][2]  # and never the whole cache
