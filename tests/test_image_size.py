"""Any grid shape: `--image-size H W` / `HxW` on every command, and a backend whose native size is not square
(a tiny LlamaGen-architecture plugin with a 4x6 token grid) through generate, adapt (images and codes) and
compare."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import cli_args, write_class_folder, write_llamagen

from flashar import api
from flashar.cli import cli
from flashar.hookspecs import hookimpl
from flashar.plugins import BackendSpec, Registry, build_manager

NATIVE = (8, 12)  # pixels; the tiny VQ downsamples 2x: a 4x6 token grid


class WidePlugin:
    """A third-party backend whose native image is 8x12 pixels."""

    @hookimpl
    def flashar_register_backends(self, register):
        from flashar.backends.llamagen import LlamaGenOptions, load

        def load_wide(options, runtime):
            backbone = load(options, runtime)
            backbone.backend_id, backbone.default_image_size = "wide", NATIVE
            return backbone

        register(
            BackendSpec(id="wide", description="a non-square test backend", options=LlamaGenOptions, load=load_wide))


@pytest.fixture
def wide():
    pm, infos = build_manager(load_entry_points=False)
    pm.register(WidePlugin(), name="wide-plugin")
    return Registry.from_manager(pm, infos)


def invoke(registry, *args):
    return CliRunner().invoke(cli, [str(a) for a in args], obj=registry)


@pytest.mark.parametrize("size", [["8", "12"], ["8x12"], []])
def test_generate_takes_height_and_width_and_defaults_to_the_native_non_square_size(tmp_path, wide, size):
    options = write_llamagen(tmp_path / "model")
    result = invoke(wide, "generate", "-b", "wide", *cli_args(options), *(["--image-size", *size] if size else []),
                    "--classes", "1,2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["grid"] == [4, 6]


def test_a_square_size_and_bad_spellings(tmp_path, wide):
    options = write_llamagen(tmp_path / "model")
    square = invoke(wide, "generate", "-b", "wide", *cli_args(options), "--image-size", 8, "--classes", 1, "--json")
    assert square.exit_code == 0 and json.loads(square.output)["grid"] == [4, 4]
    bad = invoke(wide, "generate", "-b", "wide", *cli_args(options), "--image-size", "8x", "--classes", 1)
    assert bad.exit_code == 2 and "192x320" in bad.output


def test_adapt_on_images_at_the_native_non_square_size_then_generate_with_the_adapter(tmp_path, wide):
    options = write_llamagen(tmp_path / "model")
    write_class_folder(tmp_path / "images", per_class=4)
    result = invoke(wide, "adapt", "-b", "wide", *cli_args(options), "--data", tmp_path / "images", "--out",
                    tmp_path / "a", "--stage1-steps", 2, "--stage2-steps", 1, "--batch-size", 2, "--cache-dir",
                    tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["grid"] == [4, 6]
    gen = invoke(wide, "generate", "-b", "wide", *cli_args(options), "--method", "flashar", "--adapter", tmp_path / "a",
                 "--image-size", "8x12", "--classes", "0,1", "--json")
    assert gen.exit_code == 0, gen.output
    assert json.loads(gen.output)["forward_passes_per_batch"] == 4 + 6 - 1


def write_codes(folder, grid, count: int = 6, flat: bool = True):
    (folder / "imagenet256_codes").mkdir(parents=True)
    (folder / "imagenet256_labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        codes = rng.integers(0, 64, (1, 2, *grid))
        np.save(folder / "imagenet256_codes" / f"{i}.npy", codes.reshape(1, 2, -1) if flat else codes)
        np.save(folder / "imagenet256_labels" / f"{i}.npy", np.array([i % 3]))


@pytest.mark.parametrize("flat", [True, False])
def test_codes_of_a_non_square_grid_are_read(tmp_path, wide, flat):
    options = write_llamagen(tmp_path / "model")
    write_codes(tmp_path / "codes", (4, 6), flat=flat)
    backbone = api.load_backbone("wide", options, registry=wide)
    data = api.load_data(backbone, codes_dir=tmp_path / "codes")
    assert data.grid == (4, 6) and len(data) == 12
    result = invoke(wide, "adapt", "-b", "wide", *cli_args(options), "--codes", tmp_path / "codes", "--image-size", 8,
                    12, "--out", tmp_path / "a", "--stage1-steps", 1, "--stage2-steps", 0, "--batch-size", 2)
    assert result.exit_code == 0, result.output


def test_compare_takes_height_and_width(tmp_path, wide):
    options = write_llamagen(tmp_path / "model")
    result = invoke(wide, "compare", "-b", "wide", *cli_args(options), "--methods", "raster", "--image-size", 8, 12,
                    "--no-metrics", "--repeats", 1, "--warmup", 0, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["grid"] == [4, 6]
