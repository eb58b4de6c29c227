"""LlamaGen's VQ image tokenizer (VQ-16 / VQ-8), written from the spec in reference/llamagen.md §8.

A VQGAN-style conv autoencoder with an l2-normalised codebook (16384 x 8). Module and parameter names
match the official state dict (``encoder.conv_blocks.{i}.res.{j}...``, ``quantize.embedding.weight``),
so ``vq_ds16_c2i.pt`` loads strictly. Codes are in raster order: code k of an image is cell
(k // w, k % w). The model runs in float32, as the official scripts do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


class VQConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    z_channels: int = 256
    channels: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # the decoder has one more per level
    norm_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


VQ_PRESETS = {"VQ-16": VQConfig(ch_mult=(1, 1, 2, 2, 4)), "VQ-8": VQConfig(ch_mult=(1, 2, 2, 4))}


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, scale 1/sqrt(C)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(b, c, h * w) for conv in (self.q, self.k, self.v))
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=2)  # (b, hw_q, hw_k)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(c_in: int, c_out: int, num_res: int, with_attn: bool, groups: int) -> nn.Module:
    level = nn.Module()
    level.res = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(num_res))
    level.attn = nn.ModuleList(AttnBlock(c_out, groups) for _ in range(num_res if with_attn else 0))
    return level


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    for j, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


def _mid(channels: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(
        [ResnetBlock(channels, channels, groups), AttnBlock(channels, groups), ResnetBlock(channels, channels, groups)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, g = cfg.channels, cfg.ch_mult, cfg.norm_groups
        widths_in = (1,) + tuple(mult)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        for i, m in enumerate(mult):
            level = _level(ch * widths_in[i], ch * m, cfg.num_res_blocks, i == len(mult) - 1, g)
            if i < len(mult) - 1:
                level.downsample = Downsample(ch * m)
            self.conv_blocks.append(level)
        top = ch * mult[-1]
        self.mid = _mid(top, g)
        self.norm_out = nn.GroupNorm(g, top, eps=1e-6)
        self.conv_out = nn.Conv2d(top, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, g = cfg.channels, cfg.ch_mult, cfg.norm_groups
        width = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.mid = _mid(width, g)
        self.conv_blocks = nn.ModuleList()  # deepest level first
        for i in reversed(range(len(mult))):
            level = _level(width, ch * mult[i], cfg.num_res_blocks + 1, i == len(mult) - 1, g)
            width = ch * mult[i]
            if i > 0:
                level.upsample = Upsample(width)
            self.conv_blocks.append(level)
        self.norm_out = nn.GroupNorm(g, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class Quantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        self.register_buffer("codebook_used", torch.zeros(65536))  # training statistic, kept for strict loading

    def codebook(self) -> Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def nearest(self, z: Tensor) -> Tensor:
        """z (B, C, h, w) -> codes (B, h, w), nearest l2-normalised codebook row."""
        z = F.normalize(z.permute(0, 2, 3, 1), p=2, dim=-1)
        book = self.codebook()
        dist = (z**2).sum(-1, keepdim=True) + (book**2).sum(-1) - 2 * z @ book.T
        return dist.argmin(-1)


class VQModel(nn.Module):
    """The official ``VQModel`` layout: encoder, decoder, quantize, quant_conv, post_quant_conv."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    @torch.no_grad()
    def encode_codes(self, pixels: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> codes (B, h, w)."""
        return self.quantize.nearest(self.quant_conv(self.encoder(pixels)))

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w) -> pixels (B, 3, 16h, 16w), roughly in [-1, 1] (not clamped)."""
        z = self.quantize.codebook()[codes].permute(0, 3, 1, 2)  # (B, 8, h, w)
        return self.decoder(self.post_quant_conv(z))


def to_unit_range(pixels: Tensor) -> Tensor:
    """Official 8-bit conversion clamp(127.5 x + 128) truncated, returned as float in [0, 1]."""
    return torch.clamp(127.5 * pixels + 128.0, 0, 255).to(torch.uint8).float() / 255.0


class VQTokenizer:
    """Codes <-> images in [0, 1] through a :class:`VQModel` (a plain object, so it never joins a state dict)."""

    def __init__(self, model: VQModel):
        self.model = model.eval()
        self.downsample = model.config.downsample
        self.codebook_size = model.config.codebook_size

    def decode(self, codes: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        return to_unit_range(self.model.decode_codes(codes.to(device).long())).cpu()

    def encode(self, images: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        return self.model.encode_codes(images.to(device, torch.float32) * 2 - 1).cpu()
