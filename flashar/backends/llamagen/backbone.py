"""LlamaGen GPT (c2i and t2i) as a flashar :class:`~flashar.backbone.Backbone`.

The module tree and parameter names are the official ones (``cls_embedding``, ``tok_embeddings``,
``layers.{i}``, ``norm``, ``output``), so the backbone's state dict is the checkpoint's. The VQ tokenizer
and the optional T5 text encoder are plain attributes and never enter the state dict.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from flashar.backbone import Backbone, Prefix
from flashar.backends.llamagen.model import (
    CaptionEmbedder,
    GPTConfig,
    LabelEmbedder,
    RMSNorm,
    TransformerBlock,
    preset_of,
    rope_table,
)
from flashar.backends.llamagen import SAMPLING
from flashar.errors import FlashARError


class LlamaGenBackbone(Backbone):
    backend_id = "llamagen"
    sampling_defaults = SAMPLING
    tokenizer_hint = "pass --vq-checkpoint (e.g. vq_ds16_c2i.pt)"

    def __init__(self, cfg: GPTConfig, preset: str | None = None, tokenizer=None, text_encoder=None):
        super().__init__()
        self.config, self.preset = cfg, preset
        self.condition_kind = "class" if cfg.model_type == "c2i" else "text"
        self.num_classes = cfg.num_classes if cfg.model_type == "c2i" else None
        self.codebook_size = cfg.vocab_size
        self.cls_embedding = LabelEmbedder(cfg) if cfg.model_type == "c2i" else CaptionEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.downsample = getattr(tokenizer, "downsample", 16)
        self.default_image_size = getattr(tokenizer, "default_image_size", 256)

    @property
    def num_kv_heads(self) -> int:
        return self.config.kv_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    def architecture(self) -> dict[str, Any]:
        """What was loaded: the sizes, and the preset they match whether or not --gpt-model named it (so an
        adapter fits the same checkpoint however it is loaded)."""
        return {"backend": self.backend_id, "preset": preset_of(self.config), **self.config.model_dump()}

    # --- conditioning ---------------------------------------------------------------------------
    def prefix(self, conditions: Sequence[Any], *, cfg: bool, grid: tuple[int, int] | None = None,
               unconditional: str = "native") -> Prefix:
        """The null class (c2i) or the null caption (t2i) is the unconditional row either way."""
        if self.config.model_type == "c2i":
            embeds = self.cls_embedding(self._class_ids(conditions, cfg))  # (B, 1, D)
            valid = torch.ones(embeds.shape[:2], dtype=torch.bool, device=self.device)
        else:
            embeds, valid = self._caption_prefix(conditions, cfg)
        embeds = embeds[:, : self.config.cls_token_num].to(self.dtype)
        length = embeds.shape[1]
        positions = torch.zeros(length, self.head_dim // 2, 2, device=self.device)  # all-zero prefix rotary rows
        last = torch.full((embeds.shape[0],), length - 1, dtype=torch.long, device=self.device)
        return Prefix(embeds, valid, positions, last)

    def _class_ids(self, conditions: Sequence[Any], cfg: bool) -> Tensor:
        ids = []
        for c in conditions:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.config.num_classes:
                raise FlashARError(
                    f"class id {c!r} is out of range for this class-conditional model; use integers in "
                    f"[0, {self.config.num_classes})"
                )
            ids.append(c)
        if cfg:
            ids += [self.config.num_classes] * len(ids)  # the null class
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _caption_prefix(self, conditions: Sequence[Any], cfg: bool) -> tuple[Tensor, Tensor]:
        """Left-padded caption features -> ([cond; uncond] embeddings, validity mask); spec §7."""
        if self.text_encoder is None:
            raise FlashARError(
                "this text-conditional LlamaGen model needs a text encoder; pass --t5-path DIR (a FLAN-T5-XL folder)")
        features, mask = self.text_encoder(list(conditions))  # (B, 120, 2048) zero-padded on the left, (B, 120)
        features, mask = features.to(self.device, torch.float32), mask.to(self.device)
        if cfg:
            uncond = self.cls_embedding.uncond_embedding[: features.shape[1]].float().expand_as(features)
            features, mask = torch.cat([features, uncond]), torch.cat([mask, mask])
        return self.cls_embedding(features.to(self.cls_embedding.cap_proj.fc1.weight.dtype)), mask

    # --- positions and layers -------------------------------------------------------------------
    def cell_positions(self, cells: Tensor, prefix_length: int, native: bool = False,
                       grid: tuple[int, int] | None = None) -> Tensor:
        return rope_table(cells.to(self.device), self.head_dim, self.config.rope_base)

    def embed(self, ids: Tensor) -> Tensor:
        return self.tok_embeddings(ids)

    def layer_forward(self, layer, x, positions, mask, kv, slots):
        return layer(x, positions, mask, kv, slots)
