"""A tiny random GLM-Image in the published folder layout (``zai-org/GLM-Image``).

    <root>/model_index.json
    <root>/vision_language_encoder/config.json, generation_config.json,
                                   model-0000{1,2}-of-00002.safetensors, model.safetensors.index.json
    <root>/processor/tokenizer.json, tokenizer_config.json, chat_template.jinja,
                     preprocessor_config.json, processor_config.json
    <root>/transformer/, vae/, scheduler/, text_encoder/, tokenizer/   (where diffusers has GLM-Image)

The AR prior is transformers' ``GlmImageForConditionalGeneration`` with a 3-layer, 64-wide GLM text model
(4 query heads of 16 over 2 KV heads, M-RoPE over half of each head), a 1-block vision tower with
16-pixel patches and a 64-code VQ. Ids keep the published arrangement at a small scale: codes are ids
0..63, image start / end are 64 / 65 (the first two of the 80 vision-vocabulary rows ``lm_head`` outputs),
and text sits above the vision vocabulary. The tokenizer is word-level over a few words plus GLM's
special tokens; the chat template is a small stand-in (the published one is not reproduced here).

The pixel side is diffusers' own classes, saved with ``save_pretrained``: a 2-layer DiT (2 heads of 8) over
the 64 codes, a 4-level VAE (8x, 4 latent channels, so DiT patch 2 x VAE 8 = the 16 pixels of an upsampled
code), a flow-matching scheduler with the resolution-dependent shift, a 1-layer T5 glyph encoder and the byte-level
ByT5 tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CODEBOOK, VISION_VOCAB, VOCAB = 64, 80, 160
IMAGE_START, IMAGE_END, IMAGE_TOKEN, PAD = 64, 65, 158, 159
WORDS = ["a", "red", "fox", "two", "cats", "on", "sofa", "in", "the", "snow", "car", "blue", "house", "[UNK]",
         *[str(i) for i in range(40)], " "]
SPECIALS = {"<sop>": 140, "<eop>": 141, "[gMASK]": 142, "<|user|>": 143, "<|assistant|>": 144,
            "<|image|>": IMAGE_TOKEN, "<|endoftext|>": PAD, "<|dit_token_64|>": IMAGE_START,
            "<|dit_token_65|>": IMAGE_END}
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endfor %}<|assistant|>"
)


def tiny_config() -> dict:
    text = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "attention_bias": True, "vision_vocab_size": VISION_VOCAB,
            "pad_token_id": PAD, "eos_token_id": IMAGE_END,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                "mrope_section": [2, 1, 1]}}
    vision = {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48, "patch_size": 16,
              "image_size": 64, "spatial_merge_size": 1, "in_channels": 3}
    vq = {"embed_dim": 16, "num_embeddings": CODEBOOK, "latent_channels": 32}
    return {"architectures": ["GlmImageForConditionalGeneration"], "model_type": "glm_image",
            "text_config": text, "vision_config": vision, "vq_config": vq, "image_token_id": IMAGE_TOKEN,
            "image_start_token_id": IMAGE_START, "image_end_token_id": IMAGE_END, "tie_word_embeddings": False}


def random_model(seed: int = 0):
    """The tiny model, eager attention, weights large enough that greedy decoding is not constant."""
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    torch.manual_seed(seed)
    config = GlmImageConfig(**{k: v for k, v in tiny_config().items() if k not in ("architectures", "model_type")})
    model = GlmImageForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.normal_(1.0, 0.1)
            elif p.ndim > 1:
                p.normal_(0.0, 1.0 if "embed" in name or "lm_head" in name else 0.3)
            else:
                p.normal_(0.0, 0.05)
    return model


def write_two_shards(folder: Path, state: dict[str, torch.Tensor], first_prefix: str) -> None:
    """``state`` as two safetensors shards plus ``model.safetensors.index.json`` (keys under ``first_prefix``
    go to shard 1)."""
    from safetensors.torch import save_file

    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    parts = ({k: v for k, v in state.items() if k.startswith(first_prefix)},
             {k: v for k, v in state.items() if not k.startswith(first_prefix)})
    weight_map = {}
    for name, part in zip(names, parts):
        save_file({k: v.contiguous() for k, v in part.items()}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_vle(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """The ``vision_language_encoder`` subfolder: config, generation config and two shards."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(tiny_config(), indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.9, "top_k": VISION_VOCAB, "top_p": 0.75,
         "eos_token_id": IMAGE_END, "pad_token_id": PAD}))
    write_two_shards(folder, state, "model.language_model.layers.0.")
    return folder


def write_processor(folder: Path) -> Path:
    """A word-level tokenizer with GLM-Image's special tokens, the chat template, the image processor."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import GlmImageImageProcessor, GlmImageProcessor, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {word: VISION_VOCAB + i for i, word in enumerate(WORDS)} | SPECIALS  # 80..134, below the specials
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|\s|[^\w\s]"), behavior="isolated")
    core.add_special_tokens(list(SPECIALS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|endoftext|>", eos_token="<|dit_token_65|>", bos_token="<|dit_token_64|>",
        unk_token="[UNK]", padding_side="left",
        extra_special_tokens={"image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>"},
    )
    images = GlmImageImageProcessor(patch_size=16, merge_size=1, temporal_patch_size=1,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 512 * 512})
    GlmImageProcessor(image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder


PIXEL_PARTS = {"text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "ByT5Tokenizer"],
               "transformer": ["diffusers", "GlmImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}


def write_pixel_parts(root: Path, seed: int = 0) -> None:
    """The DiT, VAE, scheduler and glyph encoder as diffusers' ``GlmImagePipeline`` loads them."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImageTransformer2DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    glyphs = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                     feed_forward_proj="gated-gelu"))
    dit = GlmImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                                     num_attention_heads=2, text_embed_dim=32, time_embed_dim=16, condition_dim=8,
                                     prior_vq_quantizer_codebook_size=CODEBOOK)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4, 8, 16, 16), latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        norm_num_groups=4, sample_size=128, latents_mean=[0.1, -0.2, 0.0, 0.3],
                        latents_std=[1.5, 0.8, 1.0, 1.2])
    parts = {"text_encoder": glyphs, "tokenizer": ByT5Tokenizer(), "transformer": dit, "vae": vae,
             "scheduler": FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75)}
    for name, part in parts.items():
        part.save_pretrained(root / name)


def write_tiny_glm_image(root: Path, seed: int = 0, pixels: bool | None = None) -> Path:
    """The whole published layout under ``root``; the DiT, VAE and glyph encoder only with ``pixels`` (by default:
    when the installed diffusers has GLM-Image)."""
    root.mkdir(parents=True, exist_ok=True)
    model = random_model(seed)
    write_vle(root / "vision_language_encoder", model.state_dict())
    write_processor(root / "processor")
    if pixels is None:
        pixels = has_glm_image_diffusers()
    if pixels:
        write_pixel_parts(root, seed)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "GlmImagePipeline", "processor": ["transformers", "GlmImageProcessor"],
        "vision_language_encoder": ["transformers", "GlmImageForConditionalGeneration"],
        **(PIXEL_PARTS if pixels else {})}))
    return root


def has_glm_image_diffusers() -> bool:
    try:
        from diffusers import GlmImagePipeline  # noqa: F401
    except ImportError:
        return False
    return True
