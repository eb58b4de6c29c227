"""LlamaGen's GPT building blocks, written from reference/llamagen.md §2-§4 (FoundationVision/LlamaGen).

A pre-norm Llama transformer: RMSNorm (normalise in float32, cast back, then scale), fused ``wqkv``
attention with interleaved-pair 2-D RoPE (the first hd/4 pairs rotate by the row, the last hd/4 by the
column; conditioning positions get an all-zero table, so their queries and keys vanish), and a SwiGLU
MLP. Module names match the official checkpoints; :class:`GPTConfig` holds the sizes.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from flashar.backbone import attention, write_kv


class GPTConfig(BaseModel):
    """The official ``ModelArgs`` fields that shape the weights (dropouts are training-only, not kept)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: int = Field(768, gt=0)
    n_layer: int = Field(12, gt=0)
    n_head: int = Field(12, gt=0)
    n_kv_head: int | None = Field(None, gt=0, description="None = n_head (all released models are MHA).")
    multiple_of: int = Field(256, gt=0)
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    num_classes: int = Field(1000, gt=0)
    caption_dim: int = 2048
    class_dropout_prob: float = Field(0.1, description="> 0 adds the null-class row used by CFG.")
    model_type: Literal["c2i", "t2i"] = "c2i"
    vocab_size: int = Field(16384, gt=0)
    cls_token_num: int = Field(1, gt=0, description="Prefix length: 1 (c2i) or 120 (t2i).")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of


# Named sizes, as in the official ``GPT_models`` dict (reference/llamagen.md §2.2).
PRESETS: dict[str, dict] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
    "GPT-7B": dict(n_layer=32, n_head=32, dim=4096),
}


def preset_of(cfg: GPTConfig) -> str | None:
    """The preset whose sizes ``cfg`` has (None for a custom size): named by the weights, not by the user."""
    sizes = (cfg.n_layer, cfg.n_head, cfg.dim)
    return next((name for name, p in PRESETS.items() if (p["n_layer"], p["n_head"], p["dim"]) == sizes), None)


def rope_frequencies(head_dim: int, base: float) -> Tensor:
    """omega_m = base^(-2m / (hd/2)) for m < hd/4, float32 (one set per axis)."""
    half = head_dim // 2
    return 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))


def rope_table(cells: Tensor, head_dim: int, base: float) -> Tensor:
    """(cos, sin) per rotary pair for cells (T, 2) = (row, col) -> (T, hd/2, 2) float32."""
    freqs = rope_frequencies(head_dim, base).to(cells.device)
    angles = torch.cat([cells[:, :1].float() * freqs, cells[:, 1:].float() * freqs], dim=-1)  # (T, hd/2)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs (2j, 2j+1) of x (B, T, heads, hd) by rope (T, hd/2, 2), in float32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    rope = rope.view(1, rope.shape[0], 1, rope.shape[1], 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = rope[..., 0], rope[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, kv: tuple[Tensor, Tensor] | None = None,
                slots: Tensor | None = None) -> Tensor:
        batch, seq, dim = x.shape
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([dim, kv_dim, kv_dim], dim=-1)
        q = apply_rope(q.view(batch, seq, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(batch, seq, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        if kv is not None:
            k, v = write_kv(kv, slots, k, v, mask.shape[-1])  # (B, H_kv, S', hd)
        y = attention(q, k, v, mask)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(batch, seq, dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, kv=None, slots=None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, kv, slots)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class ids -> (B, 1, D); row ``num_classes`` is the learned null class for CFG."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(cfg.num_classes + int(cfg.class_dropout_prob > 0), cfg.dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels).unsqueeze(1)


class CaptionMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """T5 caption features (B, 120, 2048) -> (B, 120, D); ``uncond_embedding`` is the stored null caption."""

    def __init__(self, cfg: GPTConfig, token_num: int = 120):
        super().__init__()
        self.cap_proj = CaptionMLP(cfg.caption_dim, cfg.dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, cfg.caption_dim) / cfg.caption_dim**0.5)

    def forward(self, captions: Tensor) -> Tensor:
        return self.cap_proj(captions)
