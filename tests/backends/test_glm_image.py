"""The GLM-Image backend: the published folder layout, parity with transformers' own generation, the
protocol, FlashAR on an official-trainer checkpoint, and the CLI.

The model is a tiny random GLM-Image (``tiny_glm_image.py``: 3 GLM layers, M-RoPE over half of each head,
a 64-code VQ) written as ``zai-org/GLM-Image`` is published. The preview grid is greedy so that the whole
prompt -> preview -> large grid path can be compared with ``GlmImageForConditionalGeneration.generate``.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_glm_image import (
    CODEBOOK, has_glm_image_diffusers, random_model, tiny_config, write_tiny_glm_image, write_two_shards, write_vle,
)

from flashar import api
from flashar.cli import cli
from flashar.config import SamplingConfig
from flashar.errors import CheckpointError, MissingExtraError
from flashar.methods.flashar import FlashAR
from flashar.methods.raster import Raster
from flashar.sampling import make_generator
from flashar.teacher import flashar_logits
from flashar.testing import BackboneConformance, raster_hidden

PROMPTS = ["a red fox", "two cats on the sofa in the snow"]
GRID = (3, 4)  # 96 x 128 pixels; the preview is 13 x 18
HAS_DIFFUSERS = has_glm_image_diffusers()
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS,
                                     reason="diffusers with GLM-Image (GlmImagePipeline) is not installed")
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_tiny_glm_image(tmp_path_factory.mktemp("glm_image") / "GLM-Image")


PREVIEWS: dict = {}  # greedy previews of the tiny model, shared by the backbones loaded in this module


def load(root, **extra):
    backbone = api.load_backbone("glm_image", {"model_path": root, "preview": "greedy", **extra}).eval()
    backbone._previews = PREVIEWS  # the same weights and greedy: the same previews; saves seconds per test
    return backbone


class TestGlmImage(BackboneConformance):
    conditions = PROMPTS
    grid = GRID
    cfg_scale = 2.0

    @pytest.fixture
    def backbone(self, root):
        return load(root)

    @needs_diffusers
    def test_decode_gives_images(self, backbone):
        super().test_decode_gives_images(backbone)

    def test_decode_without_diffusers_names_the_pip_command(self, backbone, monkeypatch):
        monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails as if not installed
        with pytest.raises(MissingExtraError, match=r"needs the Python package 'diffusers'.*pip install 'diffusers>="):
            backbone.decode(self.random_codes(backbone))

    def test_save_then_load_gives_the_same_backbone(self, backbone, tmp_path):
        """The AR prior written back into the published layout (the vision tower and VQ as they were) loads to
        the same weights and the same forward (the pixel decoder is diffusers'; see
        test_pixels_equal_glm_image_pipeline)."""
        import shutil

        source = backbone.tokenizer.root
        shutil.copytree(source / "processor", tmp_path / "saved" / "processor")
        reference = random_model()
        state = {k: v for k, v in reference.state_dict().items() if k.startswith(("model.visual.", "model.vqmodel."))}
        state.update(
            {(f"model.{k}" if k.startswith("language_model.") else k): v for k, v in backbone.state_dict().items()})
        write_vle(tmp_path / "saved" / "vision_language_encoder", state)
        loaded = load(tmp_path / "saved")
        ours, theirs = backbone.state_dict(), loaded.state_dict()
        assert sorted(ours) == sorted(theirs) and all(torch.equal(theirs[k], v) for k, v in ours.items())
        assert loaded.fingerprint() == backbone.fingerprint()
        codes = self.random_codes(backbone)
        with torch.no_grad():
            torch.testing.assert_close(raster_hidden(loaded, codes), raster_hidden(backbone, codes))


# --- parity with transformers' own GLM-Image -------------------------------------------------------------------

def transformers_generate(root, prompts, grid):
    """Greedy ``GlmImageForConditionalGeneration.generate``: prompt -> preview grid -> large grid, codes only."""
    from transformers import AutoProcessor, GlmImageForConditionalGeneration

    model = GlmImageForConditionalGeneration.from_pretrained(root / "vision_language_encoder",
                                                             attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(root / "processor")
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                           tokenize=False, add_generation_prompt=True) for p in prompts]
    inputs = processor(text=texts, target_h=grid[0] * 32, target_w=grid[1] * 32, padding=True, return_tensors="pt")
    (_, height, width), (_, preview_h, preview_w) = inputs["image_grid_thw"][:2].tolist()
    num_preview = preview_h * preview_w
    # the image stage draws codes only: suppress the image start/end and spare vision-vocabulary rows
    out = model.generate(**inputs, max_new_tokens=num_preview + height * width, do_sample=False,
                         suppress_tokens=list(range(CODEBOOK, tiny_config()["text_config"]["vision_vocab_size"])))
    generated = out[:, inputs["input_ids"].shape[1] :]
    return generated[:, :num_preview], generated[:, num_preview:].reshape(len(prompts), height, width)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "padded-batch"])
def test_raster_greedy_equals_transformers_generate(root, prompts):
    backbone = load(root)
    preview, large = transformers_generate(root, prompts, GRID)
    for i, prompt in enumerate(prompts):
        assert torch.equal(backbone.preview_codes(prompt, GRID), preview[i])
    result = Raster(backbone).generate(prompts, GRID, SamplingConfig(top_k=1), make_generator(0, "cpu"))
    assert torch.equal(result.codes, large)
    assert len(set(large.flatten().tolist())) > 3, "the tiny model should not decode a constant grid"


def test_large_grid_positions_follow_the_preview_extent(root):
    """Cell (r, c) of the large grid sits at (base, base + r, base + c), base = text + max(preview h, w)."""
    from flashar.backends.glm_image.backbone import grid_position_ids

    backbone = load(root)
    prefix = backbone.prefix(PROMPTS[:1], cfg=False, grid=GRID)
    text_length = prefix.length - 13 * 18
    cells = torch.tensor([[0, 0], [2, 3]])
    expected = backbone.mrope(torch.tensor([[text_length + 18] * 2, [text_length + 18, text_length + 20],
                                            [text_length + 18, text_length + 21]]))
    assert torch.equal(backbone.cell_positions(cells, prefix.length, grid=GRID), expected)
    assert torch.equal(grid_position_ids((2, 3), 5, "cpu")[:, -1], torch.tensor([5, 6, 7]))


def test_published_config_sizes():
    """GLM-Image's AR prior (reference/emu35_glm.md §10.1): the numbers docs/glm_image.md quotes."""
    from transformers import GlmImageConfig

    from flashar.backends.glm_image.backbone import GlmImageBackbone

    with torch.device("meta"):
        backbone = GlmImageBackbone(GlmImageConfig())
    assert (backbone.num_layers, backbone.dim, backbone.num_kv_heads, backbone.head_dim) == (40, 4096, 2, 128)
    assert backbone.lm_head.weight.shape == (16512, 4096) and backbone.codebook_size == 16384
    assert sum(p.numel() for p in backbone.parameters()) == 8_914_788_352  # 8.91 B: 17.8 GB in bf16
    # KV bytes per token, bf16
    assert (2 * backbone.num_layers * backbone.num_kv_heads * backbone.head_dim * 2 == 40 * 1024)


