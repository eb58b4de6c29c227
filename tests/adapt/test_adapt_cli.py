"""`flashar adapt` options say what they do, and a config that cannot train fails before any model or data work."""

from __future__ import annotations

import importlib.util

from click.testing import CliRunner
from helpers import cli_args, write_llamagen

from flashar.cli import cli


def test_help_offers_only_options_that_apply(registry):
    text = CliRunner().invoke(cli, ["adapt", "--help"], obj=registry, terminal_width=200).output
    # adapt compiles nothing; stage 1 freezes the backbone
    assert "--compile-mode" not in text and "--stage1-backbone-lr-factor" not in text
    assert "--stage2-backbone-lr-factor" in text
    distill = next(line for line in text.splitlines() if "--stage2-distill-weight" in line)
    assert "stage 1" in distill and "stage 2" in distill


def adapt_args(tmp_path, *extra):
    options = write_llamagen(tmp_path / "model")
    return [str(a) for a in ["adapt", "-b", "llamagen", *cli_args(options), "--data", tmp_path / "no-such-folder",
                             "--out", tmp_path / "out", *extra]]


def test_zero_training_steps_are_refused_before_the_data_is_read(tmp_path, registry):
    result = CliRunner().invoke(cli, adapt_args(tmp_path, "--stage1-steps", 0, "--stage2-steps", 0), obj=registry)
    assert result.exit_code == 1 and "0 steps" in result.output and "untrained adapter" in result.output
    assert not (tmp_path / "out").exists()


def test_a_missing_peft_is_reported_before_the_data_is_read(tmp_path, registry, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    result = CliRunner().invoke(cli, adapt_args(tmp_path, "--stage2-mode", "lora"), obj=registry)
    assert result.exit_code == 1 and "pip install 'flashar[lora]'" in result.output
