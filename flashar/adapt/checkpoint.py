"""Resumable training checkpoints: safetensors for every tensor, JSON for everything else.

``<out>/checkpoints/step-00000200/`` holds ``weights.safetensors`` (the trainable state: FlashAR parts,
plus backbone weights or LoRA factors in stage 2), ``optimizer.safetensors`` + ``state.json`` (the AdamW
moments, the param groups, the stage, step, data-sampler position and RNG state). Each file is written
atomically and the folder is renamed into place last, so a crash never leaves a half checkpoint that
``--resume`` would pick up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from flashar.errors import CheckpointError
from flashar.io import load_json, load_weights, save_json, save_safetensors

KEEP = 2


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(out_dir: Path, step: int, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        save_safetensors(weights, staging / "weights.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_safetensors(opt_tensors, staging / "optimizer.safetensors")
        save_json({**state, "optimizer": opt_meta}, staging / "state.json")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    for old in sorted(root.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted((out_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, optimizer tensors, state with the optimizer's JSON part) of a checkpoint folder."""
    needed = [path / "weights.safetensors", path / "optimizer.safetensors", path / "state.json"]
    if not all(p.is_file() for p in needed):
        raise CheckpointError(f"checkpoint {path} is incomplete; delete it to resume from the previous one")
    return load_weights(needed[0]), load_weights(needed[1]), load_json(needed[2])


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
