"""Grouped speculative decoding: the grouped rule, equality with SJD at G = 1, relaxed = faster and lossy."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import cli_args, random_gpt, write_llamagen
from method_helpers import (chi_square, chi_square_bound, compile_and_compare, exact_joint, sample_codes,
                            weakly_contextual)

from flashar.cli import cli
from flashar.config import SamplingConfig
from flashar.methods.gsd import GSD, group_members, grouped_mass
from flashar.methods.sjd import SJD
from flashar.sampling import make_generator

P = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.03, 0.02])
Q = torch.tensor([0.00, 0.00, 0.10, 0.50, 0.20, 0.20, 0.00, 0.00])
EMBED = torch.tensor([[5.0, 5], [4, 4], [0.5, 0], [0, 0], [1, 0], [0.1, 0], [3, 3], [2, 2]])


def masses(code: int, size: int, margin: float, distance: float) -> tuple[float, float]:
    logits = torch.linspace(8, 1, 8)  # rank r is code r
    p, q = grouped_mass(
        logits[None, None], P[None, None], Q[None, None], torch.tensor([[code]]), EMBED, size, margin, distance)
    return round(p.item(), 6), round(q.item(), 6)


@pytest.mark.parametrize("code, size, margin, distance, expected", [
    (3, 1, 1.0, 1e9, (0.12, 0.50)),            # G = 1: SJD's p(x), q(x)
    (3, 3, 1.0, 1e9, (0.37, 0.80)),            # ranks 2..4
    (3, 3, 1.0, 0.5, (0.27, 0.60)),            # code 4 is 1.0 away in the embedding table
    (3, 3, 0.025, 1e9, (0.22, 0.70)),          # code 2's probability is 0.03 away
    (3, 4, 1.0, 1e9, (0.45, 1.00)),            # ranks 2..5: one above x, two below
    (0, 3, 1.0, 1e9, (0.65, 0.10)),            # at the top of the ranking the window shifts: ranks 0..2
    (7, 3, 1.0, 1e9, (0.13, 0.20)),            # and at the bottom: ranks 5..7
])
def test_grouped_mass_follows_the_published_rule(code, size, margin, distance, expected):
    assert masses(code, size, margin, distance) == pytest.approx(expected)


def sorted_members(logits, codes, size):
    """The group's definition: a stable descending sort of the vocabulary, the window of ranks around the code."""
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    rank = (order == codes[..., None]).int().argmax(-1, keepdim=True)
    first = (rank - (size - 1) // 2).clamp(0, logits.shape[-1] - size)
    return order.gather(-1, first + torch.arange(size))


@pytest.mark.parametrize("ties", ["none", "integers", "signed zeros", "bfloat16"])
def test_group_members_are_the_sorted_windows_without_sorting(ties):
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        vocab = int(torch.randint(1, 40, (), generator=generator))
        size = int(torch.randint(1, vocab + 1, (), generator=generator))
        logits = torch.randn(2, 3, vocab, generator=generator)
        if ties in ("integers", "signed zeros"):
            logits = logits.round()  # many equal logits: the lower code ranks first
        if ties == "signed zeros":
            logits = torch.where(torch.rand(logits.shape, generator=generator) < 0.3, -0.0, logits)
        if ties == "bfloat16":
            logits = logits.to(torch.bfloat16)
        codes = torch.randint(0, vocab, (2, 3), generator=generator)
        assert torch.equal(group_members(logits, codes, size), sorted_members(logits, codes, size)), (vocab, size)


@pytest.mark.parametrize("draft_init", ["repeat_horizon", "random"])
def test_group_of_one_is_sjd(draft_init):
    backbone = random_gpt()
    sampling = SamplingConfig(cfg_scale=3.0, top_k=8)
    sjd = SJD(backbone, SJD.Options(draft_length=4, draft_init=draft_init)).generate(
        [3, 7], (4, 5), sampling, make_generator(3, "cpu"))
    gsd = GSD(backbone, GSD.Options(draft_length=4, draft_init=draft_init, group_size=1)).generate(
        [3, 7], (4, 5), sampling, make_generator(3, "cpu"))
    assert torch.equal(gsd.codes, sjd.codes) and gsd.num_forward_passes == sjd.num_forward_passes


def test_relaxed_groups_accept_more_and_are_lossy():
    backbone = weakly_contextual(random_gpt())
    sampling, grid = SamplingConfig(cfg_scale=2.0, top_k=3), (2, 2)
    expected = exact_joint(backbone, 3, grid, sampling, depth=3)
    loose = GSD(
        backbone, GSD.Options(draft_length=3, group_size=8, group_prob_margin=1.0, group_embed_distance=float("inf")))
    samples, loose_passes = sample_codes(loose, 3, grid, sampling, batch=16, calls=40)
    _, sjd_passes = sample_codes(SJD(backbone, SJD.Options(draft_length=3)), 3, grid, sampling, batch=16, calls=40)
    assert loose_passes < sjd_passes
    stat, df, _ = chi_square(samples, expected, depth=3)
    assert stat > chi_square_bound(df), "GSD with loose groups must not keep the raster distribution"


def test_gsd_step_compiles_once():
    options = GSD.Options(draft_length=3, group_size=5)
    got, eager, frames = compile_and_compare(GSD, options, SamplingConfig(cfg_scale=3.0, top_k=8))
    assert frames == 1
    assert torch.equal(got.codes, eager.codes)


def test_cli_generates_with_gsd(tmp_path, registry):
    options = write_llamagen(tmp_path / "model")
    args = ["generate", "-b", "llamagen", *cli_args(options), "--image-size", 8, "--classes", "3,7", "--method", "gsd",
            "--draft-length", 4, "--group-size", 6, "--group-embed-distance", "inf", "--top-k", 5, "--json"]
    result = CliRunner().invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["method"] == "gsd" and 1 < summary["forward_passes_per_batch"] <= 16
