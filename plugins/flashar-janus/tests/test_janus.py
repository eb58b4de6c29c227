"""The Janus backend: the conformance suite, parity with transformers' Janus, the folder format, the CLI."""

from __future__ import annotations

import importlib.metadata
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_janus import SPECIAL, random_model, save_folder, write_tiny_janus

flashar_janus = pytest.importorskip(
    "flashar_janus", reason="flashar-janus is not installed; run: pip install -e plugins/flashar-janus")
from flashar import api  # noqa: E402
from flashar import geometry  # noqa: E402
from flashar.cli import cli  # noqa: E402
from flashar.config import RuntimeConfig, SamplingConfig  # noqa: E402
from flashar.errors import CheckpointError, FlashARError  # noqa: E402
from flashar.methods.raster import Raster  # noqa: E402
from flashar.plugins import Registry, build_manager  # noqa: E402
from flashar.sampling import make_generator  # noqa: E402
from flashar.testing import BackboneConformance, full_forward  # noqa: E402
from flashar_janus.loader import to_hf_key  # noqa: E402

PROMPTS = ["a red fox", "two cats on a sofa"]
BOS, PAD, BOI = 0, SPECIAL.index("<｜▁pad▁｜>"), SPECIAL.index("<begin_of_image>")


def load(folder, registry, **options):
    return api.load_backbone("janus", {"model_path": folder, **options}, registry=registry).eval()


def hf_model(folder):
    """transformers' own model from the same folder, set up for its image-generation loop."""
    from transformers import JanusForConditionalGeneration

    model = JanusForConditionalGeneration.from_pretrained(str(folder)).eval()
    model.generation_config.generation_kwargs = {"boi_token_id": BOI}  # what its generate() reads
    return model


def save_backbone_folder(backbone, folder):
    """A loaded backbone -> a save_pretrained folder (the understanding tower is freshly random)."""
    model = random_model(seed=99)
    state = {to_hf_key(k): v for k, v in backbone.state_dict().items()}
    state.update({f"model.vqmodel.{k}": v for k, v in backbone.tokenizer.model.state_dict().items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("model.vision_model.", "model.aligner.", "lm_head.")) for k in missing)
    return save_folder(model, folder, backbone.prompts.tokenizer)


class TestJanusConformance(BackboneConformance):
    conditions = PROMPTS  # different lengths: the prefix is left-padded
    grid = (3, 3)  # the tiny model's native grid
    plugins = [flashar_janus]

    @pytest.fixture(autouse=True)
    def _folder(self, janus_folder):
        self.folder = janus_folder

    def make_backbone(self, tmp_path):
        return load(self.folder, self.registry())

    def save_backbone(self, backbone, folder):
        return {"model_path": save_backbone_folder(backbone, folder)}


# --- parity with transformers' JanusForConditionalGeneration ---------------------------------------

def test_forward_matches_transformers_language_model(janus_folder, registry):
    backbone, model = load(janus_folder, registry), hf_model(janus_folder)
    codes = torch.randint(0, backbone.codebook_size, (2, 3, 3), generator=torch.Generator().manual_seed(0))
    ids, valid = backbone.prompts.batch(PROMPTS, cfg=False)
    with torch.no_grad():
        ours, _ = full_forward(backbone, PROMPTS, codes, geometry.causal_mask(9), cfg=False)
        x = torch.cat([model.model.language_model.embed_tokens(ids),
                       model.prepare_embeddings_for_image_generation(codes.flatten(1))], dim=1)
        mask = torch.cat([valid, torch.ones(2, 9, dtype=torch.bool)], dim=1).long()
        theirs = model.model.language_model(inputs_embeds=x, attention_mask=mask,
                                            position_ids=torch.arange(x.shape[1])[None].expand(2, -1)).last_hidden_state
        torch.testing.assert_close(ours, theirs[:, ids.shape[1] :], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(backbone.logits(ours), model.model.generation_head(ours), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "padded-batch"])
