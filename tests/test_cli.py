"""The CLI as a user drives it: exit codes, one-line errors, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import cli_args, write_llamagen
from PIL import Image

from flashar.cli import cli


@pytest.fixture
def run(registry):
    def invoke(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], obj=registry)

    return invoke


def test_generate_writes_pngs_tokens_and_json(tmp_path, run):
    options = write_llamagen(tmp_path / "model")
    out, tokens = tmp_path / "out", tmp_path / "tokens.npy"
    result = run("generate", "--backend", "llamagen", *cli_args(options), "--image-size", 8, "--classes", "3,7,1",
                 "--top-k", 5, "--cfg-scale", 2.0, "--seed", 0, "--out", out, "--save-tokens", tokens, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["forward_passes_per_batch"] == 16 and summary["grid"] == [4, 4]
    assert sorted(p.name for p in out.iterdir()) == ["0000_3.png", "0001_7.png", "0002_1.png"]
    assert Image.open(out / "0000_3.png").size == (8, 8)
    grids = np.load(tokens)
    assert grids.shape == (3, 4, 4) and grids.dtype == np.int64


def test_generate_takes_a_method_variant_as_compare_does(tmp_path, run):
    """-m zipar:window=2 decodes as --method zipar --window 2 does, and the summary names the variant."""
    options = write_llamagen(tmp_path / "model")
    common = ["generate", "-b", "llamagen", *cli_args(options), "--image-size", 8, "--classes", "1,2", "--json"]
    variant = run(*common, "-m", "zipar:window=2", "--window", 3, "--save-tokens", tmp_path / "a.npy")
    flags = run(*common, "-m", "zipar", "--window", 2, "--save-tokens", tmp_path / "b.npy")
    assert variant.exit_code == 0 and flags.exit_code == 0, variant.output + flags.output
    assert json.loads(variant.output)["method"] == "zipar:window=2" and json.loads(flags.output)["method"] == "zipar"
    assert json.loads(variant.output)["forward_passes_per_batch"] == 12  # 2W + (H-2)w on 4x4 with w = 2
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    several = run(*common, "-m", "raster,zipar")
    assert several.exit_code == 1 and "--method takes one method, got 'raster,zipar'" in several.output


def test_a_dtype_this_cpu_emulates_gets_a_one_line_warning_and_the_run_goes_on(tmp_path, run, monkeypatch):
    """bf16 on a CPU without native bf16 matmuls (AVX2 only) runs several times slower than float32: generate
    says so on one line and goes on; where the CPU has them, or for float32, nothing is said."""
    import torch

    from flashar import attention

    options = write_llamagen(tmp_path / "model")
    for dtype, native in (("bfloat16", False), ("bfloat16", True), ("float32", False)):
        monkeypatch.setitem(attention.CPU_NATIVE, torch.bfloat16, native)
        result = run("generate", "-b", "llamagen", *cli_args(options), "--image-size", 8, "--classes", "1",
                     "--dtype", dtype, "--save-tokens", tmp_path / f"{dtype}{native}.npy")
        assert result.exit_code == 0, result.output
        warned = [line for line in result.output.splitlines() if "warning" in line.lower()]
        if dtype == "bfloat16" and not native:
            assert len(warned) == 1 and warned[0].startswith("warning: this CPU has no native bfloat16 matmuls")
            assert warned[0].endswith("use --dtype float32")
        else:
            assert warned == []


def test_greedy_top_k_1_equals_temperature_0(tmp_path, run):
    options = write_llamagen(tmp_path / "model")
    grids = []
    for flag, name in (("--top-k", "k.npy"), ("--temperature", "t.npy")):
        result = run("generate", "-b", "llamagen", *cli_args(options), "--image-size", 8, "--classes", "4",
                     flag, 1 if flag == "--top-k" else 0, "--save-tokens", tmp_path / name, "--json")
        assert result.exit_code == 0, result.output
        grids.append(np.load(tmp_path / name))
    assert np.array_equal(*grids)


@pytest.mark.parametrize("args, message", [
    (["--backend", "llamgen"], "unknown backend 'llamgen'; installed: digits, emu35, glm_image, llamagen"),
    (["--backend", "llamagen", "--method", "nope"], "unknown method 'nope'"),
    (["--backend", "llamagen", "--classes", "99"], "class id 99 is out of range"),
    (["--backend", "llamagen", "--classes", "1", "--image-size", 7], "not a positive multiple"),
    (["--backend", "llamagen", "--classes", "1", "--top-p", 0], "invalid sampling option 'top_p'"),
    (["--backend", "llamagen", "--classes", "x"], "expected comma-separated integers"),
])
def test_bad_input_gives_one_line_and_no_output(tmp_path, run, args, message):
    options = write_llamagen(tmp_path / "model")
    out = tmp_path / "out"
    full = args[:2] + (cli_args(options) if args[1] == "llamagen" else []) + args[2:]
    result = run("generate", *full, "--out", out)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())


def test_missing_checkpoint_is_one_line(tmp_path, run):
    result = run("generate", "-b", "llamagen", "--checkpoint", tmp_path / "nope.pt", "--classes", "1")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: checkpoint file not found")


def test_debug_shows_the_traceback(tmp_path, registry):
    result = CliRunner().invoke(cli,
        ["--debug", "generate", "-b", "llamagen", "--checkpoint", str(tmp_path / "x.pt"), "--classes", "1"],
        obj=registry)
    assert result.exit_code != 0 and result.exception is not None


def test_listings_as_json(run):
    backends = json.loads(run("backends", "--json").output)
    methods = json.loads(run("methods", "--json").output)
    assert {b["id"] for b in backends} >= {"llamagen"}
    raster = next(m for m in methods if m["id"] == "raster")
    assert raster["forward_passes_32x32"] == 1024
    assert next(m for m in methods if m["id"] == "zipar")["options"] == ["mask_unwritten", "window"]
    assert "mask-unwritten" in run("methods").output  # the table names the options a variant may set


def test_help_lists_backend_options(run):
    result = run("generate", "--help")
    assert "--gpt-model" in result.output and "--vq-checkpoint" in result.output and "--cfg-scale" in result.output


def test_an_option_scoped_to_some_commands_is_only_offered_there(run):
    """GLM-Image's DiT settings turn codes into pixels: `generate` and `compare` take them, `adapt` neither
    shows nor parses them."""
    for command in ("generate", "compare"):
        assert "--dit-steps" in run(command, "--help").output
    assert "--dit-steps" not in run("adapt", "--help").output and "--model-path" in run("adapt", "--help").output
    result = run("adapt", "--backend", "glm-image", "--dit-steps", 3)
    assert result.exit_code == 2 and "No such option '--dit-steps'" in result.output