# --- loader errors -------------------------------------------------------------------------------------------

def test_missing_and_unexpected_keys_are_named(root, tmp_path):
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(root, tmp_path / "bad")
    vle = tmp_path / "bad" / "vision_language_encoder"
    state = {}
    for shard in sorted(vle.glob("model-*.safetensors")):
        state.update(load_file(str(shard)))
    state.pop("model.language_model.norm.weight")
    state["model.language_model.extra.weight"] = torch.zeros(1)
    write_two_shards(vle, state, "model.language_model.layers.0.")
    with pytest.raises(
        CheckpointError, match=r"missing 1 keys \(model.language_model.norm.weight\).*unexpected 1 keys"):
        load(tmp_path / "bad")


def test_a_folder_that_is_not_glm_image_says_what_to_pass(root, tmp_path):
    with pytest.raises(CheckpointError, match="vision_language_encoder/ and processor/"):
        load(tmp_path)
    (tmp_path / "vision_language_encoder").mkdir()
    (tmp_path / "vision_language_encoder" / "config.json").write_text(json.dumps({"model_type": "emu3"}))
    with pytest.raises(CheckpointError, match="not a GLM-Image config"):
        load(tmp_path)


def test_sampled_preview_is_seeded_and_shared_by_every_method(root):
    backbone = api.load_backbone("glm_image", {"model_path": root, "preview_seed": 3}).eval()
    again = api.load_backbone("glm_image", {"model_path": root, "preview_seed": 3}).eval()
    first = backbone.preview_codes(PROMPTS[0], GRID)
    assert torch.equal(first, again.preview_codes(PROMPTS[0], GRID))
    assert backbone.preview_codes(PROMPTS[0], GRID) is first  # memoised: raster and FlashAR see the same preview
    assert backbone.sampling_defaults == {"cfg_scale": 1.0, "temperature": 0.9, "top_k": 0, "top_p": 0.75}