def test_raster_greedy_equals_transformers_generate(janus_folder, registry, prompts):
    backbone, model = load(janus_folder, registry), hf_model(janus_folder)
    ids, valid = backbone.prompts.batch(prompts, cfg=False)
    theirs = model.generate(ids, attention_mask=valid.long(), generation_mode="image", do_sample=False,
                            guidance_scale=3.0)  # (B, 9): [cond; uncond] CFG on raw logits, argmax
    ours = Raster(backbone).generate(prompts, (3, 3), SamplingConfig(cfg_scale=3.0, top_k=1), make_generator(0, "cpu"))
    assert len(set(theirs.flatten().tolist())) > 2, "the tiny model must not decode a constant grid"
    assert torch.equal(ours.codes.flatten(1), theirs)


def test_decode_equals_transformers_decode_with_the_official_8_bit_conversion(janus_folder, registry):
    backbone, model = load(janus_folder, registry), hf_model(janus_folder)
    codes = torch.randint(0, backbone.codebook_size, (2, 3, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pixels = model.decode_image_tokens(codes.flatten(1)).permute(0, 3, 1, 2)  # (B, 3, 48, 48) in ~[-1, 1]
    expected = torch.clamp((pixels + 1) / 2 * 255, 0, 255).to(torch.uint8).float() / 255
    torch.testing.assert_close(backbone.decode(codes), expected, atol=1 / 255, rtol=0)


def test_encode_picks_the_nearest_normalised_code_like_the_official_quantiser(janus_folder, registry):
    vq = load(janus_folder, registry).tokenizer
    codes = torch.randint(0, vq.codebook_size, (1, 3, 3), generator=torch.Generator().manual_seed(2))
    scale = torch.rand(1, 1, 3, 3) * 5 + 0.1  # any length: only the direction counts after l2 normalisation
    latent = vq.codebook()[codes].permute(0, 3, 1, 2) * scale
    vq.model.quant_conv.forward = lambda _: latent
    assert torch.equal(vq.encode(torch.rand(1, 3, 48, 48)), codes)


# --- prompts ---------------------------------------------------------------------------------------

def test_prompt_rows_follow_the_official_template_and_cfg_prompt(janus_folder, registry):
    backbone = load(janus_folder, registry)
    tokenizer = backbone.prompts.tokenizer
    text = tokenizer("<|User|>: a red fox\n\n<|Assistant|>:", add_special_tokens=False)["input_ids"]
    ids, valid = backbone.prompts.batch(PROMPTS, cfg=True)  # rows [cond; uncond], left-padded
    short = ids[0][valid[0]].tolist()
    assert short == [BOS, *text, BOI]
    assert ids[2][valid[2]].tolist() == [BOS] + [PAD] * len(text) + [BOI]  # uncond: pads are attended
    assert torch.equal(valid[:2], valid[2:]) and not valid[0, 0] and valid[1].all()


def test_prefix_positions_are_1d_rope_rows_and_cells_continue_them(janus_folder, registry):
    backbone = load(janus_folder, registry)
    prefix = backbone.prefix(PROMPTS, cfg=True)
    torch.testing.assert_close(prefix.positions, backbone.rope(torch.arange(prefix.length)))
    cells = torch.tensor([[0, 0], [1, 2], [2, 1]])
    expected = backbone.rope(prefix.length + torch.tensor([0, 5, 7]))  # P + r * W + c with W = 3
    torch.testing.assert_close(backbone.cell_positions(cells, prefix.length), expected)
    assert prefix.positions.shape == (prefix.length, 2, backbone.head_dim)


@pytest.mark.parametrize("bad", [[3], [""], [None]])
def test_conditions_must_be_prompts(janus_folder, registry, bad):
    with pytest.raises(FlashARError, match="needs non-empty prompts"):
        load(janus_folder, registry).prefix(bad, cfg=False)


def test_prompt_template_needs_a_placeholder(janus_folder, registry):
    with pytest.raises(FlashARError, match="must contain '{prompt}'"):
        load(janus_folder, registry, prompt_template="no placeholder")


def test_only_the_native_grid_is_accepted(janus_folder, registry):
    backbone = load(janus_folder, registry)
    assert backbone.grid() == (3, 3) and backbone.default_image_size == 48
    with pytest.raises(FlashARError, match="native size 48 px"):
        backbone.grid(32)


# --- the save_pretrained folder --------------------------------------------------------------------

def test_sampling_defaults_come_from_generation_config(janus_folder, registry, tmp_path):
    assert load(janus_folder, registry).sampling_defaults == {"cfg_scale": 5.0, "temperature": 1.0, "top_k": 0,
                                                              "top_p": 1.0}
    folder = shutil.copytree(janus_folder, tmp_path / "copy")
    settings = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**settings, "guidance_scale": 4.0}))
    assert api.resolve_sampling(load(folder, registry)).cfg_scale == 4.0


