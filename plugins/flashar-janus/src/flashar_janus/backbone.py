"""Janus / Janus-Pro image generation as a flashar :class:`~flashar.backbone.Backbone`.

Janus (arXiv 2410.13848) and Janus-Pro (arXiv 2501.17811) generate images with their Llama language
model, but image tokens never pass through the text vocabulary:

* image code c enters as ``generation_aligner(generation_embeddings(c))`` (an 8-d codebook embedding
  and a 2-layer GELU MLP to the model width), so ``code_offset = 0`` and ``embed`` takes codes;
* the prefix is the chat-formatted prompt through the text embedding (:mod:`flashar_janus.prompt`);
* code logits come from ``generation_head``: ``vision_head(gelu(proj_out(h)))`` on the final-normed
  hidden state. ``output`` is ``vision_head``; :meth:`JanusBackbone.logits` runs the ``proj_out`` MLP
  first, so a copy of ``output`` (e.g. FlashAR's vertical head) shares that MLP with the backbone;
* positions are 1-D RoPE ids: prefix position p is p, cell (r, c) is P + r * W + c (no row-end tokens).
  A left-padded prompt keeps ids 0..P-1; RoPE only sees differences, so this equals the unpadded sequence.
  The positions tensor holds the rotary (cos, sin) rows, (T, 2, head_dim), from the model's own
  ``LlamaRotaryEmbedding``;
* the model was trained on one grid only (24 x 24 at 384 px), which fixes W; other sizes are refused.

Module and parameter names are transformers' with the ``model.language_model.`` / ``model.`` prefix
dropped (``embed_tokens``, ``layers.{i}``, ``norm``, ``generation_*``), see :mod:`flashar_janus.loader`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashar.sdk import Backbone, FlashARError, Prefix, attention, write_kv


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama RoPE on x (B, H, T, hd): the two halves of each head form the rotated pairs."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + turned * sin


class JanusBackbone(Backbone):
    tokenizer_hint = "load the whole save_pretrained folder, which holds its VQ model"
    backend_id = "janus"
    condition_kind = "text"
    code_offset = 0
    native_cfg = "logits"  # uncond + s * (cond - uncond) on raw generation-head logits

    def __init__(self, config, prompts=None, tokenizer=None, sampling_defaults: dict[str, Any] | None = None):
        """``config`` is a transformers ``JanusConfig``; ``prompts`` a :class:`~flashar_janus.prompt.PromptEncoder`;
        ``tokenizer`` a :class:`~flashar_janus.tokenizer.JanusVQTokenizer`."""
        from transformers.models.janus.modeling_janus import JanusVQVAEAlignerMLP, JanusVQVAEHead
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        super().__init__()
        text, vq = config.text_config, config.vq_config
        self.config = config
        self.codebook_size = vq.num_embeddings
        self.downsample = 2 ** (len(vq.channel_multiplier) - 1)
        self.native_grid = (vq.num_patches, vq.num_patches)
        self.default_image_size = vq.num_patches * self.downsample
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(text, i) for i in range(text.num_hidden_layers))
        self.norm = LlamaRMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.generation_embeddings = nn.Embedding(vq.num_embeddings, vq.embed_dim)
        self.generation_aligner = JanusVQVAEAlignerMLP(vq)
        self.generation_head = JanusVQVAEHead(vq)
        with torch.device("cpu"):  # built for real even under meta: inv_freq is not in the checkpoint
            rotary = LlamaRotaryEmbedding(config=text)
        # kept outside the module tree, so .to(bfloat16) never rounds inv_freq (positions stay float32-exact)
        object.__setattr__(self, "rotary_emb", rotary)
        self.prompts, self.tokenizer = prompts, tokenizer
        self.sampling_defaults = dict(sampling_defaults or {})

    @property
    def output(self) -> nn.Linear:
        return self.generation_head.vision_head

    @property
    def dim(self) -> int:
        return self.config.text_config.hidden_size

    @property
    def num_kv_heads(self) -> int:
        return self.config.text_config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        text = self.config.text_config
        return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads

    def architecture(self) -> dict[str, Any]:
        text, vq = self.config.text_config, self.config.vq_config
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "hidden_act")
        return {"backend": self.backend_id, "text": {k: getattr(text, k) for k in keys}, "head_dim": self.head_dim,
                "rope": _jsonable(getattr(text, "rope_parameters", None) or getattr(text, "rope_theta", None)),
                "vq": {k: _jsonable(getattr(vq, k)) for k in ("num_embeddings", "embed_dim", "projection_dim",
                                                             "image_token_embed_dim", "num_hidden_layers",
                                                             "hidden_act", "channel_multiplier")},
                "grid": list(self.native_grid)}

    def grid(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        grid = super().grid(image_size)
        if grid != self.native_grid:
            raise FlashARError(
                f"Janus generates only at its native size {self.default_image_size} px (a {self.native_grid[0]}x"
                f"{self.native_grid[1]} grid), got {grid[0] * self.downsample}x{grid[1] * self.downsample}; "
                f"use --image-size {self.default_image_size}"
            )
        return grid

    # --- conditioning ---------------------------------------------------------------------------
    def prefix(self, conditions: Sequence[Any], *, cfg: bool, grid: tuple[int, int] | None = None,
               unconditional: str = "native") -> Prefix:
        if self.prompts is None:
            raise FlashARError("this Janus backbone has no text tokenizer; load it from a folder with tokenizer files")
        ids, valid = self.prompts.batch(conditions, cfg)  # (B', P), rows [cond; uncond]
        ids, valid = ids.to(self.device), valid.to(self.device)
        length = ids.shape[1]
        positions = self.rope(torch.arange(length, device=self.device))
        last = torch.full((ids.shape[0],), length - 1, dtype=torch.long, device=self.device)  # left-padded
        return Prefix(self.embed_tokens(ids), valid, positions, last)

    # --- positions and layers -------------------------------------------------------------------
    def rope(self, position_ids: Tensor) -> Tensor:
        """1-D position ids (T,) -> rotary rows (T, 2, head_dim) = (cos, sin) in the model's dtype."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary_emb(probe, position_ids.to(self.device)[None])  # (1, T, hd) each
        return torch.stack([cos[0], sin[0]], dim=1)

    def cell_positions(self, cells: Tensor, prefix_length: int, native: bool = False,
                       grid: tuple[int, int] | None = None) -> Tensor:
        width = (grid or self.native_grid)[1]
        cells = cells.to(self.device)
        return self.rope(prefix_length + cells[:, 0] * width + cells[:, 1])

    def embed(self, ids: Tensor) -> Tensor:
        return self.generation_aligner(self.generation_embeddings(ids))

    def layer_forward(self, layer, x, positions, mask, kv, slots):
        """One ``LlamaDecoderLayer`` over x (B, T, D), written with its own modules so K/V go to ``slots``."""
        attn = layer.self_attn
        batch, seq, _ = x.shape
        cos, sin = positions[None, None, :, 0], positions[None, None, :, 1]  # (1, 1, T, hd)
        h = layer.input_layernorm(x)
        q = rotate(attn.q_proj(h).view(batch, seq, -1, self.head_dim).transpose(1, 2), cos, sin)  # (B, H, T, hd)
        k = rotate(attn.k_proj(h).view(batch, seq, -1, self.head_dim).transpose(1, 2), cos, sin)  # (B, H_kv, T, hd)
        v = attn.v_proj(h).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if kv is not None:
            k, v = write_kv(kv, slots, k, v, mask.shape[-1])  # rotated keys, (B, H_kv, S', hd)
        y = attention(q, k.to(q.dtype), v.to(q.dtype), mask, scale=attn.scaling)  # (B, H, T, hd)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(batch, seq, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def logits(self, h: Tensor, head: nn.Linear | None = None) -> Tensor:
        """float32 code logits (..., V): ``head`` (default ``vision_head``) on gelu(proj_out(h))."""
        head = head or self.output
        features = self.generation_head.activation_fn(self.generation_head.proj_out(h))
        return F.linear(features, head.weight, head.bias).float()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
