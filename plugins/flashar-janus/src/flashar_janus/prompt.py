"""Janus text-to-image prompts: the chat template, the image-start token and the CFG pad prompt.

The official sampler (deepseek-ai/Janus ``generation_inference.py``) formats a prompt with the DeepSeek
chat template and an empty system prompt, then appends the image-start tag::

    <bos> "<|User|>: {prompt}\\n\\n<|Assistant|>:" <begin_of_image>

Its unconditional row keeps the first (BOS) and the last (begin-of-image) token and replaces every
token in between by the pad token ``<｜▁pad▁｜>``; those pad tokens are attended, not masked. Token
ids come from the folder's own tokenizer and ``generation_config.json`` (``pad_token_id``,
``boi_token_id``), as transformers' ``JanusForConditionalGeneration.generate`` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from flashar.sdk import FlashARError
from flashar_janus import DEFAULT_TEMPLATE
BOI_TOKEN = "<begin_of_image>"
PAD_TOKEN = "<｜▁pad▁｜>"


@dataclass
class PromptEncoder:
    """Prompts -> left-padded token id rows for the conditional and unconditional prefix."""

    tokenizer: Any  # a transformers tokenizer
    bos_id: int
    boi_id: int
    pad_id: int  # the CFG pad token (also used to fill batch padding, which is masked)
    template: str = DEFAULT_TEMPLATE

    def ids(self, prompt: Any) -> list[int]:
        """One prompt -> [BOS, template tokens..., BOI]."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise FlashARError(f"Janus is text-conditional and needs non-empty prompts (--prompt TEXT), got {prompt!r}")
        text = self.template.format(prompt=prompt)
        return [self.bos_id, *self.tokenizer(text, add_special_tokens=False)["input_ids"], self.boi_id]

    def unconditional(self, ids: list[int]) -> list[int]:
        """Keep BOS and BOI, replace the text between them by pad tokens (official CFG prompt)."""
        return [ids[0], *[self.pad_id] * (len(ids) - 2), ids[-1]]

    def batch(self, prompts: Sequence[Any], cfg: bool) -> tuple[Tensor, Tensor]:
        """Rows [cond; uncond] (B', P) int64, left-padded, and their validity mask (B', P) bool."""
        rows = [self.ids(p) for p in prompts]
        if cfg:
            rows += [self.unconditional(r) for r in rows]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        valid = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, length - len(row) :] = torch.tensor(row)
            valid[i, length - len(row) :] = True
        return ids, valid


def special_ids(tokenizer: Any, generation: dict[str, Any], text_config: Any, where: str) -> tuple[int, int, int]:
    """(BOS, BOI, pad) ids: generation_config.json first, then the tokenizer, then the text config."""
    extra = generation.get("generation_kwargs") or {}

    def pick(*values):
        return next((v for v in values if isinstance(v, int) and v >= 0), None)

    bos = pick(generation.get("bos_token_id"), tokenizer.bos_token_id, getattr(text_config, "bos_token_id", None))
    boi = pick(generation.get("boi_token_id"), extra.get("boi_token_id"), _token_id(tokenizer, BOI_TOKEN))
    pad = pick(generation.get("pad_token_id"), _token_id(tokenizer, PAD_TOKEN), tokenizer.pad_token_id)
    for name, value in (("begin-of-sentence", bos), (f"image-start ({BOI_TOKEN})", boi), (f"pad ({PAD_TOKEN})", pad)):
        if value is None:
            raise FlashARError(
                f"{where} does not define the {name} token id; add it to generation_config.json or the tokenizer"
            )
    return bos, boi, pad


def _token_id(tokenizer: Any, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id
