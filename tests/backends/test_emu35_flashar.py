"""FlashAR on Emu3.5: the released checkpoint layout, its decoder semantics, adaptation and the CLI.

The base is a tiny random Emu3.5 (real vocabulary, 4 layers) written as published; the FlashAR checkpoint
is written in the released layout (lxazjk/Emu3.5-Image-FlashAR) with K=2 vertical blocks branching at
b=1, below the default L-K, so that b is really read from the checkpoint. Parity with the reference
decoder itself is benchmarks/parity_emu35_flashar.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import write_emu35, write_emu35_flashar
from PIL import Image

from flashar import api
from flashar.adapter import load_adapter
from flashar.cli import cli
from flashar.config import SamplingConfig
from flashar.errors import CheckpointError
from flashar.methods.flashar import FlashAR
from flashar.sampling import make_generator
from flashar.teacher import flashar_logits

PROMPTS = ["a red car", "two cats on a sofa"]
GRID = (3, 4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("emu35_flashar")
    options = write_emu35(root, num_hidden_layers=4)
    released = write_emu35_flashar(root / "released", options["model_path"], num_blocks=2, branch_layer=1)
    return options, released


def load(options, **extra):
    return api.load_backbone("emu35", {**options, **extra}).eval()


def released_tensor(folder, name):
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(folder / index[name]), "pt") as f:
        return f.get_tensor(name).float()


def test_released_layout_uses_the_published_names(files):
    _, released = files
    keys = set(json.loads((released / "model.safetensors.index.json").read_text())["weight_map"])
    assert {"backbone.embed_tokens.weight", "backbone.layers.3.self_attn.q_norm.weight", "backbone.norm.weight",
            "horizontal_head.weight", "vertical_block.1.mlp.down_proj.weight", "vertical_norm.weight",
            "vertical_head.weight", "hv_gate_mlp.0.weight", "hv_gate_mlp.2.bias", "hv_gate_corner.weight"} <= keys
    assert not any(k.startswith(("model.", "lm_head", "backbone.lm_head")) for k in keys)


def test_released_checkpoint_reads_k_and_b_and_replaces_the_backbone_in_place(files):
    options, released = files
    backbone = load(options)
    storage = backbone.lm_head.weight.data_ptr()
    adapter = load_adapter(released, backbone, copy_backbone=False)
    meta = adapter.metadata
    assert (meta.num_blocks, meta.branch_layer, meta.step, meta.grid) == (2, 1, 74000, None)
    assert adapter.head.branch_layer == 1 and len(adapter.head.vertical_block) == 2
    assert adapter.backbone is backbone and backbone.lm_head.weight.data_ptr() == storage  # no second backbone
    assert torch.equal(backbone.lm_head.weight, released_tensor(released, "horizontal_head.weight"))
    assert torch.equal(
        backbone.layers[2].mlp.up_proj.weight, released_tensor(released, "backbone.layers.2.mlp.up_proj.weight"))
    assert torch.equal(adapter.head.vertical_block[1].self_attn.k_norm.weight,
                       released_tensor(released, "vertical_block.1.self_attn.k_norm.weight"))
    assert torch.equal(adapter.head.hv_gate_corner.bias, released_tensor(released, "hv_gate_corner.bias"))


def test_copying_keeps_the_base_backbone(files):
    options, released = files
    backbone = load(options)
    before = backbone.lm_head.weight.clone()
    adapter = load_adapter(released, backbone)  # copy_backbone=True, as `flashar compare` loads it
    assert adapter.backbone is not backbone and torch.equal(backbone.lm_head.weight, before)
    assert not torch.equal(adapter.backbone.lm_head.weight, before)


@pytest.fixture(scope="module")
def method(files):
    options, released = files
    return FlashAR(load(options), FlashAR.Options(adapter=released), own_backbone=True)


def test_cached_decoder_logits_equal_teacher_forced_logits(method):
    """The anti-diagonal decoder (KV caches, CFG rows with the empty-prompt uncond) computes exactly the
    training forward's fused logits for a fixed grid."""
    codes = torch.randint(0, 131072, (2, *GRID), generator=torch.Generator().manual_seed(0))
    backbone, head = method.backbone, method.head
    with torch.no_grad():
        cached = method.teacher_logits(PROMPTS, codes, SamplingConfig(cfg_scale=5.0))
        prefix = backbone.prefix(PROMPTS, cfg=True, grid=GRID, unconditional="empty")
        teacher = flashar_logits(backbone, head, prefix, codes).fused
    torch.testing.assert_close(cached, teacher, atol=1e-4, rtol=1e-4)


