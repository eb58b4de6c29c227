"""Resumable training checkpoints: safetensors for every tensor, JSON for everything else.

``<out>/checkpoints/step-00000200/`` holds ``weights.safetensors`` (the trainable state: FlashAR parts,
plus backbone weights or LoRA factors in stage 2), ``optimizer.safetensors`` + ``state.json`` (the AdamW
moments, the param groups, the stage, step and data-sampler position). The files are written into a
``.staging-*`` folder that is renamed into place last, so a crash never leaves a half checkpoint that
``--resume`` would pick up; old checkpoints are renamed to ``.pruning-*`` before they are deleted. Such
leftovers, and temporary files of interrupted writes, are removed when a run starts. Everything is global
state (full weights and moments, the sampler of the global batch), so any process count can resume it.

``<out>/checkpoints/best-stage<N>/`` holds the weights of stage N's best held-out evaluation
(``weights.safetensors``, and its step in ``best.json``); a stage ends with them.

``metrics.jsonl`` is cut back to the checkpoint's step when a run (re)starts, so after a kill and
``--resume`` it holds every step exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from flashar.errors import CheckpointError
from flashar.io import atomic_path, load_json, load_weights, remove_temporary_files, save_json, save_safetensors

KEEP = 2
CHECKPOINT_FILES = ("weights.safetensors", "optimizer.safetensors", "state.json")


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


def save_checkpoint(out_dir: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict[str, Any]) -> Path:
    """Write ``checkpoints/step-<step>/`` from full (gathered) weights and ``optimizer.state_dict()``-style state."""
    def write(staging: Path) -> None:
        save_safetensors(weights, staging / "weights.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        save_safetensors(opt_tensors, staging / "optimizer.safetensors")
        save_json({**state, "optimizer": opt_meta}, staging / "state.json")

    final = _staged(out_dir / "checkpoints", f"step-{step:08d}", write)
    root = final.parent
    for old in sorted(root.glob("step-*"))[:-KEEP]:
        doomed = root / f".pruning-{old.name}"
        os.replace(old, doomed)  # out of sight first: a kill mid-delete never leaves a half checkpoint named step-*
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def remove_checkpoints(out_dir: Path) -> None:
    """Delete ``checkpoints/`` (a finished run), renamed out of sight first like a pruned checkpoint."""
    root = out_dir / "checkpoints"
    if root.is_dir():
        doomed = out_dir / ".pruning-checkpoints"
        os.replace(root, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(out_dir: Path) -> None:
    """Delete what a killed run left behind (none of it is ever read): staging and half-pruned checkpoint
    folders, incomplete ``step-*`` folders, and the temporary files of interrupted atomic writes. The best
    weights of a stage (``best-stage<N>/``) are kept: a resumed run ends its stage with them."""
    root = out_dir / "checkpoints"
    incomplete = (p for p in root.glob("step-*") if not is_complete(p))
    for stale in [*root.glob(".staging-*"), *root.glob(".pruning-*"), *incomplete, *out_dir.glob(".pruning-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    remove_temporary_files(out_dir)
    if root.is_dir():
        remove_temporary_files(root)


def is_complete(checkpoint: Path) -> bool:
    return all((checkpoint / name).is_file() for name in CHECKPOINT_FILES)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (the ones the checkpoint covers); drop later steps and a line
    cut short by a kill, so a resumed run appends every later step exactly once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # half-written by a killed run
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(kept))


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted((out_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, optimizer tensors, state with the optimizer's JSON part) of a checkpoint folder."""
    needed = [path / name for name in CHECKPOINT_FILES]
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete; delete it to resume from the previous one")
    return load_weights(needed[0]), load_weights(needed[1]), load_json(needed[2])


def optimizer_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> dict:
    """The full ``optimizer.state_dict()`` stored in a checkpoint."""
    return _unflatten_optimizer(tensors, state["optimizer"])


def save_best(out_dir: Path, stage: int, step: int, weights: dict[str, torch.Tensor]) -> Path:
    """Write ``checkpoints/best-stage<stage>/`` (staged, then renamed into place) from full weights."""
    def write(staging: Path) -> None:
        save_safetensors(weights, staging / "weights.safetensors")
        save_json({"stage": stage, "step": step}, staging / "best.json")

    return _staged(out_dir / "checkpoints", f"best-stage{stage}", write)


def _staged(root: Path, name: str, write: Callable[[Path], None]) -> Path:
    """``write`` a folder into a staging folder under ``root``, then rename it to ``root / name`` (an older
    one is renamed out of sight first): a kill at any moment leaves either the old folder or the new one."""
    root.mkdir(parents=True, exist_ok=True)
    final, doomed = root / name, root / f".pruning-{name}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        write(staging)
        replaced = final.exists()
        if replaced:
            os.replace(final, doomed)
        os.replace(staging, final)
        if replaced:
            shutil.rmtree(doomed, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return final


def load_best(out_dir: Path, stage: int, step: int) -> dict[str, torch.Tensor]:
    """The weights :func:`save_best` wrote for ``stage`` at ``step``."""
    folder = out_dir / "checkpoints" / f"best-stage{stage}"
    if not (folder / "best.json").is_file() or load_json(folder / "best.json").get("step") != step:
        raise CheckpointError(
            f"{folder} does not hold the best weights of stage {stage} (step {step}) that the run recorded; "
            f"start again with a new --out")
    return load_weights(folder / "weights.safetensors")
