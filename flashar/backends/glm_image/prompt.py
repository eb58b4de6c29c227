"""GLM-Image's text-to-image prompt and grid geometry (reference/emu35_glm.md §10.2).

The published ``processor`` folder holds transformers' ``GlmImageProcessor``: the tokenizer, the chat
template and the image processor. A text-to-image prompt is the chat template around the caption, then
``<sop>{H} {W}<eop><sop>{h} {w}<eop><|dit_token_16384|>``: the large grid (H, W) = (height, width) // 32,
the preview grid (h, w) = (int(sqrt(H/W) * 16), int(sqrt(W/H) * 16)) (16 x 16 for a square image), and
the image-start token, whose hidden state predicts the first preview code. The processor writes all of it;
flashar only picks the target size.
"""

from __future__ import annotations

import math

FACTOR = 32  # pixels per large-grid token


def preview_grid(height: int, width: int) -> tuple[int, int]:
    """The preview grid (h, w) GLM-Image writes before a large (H, W) grid (the processor's rule)."""
    ratio = height / width
    return int(math.sqrt(ratio) * (FACTOR // 2)), int(math.sqrt(1 / ratio) * (FACTOR // 2))


class GlmImagePrompts:
    """Captions -> prompt token ids through the published ``GlmImageProcessor``."""

    def __init__(self, processor):
        self.processor = processor
        tokenizer = processor.tokenizer
        self.image_start = tokenizer.convert_tokens_to_ids(processor.bos_token)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.image_start

    def ids(self, caption: str, grid: tuple[int, int]) -> list[int]:
        """Token ids of the text-to-image prompt for ``caption`` and a large ``grid`` (H, W)."""
        messages = [{"role": "user", "content": [{"type": "text", "text": caption}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        height, width = grid
        out = self.processor(text=[text], target_h=height * FACTOR, target_w=width * FACTOR)
        return list(out["input_ids"][0])
