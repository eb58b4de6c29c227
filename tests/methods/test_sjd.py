"""Speculative Jacobi decoding: raster's greedy tokens, raster's distribution, rollback, compiling, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from helpers import cli_args, random_gpt, write_llamagen
from method_helpers import (chi_square, chi_square_bound, compile_and_compare, exact_joint, row_end_backbone,
                            sample_codes, weakly_contextual)

from flashar.cli import cli
from flashar.config import SamplingConfig
from flashar.methods.raster import Raster
from flashar.methods.sjd import SJD
from flashar.sampling import make_generator
from flashar.testing import greedy_reference

GREEDY = [SamplingConfig(cfg_scale=3.0, top_k=1), SamplingConfig(temperature=0.0),
          SamplingConfig(cfg_scale=2.0, top_k=1, cfg_interval=3)]


@pytest.mark.parametrize("sampling", GREEDY, ids=["cfg-top1", "temperature0", "cfg-interval"])
@pytest.mark.parametrize("draft_length, draft_init, coupling",
                         [(1, "repeat_horizon", "none"), (3, "random", "none"), (3, "repeat_horizon", "maximal"),
                         (16, "repeat_horizon", "none")])
def test_greedy_sjd_gives_raster_tokens(sampling, draft_length, draft_init, coupling):
    backbone = random_gpt()
    options = SJD.Options(draft_length=draft_length, draft_init=draft_init, coupling=coupling)
    expected = Raster(backbone).generate([3, 7], (4, 5), sampling, make_generator(0, "cpu"))
    got = SJD(backbone, options).generate([3, 7], (4, 5), sampling, make_generator(0, "cpu"))
    assert torch.equal(got.codes, expected.codes)
    assert 1 + math.ceil(19 / (draft_length + 1)) <= got.num_forward_passes <= 20


def test_row_end_tokens_are_forced_and_greedy_still_matches_raster():
    backbone = row_end_backbone()
    sampling = SamplingConfig(cfg_scale=3.0, top_k=1)
    got = SJD(backbone, SJD.Options(draft_length=4)).generate([1, 2], (3, 4), sampling, make_generator(0, "cpu"))
    with torch.no_grad():
        expected = greedy_reference(backbone, [1, 2], (3, 4), 3.0)
    assert torch.equal(got.codes, expected)
    assert got.num_forward_passes <= 3 * 4 + 2  # 14 native entries, row ends included


@pytest.mark.parametrize("coupling", ["none", "maximal"])
def test_sjd_samples_follow_the_raster_distribution(coupling):
    # The exact joint law of the first three codes of a 2x2 grid (CFG 2, top-k 3) against 1920 SJD samples
    # drawn 16 rows at a time, so multi-token commits, rejections and the batch minimum all occur.
    backbone = weakly_contextual(random_gpt())
    sampling, grid = SamplingConfig(cfg_scale=2.0, top_k=3), (2, 2)
    expected = exact_joint(backbone, 3, grid, sampling, depth=3)
    method = SJD(backbone, SJD.Options(draft_length=3, coupling=coupling))
    samples, mean_passes = sample_codes(method, 3, grid, sampling, batch=16, calls=120)
    stat, df, outside = chi_square(samples, expected, depth=3)
    assert outside == 0
    assert stat < chi_square_bound(df), (stat, df)
    assert mean_passes < 3.9, "drafts must be accepted for this test to exercise the acceptance rule"


class AcceptEverything(SJD):
    """A broken rule (every draft passes), to show the distribution test can fail."""

    _rule = staticmethod(lambda state, logits, p, q, codes: (torch.ones_like(p[..., 0]), torch.zeros_like(p[..., 0])))


def test_the_distribution_test_rejects_a_lossy_rule():
    backbone = weakly_contextual(random_gpt())
    sampling, grid = SamplingConfig(cfg_scale=2.0, top_k=3), (2, 2)
    expected = exact_joint(backbone, 3, grid, sampling, depth=3)
    samples, _ = sample_codes(
        AcceptEverything(backbone, SJD.Options(draft_length=3)), 3, grid, sampling, batch=16, calls=30)
    stat, df, _ = chi_square(samples, expected, depth=3)
    assert stat > 10 * chi_square_bound(df)


@pytest.mark.parametrize("coupling", ["none", "maximal"])
def test_drafts_that_are_right_are_accepted_a_window_at_a_time(coupling):
    # Zero token embeddings: predictions depend on positions only, so every Jacobi draft is exactly
    # right. A pass that commits c tokens leaves L + 1 - c Jacobi drafts, all accepted by the next pass.
    backbone = random_gpt()
    with torch.no_grad():
        backbone.tok_embeddings.weight.zero_()
    sampling = SamplingConfig(cfg_scale=2.0, top_k=4)
    method = SJD(backbone, SJD.Options(draft_length=3, coupling=coupling))
    state = method.setup([3, 5], (4, 4), sampling)
    result = method.decode(state, make_generator(0, "cpu"))
    commits = [b - a for a, b in zip([1] + state.progress, state.progress)]
    assert all(before + after >= 3 + 2 for before, after in zip(commits, commits[1:]))
    assert result.num_forward_passes <= 1 + 2 * math.ceil(15 / 5)


@pytest.mark.parametrize("draft_length", [1, 4, 40])
def test_every_entry_is_committed_exactly_once(draft_length):
    backbone = random_gpt()
    sampling = SamplingConfig(cfg_scale=2.0, top_k=8)
    method = SJD(backbone, SJD.Options(draft_length=draft_length))
    state = method.setup([3, 7], (3, 5), sampling)
    result = method.decode(state, make_generator(2, "cpu"))
    commits = [b - a for a, b in zip([1] + state.progress, state.progress)]
    assert all(1 <= c <= draft_length + 1 for c in commits)  # ranges [n, n + a] tile the sequence
    assert state.progress[-1] >= 15 and state.progress[-2] < 15
    assert result.num_forward_passes == 1 + len(state.progress)
    assert result.codes.shape == (2, 3, 5) and 0 <= result.codes.min() and result.codes.max() < 64


def test_stale_and_unwritten_cache_slots_are_never_read():
    backbone = random_gpt()
    sampling = SamplingConfig(cfg_scale=2.0, top_k=8)
    method = SJD(backbone, SJD.Options(draft_length=5))
    clean = method.generate([3, 7], (3, 5), sampling, make_generator(4, "cpu"))
    state = method.setup([3, 7], (3, 5), sampling)
    for buffer in state.cache.k + state.cache.v:  # rejected drafts and unwritten slots hold garbage, not zeros
        buffer.normal_(0, 100.0)
    dirty = method.decode(state, make_generator(4, "cpu"))
    assert torch.equal(dirty.codes, clean.codes)


@pytest.mark.parametrize("coupling", ["none", "maximal"])
def test_sjd_step_compiles_once(coupling):
    options = SJD.Options(draft_length=3, coupling=coupling, draft_init="random")
    got, eager, frames = compile_and_compare(SJD, options, SamplingConfig(cfg_scale=3.0, top_k=4, cfg_interval=4))
    assert frames == 1
    assert torch.equal(got.codes, eager.codes) and got.num_forward_passes == eager.num_forward_passes


def test_cli_generates_with_sjd(tmp_path, registry):
    options = write_llamagen(tmp_path / "model")
    args = ["generate", "-b", "llamagen", *cli_args(options), "--image-size", 8, "--classes", "3,7", "--method", "sjd",
            "--draft-length", 4, "--coupling", "maximal", "--top-k", 5, "--cfg-scale", 2.0, "--save-tokens",
            tmp_path / "t.npy", "--json"]
    result = CliRunner().invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["method"] == "sjd" and summary["grid"] == [4, 4]
    assert 1 + math.ceil(15 / 5) <= summary["forward_passes_per_batch"] <= 16
    wrong = CliRunner().invoke(cli, [str(a) for a in args[:-3] + ["--window", 2]], obj=registry)
    assert wrong.exit_code != 0 and "--window is an option of method 'zipar'" in wrong.output


def test_a_window_attends_to_the_slots_up_to_its_last_draft():
    backbone = random_gpt()
    spans = []
    forward = backbone.forward

    def record(x, positions, mask, cache=None, slots=None, tap=None):
        spans.append(mask.shape[-1])
        return forward(x, positions, mask, cache, slots, tap)

    backbone.forward = record
    method = SJD(backbone, SJD.Options(draft_length=3))
    state = method.setup([3, 7], (3, 5), SamplingConfig(cfg_scale=2.0, top_k=8))
    method.decode(state, make_generator(2, "cpu"))
    prefix = 1
    committed = [1] + state.progress[:-1]  # n before each iteration
    assert spans == [prefix] + [prefix + n + 3 for n in committed]  # slots P+n-1 .. P+n+2 are the window's