def test_greedy_decoding_is_the_argmax_of_raw_logit_cfg(method):
    sampling = SamplingConfig(cfg_scale=5.0, top_k=1)
    result = method.generate(PROMPTS, GRID, sampling, make_generator(0, "cpu"))
    assert result.num_forward_passes == GRID[0] + GRID[1] - 1
    backbone = method.backbone
    with torch.no_grad():
        prefix = backbone.prefix(PROMPTS, cfg=True, grid=GRID, unconditional="empty")
        cond, uncond = flashar_logits(backbone, method.head, prefix, result.codes).fused.chunk(2)
    assert torch.equal((uncond + 5.0 * (cond - uncond)).argmax(-1).view(2, *GRID), result.codes)


def test_flashar_guides_with_the_empty_prompt_and_raster_with_no_text(method):
    from flashar.methods.raster import Raster

    backbone, text = method.backbone, method.backbone.text
    image = text.image_prefix(*GRID)
    rows = {name: m.setup(["a red car"], GRID, SamplingConfig(cfg_scale=5.0)).prefix
            for name, m in (("flashar", method), ("raster", Raster(backbone)))}
    for name, uncond in (("flashar", text.template("") + image), ("raster", text.template(None) + image)):
        prefix = rows[name]
        row = prefix.embeds[1, prefix.valid[1]]  # right-padded for flashar, left-padded for raster
        assert int(prefix.last[1]) == (len(uncond) - 1 if name == "flashar" else prefix.length - 1)
        assert torch.equal(row, backbone.embed(torch.tensor([uncond]))[0]), name


# --- a checkpoint that does not fit is named in one line ----------------------------------------------

