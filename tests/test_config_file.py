"""`--config FILE` on generate, adapt and compare: one meaning (the command's option names, flat or nested
as in config.py), file values beat built-in defaults, the command line beats the file."""

from __future__ import annotations

import json

from click.testing import CliRunner
from helpers import write_class_folder, write_llamagen

from flashar.cli import cli


def model_options(tmp_path) -> dict:
    files = write_llamagen(tmp_path / "model")
    return {"backend": "llamagen", "checkpoint": str(files["checkpoint"]), "model-config": str(files["config_file"]),
            "vq_checkpoint": str(files["vq_checkpoint"]), "vq_config": str(files["vq_config"]), "image_size": 8}


def invoke(registry, tmp_path, values: dict, *args):
    (tmp_path / "config.json").write_text(json.dumps(values))
    return CliRunner().invoke(cli, [*map(str, args), "--config", str(tmp_path / "config.json")], obj=registry)


def test_generate_from_a_config_file_whose_values_beat_the_defaults(tmp_path, registry):
    values = {**model_options(tmp_path), "method": "sjd", "classes": [3, 7], "batch_size": 1, "json": True,
              "sampling": {"top_k": 5, "cfg_scale": 2.0}, "seed": 3}
    result = invoke(registry, tmp_path, values, "generate", "--top-k", 4)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["method"] == "sjd" and summary["images"] == 2 and summary["grid"] == [4, 4]
    assert summary["sampling"]["cfg_scale"] == 2.0 and summary["sampling"]["top_k"] == 4  # the flag wins


def test_adapt_from_a_config_file(tmp_path, registry):
    write_class_folder(tmp_path / "images", per_class=2)
    values = {**model_options(tmp_path), "data": str(tmp_path / "images"), "out": str(tmp_path / "adapter"),
              "stage1": {"steps": 2, "lr": 1e-3}, "stage2-steps": 1, "batch_size": 2, "branch": {"gate": "scalar"},
              "cache_dir": str(tmp_path / "cache")}
    result = invoke(registry, tmp_path, values, "adapt")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert meta["step"] == 3 and meta["branch"]["gate"] == "scalar"


def test_compare_from_a_config_file(tmp_path, registry):
    values = {**model_options(tmp_path), "methods": ["raster", "sjd"], "metrics": False, "repeats": 1, "warmup": 0,
              "json": True}
    result = invoke(registry, tmp_path, values, "compare")
    assert result.exit_code == 0, result.output
    assert [m["method"] for m in json.loads(result.output)["methods"]] == ["raster", "sjd"]


def test_a_required_option_may_come_from_either_place(tmp_path, registry):
    result = invoke(registry, tmp_path, {"classes": "1"}, "generate")
    assert result.exit_code == 2 and "Missing option '--backend'" in result.output
