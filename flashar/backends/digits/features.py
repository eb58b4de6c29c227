"""The FID-digits feature extractor: a small CNN trained on the digits train split.

Registered with torch-fidelity (``register_feature_extractor``) as ``digits-cnn`` so FID, KID, IS and
precision/recall run offline. Features: ``"128"`` (the penultimate layer, for FID/KID/PRC) and
``"logits_unbiased"`` (the 10 class logits, for IS). The same network gives the class accuracy of
generated samples. Reports call the resulting FID "FID-digits"; it is not comparable to Inception FID.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashar.backends.digits.data import LEVELS

NAME = "digits-cnn"
WEIGHTS = Path(__file__).parent / "weights" / "features.safetensors"


class DigitsCNN(nn.Module):
    """16 x 16 gray -> 128 features -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)  # 8 x 8
        self.conv3 = nn.Conv2d(64, 64, 3, stride=2, padding=1)  # 4 x 4
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.out = nn.Linear(128, 10)

    @staticmethod
    def from_codes(codes: Tensor) -> Tensor:
        return codes[:, None].float() / (LEVELS - 1)

    @staticmethod
    def from_uint8(images: Tensor) -> Tensor:
        """torch-fidelity's (N, 3, H, W) uint8 -> (N, 1, 16, 16) float in [0, 1]."""
        gray = images.float().mean(dim=1, keepdim=True) / 255.0
        return gray if gray.shape[-1] == 16 else F.interpolate(gray, size=(16, 16), mode="area")

    def features(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.fc(x.flatten(1))

    def classify(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.features(x)))

    def save(self, path: Path) -> None:
        from flashar.io import save_safetensors

        save_safetensors(self.state_dict(), path)

    @classmethod
    def load(cls, path: Path = WEIGHTS) -> DigitsCNN:
        from flashar.io import load_weights

        net = cls()
        net.load_state_dict(load_weights(path))
        return net.eval()


def register() -> str:
    """Register the extractor with torch-fidelity (idempotent); return its name."""
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(NAME, _extractor_class())
    return NAME


def _extractor_class():
    from torch_fidelity import FeatureExtractorBase

    class DigitsFeatureExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = DigitsCNN.load()

        @staticmethod
        def get_provided_features_list():
            return ("128", "logits_unbiased")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits_unbiased", "fid": "128", "kid": "128", "prc": "128"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

        def forward(self, images):
            x = DigitsCNN.from_uint8(images)
            feats = self.net.features(x)
            found = {"128": feats, "logits_unbiased": self.net.out(F.relu(feats))}
            return tuple(found[name] for name in self.features_list)

    return DigitsFeatureExtractor


def classify_images(images: Tensor) -> Tensor:
    """Predicted digit (N,) of uint8 images (N, 3, H, W)."""
    net = DigitsCNN.load()
    with torch.no_grad():
        return net.classify(DigitsCNN.from_uint8(images)).argmax(-1)