def test_missing_and_unexpected_keys_are_named(tmp_path, registry):
    from safetensors.torch import load_file, save_file

    folder = write_tiny_janus(tmp_path / "bad")
    state = load_file(str(folder / "model.safetensors"))
    del state["model.generation_head.proj_out.bias"]
    state["model.extra.weight"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 keys \(model.generation_head.proj_out.bias\).*"
                                              r"unexpected 1 keys \(model.extra.weight\)"):
        load(folder, registry)


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    (lambda f: (f / "tokenizer.json").unlink(), "could not load the text tokenizer"),
    (lambda f: (f / "config.json").write_text(json.dumps({"model_type": "llama"})), "not 'janus'"),
    (lambda f: (f / "model.safetensors").write_bytes(b"truncated"), "truncated or corrupt"),
], ids=["no-weights", "no-tokenizer", "not-janus", "truncated"])
def test_broken_folders_are_one_line_errors(janus_folder, registry, tmp_path, damage, message):
    folder = shutil.copytree(janus_folder, tmp_path / "copy")
    damage(folder)
    with pytest.raises(FlashARError, match=message):
        load(folder, registry)


@pytest.mark.filterwarnings("ignore::flashar.errors.FlashARWarning")  # bf16 on a CPU without native bf16 (AVX2)
def test_bfloat16_keeps_rope_frequencies_in_float32(janus_folder, registry):
    backbone = api.load_backbone("janus", {"model_path": janus_folder}, RuntimeConfig(dtype="bfloat16"), registry)
    assert backbone.output.weight.dtype == torch.bfloat16 and backbone.rotary_emb.inv_freq.dtype == torch.float32
    codes = Raster(backbone).generate(PROMPTS, (3, 3), SamplingConfig(cfg_scale=5.0), make_generator(0, "cpu")).codes
    assert codes.shape == (2, 3, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_raster_equals_eager_and_transformers(janus_folder, registry, dtype):
    runtime = RuntimeConfig(device="cuda", dtype=dtype)
    backbone = api.load_backbone("janus", {"model_path": janus_folder}, runtime, registry)
    greedy = SamplingConfig(cfg_scale=3.0, top_k=1)
    eager = Raster(backbone).generate(PROMPTS, (3, 3), greedy, make_generator(0, "cuda"))
    torch._dynamo.reset()
    compiled = Raster(backbone, compile=True)  # inductor, mode="reduce-overhead": CUDA graphs
    for seed in (0, 1):  # the second run replays the captured graph
        assert torch.equal(compiled.generate(PROMPTS, (3, 3), greedy, make_generator(seed, "cuda")).codes, eager.codes)
    if dtype == "float32":
        model = hf_model(janus_folder).cuda()
        ids, valid = backbone.prompts.batch(PROMPTS, cfg=False)
        theirs = model.generate(ids.cuda(), attention_mask=valid.long().cuda(), generation_mode="image",
                                do_sample=False, guidance_scale=3.0)
        assert torch.equal(eager.codes.flatten(1), theirs.cpu())


# --- the CLI and the plugin listing ----------------------------------------------------------------

def test_cli_generates_pngs_with_the_janus_backend(janus_folder, registry, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["generate", "--backend", "janus", "--model-path", str(janus_folder),
                                      "--prompt", "a cat", "--prompt", "a red fox", "--image-size", "48",
                                      "--out", str(out), "--json"], obj=registry)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["grid"] == [3, 3] and summary["forward_passes_per_batch"] == 9
    assert summary["sampling"]["cfg_scale"] == 5.0  # Janus's own default, from generation_config.json
    assert sorted(p.name for p in out.iterdir()) == ["0000_a_cat.png", "0001_a_red_fox.png"]
    assert Image.open(out / "0000_a_cat.png").size == (48, 48)


@pytest.mark.parametrize("args, message", [
    (["--classes", "3"], "takes prompts, not class ids"),
    (["--prompt", "a cat", "--image-size", "32"], "native size 48 px"),
])
def test_cli_bad_input_is_one_line(janus_folder, registry, args, message):
    result = CliRunner().invoke(
        cli, ["generate", "-b", "janus", "--model-path", str(janus_folder), *args], obj=registry)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_plugins_lists_flashar_janus_with_its_version(monkeypatch):
    monkeypatch.setenv("FLASHAR_LOAD_PLUGINS", "janus")  # the installed entry point, nothing else
    pm, infos = build_manager()
    result = CliRunner().invoke(cli, ["plugins", "--json"], obj=Registry.from_manager(pm, infos))
    row = next(r for r in json.loads(result.output) if r["name"] == "janus")
    assert row["package"] == "flashar-janus" and row["version"] == importlib.metadata.version("flashar-janus")
    assert row["registers"] == ["backend:janus"] and row["error"] is None


# --- FlashAR end to end ----------------------------------------------------------------------------

def test_flashar_decoding_matches_teacher_forcing_in_five_passes(janus_folder, registry):
    from flashar.adapter import Adapter, new_metadata
    from flashar.branch import FlashARHead
    from flashar.config import BranchConfig
    from flashar.methods.flashar import FlashAR
    from flashar.teacher import flashar_logits

    backbone = load(janus_folder, registry)
    head = FlashARHead(backbone, BranchConfig(num_blocks=1))
    with torch.no_grad():
        for name, p in head.named_parameters():
            if "gate" in name:
                p.normal_(0, 0.3)
    method = FlashAR(backbone, adapter=Adapter(new_metadata(backbone, head, (3, 3)), head, backbone))
    codes = torch.randint(0, backbone.codebook_size, (2, 3, 3), generator=torch.Generator().manual_seed(0))
    sampling = SamplingConfig(cfg_scale=3.0)
    with torch.no_grad():
        cached = method.teacher_logits(PROMPTS, codes, sampling)
        teacher = flashar_logits(backbone, head, backbone.prefix(PROMPTS, cfg=True, grid=(3, 3)), codes).fused
    torch.testing.assert_close(cached, teacher, atol=1e-4, rtol=1e-4)
    result = method.generate(PROMPTS, (3, 3), sampling, make_generator(0, "cpu"))
    assert result.num_forward_passes == 5 and result.codes.shape == (2, 3, 3)


def test_adapt_then_generate_with_flashar_through_the_cli(janus_folder, registry, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(4):
        Image.fromarray((torch.rand(48, 48, 3) * 255).byte().numpy()).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": PROMPTS[i % 2]}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    runner = CliRunner()
    adapted = runner.invoke(cli,
        ["adapt", "-b", "janus", "--model-path", str(janus_folder), "--data", str(data), "--image-size", "48", "--out",
        str(tmp_path / "adapter"), "--stage1-steps", "2", "--stage2-steps", "1", "--batch-size", "2", "--cache-dir",
        str(tmp_path / "cache")], obj=registry)
    assert adapted.exit_code == 0, adapted.output
    result = runner.invoke(cli, ["generate", "-b", "janus", "--model-path", str(janus_folder), "--method", "flashar",
                                 "--adapter", str(tmp_path / "adapter"), "--prompt", "a cat", "--image-size", "48",
                                 "--json"], obj=registry)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["forward_passes_per_batch"] == 5
