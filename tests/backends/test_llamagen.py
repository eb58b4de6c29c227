"""The LlamaGen backend: published sizes and RoPE values, the official file layouts, the protocol."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_GPT, random_gpt, write_llamagen

from flashar import api
from flashar.backends.llamagen import vq_config_from
from flashar.backends.llamagen.backbone import LlamaGenBackbone
from flashar.backends.llamagen.loader import load_gpt, load_vq
from flashar.backends.llamagen.model import PRESETS, GPTConfig, rope_table
from flashar.backends.llamagen.text import left_pad
from flashar.backends.llamagen.tokenizer import VQ_PRESETS, VQModel
from flashar.errors import CheckpointError, FlashARError
from flashar.testing import BackboneConformance


def save_llamagen(backbone, folder):
    """A loaded LlamaGen backbone -> the official files (GPT .pt with a 'model' entry, VQ .pt) + JSON configs."""
    folder.mkdir(parents=True)
    torch.save({"model": backbone.state_dict()}, folder / "gpt.pt")
    (folder / "gpt.json").write_text(backbone.config.model_dump_json())
    vq = backbone.tokenizer.model
    torch.save({"model": vq.state_dict()}, folder / "vq.pt")
    (folder / "vq.json").write_text(vq.config.model_dump_json())
    return {"checkpoint": folder / "gpt.pt", "config_file": folder / "gpt.json", "vq_checkpoint": folder / "vq.pt",
            "vq_config": folder / "vq.json"}


class TestLlamaGenClassConditional(BackboneConformance):
    conditions = [3, 7]

    def make_backbone(self, tmp_path):
        options = write_llamagen(tmp_path, seed=0)
        return api.load_backbone("llamagen", options)

    def save_backbone(self, backbone, folder):
        return save_llamagen(backbone, folder)


class TestLlamaGenTextConditional(BackboneConformance):
    conditions = ["a red fox", "two cats on a sofa"]
    grid = (3, 3)

    def make_backbone(self, tmp_path):
        options = write_llamagen(tmp_path, seed=1, model_type="t2i", cls_token_num=6, caption_dim=32)
        backbone = api.load_backbone("llamagen", options)
        backbone.text_encoder = FakeT5(32)
        return backbone

    def save_backbone(self, backbone, folder):
        return save_llamagen(backbone, folder)


class FakeT5:
    """Deterministic caption features, left padded like the official sampler (len(prompt) % 5 + 1 valid)."""

    def __init__(self, dim: int, length: int = 6):
        self.dim, self.length = dim, length

    def __call__(self, prompts):
        feats = torch.stack(
            [torch.randn(self.length, self.dim, generator=torch.Generator().manual_seed(len(p))) for p in prompts])
        mask = torch.zeros(len(prompts), self.length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            mask[i, : len(p) % 5 + 1] = True
        return left_pad(feats, mask)


# --- published numbers ----------------------------------------------------------------------------

@pytest.mark.parametrize("preset, params", [("GPT-B", 110_888_448), ("GPT-L", 342_910_976), ("GPT-XL", 774_699_520),
                                            ("GPT-XXL", 1_410_972_672), ("GPT-3B", 3_096_659_200)])
def test_parameter_counts_match_the_paper(preset, params):
    with torch.device("meta"):
        model = LlamaGenBackbone(GPTConfig(**PRESETS[preset]))
    assert sum(p.numel() for p in model.parameters()) == params


def test_t2i_xl_has_the_published_parameter_and_buffer_sizes():
    with torch.device("meta"):
        model = LlamaGenBackbone(GPTConfig(**PRESETS["GPT-XL"], model_type="t2i", cls_token_num=120))
    assert sum(p.numel() for p in model.parameters()) == 777_678_080
    assert model.cls_embedding.uncond_embedding.shape == (120, 2048)


def test_rope_table_matches_the_reference_values():
    # reference/llamagen.md §4.3: hd = 64, positions 2 (0,1), 17 (1,0), 54 (3,5)
    table = rope_table(torch.tensor([[0, 1], [1, 0], [3, 5]]), 64, 10000.0)
    expect = {(0, 16): (0.54030, 0.84147), (0, 17): (0.84601, 0.53317), (0, 0): (1.0, 0.0), (1, 0): (0.54030, 0.84147),
              (1, 1): (0.84601, 0.53317), (1, 20): (1.0, 0.0), (2, 0): (-0.98999, 0.14112), (2, 1): (-0.11597, 0.99325),
              (2, 16): (0.28366, -0.95892), (2, 17): (-0.94608, 0.32394)}
    for (row, pair), value in expect.items():
        torch.testing.assert_close(table[row, pair], torch.tensor(value), atol=1e-5, rtol=0)


def test_prefix_positions_are_all_zero_rotations():
    model = random_gpt()
    prefix = model.prefix([1], cfg=True)
    assert torch.count_nonzero(prefix.positions) == 0  # cos = sin = 0, not an identity rotation


def test_vq_presets_have_the_published_key_counts():
    for name, keys in (("VQ-16", 344), ("VQ-8", 300)):
        with torch.device("meta"):
            assert len(VQModel(VQ_PRESETS[name]).state_dict()) == keys
    for name, params in (("VQ-16", 71_883_403), ("VQ-8", 70_109_835)):
        with torch.device("meta"):
            assert sum(p.numel() for p in VQModel(VQ_PRESETS[name]).parameters()) == params


# --- official file layouts ------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["model", "bare", "safetensors"])
def test_official_layouts_load_to_the_same_weights(tmp_path, layout):
    options = write_llamagen(tmp_path, layout=layout)
    loaded = load_gpt(options["checkpoint"], config_file=options["config_file"])
    reference = random_gpt()
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_config_is_read_off_the_checkpoint_for_published_widths(tmp_path):
    cfg = dict(TINY_GPT, dim=768, n_head=12, n_layer=1, multiple_of=256)
    torch.save({"model": random_gpt(**cfg).state_dict()}, tmp_path / "c2i.pt")
    model = load_gpt(tmp_path / "c2i.pt")
    assert (model.config.n_head, model.config.n_layer, model.config.num_classes) == (12, 1, 10)


def test_wrapper_prefixes_and_known_extras_are_ignored(tmp_path):
    state = {f"module.{k}": v for k, v in random_gpt().state_dict().items()}
    state["freqs_cis"] = torch.zeros(3)
    state["module.layers.0.attention.kv_cache.k_cache"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "ddp.pt")
    (tmp_path / "gpt.json").write_text(json.dumps(TINY_GPT))
    model = load_gpt(tmp_path / "ddp.pt", config_file=tmp_path / "gpt.json")
    assert torch.equal(model.output.weight, random_gpt().output.weight)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = random_gpt().state_dict()
    del state["layers.1.feed_forward.w2.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    (tmp_path / "gpt.json").write_text(json.dumps(TINY_GPT))
    with pytest.raises(CheckpointError,
                       match=r"missing 1 keys \(layers.1.feed_forward.w2.weight\).*unexpected 1 keys \(extra.weight\)"):
        load_gpt(tmp_path / "bad.pt", config_file=tmp_path / "gpt.json")


def test_wrong_preset_is_reported(tmp_path):
    torch.save({"model": random_gpt(dim=768, n_head=12, n_layer=1, multiple_of=256).state_dict()}, tmp_path / "c2i.pt")
    with pytest.raises(CheckpointError, match="not GPT-L"):
        load_gpt(tmp_path / "c2i.pt", preset="GPT-L")


def test_pickles_that_need_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_gpt(tmp_path / "evil.pt")


def test_truncated_checkpoint_is_reported(tmp_path):
    options = write_llamagen(tmp_path)
    data = options["checkpoint"].read_bytes()
    options["checkpoint"].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_gpt(options["checkpoint"], config_file=options["config_file"])


def test_class_ids_are_range_checked(tmp_path):
    with pytest.raises(FlashARError, match=r"class id 10 is out of range.*\[0, 10\)"):
        random_gpt().prefix([1, 10], cfg=False)


def test_null_class_is_the_last_embedding_row():
    model = random_gpt()
    prefix = model.prefix([4], cfg=True)
    torch.testing.assert_close(prefix.embeds[1, 0], model.cls_embedding.embedding_table.weight[10])


def test_t2i_unconditional_rows_use_the_stored_null_caption(tmp_path):
    model = random_gpt(model_type="t2i", cls_token_num=6, caption_dim=32)
    model.text_encoder = FakeT5(32)
    prefix = model.prefix(["abc"], cfg=True)
    expected = model.cls_embedding(model.cls_embedding.uncond_embedding[:6])
    torch.testing.assert_close(prefix.embeds[1], expected)
    assert torch.equal(prefix.valid[0], prefix.valid[1])  # the uncond half reuses the cond padding mask
    assert prefix.embeds[0, ~prefix.valid[0]].abs().max() == 0  # padded caption rows stay exactly zero


# --- VQ tokenizer ---------------------------------------------------------------------------------

def test_vq_codes_are_in_raster_order(tmp_path):
    options = write_llamagen(tmp_path)
    vq = load_vq(options["vq_checkpoint"], config=vq_config_from(options["vq_config"])).model
    codes = torch.randint(0, 64, (2, 3, 4))
    seen = {}
    vq.post_quant_conv.register_forward_hook(lambda m, inputs, out: seen.update(z=inputs[0]))
    vq.decode_codes(codes)
    book = vq.quantize.codebook()
    assert torch.equal(seen["z"][1, :, 2, 1], book[codes[1, 2, 1]])  # code (b, r, c) feeds latent pixel (r, c)
    assert torch.equal(vq.quantize.nearest(seen["z"]), codes)  # and the quantiser reads it back in the same order

def test_vq_encode_then_decode_round_trips_codes(tmp_path):
    options = write_llamagen(tmp_path)
    backbone = api.load_backbone("llamagen", options)
    codes = torch.randint(0, 64, (2, 3, 3))
    images = backbone.decode(codes)
    assert images.shape == (2, 3, 6, 6)
    again = backbone.encode(images)
    assert again.shape == codes.shape and again.dtype == torch.long
