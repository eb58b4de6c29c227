"""The digits raster model on disk: safetensors with LlamaGen's key names + its GPTConfig as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from flashar.backends.llamagen.loader import build_gpt
from flashar.backends.llamagen.model import GPTConfig
from flashar.errors import CheckpointError
from flashar.io import atomic_path, load_json, load_weights, save_safetensors

RASTER_CONFIG = dict(dim=128, n_layer=4, n_head=4, multiple_of=32, vocab_size=17, num_classes=10,
                     class_dropout_prob=0.1)

def save_raster(model, folder: Path) -> None:
    save_safetensors(model.state_dict(), folder / "raster.safetensors")
    with atomic_path(folder / "raster.json") as tmp:
        tmp.write_text(json.dumps(model.config.model_dump(), indent=2) + "\n")


def load_raster(path: Path, backbone_cls, **components):
    """Weights from ``path``; the GPT config sits beside them as ``<name>.json``."""
    config_path = Path(path).with_suffix(".json")
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing; a digits checkpoint needs its GPT config beside it")
    try:
        cfg = GPTConfig(**load_json(config_path))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path} is not a valid GPT config ({str(exc).splitlines()[0]})") from None
    state = {k: v.float() for k, v in load_weights(path).items()}
    return build_gpt(cfg, state, path, backbone_cls=backbone_cls, **components)
