"""FlashAR adapters on disk: ``model.safetensors`` + ``config.json`` in one folder.

``config.json`` is :class:`AdapterMetadata` (flashar version, backend id, the base backbone's fingerprint
and architecture, grid, branch layer b, K, gate, stage and step, and whether backbone weights changed).
``model.safetensors`` holds the FlashAR parts under their released names (``vertical_block.*``,
``vertical_norm.*``, ``vertical_head.*``, ``hv_gate_*``) plus, when stage 2 changed the backbone, either
every backbone weight under ``backbone.*`` or LoRA factors under ``lora.*`` (merged on load).

Loading validates the JSON first, refuses an adapter made for another backend, backbone or grid, builds
the parts on ``meta`` and loads them strictly, naming any missing or unexpected key. Before reading this
format, :func:`load_adapter` asks the backbone (``Backbone.read_adapter``) whether ``path`` is a FlashAR
checkpoint in a layout its backend publishes (e.g. the released Emu3.5 FlashAR model) and returns that.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from flashar import __version__
from flashar.backbone import Backbone
from flashar.branch import FlashARHead
from flashar.config import AdapterMetadata
from flashar.errors import CheckpointError, FlashARError
from flashar.io import check_keys, ensure_writable_dir, load_json, load_weights, save_json, save_safetensors

WEIGHTS, CONFIG = "model.safetensors", "config.json"


@dataclass
class Adapter:
    metadata: AdapterMetadata
    head: FlashARHead
    backbone: Backbone  # the adapted backbone (the base one when stage 2 left it unchanged)

    def check_grid(self, grid: tuple[int, int]) -> None:
        if self.metadata.grid is not None and tuple(grid) != tuple(self.metadata.grid):
            height, width = self.metadata.grid
            raise FlashARError(
                f"this adapter was trained for a {height}x{width} token grid, not {grid[0]}x{grid[1]}; generate at "
                f"image size {height * self.backbone.downsample}x{width * self.backbone.downsample} or adapt for "
                "this size"
            )
        if self.head.config.row_lag > grid[1]:
            raise FlashARError(f"this adapter's row lag {self.head.config.row_lag} exceeds the grid's width {grid[1]}; "
                               f"generate a grid at least that wide or adapt with a smaller --row-lag")


def save_adapter(path: str | Path, metadata: AdapterMetadata, head_state: dict[str, torch.Tensor],
                 backbone_state: dict[str, torch.Tensor] | None = None,
                 lora_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an adapter folder from state dicts: the FlashAR parts, plus backbone weights or LoRA factors
    as ``metadata.backbone_weights`` says. The weights go first and ``config.json`` last, so a folder whose
    ``config.json`` is missing was interrupted and is refused on load."""
    path = ensure_writable_dir(path)
    tensors = dict(head_state)
    if metadata.backbone_weights == "full":
        tensors.update({f"backbone.{k}": v for k, v in (backbone_state or {}).items()})
    elif metadata.backbone_weights == "lora":
        tensors.update({f"lora.{k}": v for k, v in (lora_state or {}).items()})
    save_safetensors(tensors, path / WEIGHTS, metadata={"format": "flashar-adapter"})
    save_json(metadata.model_dump(mode="json"), path / CONFIG)
    return path


def new_metadata(
    backbone: Backbone, head: FlashARHead, grid: tuple[int, int], stage: int = 0, step: int = 0) -> AdapterMetadata:
    return AdapterMetadata(
        flashar_version=__version__, backend=backbone.backend_id, backbone_fingerprint=backbone.fingerprint(),
        backbone_architecture=backbone.architecture(), grid=tuple(grid), branch=head.config,
        branch_layer=head.branch_layer, num_blocks=len(head.vertical_block), stage=stage, step=step,
    )


def read_metadata(path: str | Path) -> AdapterMetadata:
    path = Path(path)
    raw = load_json(path / CONFIG) if (path / CONFIG).is_file() else None
    if isinstance(raw, dict) and "flashar_version" not in raw or raw is not None and not isinstance(raw, dict):
        kind = (f"model_type {raw.get('model_type')!r}" if isinstance(raw, dict) and raw.get("model_type")
                else "no flashar_version")
        raise CheckpointError(f"{path} is neither a flashar adapter (its {CONFIG} has {kind}) nor a FlashAR checkpoint "
                              f"layout this backend reads; check that --adapter names the checkpoint folder itself")
    if raw is None or not (path / WEIGHTS).is_file():
        raise CheckpointError(
            f"{path} is not a flashar adapter folder (it needs {CONFIG} and {WEIGHTS}); write one with `flashar adapt`")
    try:
        return AdapterMetadata(**raw)
    except (ValidationError, TypeError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else {"loc": ("?",), "msg": str(exc)}
        raise CheckpointError(f"{path / CONFIG} is not valid adapter metadata ({'.'.join(map(str, first['loc']))}: "
                              f"{first['msg']}); regenerate the adapter with `flashar adapt`") from None


def check_compatible(meta: AdapterMetadata, backbone: Backbone, path: Path) -> None:
    if meta.backend != backbone.backend_id:
        raise CheckpointError(f"adapter {path} was made for backend '{meta.backend}', not '{backbone.backend_id}'; "
                              f"use it with --backend {meta.backend} or adapt this backbone")
    if meta.backbone_fingerprint != backbone.fingerprint():
        raise CheckpointError(
            f"adapter {path} was made for another backbone (fingerprint {meta.backbone_fingerprint}, this one is "
            f"{backbone.fingerprint()}); load the checkpoint it was adapted from"
        )


def load_adapter(path: str | Path, backbone: Backbone, copy_backbone: bool = True) -> Adapter:
    """Validate, then build the FlashAR parts on ``meta`` and load them (and any backbone weights) strictly.

    Backbone weights the adapter carries go into a copy of ``backbone`` unless ``copy_backbone`` is False,
    when they replace its own (no second copy of a large model).
    """
    path = Path(path)
    foreign = backbone.read_adapter(path, copy_backbone)
    if foreign is not None:
        return foreign
    meta = read_metadata(path)
    check_compatible(meta, backbone, path)
    state = load_weights(path / WEIGHTS)
    head = FlashARHead(backbone, meta.branch.model_copy(update={"branch_layer": meta.branch_layer}), meta=True)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    head_state = {k: v for k, v in state.items() if not k.startswith(("backbone.", "lora."))}
    check_keys(expected, head_state, path / WEIGHTS)
    head.load_state_dict(head_state, strict=True, assign=True)
    head = head.to(device=backbone.device, dtype=backbone.dtype).eval()
    adapted = _adapted_backbone(backbone, meta, state, path, copy_backbone)
    return Adapter(meta, head, adapted)


def _adapted_backbone(
    backbone: Backbone, meta: AdapterMetadata, state: dict, path: Path, copy_backbone: bool) -> Backbone:
    if meta.backbone_weights == "none":
        return backbone
    target = copy.deepcopy(backbone) if copy_backbone else backbone
    if meta.backbone_weights == "full":
        weights = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        check_keys({k: tuple(v.shape) for k, v in target.state_dict().items()}, weights, path / WEIGHTS)
        target.load_state_dict({k: v.to(target.dtype) for k, v in weights.items()}, strict=True)
    else:
        from flashar.lora import merge_lora

        merge_lora(
            target, {k[len("lora.") :]: v for k, v in state.items() if k.startswith("lora.")}, meta.lora_scaling, path)
    return target.eval()
