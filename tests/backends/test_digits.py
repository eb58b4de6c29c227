"""The embedded default: real digits data, the shipped weights, FID-digits and the compare command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from flashar import api
from flashar.adapt.data import tokenize_folder
from flashar.backends.digits.data import LEVELS, held_out_reference, load_splits, shift, upsample
from flashar.backends.digits.features import DigitsCNN
from flashar.cli import cli
from flashar.testing import BackboneConformance


class TestDigitsBackbone(BackboneConformance):
    conditions = [3, 8]
    grid = (4, 4)

    def make_backbone(self, tmp_path):
        return api.load_backbone("digits", {})

    def save_backbone(self, backbone, folder):
        from flashar.backends.digits.loader import save_raster

        save_raster(backbone, folder)
        return {"checkpoint": folder / "raster.safetensors"}


def test_data_is_the_real_sklearn_digits_in_fixed_stratified_splits():
    splits = load_splits()
    sizes = [len(split[1]) for split in (splits.train, splits.val, splits.test)]
    assert sum(sizes) == 1797 and sizes == [1298, 199, 300]
    for codes, labels in (splits.train, splits.val, splits.test):
        assert codes.shape[1:] == (16, 16) and codes.min() >= 0 and codes.max() == LEVELS - 1
        counts = torch.bincount(labels, minlength=10).float()
        assert counts.min() / counts.max() > 0.9  # every class present in proportion
    assert torch.equal(load_splits().test[0], splits.test[0])  # the split is fixed


def test_upsampling_keeps_the_gray_levels():
    images = torch.tensor([[[0.0, 16.0], [16.0, 0.0]]]).repeat_interleave(4, 1).repeat_interleave(4, 2)
    codes = upsample(images)
    assert codes.shape == (1, 16, 16) and codes.dtype == torch.long
    assert codes[0, 0, 0] == 0 and codes[0, 0, -1] == 16  # constant regions keep their level


def test_png_round_trip_through_the_adaptation_data_path(tmp_path):
    backbone = api.load_backbone("digits", {})
    codes, labels = load_splits().test
    for i in range(6):
        (tmp_path / "data" / str(int(labels[i]))).mkdir(parents=True, exist_ok=True)
        gray = (codes[i].numpy() * 255 // (LEVELS - 1)).astype(np.uint8)
        Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "data" / str(int(labels[i])) / f"{i}.png")
    data = tokenize_folder(backbone, tmp_path / "data", cache_dir=tmp_path / "cache")
    order = sorted(range(6), key=lambda i: (int(labels[i]), f"{i}.png"))
    assert torch.equal(data.codes, codes[order]) and data.conditions == [int(labels[i]) for i in order]


def test_feature_cnn_classifies_held_out_digits_shifted_as_the_training_data():
    codes, labels = held_out_reference()
    with torch.no_grad():
        predicted = DigitsCNN.load().classify(DigitsCNN.from_codes(codes)).argmax(-1)
    assert (predicted == labels).float().mean() > 0.95


def test_the_reference_is_the_test_split_shifted_with_copies_adjacent():
    codes, labels = held_out_reference(copies=3)
    test_codes, test_labels = load_splits().test
    assert codes.shape == (900, 16, 16) and torch.equal(labels, test_labels.repeat_interleave(3))
    assert torch.equal(
        codes.sum((1, 2)) <= test_codes.repeat_interleave(3, 0).sum((1, 2)), torch.ones(900, dtype=torch.bool))
    assert not torch.equal(codes, test_codes.repeat_interleave(3, 0))  # shifted, not copied
    assert torch.equal(held_out_reference(copies=3)[0], codes)  # fixed


def test_raster_model_beats_a_unigram_model_on_held_out_digits():
    """The shipped raster weights are trained: held-out NLL far below the data's own unigram entropy."""
    from flashar.teacher import raster_logits

    backbone = api.load_backbone("digits", {})
    codes, labels = load_splits().test
    with torch.no_grad():
        logits = raster_logits(backbone, backbone.prefix(labels.tolist(), cfg=False, grid=(16, 16)), codes)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten()).item()
    freq = torch.bincount(load_splits().train[0].flatten(), minlength=LEVELS).float()
    unigram = -(freq / freq.sum() * (freq / freq.sum()).log()).sum().item()
    assert nll < 0.5 * unigram


def test_fid_digits_separates_real_from_noise():
    pytest.importorskip("torch_fidelity")
    from flashar.compare.metrics import Extractor, quality, to_uint8
    from flashar.plugins import get_registry

    backbone = api.load_backbone("digits", {})
    splits = load_splits()
    spec = get_registry().metrics["fid-digits"]
    extractor = Extractor(spec.register(), spec.label, {}, spec.classify)
    reference = backbone.reference_images()
    val = shift(splits.val[0], torch.Generator().manual_seed(0))
    real = quality(to_uint8(backbone.decode(val)), reference, extractor, splits.val[1].tolist())
    noise_codes = torch.randint(0, LEVELS, (199, 16, 16), generator=torch.Generator().manual_seed(0))
    noise = quality(to_uint8(backbone.decode(noise_codes)), reference, extractor, splits.val[1].tolist())
    assert real["fid"] < 0.2 * noise["fid"] and real["class_accuracy"] > 0.95 and noise["class_accuracy"] < 0.4
    assert real["two_sample_accuracy"] < 0.6 and noise["two_sample_accuracy"] > 0.95


def test_compare_on_the_default_writes_table_json_grids_and_plot(tmp_path, registry):
    pytest.importorskip("torch_fidelity")
    out = tmp_path / "report"
    result = CliRunner().invoke(cli,
        ["compare", "--methods", "raster,flashar", "--num-samples", "20", "--batch-size", "20", "--repeats", "1",
        "--warmup", "0", "--out", str(out), "--json"], obj=registry)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = {row["method"]: row for row in report["methods"]}
    # the default adapter: row lag 2
    assert rows["raster"]["forward_passes"] == 256 and rows["flashar"]["forward_passes"] == 46
    for row in rows.values():
        for key in ("fid", "kid", "precision", "recall", "class_accuracy", "two_sample_accuracy",
                    "latency_per_image_ms", "images_per_second", "latency_speedup_vs_raster",
                    "throughput_speedup_vs_raster"):
            assert row[key] is not None
        assert (row["latency_batch"], row["throughput_batch"]) == (1, 20)  # one image's wait; the quality batch's rate
        assert row["images_per_second"] == pytest.approx(20 / row["throughput_seconds_median"])
    assert rows["raster"]["latency_speedup_vs_raster"] == 1.0
    assert report["fid_label"] == "FID-digits"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["report.json", "samples_flashar.png", "samples_raster.png", "speed_vs_quality.png"]


def test_compare_refuses_too_few_samples_for_the_metrics_before_decoding(registry):
    pytest.importorskip("torch_fidelity")
    result = CliRunner().invoke(cli, ["compare", "--methods", "raster", "--num-samples", "4"], obj=registry)
    assert result.exit_code == 1 and "--num-samples 10 or more" in result.output
    assert "ms / image" not in result.output  # refused before anything was timed
