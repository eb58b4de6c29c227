"""Checkpoints of the official GLM-Image FlashAR trainer (``lxazjk/GLM-Image-FlashAR``), read as flashar adapters.

``train_glm_flashar.py`` (``save_flashar_params``) writes one torch pickle per save; flashar reads two:

* ``flashar_full_step{N}.pt`` (backbone trained): ``{"step", "local_step", "step_offset", "flashar": {...},
  "backbone": {...}, "args": vars(args), "preview_conditioned", "flashar_semantics_version",
  "training_state_meta"}``;
* ``flashar_step{N}.pt`` (backbone frozen): the same with ``"state_dict"`` in place of ``"flashar"`` and no
  ``"backbone"``.

``flashar_heads_only_step*.pt`` (``heads_only_for_trained_backbone``: the trained backbone is missing) and
``flashar_resume_step*.pt`` (``training_state``) are refused, as the official decoder refuses them. So are
checkpoints trained without the preview prefix (``preview_conditioned`` false, or a
``flashar_semantics_version`` other than ``preview_v2_valid_prefix_preview_extent``): flashar, like the
official decoder, decodes the large grid after the preview.

Key table (after dropping FSDP's ``_fsdp_wrapped_module.`` and ``module.`` parts, as the official loader does):

    backbone: embed_tokens.weight, layers.{i}.*, norm.weight  ->  language_model.*   (GlmImageTextModel keys)
    flashar:  horizontal_head.weight                          ->  lm_head.weight     (flashar's horizontal head)
              vertical_block.{j}.*, vertical_norm.weight, vertical_head.weight,
              hv_gate_mlp.{0,2}.*, hv_gate_corner.*           ->  the same names in FlashARHead

K is ``args["vertical_layers"]`` (checked against the ``vertical_block`` layers present), b is
``args["vertical_start_layer"]`` (-1: L - K, the trainer's default), the grid ``args["target_h"] // 32`` x
``args["target_w"] // 32``, the step ``step``. The pickle is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from flashar import __version__
from flashar.adapter import Adapter
from flashar.branch import FlashARHead
from flashar.config import AdapterMetadata, BranchConfig
from flashar.errors import CheckpointError
from flashar.io import check_keys, load_weights

SEMANTICS = "preview_v2_valid_prefix_preview_extent"
VERTICAL_KEY = re.compile(r"vertical_block\.(\d+)\.")


def is_released(path: Path) -> bool:
    """True for a ``.pt`` file (the official trainer's format); flashar's own adapters are folders."""
    path = Path(path)
    return path.is_file() and path.suffix in (".pt", ".pth")


def clean(state: dict, where: Path) -> dict[str, torch.Tensor]:
    """Drop FSDP / DDP wrapper parts of the names, refusing two tensors that end up with one name."""
    out = {}
    for key, value in state.items():
        name = str(key).replace("_fsdp_wrapped_module.", "")
        while name.startswith("module."):
            name = name[len("module."):]
        if name in out:
            raise CheckpointError(
                f"{where} holds two tensors named {name} once wrapper prefixes are dropped; re-export it")
        out[name] = value
    return out


def read_payload(path: Path) -> tuple[dict, dict, dict, int]:
    """(FlashAR tensors, backbone tensors (may be empty), args, step) of an official checkpoint, validated."""
    obj = load_weights(path)
    if "training_state" in obj:
        raise CheckpointError(f"{path} is a training-resume checkpoint (flashar_resume_step*.pt); pass the "
                              "flashar_full_step*.pt (or flashar_step*.pt) saved beside it")
    if obj.get("heads_only_for_trained_backbone"):
        raise CheckpointError(f"{path} holds only the FlashAR heads of a run that trained the backbone; pass the "
                              "flashar_full_step*.pt saved beside it, which carries the trained backbone")
    if "flashar" in obj and obj.get("backbone"):
        flashar, backbone = obj["flashar"], obj["backbone"]
    elif "state_dict" in obj and "backbone" not in obj:
        flashar, backbone = obj["state_dict"], {}
    else:
        raise CheckpointError(f"{path} is not a GLM-Image FlashAR checkpoint (expected 'flashar' + 'backbone' or "
                              f"'state_dict', found {', '.join(sorted(map(str, obj))[:6])})")
    if obj.get("preview_conditioned") is not True or obj.get("flashar_semantics_version") != SEMANTICS:
        raise CheckpointError(f"{path} was trained without the preview prefix (preview_conditioned "
                              f"{obj.get('preview_conditioned')!r}, flashar_semantics_version "
                              f"{obj.get('flashar_semantics_version')!r}); flashar decodes after the preview grid, "
                              f"as the official decoder does: use a checkpoint trained with {SEMANTICS!r}")
    step = obj.get("step", 0)
    return clean(flashar, path), clean(backbone, path), obj.get("args") or {}, int(step) if isinstance(step, int) else 0


def branch_of(args: dict, flashar: dict, num_layers: int, path: Path) -> tuple[int, int]:
    """(K, b) from the trainer's args, checked against the tensors and the backbone's depth."""
    held = {int(m.group(1)) for key in flashar if (m := VERTICAL_KEY.match(key))}
    num_blocks = args.get("vertical_layers", len(held))
    if not isinstance(num_blocks, int) or num_blocks < 1 or num_blocks != len(held):
        raise CheckpointError(
            f"{path} says vertical_layers={num_blocks!r} but holds {len(held)} vertical_block layers; "
            "flashar decodes only checkpoints with a vertical branch, re-export it")
    branch_layer = args.get("vertical_start_layer", -1)
    branch_layer = num_layers - num_blocks if branch_layer is None or branch_layer < 0 else int(branch_layer)
    if branch_layer + num_blocks > num_layers:
        raise CheckpointError(
            f"{path} puts K={num_blocks} vertical blocks at layer b={branch_layer}, which does not fit "
            f"the {num_layers}-layer --model-path model; pass the base model it was trained from")
    return num_blocks, branch_layer


def load_released(path: str | Path, backbone, copy_backbone: bool) -> Adapter:
    """Validate the payload, keys and shapes, then load the FlashAR parts and (full checkpoints) the backbone."""
    path = Path(path)
    flashar, trained, args, step = read_payload(path)
    num_blocks, branch_layer = branch_of(args, flashar, backbone.num_layers, path)
    branch = BranchConfig(num_blocks=num_blocks, branch_layer=branch_layer, gate="hidden")
    head = FlashARHead(backbone, branch, meta=True)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    expected["horizontal_head.weight"] = tuple(backbone.lm_head.weight.shape)
    check_keys(expected, flashar, path)
    if trained:
        lm = {k.removeprefix("language_model."): tuple(v.shape) for k, v in backbone.state_dict().items()
              if k.startswith("language_model.")}
        check_keys(lm, trained, f"{path} (backbone)")
    fingerprint = backbone.fingerprint()  # of the base weights, before they are replaced
    target = copy.deepcopy(backbone) if copy_backbone else backbone
    with torch.no_grad():
        for key, tensor in trained.items():
            target.get_parameter("language_model." + key).copy_(tensor)
        target.lm_head.weight.copy_(flashar.pop("horizontal_head.weight"))
    head.load_state_dict({k: v.to(device=target.device, dtype=target.dtype) for k, v in flashar.items()},
                         strict=True, assign=True)
    height, width = args.get("target_h"), args.get("target_w")
    grid = (height // 32, width // 32) if isinstance(height, int) and isinstance(width, int) else None
    metadata = AdapterMetadata(
        flashar_version=__version__, backend=backbone.backend_id, backbone_fingerprint=fingerprint,
        backbone_architecture=backbone.architecture(), grid=grid, branch=branch, branch_layer=branch_layer,
        num_blocks=num_blocks, stage=2 if trained else 1, step=step, backbone_weights="full",
    )
    return Adapter(metadata, head.eval(), target.eval())

