"""Progress on every long step: tokenising images before adapt, compare's timing runs, and generate within
a batch (per decode step, not per batch)."""

from __future__ import annotations

import pytest
import torch
from helpers import random_gpt, write_class_folder, write_llamagen

from flashar import api, batches
from flashar.config import CompareConfig, SamplingConfig


def test_tokenising_reports_progress_during_the_folder(tmp_path, registry):
    options = write_llamagen(tmp_path / "model")
    backbone = api.load_backbone("llamagen", options, registry=registry)
    images = write_class_folder(tmp_path / "images", per_class=4)  # 12 images
    reports = []
    data = api.load_data(
        backbone, images, image_size=8, cache_dir=tmp_path / "cache", progress=lambda d, t: reports.append((d, t)))
    assert len(data) == 12
    assert reports[0] == (0, 12) and reports[-1] == (12, 12) and len(reports) >= 3  # not one report for the lot
    assert [d for d, _ in reports] == sorted(d for d, _ in reports)


@pytest.mark.parametrize("name", ["raster", "flashar", "sjd"])
def test_generate_reports_progress_within_a_batch(name, registry, tmp_path, monkeypatch):
    monkeypatch.setattr(batches, "PROGRESS_INTERVAL", 0.0)
    backbone = random_gpt()
    options = {}
    if name == "flashar":
        from flashar.adapt.trainer import Run, adapt
        from flashar.config import AdaptConfig, StageConfig
        from helpers import stripes

        adapt(
            random_gpt(),
            Run(
                stripes(), AdaptConfig(stage1=StageConfig(steps=1, lr=1e-3), stage2_mode="none", batch_size=4), tmp_path
            ),
        )
        options = {"adapter": tmp_path}
    method = api.build_method(name, backbone, options, registry=registry)
    sampling = SamplingConfig(cfg_scale=2.0, top_k=4)
    plain = api.generate(method, [0, 1, 2], 64, sampling, batch_size=2, seed=0)
    reports, step = [], vars(method)["step"]
    got = api.generate(method, [0, 1, 2], 64, sampling, batch_size=2, seed=0, progress=reports.append)
    assert torch.equal(got.codes, plain.codes) and vars(method)["step"] is step  # the same tokens; the step restored
    assert len(reports) > 2 * 2  # more than one report per batch of the two
    assert min(reports) >= 0 and sum(reports) == pytest.approx(3)
    assert any(0 < r < 1 for r in reports)  # fractions of a batch


def test_compare_reports_every_timing_run(registry):
    from flashar.compare import run_compare, timed_runs

    backbone = random_gpt()
    methods = {n: api.build_method(n, backbone, registry=registry) for n in ("raster", "zipar")}
    sampling = {n: SamplingConfig(top_k=4) for n in methods}
    config = CompareConfig(
        num_samples=4, batch_size=4, latency_batch_size=1, repeats=2, warmup=1, metrics=False, image_size=64)
    runs = []
    run_compare(methods, sampling, config, None, None, on_run=runs.append)
    assert len(runs) == timed_runs(config, 2) == 2 * (1 + 2) * 2 and set(runs) == {"raster", "zipar"}