def edit_config(folder, **changes):
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("changes, message", [
    ({"vertical_layers": 3}, "says vertical_layers=3, but the weights hold 2 vertical_block layers"),
    ({"vertical_start_layer": None}, "no integer vertical_start_layer"),
    ({"vertical_start_layer": 3}, "K=2 vertical blocks at layer b=3, which does not fit"),
    ({"hidden_size": 5120}, "has hidden_size 5120, but the --model-path model has 64"),
    ({"use_vertical_block": False}, "use_vertical_block false"),
])
def test_bad_released_config_is_refused(files, tmp_path, changes, message):
    options, _ = files
    released = write_emu35_flashar(tmp_path / "released", options["model_path"], num_blocks=2, branch_layer=1)
    edit_config(released, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_adapter(released, load(options), copy_backbone=False)


def test_missing_and_unexpected_keys_are_named(files, tmp_path):
    options, _ = files
    released = write_emu35_flashar(tmp_path / "released", options["model_path"], num_blocks=2, branch_layer=1)
    index_path = released / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["hv_gate_corner.bias"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing 1 keys \(hv_gate_corner.bias\)"):
        load_adapter(released, load(options), copy_backbone=False)


def test_released_folder_as_model_path_says_what_to_do(files, registry):
    options, released = files
    args = ["generate", "-b", "emu35", "--model-path", released, "--prompt", "a red car"]
    result = CliRunner().invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 1 and "pass its folder as --adapter" in result.output


# --- CLI: the released checkpoint, and adapt -> generate -------------------------------------------------

def test_cli_generates_with_the_released_checkpoint(files, registry, tmp_path):
    options, released = files
    args = ["generate", "-b", "emu35", "--model-path", options["model_path"], "--vq-path", options["vq_path"],
            "--method", "flashar", "--adapter", released, "--prompt", "a red car", "--image-size", 64,
            "--out", tmp_path / "png", "--json"]
    result = CliRunner().invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["grid"] == [4, 4] and summary["forward_passes_per_batch"] == 7  # H + W - 1, no EOLs
    assert summary["sampling"]["cfg_scale"] == 5.0
    assert Image.open(tmp_path / "png" / "0000_a_red_car.png").size == (64, 64)


def write_captioned_images(folder, count=4, size=64):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    lines = []
    for i in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"picture number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_adapt_from_captioned_images_then_generate(tmp_path, registry):
    """`flashar adapt --backend emu35` defaults to K=4, b=L-4 (here a 5-layer model: b=1), trains both stages
    on images + captions, and its adapter decodes with `--method flashar`."""
    options = write_emu35(tmp_path / "model", num_hidden_layers=5)
    write_captioned_images(tmp_path / "images")
    model = ["-b", "emu35", "--model-path", options["model_path"], "--vq-path", options["vq_path"]]
    args = ["adapt", *model, "--data", tmp_path / "images", "--image-size", 64, "--out", tmp_path / "adapter",
            "--stage1-steps", 2, "--stage2-steps", 1, "--batch-size", 2, "--cache-dir", tmp_path / "cache"]
    runner = CliRunner()
    result = runner.invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert (meta["num_blocks"], meta["branch_layer"], meta["grid"], meta["backbone_weights"]) == (4, 1, [4, 4], "full")
    gen = ["generate", *model, "--method", "flashar", "--adapter", tmp_path / "adapter", "--prompt", "picture number 1",
           "--image-size", 64, "--top-k", 1, "--json"]
    result = runner.invoke(cli, [str(a) for a in gen], obj=registry)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["forward_passes_per_batch"] == 7


def test_flashar_step_traces_whole_and_compiles_once(files):
    """One graph for every diagonal step of Emu3.5's FlashAR decoder (fullgraph, no recompiles), same codes."""
    from flashar.compilation import CompileCounter

    options, released = files
    torch._dynamo.reset()
    counter = CompileCounter()
    sampling = SamplingConfig(cfg_scale=5.0, top_k=8)
    compiled = FlashAR(load(options), FlashAR.Options(adapter=released), compile=True, compile_backend=counter,
                       own_backbone=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled.generate(PROMPTS, GRID, sampling, make_generator(3, "cpu"))
    assert counter.frames == 1
    compiled.step = compiled._step  # the same weights with the eager step
    assert torch.equal(got.codes, compiled.generate(PROMPTS, GRID, sampling, make_generator(3, "cpu")).codes)


def test_a_released_folder_without_model_type_loads_like_the_release(files, tmp_path):
    """The official loaders build Emuflashar directly, so a config.json without model_type is a valid release."""
    import shutil

    options, released = files
    bare = Path(shutil.copytree(released, tmp_path / "bare"))
    config = json.loads((bare / "config.json").read_text())
    del config["model_type"]
    (bare / "config.json").write_text(json.dumps(config))
    sampling = SamplingConfig(cfg_scale=3.0, top_k=1)
    got = [FlashAR(load(options), adapter=load_adapter(folder, load(options))).generate(PROMPTS, GRID, sampling,
                                                                                   make_generator(0, "cpu")).codes
           for folder in (released, bare)]
    assert torch.equal(got[0], got[1])


def test_a_foreign_config_is_refused_without_sending_the_user_to_flashar_adapt(files, tmp_path):
    import shutil

    options, released = files
    other = Path(shutil.copytree(released, tmp_path / "other"))
    (other / "config.json").write_text(json.dumps({"model_type": "emu3", "architectures": ["Emu3ForCausalLM"]}))
    with pytest.raises(CheckpointError, match="neither a flashar adapter") as refused:
        load_adapter(other, load(options))
    assert "`flashar adapt`" not in str(refused.value) and "model_type 'emu3'" in str(refused.value)
