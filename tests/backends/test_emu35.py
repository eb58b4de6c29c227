"""The Emu3.5 backend: published file layouts, the real tokenizer, the native raster layout, the protocol.

The model is a tiny random Emu3.5 with the real vocabulary (282,926 ids), written as published: an Emu3
``config.json``, two bf16 safetensors shards with their index, the real tokenizer files, and a tiny IBQ.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (EMU35_TOKENIZER_SHA256, TINY_EMU35, TINY_IBQ, emu35_tokenizer_dir, emu35_tokenizer_files,
                     random_ibq, write_emu35, write_ibq, write_two_shards)

from flashar import api
from flashar.backends.emu35.backbone import Emu35Backbone
from flashar.backends.emu35.loader import load_vision, qwen3_config
from flashar.backends.emu35.text import Emu35TextTokenizer
from flashar.backends.emu35.tokenizer import IBQ, IBQConfig, to_unit_range
from flashar.config import RuntimeConfig, SamplingConfig
from flashar.decoding import prefill
from flashar.errors import CheckpointError, FlashARError
from flashar.methods.raster import Raster
from flashar.sampling import make_generator
from flashar.testing import BackboneConformance

PROMPTS = ["a red car", "two cats on a sofa"]


@pytest.fixture(scope="module")
def emu35_options(tmp_path_factory):
    return write_emu35(tmp_path_factory.mktemp("emu35"))


@pytest.fixture(scope="module")
def text():
    return Emu35TextTokenizer(emu35_tokenizer_dir())


def load(options, **extra):
    return api.load_backbone("emu35", {**options, **extra}).eval()


class TestEmu35(BackboneConformance):
    conditions = PROMPTS
    grid = (2, 3)  # two rows, so the native layout has an EOL between them

    @pytest.fixture
    def backbone(self, emu35_options):
        self.options = emu35_options
        return load(emu35_options)

    def vocabulary_ids(self, backbone, codes):
        """Code c is line c of the visual tokens in emu3_vision_tokens.txt, after the text vocabulary and
        its specials (the tokenizer checks the file's order)."""
        return codes + backbone.text.ids.first_visual

    def save_backbone(self, backbone, folder):
        """The published layout again: the original config.json and tokenizer files, the weights as shards."""
        import shutil

        source = self.options["model_path"]
        model_dir = folder / "emu35"
        model_dir.mkdir(parents=True)
        for name in ("config.json", *(p.name for p in emu35_tokenizer_files())):
            shutil.copy(source / name, model_dir / name)
        state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
        write_two_shards(model_dir, state, first=("model.embed_tokens", "model.layers.0."))
        return {"model_path": model_dir, "vq_path": self.options["vq_path"]}


def test_conformance_catches_a_code_offset_that_is_only_self_consistent(emu35_options):
    """One id too low still decodes raster exactly as its own reference does; only the vocabulary says no."""
    backbone = load(emu35_options)
    backbone.code_offset -= 1
    suite = TestEmu35()
    suite.test_raster_greedy_matches_full_recompute(backbone)
    with pytest.raises(AssertionError, match="code_ids"):
        suite.test_embedded_code_ids_are_the_vocabulary_ids(backbone)


# --- the published architecture -------------------------------------------------------------------

# BAAI/Emu3.5 config.json (reference/emu35_glm.md §2.1).
REAL_CONFIG = {**TINY_EMU35, "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
               "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 32768}


def test_published_config_gives_the_34b_model():
    with torch.device("meta"):
        model = Emu35Backbone(qwen3_config(REAL_CONFIG, "config.json"))
    assert sum(p.numel() for p in model.parameters()) == 34_103_460_864  # 68.2 GB in bf16
    assert model.layers[0].self_attn.q_proj.weight.shape == (8192, 5120)  # decoupled head_dim: 64 x 128 != 5120
    config = model.config
    assert (config.rms_norm_eps, config.rope_parameters["rope_theta"], config.tie_word_embeddings) == (1e-6, 1e6, False)
    assert set(config.layer_types) == {"full_attention"}  # sliding_window in config.json is unused


def test_state_dict_has_the_published_keys_once(emu35_options):
    backbone = load(emu35_options)
    keys = list(backbone.state_dict())
    assert len(keys) == len(set(keys)) == 3 + 11 * TINY_EMU35["num_hidden_layers"]
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.1.self_attn.q_norm.weight", "model.layers.0.mlp.gate_proj.weight"} <= set(keys)
    layers = backbone.layers
    backbone.layers = layers[:1]  # protocol names assign to the published modules, adding no keys
    assert backbone.model.layers is backbone.layers and len(backbone.state_dict()) == 3 + 11
    backbone.layers = layers
    assert list(backbone.state_dict()) == keys


def transformers_reference(options, backbone):
    """transformers' own Qwen3ForCausalLM (eager attention), configured from the Emu3 config.json, same weights."""
    from transformers import Qwen3ForCausalLM
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    config = qwen3_config(json.loads((options["model_path"] / "config.json").read_text()), "config.json")
    config._attn_implementation = "eager"
    with torch.device("meta"):
        reference = Qwen3ForCausalLM(config)
    reference.load_state_dict(backbone.state_dict(), strict=True, assign=True)
    reference.model.rotary_emb = Qwen3RotaryEmbedding(config)  # a non-persistent buffer, not in the weights
    return reference.eval()


def test_cached_logits_match_transformers_qwen3(emu35_options, text):
    """Prefill + one-token cached steps over a native image sequence == Qwen3ForCausalLM on the same weights."""
    backbone = load(emu35_options)
    reference = transformers_reference(emu35_options, backbone)
    eol = backbone.row_end_token
    image = [151854 + 5, 151854 + 70000, 151854 + 131071, eol, 151854 + 1, 151854 + 2]
    prompt = text.template("a red car") + text.image_prefix(2, 3)
    with torch.no_grad():
        expected = reference(torch.tensor([prompt + image])).logits[0, len(prompt) - 1 :].float()  # (7, vocab)
        got = cached_logits(backbone, "a red car", image)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    visual = backbone.logits(torch.zeros(1, backbone.dim))
    assert visual.shape == (1, 131072)  # only the visual rows of lm_head are ever multiplied


def cached_logits(backbone, prompt: str, image: list[int]) -> torch.Tensor:
    """Full-vocabulary logits at IMG and after each image token, through the static cache, one token a step."""
    prefix = backbone.prefix([prompt], cfg=False, grid=(2, 3))
    cache = backbone.new_cache(1, prefix.length + len(image))
    h, _ = prefill(backbone, prefix, cache)
    hidden = [h]
    for j, token in enumerate(image):
        slot = torch.tensor([prefix.length + j])
        mask = (torch.arange(cache.length) <= slot)[None, None, None, :]
        out, _ = backbone(backbone.embed(torch.tensor([[token]])), backbone.rope(slot), mask, cache, slot)
        hidden.append(out[:, 0])
    return backbone.output(torch.cat(hidden)).float()


# --- native layout and CFG (spec §4, §6) --------------------------------------------------------------

def test_native_layout_puts_eol_between_rows_only(emu35_options):
    backbone = load(emu35_options)
    height, width = 3, 4
    state = Raster(backbone).setup(PROMPTS, (height, width), SamplingConfig(cfg_scale=5.0))
    forced = state.forced.tolist()
    assert len(forced) == height * width + height - 1  # no EOL after the last row, EOI is not fed
    assert [j for j, t in enumerate(forced) if t >= 0] == [4, 9] and {forced[4], forced[9]} == {151846}
    # entry j sits at P + j: cell (r, c) at pos(IMG) + 1 + r (W + 1) + c, with IMG the last prefix token
    prefix_length = state.prefix.length
    assert torch.equal(state.positions, backbone.rope(prefix_length + torch.arange(len(forced))))
    cells = torch.tensor([[0, 0], [1, 0], [2, 3]])
    expected = prefix_length + cells[:, 0] * (width + 1) + cells[:, 1]
    assert torch.equal(
        backbone.cell_positions(cells, prefix_length, native=True, grid=(height, width)), backbone.rope(expected))
    assert torch.equal(backbone.cell_positions(cells, prefix_length, grid=(height, width)),
                       backbone.rope(prefix_length + cells[:, 0] * width + cells[:, 1]))


def native_greedy(reference, text, prompt: str, grid: tuple[int, int], cfg_scale: float) -> torch.Tensor:
    """Emu3.5's own sampler, greedy: cond and "no_text" uncond run unbatched at their own positions; visual
    steps mix full-vocabulary log-softmaxes, mask ids below 151854 and take the argmax; EOL is forced."""
    height, width = grid
    image = text.image_prefix(height, width)
    contexts = [text.template(prompt) + image, text.template(None) + image]
    generated, codes = [], []
    for j in range(height * (width + 1) - 1):
        if (j + 1) % (width + 1) == 0:
            generated.append(text.ids.eol)
            continue
        logits = (reference(torch.tensor([c + generated]), logits_to_keep=1).logits[0, -1].float() for c in contexts)
        cond, uncond = (torch.log_softmax(x, dim=-1) for x in logits)
        guided = uncond + cfg_scale * (cond - uncond)
        guided[:151854] = float("-inf")
        generated.append(int(guided.argmax()))
        codes.append(generated[-1] - 151854)
    return torch.tensor(codes).view(height, width)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_raster_with_native_cfg_equals_emu35_unbatched_sampler(emu35_options, text, padding):
    """Batched [cond; uncond] rows reproduce the reference's two unbatched contexts exactly, whatever
    --prefix-padding says (it pads the FlashAR decoder's rows only)."""
    backbone = load(emu35_options, prefix_padding=padding)
    reference = transformers_reference(emu35_options, backbone)
    grid = (2, 3)
    sampling = SamplingConfig(cfg_scale=5.0, top_k=1)
    got = Raster(backbone).generate(PROMPTS, grid, sampling, make_generator(0, "cpu")).codes
    with torch.no_grad():
        expected = torch.stack([native_greedy(reference, text, p, grid, 5.0) for p in PROMPTS])
    assert torch.equal(got, expected)


def test_right_padding_starts_every_grid_at_the_padded_length(emu35_options):
    """--prefix-padding pads the FlashAR decoder's rows (``unconditional="empty"``); native rows (raster,
    the training-free methods) are left-padded whatever it says."""
    backbone = load(emu35_options)
    prefix = backbone.prefix(PROMPTS, cfg=True, grid=(2, 3), unconditional="empty")
    lengths = prefix.valid.sum(1)
    assert torch.equal(prefix.last, lengths - 1) and prefix.valid[:, 0].all()  # valid tokens first
    assert int(lengths.max()) == prefix.length and int(lengths[-1]) == 21 + 5  # t2i template of "" + BOI "2*3" IMG
    left = load(emu35_options, prefix_padding="left").prefix(PROMPTS, cfg=True, grid=(2, 3), unconditional="empty")
    assert (left.last == left.length - 1).all() and left.valid[:, -1].all()
    assert torch.equal(left.valid.sum(1), lengths)
    native = backbone.prefix(PROMPTS, cfg=True, grid=(2, 3))
    assert (native.last == native.length - 1).all() and native.valid[:, -1].all()
    assert int(native.valid.sum(1)[-1]) == 16 + 5  # "no_text" + BOI "2*3" IMG


def test_emu35_recommends_the_published_t2i_sampling(emu35_options):
    sampling = api.resolve_sampling(load(emu35_options))
    assert (sampling.cfg_scale, sampling.top_k, sampling.top_p, sampling.temperature) == (5.0, 5120, 1.0, 1.0)


# --- text side (spec §3-§5) ------------------------------------------------------------------------------

def test_tokenizer_test_data_restores_the_published_files():
    """tests/data keeps the vocabulary compressed and generates the vision-token list: both must come back
    byte for byte as published."""
    import hashlib

    for path in emu35_tokenizer_files():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == EMU35_TOKENIZER_SHA256[path.name], path.name


def test_real_vocabulary_gives_the_published_ids(text):
    cond = text.template("a red car")
    assert len(cond) == 23 and cond[:2] == [151849, 2610] and cond[-3:] == [25, 220, 151746]
    uncond = text.template(None)
    assert len(uncond) == 16 and uncond[0] == 151849 and uncond[-1] == 151746
    ids = text.ids
    assert (ids.pad, ids.bos, ids.eol, ids.img, ids.boi, ids.eoi) == (151643, 151849, 151846, 151851, 151852, 151853)
    assert (ids.first_visual, ids.num_visual) == (151854, 131072)
    assert text.image_prefix(32, 32) == [151852, 18, 17, 9, 18, 17, 151851]
    assert text.image_prefix(55, 73)[1:-1] == [20, 20, 9, 22, 18] and text.image_prefix(8, 8)[1:-1] == [23, 9, 23]
    assert text.encode("<|extra_200|><|image end|>") == [151846, 151853]


def test_long_prompts_are_cut_inside_the_template(text):
    ids = text.template("word " * 200, max_length=40)
    assert len(ids) == 40 and ids[-3:] == [25, 220, 151746] and ids[0] == 151849
    with pytest.raises(FlashARError, match="no room"):
        text.template("a red car", max_length=20)


def test_prompts_and_grid_are_checked(emu35_options):
    backbone = load(emu35_options)
    with pytest.raises(FlashARError, match="text-conditional"):
        backbone.prefix([3], cfg=False, grid=(2, 2))
    with pytest.raises(FlashARError, match="grid"):
        backbone.prefix(PROMPTS, cfg=False)
    assert backbone.grid(512) == (32, 32) and backbone.grid((880, 1168)) == (55, 73)


def test_broken_vision_token_list_is_named(tmp_path):
    for name in ("emu3.tiktoken", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((emu35_tokenizer_dir() / name).read_bytes())
    lines = (emu35_tokenizer_dir() / "emu3_vision_tokens.txt").read_text().splitlines()
    (tmp_path / "emu3_vision_tokens.txt").write_text("\n".join(lines[:3] + lines[4:]))
    with pytest.raises(CheckpointError, match="expected '<\\|visual token 000000\\|>'"):
        Emu35TextTokenizer(tmp_path)


# --- loading ---------------------------------------------------------------------------------------------

def test_config_must_be_an_emu3_language_model(tmp_path):
    with pytest.raises(CheckpointError, match="not an Emu3.5 language-model config"):
        qwen3_config({**TINY_EMU35, "model_type": "emu3"}, tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="rope_scaling"):
        qwen3_config({**TINY_EMU35, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "config.json")
    linear = qwen3_config({**TINY_EMU35, "rope_scaling": {"type": "linear", "factor": 2.0}}, "config.json")
    assert linear.rope_parameters["rope_type"] == "linear" and linear.rope_parameters["factor"] == 2.0


def test_missing_keys_and_shards_are_named(tmp_path):
    options = write_emu35(tmp_path)
    index_path = options["model_path"] / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing 1 keys \(model.layers.1.mlp.up_proj.weight\)"):
        load(options)
    (options["model_path"] / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load(options)


@pytest.mark.filterwarnings("ignore::flashar.errors.FlashARWarning")  # bf16 on a CPU without native bf16 (AVX2)
def test_bf16_load_keeps_the_published_values(emu35_options):
    from safetensors import safe_open

    backbone = api.load_backbone("emu35", emu35_options, RuntimeConfig(dtype="bfloat16"))
    assert backbone.dtype == torch.bfloat16
    with safe_open(str(emu35_options["model_path"] / "model-00002-of-00002.safetensors"), "pt") as f:
        assert torch.equal(backbone.output.weight, f.get_tensor("lm_head.weight"))
    prefix = backbone.prefix(["a red car"], cfg=True, grid=(2, 2))
    h, _ = prefill(backbone, prefix, backbone.new_cache(2, prefix.length + 5))
    assert h.dtype == torch.bfloat16 and torch.isfinite(backbone.logits(h)).all()


def test_layers_split_over_devices_decode_like_one_device(emu35_options):
    """The device_map path (per-layer devices and caches) on two CPU device names gives the same tokens."""
    from flashar.backends.emu35.placement import Placement

    backbone = load(emu35_options)
    sampling = SamplingConfig(cfg_scale=5.0, top_k=1)
    expected = Raster(backbone).generate(PROMPTS, (2, 3), sampling, make_generator(0, "cpu")).codes
    backbone.placement = Placement([torch.device("cpu"), torch.device("cpu", 0)])
    backbone.placement.plan(backbone.num_layers)
    assert backbone.placement.device_of("model.layers.1.mlp.up_proj.weight") == torch.device("cpu", 0)
    assert backbone.placement.device_of("model.embed_tokens.weight") == torch.device("cpu")
    cache = backbone.new_cache(2, 10)  # one buffer pair per layer, each beside its layer
    assert len(cache.k) == backbone.num_layers and cache.length == 16
    got = Raster(backbone).generate(PROMPTS, (2, 3), sampling, make_generator(0, "cpu")).codes
    assert torch.equal(got, expected)


def test_device_map_needs_gpus(emu35_options):
    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    with pytest.raises(FlashARError, match="none is visible"):
        api.load_backbone("emu35", {**emu35_options, "device_map": "auto"})


# --- IBQ vision tokenizer (spec §8) -----------------------------------------------------------------

def test_ibq_has_the_published_key_names():
    keys = {k: tuple(v.shape) for k, v in random_ibq().state_dict().items()}
    assert keys["quantize.embedding.weight"] == (131072, 8)
    assert keys["quant_conv.weight"] == (8, 32, 1, 1) and keys["post_quant_conv.weight"] == (32, 8, 1, 1)
    for key in ("encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.down.2.block.0.nin_shortcut.weight", "encoder.down.4.attn.0.q.weight",
                "encoder.mid.block_1.conv1.weight", "encoder.mid.attn_1.proj_out.weight",
                "decoder.up.4.attn.1.k.weight", "decoder.up.1.upsample.conv.weight",
                "decoder.up.0.block.1.conv2.weight", "decoder.mid.block_2.norm2.bias", "decoder.conv_out.weight"):
        assert key in keys, key
    assert not any(
        k.startswith(("encoder.down.4.downsample", "decoder.up.0.upsample", "encoder.down.3.attn")) for k in keys)


def test_published_ibq_config_has_455m_parameters():
    with torch.device("meta"):
        model = IBQ(IBQConfig())  # ch 256, ch_mult 1-1-2-2-4, 4 blocks, attention at 16, codebook 131072 x 256
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 455


def test_ibq_encode_decode_shapes_and_raster_order(emu35_options):
    backbone = load(emu35_options)
    images = torch.rand(2, 3, 64, 96)
    codes = backbone.encode(images)
    assert codes.shape == (2, 4, 6) and codes.dtype == torch.long
    decoded = backbone.decode(codes)
    assert decoded.shape == (2, 3, 64, 96) and decoded.min() >= 0 and decoded.max() <= 1
    ibq, seen = backbone.tokenizer.model, {}
    ibq.post_quant_conv.register_forward_hook(lambda m, inputs, out: seen.update(z=inputs[0]))
    ibq.decode_codes(codes)
    # code (b, r, c) -> latent (r, c)
    assert torch.equal(seen["z"][1, :, 2, 5], ibq.quantize.embedding.weight[codes[1, 2, 5]])


def test_ibq_quantizer_takes_the_largest_dot_product_not_the_nearest_code():
    ibq = random_ibq()
    book = ibq.quantize.embedding.weight
    with torch.no_grad():
        book[:2] = torch.tensor([[1.0] + [0.0] * 7, [3.0] + [0.0] * 7])  # row 1 is farther from z but scores higher
        book[2:] = -10.0
    z = torch.tensor([1.0] + [0.0] * 7).view(1, 8, 1, 1)
    assert ibq.quantize.codes(z).item() == 1


def test_ibq_yaml_and_ckpt_layout_loads_the_same_weights(tmp_path):
    a = load_vision(write_ibq(tmp_path / "json", seed=3)).model.state_dict()
    b = load_vision(write_ibq(tmp_path / "yaml", seed=3, layout="ckpt")).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ibq_config_is_checked(tmp_path):
    folder = write_ibq(tmp_path / "vq")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "Emu3VisionVQ"}))
    with pytest.raises(CheckpointError, match="Emu3p5VisionVQ"):
        load_vision(folder)
    (folder / "config.json").write_text(json.dumps({**raw, "num_res_blocks": 2}))
    with pytest.raises(CheckpointError, match="missing"):
        load_vision(folder)


def test_pixels_convert_like_the_reference():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    assert torch.equal(to_unit_range(x), torch.tensor([0.0, 127.0, 255.0, 255.0]) / 255)
    assert TINY_IBQ["codebook_size"] == Emu35Backbone.codebook_size


# --- CLI ---------------------------------------------------------------------------------------------------

def test_cli_generates_an_image(emu35_options, tmp_path, registry):
    from click.testing import CliRunner
    from PIL import Image

    from flashar.cli import cli

    out = tmp_path / "out"
    args = ["generate", "--backend", "emu35", "--model-path", emu35_options["model_path"], "--vq-path",
            emu35_options["vq_path"], "--prompt", "a red car", "--image-size", 64, "--out", out, "--json"]
    result = CliRunner().invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["grid"] == [4, 4] and summary["forward_passes_per_batch"] == 4 * 4 + 3  # 16 cells + 3 EOL
    assert summary["sampling"]["cfg_scale"] == 5.0 and summary["sampling"]["top_k"] == 5120
    assert Image.open(out / "0000_a_red_car.png").size == (64, 64)


def test_cli_names_a_missing_model_folder(tmp_path, registry):
    from click.testing import CliRunner

    from flashar.cli import cli

    args = ["generate", "-b", "emu35", "--model-path", str(tmp_path / "nope"), "--prompt", "a red car"]
    result = CliRunner().invoke(cli, args, obj=registry)
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "is not a folder" in result.output
