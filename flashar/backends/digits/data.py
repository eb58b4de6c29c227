"""The embedded default's data: scikit-learn's bundled handwritten digits as 16 x 16 token grids.

``sklearn.datasets.load_digits`` ships 1,797 real 8 x 8 digits (gray levels 0..16, 10 classes) inside
the wheel, so nothing is downloaded. Each image is upsampled 2x (bilinear) to 16 x 16 and rounded back
to the 17 gray levels: a token is a gray level, so raster decoding needs 256 passes and FlashAR 31.
The split is fixed (seeded, stratified by class): 1,298 train, 199 validation (early stopping) and
300 test images (held out for every reported metric).

The generator is trained on randomly shifted digits (:func:`shift`, up to 2 cells each way), so what it
should reproduce is that distribution: :func:`held_out_reference` shifts the test split the same way and
is what every quality metric compares samples with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flashar.errors import require

LEVELS = 17  # gray levels 0..16 = the codebook
GRID = 16
SPLIT_SEED = 20260101
NUM_VAL, NUM_TEST = 200, 300


def upsample(images: Tensor) -> Tensor:
    """(N, 8, 8) gray levels 0..16 -> (N, 16, 16) int64 codes (2x bilinear, rounded)."""
    up = F.interpolate(images[:, None].float(), scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
    return up.round().clamp(0, LEVELS - 1).long()


@dataclass
class DigitSplits:
    train: tuple[Tensor, Tensor]  # (codes (N, 16, 16), labels (N,))
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def load_splits() -> DigitSplits:
    require("sklearn", "digits")
    from sklearn.datasets import load_digits

    digits = load_digits()
    codes = upsample(torch.from_numpy(digits.images))
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    # stratify: sort the shuffled indices by label, then deal them round-robin into the three splits
    test, val, train = [], [], []
    for cls in range(10):
        members = order[labels[order] == cls].tolist()
        n_test = round(NUM_TEST * len(members) / len(labels))
        n_val = round(NUM_VAL * len(members) / len(labels))
        test += members[:n_test]
        val += members[n_test : n_test + n_val]
        train += members[n_test + n_val :]
    pick = lambda idx: (codes[torch.tensor(sorted(idx))], labels[torch.tensor(sorted(idx))])
    return DigitSplits(pick(train), pick(val), pick(test))


MAX_SHIFT = 2  # the generator's training augmentation: up to 2 cells each way
REFERENCE_COPIES, REFERENCE_SEED = 4, 20261206


def shift(codes: Tensor, generator: torch.Generator, max_shift: int = MAX_SHIFT) -> Tensor:
    """Augmentation: translate each grid by up to ``max_shift`` cells, filling with background (0)."""
    out = torch.zeros_like(codes)
    dy, dx = (torch.randint(-max_shift, max_shift + 1, (2, len(codes)), generator=generator)).tolist()
    for i, (y, x) in enumerate(zip(dy, dx)):
        src = codes[i, max(0, -y) : GRID - max(0, y), max(0, -x) : GRID - max(0, x)]
        out[i, max(0, y) : max(0, y) + src.shape[0], max(0, x) : max(0, x) + src.shape[1]] = src
    return out


def held_out_reference(copies: int = REFERENCE_COPIES, seed: int = REFERENCE_SEED) -> tuple[Tensor, Tensor]:
    """The test split as the generator's training data looks: ``copies`` randomly shifted versions of each
    grid (fixed seed), the copies of one grid adjacent, so contiguous folds keep a digit's copies together.
    Returns (codes (N * copies, 16, 16), labels)."""
    codes, labels = load_splits().test
    repeated = codes.repeat_interleave(copies, dim=0)
    return shift(repeated, torch.Generator().manual_seed(seed)), labels.repeat_interleave(copies)
