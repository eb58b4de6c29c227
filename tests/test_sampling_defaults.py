"""Each backend's effective sampling defaults are what --help, docs/cli.md and the printed tables show (LlamaGen
runs CFG 4.0 and top-k 2000, Emu3.5 CFG 5.0 and top-k 5120, not the library's 1.0 and 0)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from helpers import cli_args, write_emu35, write_llamagen

from flashar import api
from flashar.cli import cli


def option_help(registry, command: str, flag: str) -> str:
    text = CliRunner().invoke(cli, [command, "--help"], obj=registry, terminal_width=400).output
    line = next(line for line in text.splitlines() if line.strip().startswith(flag + " "))
    return re.sub(r"\s+", " ", line)


@pytest.mark.parametrize("command", ["generate", "compare"])
def test_help_names_each_backends_cfg_and_top_k(registry, command):
    cfg, top_k = option_help(registry, command, "--cfg-scale"), option_help(registry, command, "--top-k")
    assert "llamagen 4.0" in cfg and "emu35 5.0" in cfg and "[default: 1.0;" in cfg
    assert "llamagen 2000" in top_k and "emu35 5120" in top_k
    assert "glm_image: the model's" in cfg  # read from the model's files at load time


def test_declared_defaults_are_the_loaded_backbones(registry, tmp_path):
    """What the spec declares (and the help prints) is what a loaded backbone runs with."""
    for backend, options in (("llamagen", write_llamagen(tmp_path / "l")), ("emu35", write_emu35(tmp_path / "e"))):
        declared = registry.backend(backend).sampling_defaults
        sampling = api.resolve_sampling(api.load_backbone(backend, options, registry=registry)).model_dump()
        assert {k: sampling[k] for k in declared} == declared, backend


def test_digits_declares_its_backbones_defaults(registry):
    """The digits spec copies the dict (importing the backbone at registration would import torch)."""
    from flashar.backends.digits.backbone import DigitsBackbone

    assert registry.backend("digits").sampling_defaults == DigitsBackbone.sampling_defaults


def test_backends_and_generate_tables_show_the_sampling(registry, tmp_path):
    result = CliRunner().invoke(cli, ["backends"], obj=registry, terminal_width=300)
    row = next(line for line in result.output.splitlines() if "llamagen" in line)
    assert "cfg 4.0, top-k 2000" in row
    options = write_llamagen(tmp_path / "model")
    args = ["generate", "-b", "llamagen", *cli_args(options), "--image-size", 8, "--classes", "1"]
    result = CliRunner().invoke(cli, [str(a) for a in args], obj=registry, terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "cfg 4.0" in result.output and "top-k 2000" in result.output
