"""A tiny random Janus written exactly as transformers' ``save_pretrained`` writes a real one (no hub here).

The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` and a word-level
tokenizer with Janus's special tokens. Sizes: Llama 2 layers x 32 wide (4 heads, 2 KV heads), a 40-code
VQ with 16x downsampling, native grid 3 x 3 (48 px).
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "red", "fox", "two", "cats", "on", "sofa", "cat", "in", "the", "snow", ":", "dog"]
SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<begin_of_image>", "<end_of_image>",
           "<image_placeholder>", "<|User|>", "<|Assistant|>", "[UNK]"]
TEXT = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=48, patch_size=16,
              projection_dim=32, num_image_tokens=9, depth=2, mlp_ratio=2)
VQ = dict(embed_dim=4, num_embeddings=40, base_channels=32, channel_multiplier=[1, 1, 1, 1, 1], num_res_blocks=1,
          latent_channels=32, projection_dim=32, image_token_embed_dim=32, num_hidden_layers=2)


def tiny_config(**text_overrides):
    from transformers import JanusConfig

    return JanusConfig(text_config={**TEXT, **text_overrides}, vision_config=VISION, vq_config=VQ,
                       image_token_id=SPECIAL.index("<image_placeholder>"))


def random_model(seed: int = 0, **text_overrides):
    """A JanusForConditionalGeneration with weights large enough that greedy decoding is not constant."""
    from transformers import JanusForConditionalGeneration

    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(tiny_config(**text_overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.normal_(1.0, 0.1)  # RMSNorm / GroupNorm scales near one
            else:
                p.normal_(0, 0.3 if p.ndim > 1 else 0.05)
    return model


def tiny_tokenizer():
    """A word-level tokenizer whose ids 0..8 are Janus's special tokens (BOS 0, pad 2, begin-of-image 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=SPECIAL[0], eos_token=SPECIAL[1],
                                   pad_token=SPECIAL[1], unk_token="[UNK]")


def save_folder(model, folder: Path, tokenizer=None) -> Path:
    """save_pretrained the model, its generation config (Janus's CFG defaults and token ids) and tokenizer."""
    generation = model.generation_config
    generation.bos_token_id, generation.pad_token_id = 0, SPECIAL.index("<｜▁pad▁｜>")
    generation.guidance_scale, generation.temperature = 5.0, 1.0
    generation.generation_kwargs = {"boi_token_id": SPECIAL.index("<begin_of_image>")}  # where transformers reads it
    model.save_pretrained(str(folder))
    (tokenizer or tiny_tokenizer()).save_pretrained(str(folder))
    return folder


def write_tiny_janus(folder: Path, seed: int = 0, **text_overrides) -> Path:
    """Write a tiny random Janus folder and return its path (the backend's ``model_path``)."""
    return save_folder(random_model(seed, **text_overrides), Path(folder))
