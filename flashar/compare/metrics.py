"""Sample quality through torch-fidelity: FID, KID, IS, precision/recall (and class accuracy).

The feature extractor is either one a plugin registers (the digits backend's CNN gives "FID-digits")
or torch-fidelity's Inception with weights the user supplies (``--fid-weights``), since nothing can be
downloaded here. Real images come from the backend (``Backbone.reference_images``) or a folder
(``--reference-images``). Inputs are uint8 tensors (N, 3, H, W).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from flashar.errors import CheckpointError, DataError, FlashARError, require
from flashar.io import load_weights


@dataclass(frozen=True)
class Extractor:
    """Which torch-fidelity feature extractor to use, and how to name the resulting FID."""

    name: str
    label: str  # "FID-digits", "FID"
    kwargs: dict[str, Any]
    classify: Callable[[Tensor], Tensor] | None = None


INCEPTION = "flashar-inception-v3"
INCEPTION_LAYERS = {"feature_layer_fid": "2048", "feature_layer_kid": "2048", "feature_layer_prc": "2048",
                    "feature_layer_isc": "logits_unbiased"}


def inception_extractor(weights: str | Path) -> Extractor:
    """torch-fidelity's Inception with ``--fid-weights`` read by flashar, never by torch-fidelity.

    torch-fidelity would ``torch.load(weights_only=False)`` the path, which runs any code a pickle holds;
    instead the file is read here without code execution (:func:`inception_state`) and the tensors are
    handed over. Building the network once checks the keys and shapes before any image is generated.
    """
    require("torch_fidelity", "metrics")
    state = inception_state(weights)
    name = register_inception()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    try:
        FEATURE_EXTRACTORS_REGISTRY[name](name, ["2048"], flashar_inception_state=state)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not hold torch-fidelity's Inception weights ({str(exc).strip().splitlines()[0][:120]}); "
                              f"pass the pt_inception-2015-12-05 file with --fid-weights") from None
    return Extractor(name, "FID", {"flashar_inception_state": state, **INCEPTION_LAYERS})


def inception_state(weights: str | Path) -> dict[str, Tensor]:
    """The tensors of an Inception weights file: safetensors, or a pickle of plain tensors (weights only)."""
    if not Path(weights).is_file():
        raise FlashARError(f"Inception weights not found: {weights}; pass the pt_inception-2015-12-05 file with --fid-weights")
    state = load_weights(weights)
    if not state or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError(f"{weights} is not a state dict of tensors; pass the pt_inception-2015-12-05 file with --fid-weights")
    return state


def register_inception() -> str:
    """Register (once) torch-fidelity's Inception fed with tensors flashar loaded; return its name."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class SafeInceptionV3(FeatureExtractorInceptionV3):
        def __init__(self, name, features_list, flashar_inception_state=None, **kwargs):
            if flashar_inception_state is None:
                raise FlashARError("the Inception feature extractor needs weights; pass --fid-weights FILE")
            kwargs.pop("feature_extractor_weights_path", None)
            buffer = io.BytesIO()  # the parent reads a file: give it the checked tensors, re-serialised by us
            torch.save(flashar_inception_state, buffer)
            buffer.seek(0)
            super().__init__(name, features_list, feature_extractor_weights_path=buffer, **kwargs)

    if INCEPTION not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(INCEPTION, SafeInceptionV3)
    return INCEPTION


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def quality(samples: Tensor, reference: Tensor, extractor: Extractor, labels: list[int] | None = None) -> dict[str, float]:
    """FID / KID / IS / precision / recall of uint8 ``samples`` against uint8 ``reference``."""
    require("torch_fidelity", "metrics")
    import torch_fidelity

    if len(samples) < 2 or len(reference) < 2:
        raise DataError("quality metrics need at least 2 generated and 2 reference images")
    result = torch_fidelity.calculate_metrics(
        input1=_Images(samples), input2=_Images(reference), cuda=torch.cuda.is_available(), isc=True, fid=True,
        kid=True, prc=True, feature_extractor=extractor.name, kid_subset_size=min(1000, len(samples), len(reference)),
        save_cpu_ram=True, cache=False, verbose=False, batch_size=min(256, len(samples)), **extractor.kwargs,
    )
    out = {
        "fid": float(result["frechet_inception_distance"]),
        "kid": float(result["kernel_inception_distance_mean"]),
        "kid_std": float(result["kernel_inception_distance_std"]),
        "inception_score": float(result["inception_score_mean"]),
        "precision": float(result["precision"]),
        "recall": float(result["recall"]),
    }
    if extractor.classify is not None and labels is not None:
        predicted = extractor.classify(samples)
        out["class_accuracy"] = float((predicted == torch.tensor(labels)).float().mean())
    return out


def load_image_folder(folder: str | Path, size: tuple[int, int] | None = None, limit: int | None = None) -> Tensor:
    """Every image under ``folder`` (recursively) as uint8 (N, 3, H, W), centre-cropped to ``size``."""
    from PIL import Image, UnidentifiedImageError

    from flashar.adapt.data import IMAGE_SUFFIXES, center_crop

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"reference image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise DataError(f"no images found under {folder}")
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arr = center_crop(image, size[0]) if size else np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read reference image {path} ({exc})") from None
        images.append(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1))
    return torch.stack(images)


def to_uint8(images: Tensor) -> Tensor:
    """Images in [0, 1] -> uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)
