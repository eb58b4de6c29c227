"""The backend card: what a backend says about itself (ids, image sizes, sampling defaults, tokenizer, metric,
adapters, ``architecture``), read by the CLI, ``compare`` and ``adapt`` and never while decoding.

:class:`~flashar.backbone.Backbone` inherits :class:`BackendCard`, so a backend sets these members on its backbone
class; the conformance suite decodes with them hidden (``CARD_MEMBERS``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch
from torch import Tensor, nn

from flashar.errors import FlashARError

if TYPE_CHECKING:  # adapter.py imports backbone.py, which imports this module
    from flashar.adapter import Adapter


class BackendCard(ABC):
    """What a backend says about itself: read by the CLI, ``compare`` and ``adapt``, never while decoding
    (``BackboneConformance`` runs every method with these members hidden). :class:`Backbone` inherits it,
    so a backend sets them on its backbone class as before."""

    backend_id: str = ""
    condition_kind: Literal["class", "text"] = "class"
    num_classes: int | None = None
    downsample: int = 16
    default_image_size: int | tuple[int, int] = 256  # pixels: one side, or (height, width) for a non-square native size
    sampling_defaults: dict[str, Any] = {}
    default_adapter: Any = None  # a FlashAR adapter folder shipped with the backend, if any
    tokenizer: Any = None  # codes <-> pixels (an object with decode/encode; never part of the state dict)
    tokenizer_hint: str = "load the backbone together with its image tokenizer"
    default_branch: dict[str, Any] = {}  # BranchConfig values `flashar adapt` uses unless the user sets them
    metric: str | None = None  # id of a registered MetricSpec suited to this backend's images
    # the Backbone's weights, which fingerprint() samples (annotations only: not card members)
    output: nn.Linear
    layers: nn.ModuleList

    def reference_images(self) -> Tensor | None:
        """Real images (N, 3, h, w) uint8 to compare generated samples against, if the backend ships some."""
        return None

    def grid(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """Token grid (H, W) for an image of ``image_size`` pixels (one side, or (height, width))."""
        size = self.default_image_size if image_size is None else image_size
        height, width = (size, size) if isinstance(size, int) else size
        if height % self.downsample or width % self.downsample or height <= 0 or width <= 0:
            raise FlashARError(
                f"image size {height}x{width} is not a positive multiple of the tokenizer's downsampling factor "
                f"{self.downsample}; use e.g. {_spelled(self.default_image_size)}"
            )
        return height // self.downsample, width // self.downsample

    def decode(self, codes: Tensor, conditions: Sequence[Any] | None = None) -> Tensor:
        """Codes (B, H, W) in [0, V) -> images (B, 3, h, w) in [0, 1], through ``tokenizer``.

        ``conditions`` are the classes or prompts the codes were drawn for; a backend whose pixel decoder
        reads them (GLM-Image's DiT) overrides this, the others ignore them."""
        return self._image_tokenizer().decode(codes)

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, h, w) in [0, 1] -> codes (B, H, W), through ``tokenizer``."""
        return self._image_tokenizer().encode(images)

    def _image_tokenizer(self):
        if self.tokenizer is None:
            raise FlashARError(f"no image tokenizer is loaded; {self.tokenizer_hint}")
        return self.tokenizer

    @abstractmethod
    def architecture(self) -> dict[str, Any]:
        """JSON-able description of the architecture as loaded (sizes, vocabulary): it enters the fingerprint,
        so it must not depend on how the user named the model."""

    def read_adapter(self, path: Path, copy_backbone: bool) -> Adapter | None:
        """A FlashAR checkpoint in a layout this backend publishes, or None when ``path`` is not one.

        ``copy_backbone=False`` lets the backend load backbone weights the checkpoint carries into this
        backbone in place. The default knows no foreign layout; :func:`flashar.adapter.load_adapter` then
        reads flashar's own format.
        """
        return None

    def fsdp_units(self, blocks: nn.ModuleList) -> list[nn.Module]:
        """The modules FSDP2 shards one by one among ``blocks`` (``layers``, or the FlashAR clones of them).

        FSDP gathers a unit's weights in its forward hooks, so each unit must be entered through its
        ``__call__`` while the model runs. The default is the blocks themselves, for backends whose
        ``layer_forward`` calls the block; a backend that runs a block's sub-modules itself names those.
        """
        return list(blocks)

    def fingerprint(self) -> str:
        """Identity of the architecture and weights: a hash of ``architecture()`` and sampled weight values."""
        digest = hashlib.sha256(json.dumps(self.architecture(), sort_keys=True).encode())
        with torch.no_grad():
            for tensor in (self.output.weight, self.layers[0].state_dict()[next(iter(self.layers[0].state_dict()))]):
                sample = tensor.detach().flatten()[:: max(1, tensor.numel() // 4096)][:4096]
                digest.update(sample.float().cpu().numpy().round(5).tobytes())
        return digest.hexdigest()[:16]


CARD_MEMBERS = frozenset(name for name in vars(BackendCard) if not name.startswith("_"))


def decode_images(card: BackendCard, codes: Tensor, conditions: Sequence[Any]) -> Tensor:
    """``card.decode(codes, conditions)``; a backend written when ``decode`` took the codes alone still
    works, with a one-line deprecation warning naming the new parameter."""
    if len(inspect.signature(card.decode).parameters) >= 2:
        return card.decode(codes, conditions)
    warnings.warn(f"{type(card).__name__}.decode(codes) should also take the conditions the codes were drawn for: "
                  f"decode(codes, conditions=None); it is called without them for now", DeprecationWarning,
                  stacklevel=2)
    return card.decode(codes)


def _spelled(size: int | tuple[int, int]) -> str:
    """An image size as the CLI takes it: 256 or 192x320."""
    return str(size) if isinstance(size, int) else "x".join(map(str, size))
