"""The released Emu3.5 FlashAR checkpoint (``lxazjk/Emu3.5-Image-FlashAR``), read as a flashar adapter.

The reference trainer (lxazjk/Emu3.5-FlashAR, ``flashar/utils/checkpoint_utils.py``) saves the whole
``Emuflashar`` wrapper as a Hugging Face folder (reference/emu35_glm.md §9.1, flashar_method.md §3):

* ``config.json``: ``model_type "emu3_flashar"``, ``architectures ["Emuflashar"]``, ``vocab_size``,
  ``hidden_size``, ``visual_token_offset``, ``use_vertical_block``, ``vertical_layers`` (K),
  ``vertical_start_layer`` (b), ``backbone_config`` (the base model's Emu3Config);
* ``checkpoint_meta.json``: ``global_step`` (74000 for the release), ``epoch``, ``save_reason``;
* ``model.safetensors.index.json`` + bf16 shards (16 for the release), or one ``model.safetensors``.

Key table, released name -> flashar name (the FlashAR parts keep theirs):

    backbone.embed_tokens / layers.{i}.* / norm  ->  model.embed_tokens / layers.{i}.* / norm  (fine-tuned Emu3Model)
    horizontal_head.weight                       ->  lm_head.weight  (flashar's horizontal head is the backbone's head)
    vertical_block.{j}.*, vertical_norm.weight, vertical_head.weight,
    hv_gate_mlp.{0,2}.*, hv_gate_corner.*         ->  the same names in :class:`~flashar.branch.FlashARHead`

Loading reads K from ``vertical_layers`` and checks it against the ``vertical_block`` layers the index
holds; b comes from ``vertical_start_layer`` (-1 means L - K, as in the reference constructor; a missing
field is refused, where the reference silently falls back to a branch-less layout). Every key and shape is
checked, with missing and unexpected keys named in one line, before any tensor is read. The released
backbone then replaces the loaded base's weights in place, one tensor at a time (peak memory: the model
plus one tensor), unless ``copy_backbone`` asks for a copy. The checkpoint records no grid (the release was
trained at 32 x 32), so the adapter accepts any.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from flashar import __version__
from flashar.adapter import Adapter
from flashar.backends.emu35.backbone import Emu35Backbone
from flashar.backends.emu35.loader import iter_shard_tensors, shard_map, shard_shapes
from flashar.branch import FlashARHead
from flashar.config import AdapterMetadata, BranchConfig
from flashar.errors import CheckpointError
from flashar.io import check_keys, load_json

MODEL_TYPE = "emu3_flashar"
META_FILE = "checkpoint_meta.json"
RELEASED_FIELDS = ("vertical_layers", "vertical_start_layer", "use_vertical_block", "visual_token_offset")
VERTICAL_KEY = re.compile(r"vertical_block\.(\d+)\.")


@dataclass(frozen=True)
class ReleasedConfig:
    num_blocks: int  # K
    branch_layer: int  # b
    step: int  # optimizer steps (checkpoint_meta.json's global_step), 0 if unknown


def is_released(path: Path) -> bool:
    """True when ``path`` is a folder whose config.json is the reference trainer's: ``model_type:
    "emu3_flashar"``, or no ``model_type`` at all (the official loaders build ``Emuflashar`` directly and do
    not need it) with the ``Emuflashar`` architecture or the vertical-branch fields. flashar's own adapter
    metadata (``flashar_version``) is not."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(raw, dict) or "flashar_version" in raw:
        return False
    if raw.get("model_type") is not None:
        return raw["model_type"] == MODEL_TYPE
    return "Emuflashar" in (raw.get("architectures") or []) or any(k in raw for k in RELEASED_FIELDS)


