"""Two-stage adaptation: learning, exact resume, stages, LoRA, the CLI from images to an adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import adapt_config, cli_args, random_gpt, stripes, write_class_folder, write_llamagen

from flashar.adapt.trainer import Run, adapt, lr_factor
from flashar.adapter import load_adapter
from flashar.cli import cli
from flashar.config import SamplingConfig, StageConfig
from flashar.errors import FlashARError
from flashar.io import load_weights
from flashar.methods.flashar import FlashAR


def test_loss_falls_on_a_tiny_model(tmp_path):
    losses = []
    adapt(random_gpt(),
        Run(stripes(), adapt_config(steps1=20, steps2=20), tmp_path,
            on_step=lambda r: "ce" in r and losses.append(r["ce"])))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_interrupted_run_resumed_ends_with_the_same_adapter(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    adapt(random_gpt(), Run(stripes(), adapt_config(), full))
    assert adapt(random_gpt(), Run(stripes(), adapt_config(), cut, stop_after=5)) is None  # "killed" after step 5
    assert not (cut / "model.safetensors").exists()
    adapt(random_gpt(), Run(stripes(), adapt_config(), cut), resume=True)  # resumes from the step-4 checkpoint
    a, b = load_weights(full / "model.safetensors"), load_weights(cut / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((full / "config.json").read_text())["step"] == 6


def test_stage_one_trains_only_the_flashar_parts(tmp_path):
    backbone = random_gpt()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    adapter = adapt(backbone, Run(stripes(), adapt_config(steps2=0), tmp_path))
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert adapter.metadata.backbone_weights == "none"
    assert not any(k.startswith("backbone.") for k in load_weights(tmp_path / "model.safetensors"))


def test_stage_two_changes_the_backbone_and_the_adapter_carries_it(tmp_path):
    backbone = random_gpt()
    adapt(backbone, Run(stripes(), adapt_config(), tmp_path))
    loaded = load_adapter(tmp_path, random_gpt())
    assert loaded.metadata.backbone_weights == "full"
    assert torch.equal(loaded.backbone.output.weight, backbone.output.weight)
    assert not torch.equal(loaded.backbone.output.weight, random_gpt().output.weight)


def test_lora_stage_two_merges_on_load(tmp_path):
    pytest.importorskip("peft")
    backbone = random_gpt()
    adapter = adapt(backbone, Run(stripes(), adapt_config(stage2_mode="lora", lora_rank=2), tmp_path))
    keys = load_weights(tmp_path / "model.safetensors").keys()
    assert any(k.startswith("lora.") for k in keys) and not any(k.startswith("backbone.") for k in keys)
    loaded = load_adapter(tmp_path, random_gpt())
    codes = torch.randint(0, 64, (1, 4, 4))
    sampling = SamplingConfig(cfg_scale=1.0)
    with torch.no_grad():  # the merged weights compute what the peft-wrapped trained model computes
        a = FlashAR(loaded.backbone, adapter=loaded).teacher_logits([1], codes, sampling)
        b = FlashAR(adapter.backbone, adapter=adapter).teacher_logits([1], codes, sampling)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_adapter_from_another_backbone_is_refused(tmp_path):
    adapt(random_gpt(), Run(stripes(), adapt_config(steps2=0), tmp_path))
    with pytest.raises(FlashARError, match="made for another backbone"):
        load_adapter(tmp_path, random_gpt(seed=3))


def test_resuming_with_another_backbone_is_refused(tmp_path):
    adapt(random_gpt(), Run(stripes(), adapt_config(), tmp_path, stop_after=2))
    with pytest.raises(FlashARError, match="while adapting another backbone"):
        adapt(random_gpt(seed=3), Run(stripes(), adapt_config(), tmp_path), resume=True)


def test_schedule_warms_up_holds_and_decays():
    cfg = StageConfig(steps=10, lr=1.0, warmup_steps=2, flat_steps=3, min_lr_factor=0.1)
    factors = [lr_factor(i, cfg) for i in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2:5] == [1.0, 1.0, 1.0]
    assert all(a >= b for a, b in zip(factors[5:], factors[6:])) and factors[-1] > 0.1


def test_adapt_then_generate_from_an_image_folder(tmp_path, registry):
    options = write_llamagen(tmp_path / "model")
    write_class_folder(tmp_path / "images")
    runner = CliRunner()
    args = ["adapt", "-b", "llamagen", *cli_args(options), "--data", tmp_path / "images", "--image-size", 8,
            "--out", tmp_path / "adapter", "--stage1-steps", 2, "--stage2-steps", 2, "--batch-size", 2,
            "--checkpoint-every", 1, "--cache-dir", tmp_path / "cache"]
    result = runner.invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapter" / "config.json").is_file() and (tmp_path / "cache").is_dir()
    records = [json.loads(line) for line in (tmp_path / "adapter" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    fit = records[-1]  # then the coupling fit, on the training grids (none held out), stored in the adapter
    assert fit["held_out"] is False and fit["coupling_grids"] == len(list((tmp_path / "images").rglob("*.png")))
    assert (
        json.loads((tmp_path / "adapter" / "config.json").read_text())["diagonal_coupling"] == fit["diagonal_coupling"])
    again = runner.invoke(cli, [str(a) for a in args], obj=registry)
    assert again.exit_code == 1 and "pass --resume" in again.output
    gen = runner.invoke(cli,
        [str(a) for a in ["generate", "-b", "llamagen", *cli_args(options), "--image-size", 8, "--classes", "0,1,2",
        "--method", "flashar", "--adapter", tmp_path / "adapter", "--out", tmp_path / "png", "--json"]], obj=registry)
    assert gen.exit_code == 0, gen.output
    summary = json.loads(gen.output)
    assert summary["forward_passes_per_batch"] == 7 and len(summary["outputs"]) == 3


def test_a_row_lag_is_trained_stored_and_decoded(tmp_path, registry):
    """``--row-lag 2``: the adapter records it, the coupling is fitted along its diagonals, and generation
    takes 2 * (H - 1) + W passes; a lag wider than the grid is refused before any work."""
    options = write_llamagen(tmp_path / "model")
    write_class_folder(tmp_path / "images")
    runner = CliRunner()
    common = ["-b", "llamagen", *cli_args(options), "--image-size", 8]
    args = ["adapt", *common, "--data", tmp_path / "images", "--out", tmp_path / "adapter", "--stage1-steps", 2,
            "--stage2-steps", 1, "--batch-size", 2, "--row-lag"]
    wide = runner.invoke(cli, [str(a) for a in [*args, 5]], obj=registry)
    assert wide.exit_code == 1 and "--row-lag 5 exceeds the grid's width 4" in wide.output
    assert not (tmp_path / "adapter").exists()
    result = runner.invoke(cli, [str(a) for a in [*args, 2]], obj=registry)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "adapter" / "config.json").read_text())["branch"]["row_lag"] == 2
    gen = runner.invoke(cli, [str(a) for a in ["generate", *common, "--classes", "0,1", "--method", "flashar",
                                                 "--adapter", tmp_path / "adapter", "--json"]], obj=registry)
    assert gen.exit_code == 0, gen.output
    assert json.loads(gen.output)["forward_passes_per_batch"] == 2 * 3 + 4


def test_empty_data_folder_is_reported(tmp_path, registry):
    options = write_llamagen(tmp_path / "model")
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, [str(a) for a in ["adapt", "-b", "llamagen", *cli_args(options), "--data",
                                                         tmp_path / "empty", "--out", tmp_path / "a"]], obj=registry)
    assert result.exit_code == 1 and "no images found" in result.output


def test_context_noise_feeds_random_codes_and_skips_them_in_the_loss(tmp_path):
    from flashar.adapt.model import AdaptModel
    from flashar.adapt.trainer import Sampler
    from flashar.branch import FlashARHead
    from flashar.config import BranchConfig

    data = stripes()
    sampler = Sampler(len(data), seed=0)
    index, _ = sampler.next(8, 0.0)
    codes, conditions = data.codes[index], [data.conditions[i] for i in index.tolist()]
    backbone = random_gpt()
    noisy = sampler.noisy(codes, 0.3, backbone.codebook_size)
    replaced = (noisy != codes).float().mean().item()
    # seeded by the batch
    assert 0.15 < replaced < 0.35 and torch.equal(noisy, sampler.noisy(codes, 0.3, backbone.codebook_size))
    model = AdaptModel(backbone, FlashARHead(backbone, BranchConfig(num_blocks=1)))
    cfg = StageConfig(steps=1, lr=1e-3, aux_vertical_weight=0.0)
    dropped = torch.zeros(8, dtype=torch.bool)
    clean, _ = model(codes, conditions, dropped, cfg, 2)
    with_noise, _ = model(codes, conditions, dropped, cfg, 2, noisy)
    # the replaced cells are not scored: the noisy loss equals the clean-target CE over the kept cells only
    from flashar.teacher import flashar_logits
    from flashar.adapt.model import dropout_prefix

    prefix = dropout_prefix(
        backbone.prefix(conditions, cfg=True, grid=tuple(codes.shape[1:]), unconditional="empty"), dropped)
    fused = flashar_logits(backbone, model.head, prefix, noisy).fused
    kept = (noisy == codes).flatten(1)
    expected = torch.nn.functional.cross_entropy(fused[kept], codes.flatten(1)[kept])
    assert torch.allclose(with_noise, expected) and not torch.allclose(with_noise, clean)


def test_context_noise_run_resumes_to_the_same_adapter(tmp_path):
    noisy = lambda: adapt_config().model_copy(
        update={"stage2": StageConfig(steps=3, lr=1e-3, flat_steps=1, context_noise=0.2)})
    adapt(random_gpt(), Run(stripes(), noisy(), tmp_path / "full"))
    assert adapt(random_gpt(), Run(stripes(), noisy(), tmp_path / "cut", stop_after=5)) is None
    adapt(random_gpt(), Run(stripes(), noisy(), tmp_path / "cut"), resume=True)
    a, b = load_weights(tmp_path / "full" / "model.safetensors"), load_weights(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    clean = tmp_path / "clean"
    adapt(random_gpt(), Run(stripes(), adapt_config(), clean))
    c = load_weights(clean / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the noise changed what stage 2 learned


def test_sampler_draws_exactly_a_batch_and_walks_every_sample_once_per_epoch():
    from flashar.adapt.trainer import Sampler

    sampler = Sampler(10, seed=0)
    batches = [sampler.next(4, 0.0)[0] for _ in range(5)]  # 20 draws = two epochs
    assert [len(b) for b in batches] == [4] * 5
    drawn = torch.cat(batches)
    assert sorted(drawn[:10].tolist()) == list(range(10)) and sorted(drawn[10:].tolist()) == list(range(10))
    assert sampler.state() == {"epoch": 1, "cursor": 10}
