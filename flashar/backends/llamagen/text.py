"""FLAN-T5 caption features for text-conditional LlamaGen (reference/llamagen.md §7).

Prompts are tokenised to 120 tokens (padding, truncation, EOS appended), encoded by a local
``T5EncoderModel`` folder, then left-padded: the valid rows move to the end and padding rows are zeroed.
The official pipeline also runs a PixArt-style ``clean_caption`` on each prompt; flashar passes prompts
through unchanged, so pre-clean them for exact parity.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from flashar.errors import FlashARError, require


class T5TextEncoder:
    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_length: int = 120):
        require("transformers", "llamagen")
        from transformers import AutoTokenizer, T5EncoderModel

        if not Path(path).is_dir():
            raise FlashARError(f"T5 folder not found: {path}; pass the local flan-t5-xl folder with --t5-path")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = T5EncoderModel.from_pretrained(str(path), torch_dtype=dtype).to(device).eval()
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> left-padded features (B, 120, d_model) float32 and mask (B, 120) bool."""
        if not all(isinstance(p, str) and p for p in prompts):
            raise FlashARError("text-conditional models need non-empty prompts; pass --prompt TEXT")
        batch = self.tokenizer(prompts, max_length=self.max_length, padding="max_length", truncation=True,
                               add_special_tokens=True, return_tensors="pt").to(self.model.device)
        features = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return left_pad(features.float(), batch.attention_mask.bool())


def left_pad(features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's valid positions to the end; zero the padding (the official sampler's layout)."""
    out, new_mask = torch.zeros_like(features), torch.zeros_like(mask)
    for i in range(features.shape[0]):
        n = int(mask[i].sum())
        if n:
            out[i, -n:] = features[i, :n]
            new_mask[i, -n:] = True
    return out, new_mask
