"""Determinism on CPU: for every registered method, the same seed and inputs give identical tokens, and
another seed gives other tokens (with real sampling, not greedy)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import cli_args, random_gpt, stripes, write_llamagen

from flashar.adapt.trainer import Run, adapt
from flashar.cli import cli
from flashar.config import AdaptConfig, StageConfig
from flashar.plugins import Registry, build_manager

METHODS = sorted(Registry.from_manager(*build_manager(load_entry_points=False)).methods)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny LlamaGen (4x4 grids at image size 8) and an adapter for it from a quick adaptation."""
    root = tmp_path_factory.mktemp("determinism")
    options = write_llamagen(root / "model")
    config = AdaptConfig(stage1=StageConfig(steps=3, lr=1e-3), stage2=StageConfig(steps=2, lr=1e-4), batch_size=4)
    adapt(random_gpt(), Run(stripes(), config, root / "adapter"))
    return cli_args(options), root / "adapter"


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_tokens_other_seed_other_tokens(method, model, registry, tmp_path):
    options, adapter = model
    extra = ["--adapter", str(adapter)] if registry.method(method).requires_adapter else []

    def tokens(seed: int) -> np.ndarray:
        path = tmp_path / f"{seed}-{len(list(tmp_path.iterdir()))}.npy"
        args = ["generate", "-b", "llamagen", *options, "--method", method, *extra, "--image-size", "8",
                "--classes", "0,3,7,9", "--top-k", "0", "--temperature", "1.0", "--cfg-scale", "2.0",
                "--seed", str(seed), "--save-tokens", str(path), "--json"]
        result = CliRunner().invoke(cli, args, obj=registry)
        assert result.exit_code == 0, result.output
        return np.load(path)

    first = tokens(0)
    assert np.array_equal(first, tokens(0))
    assert not np.array_equal(first, tokens(1))
