"""Emu3.5's IBQ vision tokenizer, written from reference/emu35_glm.md §8 (baaivision/Emu3.5 ``src/vision_tokenizer``).

A taming-style conv autoencoder with an index-propagation quantiser: the encoder's latent is scored
against the codebook by dot product and the argmax is the code (not the nearest code in L2). Module and
parameter names match the published state dicts (``encoder.down.{i}.block.{j}...``, ``encoder.mid.block_1``,
``decoder.up.{i}...``, ``quantize.embedding.weight``, ``quant_conv``, ``post_quant_conv``), which both
published layouts share: ``config.yaml`` + ``model.ckpt`` (the reference loader) and the transformers-style
``config.json`` (``model_type: Emu3p5VisionVQ``) + ``model.safetensors``.

Pixels are RGB in [-1, 1] (the reference encodes ``uint8 / 127.5 - 1`` and decodes ``(x + 1) * 127.5``
clamped and truncated to uint8). Codes are in raster order: code k of an image is cell (k // w, k % w).
The model runs in float32: the encode argmax flips codes in half precision.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

# The taming VQGAN blocks (same parameter names: norm1/conv1/norm2/conv2/nin_shortcut, norm/q/k/v/proj_out).
from flashar.backends.llamagen.tokenizer import AttnBlock, Downsample, ResnetBlock, Upsample, swish

GROUPS = 32  # GroupNorm(32, C), eps 1e-6, as in the reference ``Normalize``


class IBQConfig(BaseModel):
    """The IBQ sizes; field names follow ``config.json`` (``codebook_size``), ``config.yaml`` says ``n_embed``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ch: int = Field(256, gt=0)
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = Field(4, gt=0)
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = Field(
        256, gt=0, description="Training resolution; with attn_resolutions it places the attention blocks.")
    z_channels: int = Field(256, gt=0)
    in_channels: int = 3
    out_ch: int = 3
    codebook_size: int = Field(131072, gt=0)
    embed_dim: int = Field(256, gt=0)

    @model_validator(mode="after")
    def _check_groups(self):
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % GROUPS for w in widths):
            raise ValueError(f"channel widths {widths} must be multiples of {GROUPS} (GroupNorm)")
        return self

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _stage(c_in: int, c_out: int, num_blocks: int, with_attn: bool) -> nn.Module:
    """One resolution level: ``block`` (ResNet blocks) and ``attn`` (one per block where attention is on)."""
    stage = nn.Module()
    stage.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, GROUPS) for j in range(num_blocks))
    stage.attn = nn.ModuleList(AttnBlock(c_out, GROUPS) for _ in range(num_blocks if with_attn else 0))
    return stage


def _run_stage(stage: nn.Module, h: Tensor) -> Tensor:
    for j, block in enumerate(stage.block):
        h = block(h)
        if len(stage.attn):
            h = stage.attn[j](h)
    return h


def _middle(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, GROUPS)
    mid.attn_1 = AttnBlock(channels, GROUPS)
    mid.block_2 = ResnetBlock(channels, channels, GROUPS)
    return mid


def _run_middle(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: IBQConfig):
        super().__init__()
        widths_in = (1,) + cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        resolution = cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            stage = _stage(cfg.ch * widths_in[i], cfg.ch * mult, cfg.num_res_blocks, resolution in cfg.attn_resolutions)
            if i < len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(cfg.ch * mult)
                resolution //= 2
            self.down.append(stage)
        top = cfg.ch * cfg.ch_mult[-1]
        self.mid = _middle(top)
        self.norm_out = nn.GroupNorm(GROUPS, top, eps=1e-6)
        self.conv_out = nn.Conv2d(top, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = _run_stage(stage, h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return self.conv_out(swish(self.norm_out(_run_middle(self.mid, h))))


class Decoder(nn.Module):
    def __init__(self, cfg: IBQConfig):
        super().__init__()
        width = cfg.ch * cfg.ch_mult[-1]
        resolution = cfg.resolution // cfg.downsample
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.mid = _middle(width)
        stages = []  # built deepest first, stored shallowest first (``up.0`` is the full-resolution level)
        for i in reversed(range(len(cfg.ch_mult))):
            stage = _stage(width, cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, resolution in cfg.attn_resolutions)
            width = cfg.ch * cfg.ch_mult[i]
            if i > 0:
                stage.upsample = Upsample(width)
                resolution *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = nn.GroupNorm(GROUPS, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_middle(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            h = _run_stage(stage, h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class IndexPropagationQuantizer(nn.Module):
    def __init__(self, cfg: IBQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.embed_dim)

    def codes(self, z: Tensor) -> Tensor:
        """z (B, d, h, w) -> codes (B, h, w): argmax of the dot product with every codebook row."""
        return torch.einsum("bdhw,nd->bnhw", z, self.embedding.weight).argmax(dim=1)

    def lookup(self, codes: Tensor) -> Tensor:
        """codes (B, h, w) -> latents (B, d, h, w)."""
        return self.embedding(codes).permute(0, 3, 1, 2)


class IBQ(nn.Module):
    """The published ``IBQ`` layout: encoder, decoder, quantize, quant_conv, post_quant_conv."""

    def __init__(self, cfg: IBQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = IndexPropagationQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @torch.no_grad()
    def encode_codes(self, pixels: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1], H and W multiples of 16 -> codes (B, H/16, W/16)."""
        return self.quantize.codes(self.quant_conv(self.encoder(pixels)))

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w) -> pixels (B, 3, 16h, 16w), roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))


def to_unit_range(pixels: Tensor) -> Tensor:
    """The reference's 8-bit conversion ``clamp((x + 1) * 127.5, 0, 255)`` truncated, as float in [0, 1]."""
    return ((pixels + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).float() / 255.0


class IBQTokenizer:
    """Codes <-> images in [0, 1] through an :class:`IBQ` (a plain object, so it never joins a state dict)."""

    def __init__(self, model: IBQ):
        self.model = model.float().eval()
        self.downsample = model.config.downsample
        self.codebook_size = model.config.codebook_size

    @property
    def device(self) -> torch.device:
        return self.model.post_quant_conv.weight.device

    def decode(self, codes: Tensor) -> Tensor:
        return to_unit_range(self.model.decode_codes(codes.to(self.device).long())).cpu()

    def encode(self, images: Tensor) -> Tensor:
        return self.model.encode_codes(images.to(self.device, torch.float32) * 2 - 1).cpu()