def read_config(path: Path, backbone: Emu35Backbone) -> ReleasedConfig:
    """K, b and the step from config.json (and checkpoint_meta.json), checked against ``backbone``."""
    where, raw = path / "config.json", load_json(path / "config.json")
    if raw.get("use_vertical_block") is False:
        raise CheckpointError(
            f"{where} sets use_vertical_block false; flashar decodes only checkpoints with a vertical branch")
    ours = {"hidden_size": backbone.config.hidden_size, "vocab_size": backbone.config.vocab_size,
            "visual_token_offset": backbone.code_offset}
    for field, value in ours.items():
        if raw.get(field) is not None and raw[field] != value:
            raise CheckpointError(f"{where} has {field} {raw[field]}, but the --model-path model has {value}; "
                                  "pass the base model this checkpoint was trained from")
    num_blocks, branch_layer = raw.get("vertical_layers"), raw.get("vertical_start_layer")
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise CheckpointError(
            f"{where} has vertical_layers {num_blocks!r}; expected the number of vertical blocks K >= 1")
    if not isinstance(branch_layer, int):
        raise CheckpointError(f"{where} has no integer vertical_start_layer (got {branch_layer!r}); "
                              "it names the branch layer b, write it into config.json")
    num_layers = backbone.num_layers
    branch_layer = num_layers - num_blocks if branch_layer < 0 else branch_layer
    if branch_layer + num_blocks > num_layers:
        raise CheckpointError(
            f"{where} puts K={num_blocks} vertical blocks at layer b={branch_layer}, which does not fit "
            f"the {num_layers}-layer --model-path model; pass the base model it was trained from")
    meta = load_json(path / META_FILE) if (path / META_FILE).is_file() else {}
    step = meta.get("global_step", meta.get("step", 0)) if isinstance(meta, dict) else 0
    return ReleasedConfig(num_blocks, branch_layer, int(step or 0))


def check_vertical_count(config: ReleasedConfig, keys: list[str], path: Path) -> None:
    """config.json's K must equal the number of ``vertical_block.{j}`` layers the weights hold."""
    held = {int(m.group(1)) for key in keys if (m := VERTICAL_KEY.match(key))}
    if len(held) != config.num_blocks:
        raise CheckpointError(f"{path / 'config.json'} says vertical_layers={config.num_blocks}, but the weights hold "
                              f"{len(held)} vertical_block layers; the folder mixes two checkpoints, re-download it")


def released_names(backbone: Emu35Backbone, head: FlashARHead) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """The key table: released name -> (part "backbone" or "head", flashar name, shape)."""
    table = {}
    for key, value in backbone.state_dict().items():
        name = "horizontal_head.weight" if key == "lm_head.weight" else "backbone." + key.removeprefix("model.")
        table[name] = ("backbone", key, tuple(value.shape))
    for key, value in head.state_dict().items():
        table[key] = ("head", key, tuple(value.shape))
    return table


def load_released(path: str | Path, backbone: Emu35Backbone, copy_backbone: bool) -> Adapter:
    """Validate config and keys, then load the FlashAR parts and the fine-tuned backbone (module docstring)."""
    path = Path(path)
    config = read_config(path, backbone)
    shards = shard_map(path, hint="download every file of the FlashAR checkpoint into that folder")
    check_vertical_count(config, list(shards), path)
    fingerprint = backbone.fingerprint()  # of the base weights, before they are replaced
    branch = BranchConfig(num_blocks=config.num_blocks, branch_layer=config.branch_layer, gate="hidden")
    head = FlashARHead(backbone, branch, meta=True)
    table = released_names(backbone, head)
    check_keys({name: shape for name, (_, _, shape) in table.items()}, shard_shapes(shards), path)
    target = copy.deepcopy(backbone) if copy_backbone else backbone
    head.load_state_dict(_read_weights(shards, table, target), strict=True, assign=True)
    metadata = AdapterMetadata(
        flashar_version=__version__, backend=backbone.backend_id, backbone_fingerprint=fingerprint,
        backbone_architecture=backbone.architecture(), grid=None, branch=branch, branch_layer=config.branch_layer,
        num_blocks=config.num_blocks, stage=2, step=config.step, backbone_weights="full",
    )
    return Adapter(metadata, head.eval(), target.eval())


def _read_weights(shards: dict[str, Path], table: dict, target: Emu35Backbone) -> dict[str, torch.Tensor]:
    """Copy backbone tensors into ``target``'s parameters (in place: no second backbone) and return the
    FlashAR parts' tensors on the head's device and dtype (``target.device``, the last layer's device)."""
    head_state = {}
    with torch.no_grad():
        for name, tensor in iter_shard_tensors(shards):
            part, key, _ = table[name]
            if part == "backbone":
                target.get_parameter(key).copy_(tensor)  # casts bf16 -> the model's dtype on the parameter's device
            else:
                head_state[key] = tensor.to(device=target.device, dtype=target.dtype)
    return head_state