# --- FlashAR: a checkpoint of the official GLM-Image FlashAR trainer -------------------------------------------

def write_official_checkpoint(path, root, num_blocks=2, branch_layer=1, grid=GRID, **overrides):
    """``flashar_full_step7.pt`` as ``train_glm_flashar.py`` saves it: the trained backbone (base + noise) under
    GlmImageTextModel names, the FlashAR tensors, the args and the preview-conditioned semantics tag."""
    from safetensors.torch import load_file

    base = {}
    for shard in sorted((root / "vision_language_encoder").glob("model-*.safetensors")):
        base.update(load_file(str(shard)))
    generator = torch.Generator().manual_seed(1)
    noisy = lambda t, scale=0.02: t.float() + scale * torch.randn(t.shape, generator=generator)
    prefix = "model.language_model."
    backbone = {k[len(prefix):]: noisy(v) for k, v in base.items() if k.startswith(prefix)}
    flashar = {"horizontal_head.weight": noisy(base["lm_head.weight"]),
               "vertical_head.weight": noisy(base["lm_head.weight"])}
    for j in range(num_blocks):
        source = f"layers.{branch_layer + j}."
        flashar.update({f"_fsdp_wrapped_module.vertical_block.{j}.{k[len(source):]}": noisy(v)
                        for k, v in backbone.items() if k.startswith(source)})
    dim = tiny_config()["text_config"]["hidden_size"]
    width = max(64, dim // 8)
    flashar["vertical_norm.weight"] = noisy(torch.ones(dim), 0.1)
    for name, shape in (("hv_gate_mlp.0.weight", (width, 2 * dim)), ("hv_gate_mlp.2.weight", (1, width)),
                        ("hv_gate_mlp.2.bias", (1,)), ("hv_gate_corner.weight", (1, dim)),
                        ("hv_gate_corner.bias", (1,))):
        flashar[name] = noisy(torch.zeros(shape), 0.3)
    args = {"vertical_layers": num_blocks, "vertical_start_layer": branch_layer, "target_h": grid[0] * 32,
            "target_w": grid[1] * 32, "train_backbone": True, "codebook_size": CODEBOOK}
    payload = {"step": 7, "local_step": 7, "step_offset": 0, "flashar": flashar, "backbone": backbone, "args": args,
               "preview_conditioned": True, "flashar_semantics_version": "preview_v2_valid_prefix_preview_extent",
               "training_state_meta": {"epoch": 0, "next_batch_idx": 7}, **overrides}
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def official(root, tmp_path_factory):
    return write_official_checkpoint(tmp_path_factory.mktemp("official") / "flashar_full_step7.pt", root)


def test_official_checkpoint_reads_k_b_grid_and_the_trained_backbone(root, official):
    from flashar.adapter import load_adapter

    backbone = load(root)
    base_head = backbone.lm_head.weight.clone()
    adapter = load_adapter(official, backbone)  # copy_backbone=True: the base stays as it was
    meta = adapter.metadata
    assert (meta.num_blocks, meta.branch_layer, meta.grid, meta.step) == (2, 1, GRID, 7)
    trained = torch.load(official, weights_only=True)
    assert torch.equal(adapter.backbone.language_model.norm.weight, trained["backbone"]["norm.weight"])
    assert torch.equal(adapter.backbone.lm_head.weight, trained["flashar"]["horizontal_head.weight"])
    assert torch.equal(adapter.head.vertical_block[1].mlp.down_proj.weight,
                       trained["flashar"]["_fsdp_wrapped_module.vertical_block.1.mlp.down_proj.weight"])
    assert torch.equal(backbone.lm_head.weight, base_head)


@pytest.mark.parametrize("changes, message", [
    ({"preview_conditioned": False}, "without the preview prefix"),
    ({"heads_only_for_trained_backbone": True}, "flashar_full_step"),
    ({"training_state": {}}, "training-resume"),
])
def test_official_checkpoints_flashar_cannot_decode_are_refused(root, tmp_path, changes, message):
    from flashar.adapter import load_adapter

    path = write_official_checkpoint(tmp_path / "ckpt.pt", root, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_adapter(path, load(root))


@pytest.fixture(scope="module")
def method(root, official):
    return FlashAR(load(root), FlashAR.Options(adapter=official), own_backbone=True)


def test_flashar_greedy_takes_h_plus_w_minus_1_passes_and_is_the_fused_argmax(method):
    result = method.generate(PROMPTS, GRID, SamplingConfig(top_k=1), make_generator(0, "cpu"))
    assert result.num_forward_passes == GRID[0] + GRID[1] - 1
    backbone = method.backbone
    with torch.no_grad():
        prefix = backbone.prefix(PROMPTS, cfg=False, grid=GRID, unconditional="empty")
        fused = flashar_logits(backbone, method.head, prefix, result.codes).fused
    assert torch.equal(fused.argmax(-1).view(len(PROMPTS), *GRID), result.codes)


def test_cached_flashar_logits_equal_the_recomputed_training_forward(method):
    """What the official port could not do: the KV-cached diagonal decoder equals the full recompute."""
    codes = torch.randint(0, CODEBOOK, (2, *GRID), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = method.teacher_logits(PROMPTS, codes, SamplingConfig())
        prefix = method.backbone.prefix(PROMPTS, cfg=False, grid=GRID, unconditional="empty")
        recomputed = flashar_logits(method.backbone, method.head, prefix, codes).fused
    torch.testing.assert_close(cached, recomputed, atol=1e-4, rtol=1e-4)


# --- CLI ----------------------------------------------------------------------------------------------------

def test_cli_compare_runs_raster_and_flashar(root, registry, tmp_path):
    official = write_official_checkpoint(tmp_path / "flashar_full_step7.pt", root, grid=(3, 3))
    (tmp_path / "prompts.txt").write_text("a red fox\ntwo cats on the sofa\n")
    args = ["compare", "-b", "glm_image", "--model-path", root, "--preview", "greedy", "--methods", "raster,flashar",
            "--prompts", tmp_path / "prompts.txt", "--adapter", official, "--image-size", "96", "--no-metrics",
            "--repeats", "1", "--warmup", "0", "--json"]
    result = CliRunner().invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(result.output)["methods"]}
    assert rows["raster"]["forward_passes"] == 9 and rows["flashar"]["forward_passes"] == 5  # 3 x 3 grid


def test_cli_out_without_diffusers_is_one_line(root, registry, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails as if not installed
    args = ["generate", "-b", "glm_image", "--model-path", root, "--preview", "greedy", "--prompt", "a red fox",
            "--image-size", "96", "--out", tmp_path / "png"]
    result = CliRunner().invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # a ClickException
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "pip install 'diffusers>=" in errors[0] and "Traceback" not in result.output
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["tokens.npy"]  # the decoded tokens are kept


# --- pixels: GLM-Image's DiT + VAE through diffusers ---------------------------------------------------------------

DIT = {"dit_steps": 3, "dit_guidance_scale": 2.0, "dit_seed": 7}


@needs_diffusers
def test_pixels_equal_glm_image_pipeline(root):
    """flashar's decode of given codes is what diffusers' GlmImagePipeline, loaded whole from the same folder, makes
    of the same large grid (upsampled by the pipeline's own rule), prompt, seed and DiT settings."""
    from diffusers import GlmImagePipeline

    backbone = load(root, **DIT)
    codes = torch.randint(0, CODEBOOK, (2, *GRID), generator=torch.Generator().manual_seed(0))
    prompts = ['a sign that says "open"', "a red fox"]  # the DiT's glyph encoder reads the quoted text
    ours = backbone.decode(codes, prompts)
    assert ours.shape == (2, 3, 96, 128) and ours.dtype == torch.float32

    pipeline = GlmImagePipeline.from_pretrained(root)  # the AR model and processor too, as a diffusers user loads it
    pipeline.set_progress_bar_config(disable=True)
    for image, grid, prompt in zip(ours, codes, prompts):
        prior = GlmImagePipeline._upsample_token_ids(grid, *GRID)  # (1, 2H * 2W), the pipeline's own upsampling
        theirs = pipeline(prompt=prompt, prior_token_ids=prior, height=96, width=128, num_inference_steps=3,
                          guidance_scale=2.0, generator=torch.Generator().manual_seed(7), output_type="pt").images[0]
        assert torch.equal(image, theirs)
    assert not torch.equal(ours[0], backbone.decode(codes[:1], ["a red fox"])[0])  # the glyphs condition the DiT


@needs_diffusers
def test_pixels_name_the_missing_published_folders(root, tmp_path):
    import shutil

    shutil.copytree(root, tmp_path / "partial", ignore=shutil.ignore_patterns("transformer", "vae"))
    backbone = load(tmp_path / "partial")
    with pytest.raises(CheckpointError, match=r"lacks transformer/, vae/; download all of zai-org/GLM-Image"):
        backbone.decode(torch.zeros(1, *GRID, dtype=torch.long), ["a red fox"])


@needs_diffusers
@pytest.mark.parametrize("change", ["drop", "reshape"])
def test_pixels_refuse_a_dit_folder_with_other_weights(root, tmp_path, change):
    """The DiT, VAE and glyph encoder load strictly: a missing or mis-shaped weight is a one-line error naming it
    (diffusers itself would only warn and leave the weight random)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(root, tmp_path / "edited")
    path = next((tmp_path / "edited" / "transformer").glob("*.safetensors"))
    weights = load_file(path)
    name = sorted(weights)[0]
    if change == "drop":
        del weights[name]
    else:
        weights[name] = torch.zeros(3, *weights[name].shape)
    save_file(weights, path, metadata={"format": "pt"})
    backbone = load(tmp_path / "edited")
    found = f"missing keys {name}" if change == "drop" else f"{name} expected shape"
    with pytest.raises(CheckpointError,
        match=re.escape(f"transformer does not hold the weights of GlmImageTransformer2DModel ({found}")):
        backbone.decode(torch.zeros(1, *GRID, dtype=torch.long), ["a red fox"])


@needs_diffusers
def test_cli_generate_out_writes_the_dit_images(root, registry, tmp_path):
    """`flashar generate --out` end to end: AR tokens, then the DiT + VAE under each image's own prompt."""
    prompts = ['a sign that says "open"', "a red fox"]
    args = ["generate", "-b", "glm_image", "--model-path", root, "--preview", "greedy", "--image-size", "96x128",
            "--top-k", 1, "--dit-steps", 3, "--dit-guidance-scale", 2.0, "--dit-seed", 7, "--out", tmp_path / "png",
            "--save-tokens", tmp_path / "tokens.npy", *[a for p in prompts for a in ("--prompt", p)]]
    result = CliRunner().invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name[:4] for p in pngs] == ["0000", "0001"]
    codes = torch.from_numpy(np.load(tmp_path / "tokens.npy"))
    expected = (load(root, **DIT).decode(codes, prompts) * 255).round().to(torch.uint8)
    for png, image in zip(pngs, expected):
        assert torch.equal(torch.from_numpy(np.array(Image.open(png))).permute(2, 0, 1), image)


def test_adapt_from_captioned_images_then_generate_with_flashar(root, tmp_path, registry):
    """`flashar adapt --backend glm_image` on images + captions (metadata.jsonl, as for Emu3.5): images are encoded
    by the published vision tower + VQ, both stages train, and the adapter decodes the large grid in H+W-1 passes."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    lines = []
    for i in range(4):
        Image.fromarray((rng.random((96, 96, 3)) * 255).astype(np.uint8)).save(tmp_path / "images" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": ["a red fox", "a blue house"][i % 2]}))
    (tmp_path / "images" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    model = ["-b", "glm_image", "--model-path", root, "--preview", "greedy"]
    args = ["adapt", *model, "--data", tmp_path / "images", "--image-size", 96, "--out", tmp_path / "adapter",
            "--num-blocks", 2, "--stage1-steps", 2, "--stage2-steps", 1, "--batch-size", 2, "--cache-dir",
            tmp_path / "cache"]
    runner = CliRunner()
    result = runner.invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert (meta["num_blocks"], meta["branch_layer"], meta["grid"], meta["backend"]) == (2, 1, [3, 3], "glm_image")
    gen = ["generate", *model, "--method", "flashar", "--adapter", tmp_path / "adapter", "--prompt", "a red fox",
           "--image-size", 96, "--top-k", 1, "--json"]
    result = runner.invoke(cli, [str(a) for a in gen], obj=registry)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["forward_passes_per_batch"] == 5
