"""Held-out evaluation during adaptation: both NLL curves, the best weights per stage, early stopping, an
exact resume, stage-2 distillation, and an adapter folder without the checkpoints at the end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import adapt_config, random_gpt, stripes
from PIL import Image

from flashar.adapt.data import TokenData
from flashar.adapt.trainer import Run, adapt
from flashar.cli import cli
from flashar.config import StageConfig
from flashar.io import load_json, load_weights
from flashar.teacher import flashar_logits, horizontal_distillation_kl, raster_logits


def config(steps1=4, steps2=4, **kw):
    return adapt_config(steps1, steps2, **{"val_fraction": 0.25, "eval_every": 3, **kw})


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def evaluations(out):
    return [(r["stage"], r["step"]) for r in records(out) if "val_nll_flashar" in r]


def without_seconds(out):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records(out)]


def test_both_held_out_curves_at_the_start_every_n_steps_and_the_end_of_each_stage(tmp_path):
    adapt(random_gpt(), Run(stripes(), config(), tmp_path))
    assert evaluations(tmp_path) == [(1, 0), (1, 3), (1, 4), (2, 4), (2, 7), (2, 8)]
    held = [r for r in records(tmp_path) if "val_nll_flashar" in r]
    assert all(np.isfinite(r["val_nll_flashar"]) and np.isfinite(r["val_nll_raster"]) for r in held)
    assert len({r["val_nll_raster"] for r in held if r["stage"] == 1}) == 1  # stage 1 leaves the raster model alone
    assert held[0]["val_nll_flashar"] > held[2]["val_nll_flashar"]  # stage 1 learns


def test_a_finished_run_leaves_the_adapter_and_its_metrics_only(tmp_path):
    adapt(random_gpt(), Run(stripes(), config(), tmp_path / "plain"))
    assert sorted(p.name for p in (tmp_path / "plain").iterdir() if p.name != ".flashar.lock") == ["config.json",
                                                                                                   "metrics.jsonl",
                                                                                                   "model.safetensors"]
    adapt(random_gpt(), Run(stripes(), config(keep_checkpoints=True), tmp_path / "kept"))
    kept = sorted(p.name for p in (tmp_path / "kept" / "checkpoints").iterdir())
    assert kept == ["best-stage1", "best-stage2", "step-00000006", "step-00000008"]


def test_resuming_a_finished_run_says_it_is_finished(tmp_path):
    from flashar.errors import FlashARError

    adapt(random_gpt(), Run(stripes(), config(), tmp_path))
    with pytest.raises(FlashARError, match="finished adapter and no checkpoints"):
        adapt(random_gpt(), Run(stripes(), config(), tmp_path), resume=True)


def test_early_stopping_ends_the_stage_with_its_best_weights(tmp_path):
    """A learning rate far too high makes the held-out NLL rise: the stage stops after ``patience`` worse
    evaluations and the adapter holds the weights of the best one."""
    cfg = config(steps1=20, steps2=0, eval_every=1, patience=2, keep_checkpoints=True,
                 stage1=StageConfig(steps=20, lr=1.0))
    adapt(random_gpt(), Run(stripes(), cfg, tmp_path))
    held = [r for r in records(tmp_path) if "val_nll_flashar" in r]
    last = held[-1]
    assert last["stopped_early"] and last["step"] < 20 and last["best_step"] < last["step"]
    assert max(r["step"] for r in records(tmp_path)) == last["step"]  # no training after the stop
    best = load_weights(tmp_path / "checkpoints" / "best-stage1" / "weights.safetensors")
    adapter = load_weights(tmp_path / "model.safetensors")
    assert {f"head.{k}" for k in adapter} == set(best)
    assert all(torch.equal(adapter[k], best[f"head.{k}"]) for k in adapter)
    metadata = load_json(tmp_path / "config.json")
    assert (metadata["step"], metadata["weights_step"]) == (last["step"], last["best_step"])


def test_held_out_evaluation_does_not_change_training(tmp_path):
    """Evaluating after every step draws nothing from the training stream: the same losses, step by step."""
    train, held = stripes(), stripes(8)
    base = dict(val_fraction=0.0, stage2=StageConfig(steps=4, lr=1e-3, flat_steps=1, distill_weight=0.3))
    adapt(random_gpt(), Run(train, config(**base), tmp_path / "plain"))
    adapt(random_gpt(), Run(train, config(eval_every=1, **base), tmp_path / "held", val_data=held))
    losses = [[r["loss"] for r in records(tmp_path / name) if "loss" in r] for name in ("plain", "held")]
    assert losses[0] == losses[1] and len(losses[0]) == 8


@pytest.mark.parametrize("stop_after", [3, 5])
def test_an_interrupted_run_with_held_out_data_resumes_exactly(tmp_path, stop_after):
    """Killed mid-stage 1 (after its best weights moved on) or just after stage 2's start evaluation: the
    resumed run logs every step and evaluation once and ends with the uninterrupted run's adapter."""
    cfg = config(eval_every=1, patience=2, stage2=StageConfig(steps=4, lr=1e-3, distill_weight=0.5))
    adapt(random_gpt(), Run(stripes(), cfg, tmp_path / "full"))
    assert adapt(random_gpt(), Run(stripes(), cfg, tmp_path / "cut", stop_after=stop_after)) is None
    adapt(random_gpt(), Run(stripes(), cfg, tmp_path / "cut"), resume=True)
    assert without_seconds(tmp_path / "cut") == without_seconds(tmp_path / "full")
    a, b = load_weights(tmp_path / "full" / "model.safetensors"), load_weights(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def horizontal_kl(backbone, base, adapter_head, data: TokenData) -> float:
    with torch.no_grad():
        prefix = backbone.prefix(data.conditions, cfg=False, grid=data.grid)
        out = flashar_logits(backbone, adapter_head, prefix, data.codes)
        teacher = raster_logits(base, base.prefix(data.conditions, cfg=False, grid=data.grid), data.codes)
        return horizontal_distillation_kl(teacher, backbone.logits(out.h_left), out.kind, 1.0).item()


def test_stage_two_distillation_keeps_the_horizontal_logits_near_the_frozen_raster_model(tmp_path):
    kls = []
    for weight in (0.0, 5.0):
        backbone = random_gpt()
        stage2 = StageConfig(steps=10, lr=1e-2, backbone_lr_factor=1.0, distill_weight=weight, distill_temperature=1.0)
        adapter = adapt(backbone, Run(stripes(), config(val_fraction=0.0, stage2=stage2), tmp_path / str(weight)))
        kls.append(horizontal_kl(adapter.backbone, random_gpt(), adapter.head, stripes(8)))
        assert any("distill" in r for r in records(tmp_path / str(weight)) if r["stage"] == 2) == bool(weight)
    assert kls[1] < 0.5 * kls[0]


def test_held_out_data_and_a_fraction_are_exclusive(tmp_path):
    from flashar.errors import FlashARError

    with pytest.raises(FlashARError, match="not both"):
        adapt(random_gpt(), Run(stripes(), config(), tmp_path, val_data=stripes(8)))


def write_digits_folder(folder, count: int = 40):
    from flashar.backends.digits.data import LEVELS, load_splits

    codes, labels = load_splits().train
    for i, (grid, label) in enumerate(zip(codes[:count], labels[:count].tolist())):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        gray = (grid.numpy() * 255 // (LEVELS - 1)).astype(np.uint8)
        Image.fromarray(np.stack([gray] * 3, axis=-1)).save(folder / str(label) / f"{i:05d}.png")


def test_adapt_on_the_digits_default_with_a_held_out_fraction_reports_both_curves_and_stops_early(tmp_path, registry):
    pytest.importorskip("sklearn")
    write_digits_folder(tmp_path / "png")
    args = ["adapt", "--backend", "digits", "--data", tmp_path / "png", "--val-fraction", 0.1, "--out", tmp_path / "a",
            "--cache-dir", tmp_path / "cache", "--stage1-steps", 20, "--stage1-lr", 1.0, "--stage2-steps", 2,
            "--batch-size", 4, "--eval-every", 1, "--patience", 2]
    result = CliRunner().invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    assert "held-out NLL (nats/token)" in result.output and "stopped early" in result.output
    held = [r for r in records(tmp_path / "a") if "val_nll_flashar" in r]
    assert {r["stage"] for r in held} == {1, 2} and held[0]["val_nll_raster"] > 0
    assert any(r["stopped_early"] for r in held if r["stage"] == 1)
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.name != ".flashar.lock") == ["config.json",
                                                                                               "metrics.jsonl",
                                                                                               "model.safetensors"]
