"""Fail before the expensive part: input that cannot work is refused before the model loads (an Emu3.5-34B
load reads ~68 GB), and a failure after decoding never loses the decoded tokens."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import cli_args, write_class_folder, write_llamagen

from flashar.cli import cli


@pytest.fixture
def unloadable(registry):
    """The built-in registry with every backend's load replaced by a failure: a test passes only if the
    command refuses before it would load a model."""
    def never(options, runtime):
        raise AssertionError("the model was loaded before the input was checked")

    registry.backends = {k: dataclasses.replace(spec, load=never) for k, spec in registry.backends.items()}
    return registry


def refused(registry, *args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "loaded before" not in str(result.exception or "")
    return result.output


@pytest.fixture
def llamagen(tmp_path) -> dict:
    return write_llamagen(tmp_path / "model")


def without_vq(options: dict) -> list[str]:
    return cli_args({k: v for k, v in options.items() if k != "vq_checkpoint"})


# --- the image tokenizer -------------------------------------------------------------------------------------

def test_generate_out_without_the_image_tokenizer_is_refused_before_loading(unloadable, llamagen, tmp_path):
    out = refused(
        unloadable, "generate", "-b", "llamagen", *without_vq(llamagen), "--classes", "1", "--out", tmp_path / "png")
    assert "--vq-checkpoint" in out and "--out" in out
    out = refused(
        unloadable, "generate", "-b", "emu35", "--model-path", tmp_path, "--prompt", "a cat", "--out", tmp_path / "png")
    assert "--vq-path" in out and "Emu3.5-VisionTokenizer" in out
    assert not (tmp_path / "png").exists()


def test_adapt_on_images_without_the_image_tokenizer_is_refused_before_loading(unloadable, llamagen, tmp_path):
    images = write_class_folder(tmp_path / "images", per_class=1)
    out = refused(
        unloadable, "adapt", "-b", "llamagen", *without_vq(llamagen), "--data", images, "--out", tmp_path / "a")
    assert "--vq-checkpoint" in out and "tokenising" in out


def test_compare_without_the_image_tokenizer_is_refused_unless_speed_only(unloadable, tmp_path):
    args = ["compare", "-b", "emu35", "--model-path", tmp_path, "--methods", "raster"]
    assert "--vq-path" in refused(unloadable, *args, "--no-metrics", "--out", tmp_path / "cmp")
    assert "--vq-path" in refused(unloadable, *args)  # the metrics decode the samples
    out = refused(unloadable, *args, "--no-metrics", "--vq-path", tmp_path, "--fid-weights", tmp_path / "missing.pth")
    assert "--fid-weights" in out and "not a file" in out


# --- the data --------------------------------------------------------------------------------------------------

def test_missing_metadata_for_a_text_backend_is_refused_before_loading(unloadable, tmp_path):
    folder = write_class_folder(tmp_path / "images", per_class=1)
    out = refused(unloadable, "adapt", "-b", "emu35", "--model-path", tmp_path, "--vq-path", tmp_path, "--data", folder,
                  "--out", tmp_path / "a")
    assert "metadata.jsonl" in out


def test_metadata_naming_a_missing_image_is_refused_before_loading(unloadable, tmp_path):
    folder = tmp_path / "captioned"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "a cat"}) + "\n")
    out = refused(unloadable, "adapt", "-b", "emu35", "--model-path", tmp_path, "--vq-path", tmp_path, "--data", folder,
                  "--out", tmp_path / "a")
    assert "gone.png" in out and "line 1" in out


def test_unreadable_or_empty_data_is_refused_before_loading(unloadable, llamagen, tmp_path, monkeypatch):
    images = write_class_folder(tmp_path / "images", per_class=1)
    args = ["adapt", "-b", "llamagen", *cli_args(llamagen), "--out", tmp_path / "a"]
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == images:  # root reads any folder, so the permission error is simulated
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    out = refused(unloadable, *args, "--data", images)
    assert "cannot read the data folder" in out and "Permission denied" in out
    monkeypatch.setattr(Path, "iterdir", real_iterdir)
    (tmp_path / "empty").mkdir()
    assert "no images found" in refused(unloadable, *args, "--data", tmp_path / "empty")
    assert "no images found" in refused(unloadable, *args, "--data", images, "--val-data", tmp_path / "empty")
    assert "--codes" in refused(unloadable, *args, "--codes", tmp_path / "no-codes")


# --- after decoding --------------------------------------------------------------------------------------------

def test_a_failure_writing_images_keeps_the_decoded_tokens(registry, llamagen, tmp_path, monkeypatch):
    import flashar.api

    gen = ["generate", "-b", "llamagen", *cli_args(llamagen), "--image-size", 8, "--classes", "1,2", "--top-k", 1]
    result = CliRunner().invoke(cli, [str(a) for a in [*gen, "--save-tokens", tmp_path / "want.npy"]], obj=registry)
    assert result.exit_code == 0, result.output
    want = np.load(tmp_path / "want.npy")

    def disk_full(image, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(flashar.api, "save_png", disk_full)
    out = refused(registry, *gen, "--out", tmp_path / "png")
    assert "No space left on device" in out and "tokens" in out
    assert np.array_equal(np.load(tmp_path / "png" / "tokens.npy"), want)
    out = refused(registry, *gen, "--out", tmp_path / "png2", "--save-tokens", tmp_path / "mine.npy")
    assert str(tmp_path / "mine.npy") in out.replace("\n", "")
    assert np.array_equal(np.load(tmp_path / "mine.npy"), want) and not (tmp_path / "png2" / "tokens.npy").exists()
