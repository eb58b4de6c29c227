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


FOLDS = 5  # of the classifier two-sample test
KID_SUBSET_SIZE = 1000  # torch-fidelity's default: the largest KID subset


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
        raise CheckpointError(
            f"{weights} does not hold torch-fidelity's Inception weights ({str(exc).strip().splitlines()[0][:120]}); "
            f"pass the pt_inception-2015-12-05 file with --fid-weights") from None
    return Extractor(name, "FID", {"flashar_inception_state": state, **INCEPTION_LAYERS})


def inception_state(weights: str | Path) -> dict[str, Tensor]:
    """The tensors of an Inception weights file: safetensors, or a pickle of plain tensors (weights only)."""
    if not Path(weights).is_file():
        raise FlashARError(
            f"Inception weights not found: {weights}; pass the pt_inception-2015-12-05 file with --fid-weights")
    state = load_weights(weights)
    if not state or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError(
            f"{weights} is not a state dict of tensors; pass the pt_inception-2015-12-05 file with --fid-weights")
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


def quality(
    samples: Tensor, reference: Tensor, extractor: Extractor, labels: list[int] | None = None) -> dict[str, float]:
    """FID / KID / IS / precision / recall and the two-sample test of uint8 ``samples`` against uint8 ``reference``.

    Features are extracted once per image set with torch-fidelity's extractor and fed to its metric functions."""
    require("torch_fidelity", "metrics")
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    if min(len(samples), len(reference)) < 2 * FOLDS:
        raise DataError(
            f"quality metrics need at least {2 * FOLDS} generated and reference images (the two-sample test "
            f"holds out a fifth of each); pass --num-samples {2 * FOLDS} or more, or --no-metrics")
    kwargs = {"feature_extractor": extractor.name, "cuda": torch.cuda.is_available(), "verbose": False,
              "save_cpu_ram": True, **extractor.kwargs}
    layers = {m: resolve_layer(m, kwargs) for m in ("fid", "kid", "prc", "isc")}
    fake, real = extract_features([samples, reference], sorted(set(layers.values())), kwargs)
    fid = fid_statistics_to_metric(
        fid_features_to_statistics(fake[layers["fid"]]), fid_features_to_statistics(real[layers["fid"]]), False)
    kid, kid_std = kernel_inception_distance(fake[layers["kid"]], real[layers["kid"]])
    isc = isc_features_to_metric(fake[layers["isc"]])
    prc = prc_features_to_metric(fake[layers["prc"]], real[layers["prc"]], **kwargs)
    out = {
        "fid": float(fid["frechet_inception_distance"]),
        "kid": kid,
        "kid_std": kid_std,
        "inception_score": float(isc["inception_score_mean"]),
        "precision": float(prc["precision"]),
        "recall": float(prc["recall"]),
        "two_sample_accuracy": two_sample_accuracy(fake[layers["fid"]], real[layers["fid"]]),
    }
    if extractor.classify is not None and labels is not None:
        predicted = extractor.classify(samples)
        out["class_accuracy"] = float((predicted == torch.tensor(labels)).float().mean())
    return out


def kid_subset_size(samples: int, reference: int) -> int:
    """KID's subset size: at most half of either set, and at most torch-fidelity's 1,000.

    KID is the mean of an unbiased MMD estimate over 100 random subsets; reports print the spread over those
    subsets beside it. A subset as large as the generated set holds all of it every time, so the spread shows
    the reference's variation alone: none when both sets are as large, and at 1,000 digits per seed two seeds
    of one method scored up to five spreads apart. Half of a set, drawn without replacement, varies about as
    much as an estimate on the whole set, and subsets of half of each set vary with both: against one fixed
    reference, simulated, the spread is 1.1-1.9x the deviation between independent generated sets' KIDs,
    where it was 0-0.8x (``tests/test_kid_spread.py``), so it errs on the safe side. Above 2,000 images the
    subsets keep 1,000, and the spread, that of a 1,000-image estimate, is larger still."""
    return min(KID_SUBSET_SIZE, samples // 2, reference // 2)


def kernel_inception_distance(fake: Tensor, real: Tensor) -> tuple[float, float]:
    """KID of two feature sets (N, F) and (M, F), torch-fidelity's (cubic polynomial kernel, 100 subsets,
    seeded), with subsets of :func:`kid_subset_size`: its mean and its spread over the subsets."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    kid = kid_features_to_metric(fake, real, kid_subset_size=kid_subset_size(len(fake), len(real)), verbose=False)
    return float(kid["kernel_inception_distance_mean"]), float(kid["kernel_inception_distance_std"])


def resolve_layer(metric: str, kwargs: dict[str, Any]) -> str:
    from torch_fidelity.utils import resolve_feature_layer_for_metric

    return resolve_feature_layer_for_metric(metric, **kwargs)


def extract_features(image_sets: list[Tensor], layers: list[str], kwargs: dict[str, Any]) -> list[dict[str, Tensor]]:
    """torch-fidelity features (name -> (N, F)) of each uint8 image set, through one extractor instance."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    net = create_feature_extractor(kwargs["feature_extractor"], layers, **kwargs)
    return [
        get_featuresdict_from_dataset(_Images(images), net, 256, kwargs["cuda"], True, False) for images in image_sets]


def two_sample_accuracy(fake: Tensor, real: Tensor, folds: int = FOLDS, l2: float = 1e-2) -> float:
    """Classifier two-sample test: the held-out accuracy of a logistic regression telling ``fake`` features
    from ``real`` ones, averaged over ``folds`` contiguous folds (0.5: indistinguishable, 1.0: always told).

    Both sets are thinned evenly to the same size, keeping their order, so that copies of one real image
    that a reference set keeps adjacent (shifted versions, say) fall into the same fold. The features are
    standardised on each training fold; the regression is fitted to convergence (L-BFGS, float64, L2)."""
    n = min(len(fake), len(real))
    thin = lambda x: x[torch.linspace(0, len(x) - 1, n).round().long()].double().flatten(1)
    x = torch.cat([thin(fake), thin(real)])
    y = torch.cat([torch.zeros(n), torch.ones(n)]).double()
    fold = (torch.arange(n) * folds // n).repeat(2)
    accuracies = []
    for k in range(folds):
        train, test = fold != k, fold == k
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
        w = _logistic_regression((x[train] - mean) / std, y[train], l2)
        predicted = (_with_bias((x[test] - mean) / std) @ w) > 0
        accuracies.append((predicted.double() == y[test]).double().mean().item())
    return float(np.mean(accuracies))


def _with_bias(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)


def _logistic_regression(x: Tensor, y: Tensor, l2: float) -> Tensor:
    xb = _with_bias(x)
    w = torch.zeros(xb.shape[1], dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(xb @ w, y) + l2 * w[:-1].pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    return w.detach()


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
