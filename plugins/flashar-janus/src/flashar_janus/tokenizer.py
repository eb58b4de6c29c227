"""Janus's image tokenizer: codes <-> pixels through transformers' ``JanusVQVAE``.

The VQ model is LlamaGen's VQ-16 design (deepseek-ai/Janus ``janus/models/vq_model.py``): a conv
encoder/decoder with 16x downsampling (2^(levels - 1)) and an l2-normalised codebook (16384 x 8 in the
released models). Codes are in raster order: code k of an image is cell (k // W, k % W).

* decode: normalised codebook rows -> ``post_quant_conv`` -> decoder -> pixels in [-1, 1], then the official
  8-bit conversion clip((x + 1) / 2 * 255, 0, 255) truncated to uint8 (``generation_inference.py``).
  transformers' own ``JanusVQVAE.decode`` only accepts the native grid; this path takes any (H, W).
* encode: encoder -> ``quant_conv`` -> nearest codebook row after l2-normalising both sides, as the
  official quantiser does (transformers' quantiser compares unnormalised vectors, so it can disagree).

The VQ model runs in float32 and is a plain attribute of the backbone, never part of its state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def to_unit_range(pixels: Tensor) -> Tensor:
    """Decoder output in [-1, 1] -> the official 8-bit image, returned as float in [0, 1]."""
    return torch.clamp((pixels + 1) / 2 * 255, 0, 255).to(torch.uint8).float() / 255.0


class JanusVQTokenizer:
    """Codes (B, H, W) <-> images (B, 3, h, w) in [0, 1] with a transformers ``JanusVQVAE``."""

    def __init__(self, model: nn.Module):
        self.model = model.float().eval()
        self.downsample = 2 ** (len(model.config.channel_multiplier) - 1)
        self.codebook_size = model.config.num_embeddings

    @property
    def device(self) -> torch.device:
        return self.model.quantize.embedding.weight.device

    def codebook(self) -> Tensor:
        """(V, C) l2-normalised code vectors."""
        return F.normalize(self.model.quantize.embedding.weight, p=2, dim=-1)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        z = self.codebook()[codes.to(self.device).long()].permute(0, 3, 1, 2)  # (B, C, H, W)
        pixels = self.model.decoder(self.model.post_quant_conv(z))  # (B, 3, 16H, 16W), roughly [-1, 1]
        return to_unit_range(pixels).cpu()

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        pixels = images.to(self.device, torch.float32) * 2 - 1
        z = self.model.quant_conv(self.model.encoder(pixels))  # (B, C, H, W)
        z = F.normalize(z.permute(0, 2, 3, 1), p=2, dim=-1)  # (B, H, W, C)
        book = self.codebook()
        # squared distance between unit vectors: 2 - 2 cos; argmax of the dot product is the nearest row
        return (z @ book.T).argmax(-1).cpu()
