"""The digits "tokenizer": a token is one of 17 gray levels of a 16 x 16 image (no learned codebook)."""

from __future__ import annotations

from torch import Tensor

from flashar.backends.digits.data import GRID, LEVELS


class GrayTokenizer:
    """Images (B, 3, 16, 16) in [0, 1] <-> codes (B, 16, 16) in [0, 16]; ink is bright, background black."""

    downsample = 1
    default_image_size = GRID
    codebook_size = LEVELS

    def encode(self, images: Tensor) -> Tensor:
        gray = images.float().mean(dim=1)  # (B, h, w)
        return (gray * (LEVELS - 1)).round().clamp(0, LEVELS - 1).long()

    def decode(self, codes: Tensor) -> Tensor:
        gray = codes.float().cpu() / (LEVELS - 1)
        return gray[:, None].expand(-1, 3, -1, -1).contiguous()
