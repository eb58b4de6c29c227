"""The two-stage FlashAR adaptation loop (reference/flashar_method.md §7).

Stage 1 trains the FlashAR parts on the frozen backbone, stage 2 trains jointly (see
:mod:`flashar.adapt.model`). Each stage has its own AdamW (fresh moments) and its own warm-up / flat /
cosine schedule.

The loop is deterministic on CPU: batches come from a seeded sampler whose position is checkpointed, so
``resume=True`` continues from the newest checkpoint and ends with the same adapter as an uninterrupted
run, even after a SIGKILL (checkpoints and the adapter are written atomically; ``metrics.jsonl`` is cut
back to the checkpoint's step). Under torchrun the same loop runs data-parallel (DDP or FSDP2, see
:mod:`flashar.adapt.distributed`): every process computes its share of each global batch and only the
main process writes metrics, checkpoints and the adapter (``config.json`` + ``model.safetensors``).

With held-out data (``Run.val_data``, or ``val_fraction`` of the data split off by seed) every stage
evaluates the held-out NLL of the fused FlashAR decoder (teacher-forced in its anti-diagonal order) and of
the raster model at its start, every ``eval_every`` steps and at its end; it writes the weights of its best
FlashAR NLL to ``checkpoints/best-stage<N>/``, stops after ``patience`` evaluations without a better one,
and ends with the best weights. Evaluation draws no random numbers and the decisions are checkpointed, so
resume stays exact. The ``checkpoints/`` sub-folder is removed when the run finishes unless
``keep_checkpoints``: the folder then holds the adapter and ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from flashar.adapt.checkpoint import (
    latest_checkpoint,
    load_best,
    load_checkpoint,
    optimizer_state,
    remove_checkpoints,
    remove_leftovers,
    save_best,
    save_checkpoint,
    truncate_metrics,
)
from flashar.adapt.data import TokenData
from flashar.adapt.distributed import (
    SINGLE,
    Distributed,
    barrier,
    current,
    full_norm,
    full_optimizer_state,
    full_tensors,
    load_full_state,
    mean_over_processes,
    shard_fsdp,
    shard_optimizer_state,
    shard_rows,
    sync_context,
    wrap_ddp,
)
from flashar.adapt.model import (
    AdaptModel,
    load_trainable_state,
    prepare_lora,
    stage_parameters,
    trainable_state,
    uses_lora,
)
from flashar.adapter import Adapter, AdapterMetadata, new_metadata, save_adapter
from flashar.backbone import Backbone
from flashar.branch import FlashARHead
from flashar.config import AdaptConfig, StageConfig
from flashar.coupling import fit_coupling, grid_log_likelihood
from flashar.errors import CheckpointError, DataError, FlashARError, require
from flashar.io import atomic_path, ensure_writable_dir, folder_lock
from flashar.lora import lora_state

METRICS = "metrics.jsonl"


class Sampler:
    """Seeded, resumable batches over the dataset: a fresh permutation per epoch, plus condition dropout."""

    def __init__(self, size: int, seed: int, epoch: int = 0, cursor: int = 0):
        self.size, self.seed, self.epoch, self.cursor = size, seed, epoch, cursor
        self._order = self._permutation()

    def _permutation(self) -> Tensor:
        return torch.randperm(
            self.size, generator=torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) % 2**64))

    def next(self, count: int, drop_prob: float) -> tuple[Tensor, Tensor]:
        picked, have = [], 0
        while have < count:
            if self.cursor == self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(count - have, self.size - self.cursor)
            picked.append(self._order[self.cursor : self.cursor + take])
            self.cursor, have = self.cursor + take, have + take
        index = torch.cat(picked)
        rng = torch.Generator().manual_seed((self.seed * 7919 + self.epoch * 1_000_003 + self.cursor) % 2**64)
        return index, torch.rand(count, generator=rng) < drop_prob

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def noisy(self, codes: Tensor, prob: float, vocab: int) -> Tensor:
        """``codes`` of the batch just drawn with a ``prob`` fraction of tokens replaced by random codes, seeded by
        the sampler's position (the same in every process, and again on resume)."""
        rng = torch.Generator().manual_seed(self.seed * 6007 + self.epoch * 1_000_033 + self.cursor)
        replace = torch.rand(codes.shape, generator=rng) < prob
        return torch.where(replace, torch.randint(0, vocab, codes.shape, generator=rng), codes)


def lr_factor(step: int, cfg: StageConfig) -> float:
    """Linear warm-up, flat, then cosine down to ``min_lr_factor`` at the end of the stage."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    start = cfg.warmup_steps + cfg.flat_steps
    if step < start:
        return 1.0
    span = max(1, cfg.steps - start)
    progress = min(1.0, (step - start) / span)
    return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Run:
    """What the loop needs besides the model: data, config, where to write, how to report."""

    data: TokenData
    config: AdaptConfig
    out_dir: Path
    on_step: Callable[[dict[str, Any]], None] | None = None  # called on the main process after every step
    stop_after: int | None = None  # stop (as if killed) after this many optimizer steps: for tests
    place: Distributed | None = None  # this process's rank and world size; None: from the process group, if any
    force_resume: bool = False  # resume even when the data or the config differ from the checkpoint's
    val_data: TokenData | None = None  # held-out grids; None: ``config.val_fraction`` of ``data``, if any


@dataclass
class Best:
    """The best held-out evaluation of the current stage, and whether the stage stopped early."""

    nll: float | None = None  # FlashAR NLL (nats / token) at ``step``
    step: int | None = None
    bad: int = 0  # evaluations since the best one
    stopped: bool = False


@dataclass
class Position:
    """Where training stands (what a checkpoint records): the stage, steps taken in it and in total, the
    data sampler, the fingerprint of the base backbone training started from, and the stage's best
    held-out evaluation."""

    stage: int
    in_stage: int
    step: int
    sampler: Sampler
    base: str
    best: Best = field(default_factory=Best)


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def train_step(wrapped: nn.Module, optimizer: torch.optim.Optimizer, sampler: Sampler, run: Run, cfg: StageConfig,
               place: Distributed = SINGLE, stage: int = 1) -> dict[str, float]:
    """One optimizer step over the global batch (``batch_size`` samples in ``grad_accum`` micro-batches);
    this process computes its contiguous share of every micro-batch and the wrapper averages gradients."""
    config, data = run.config, run.data
    backbone = getattr(wrapped, "module", wrapped).backbone
    device = backbone.device
    index, dropped = sampler.next(config.batch_size, config.condition_dropout)  # (batch_size,), same everywhere
    noisy = sampler.noisy(data.codes[index], cfg.context_noise, backbone.codebook_size) if cfg.context_noise else None
    micro = config.batch_size // config.grad_accum
    mine = shard_rows(micro, place)
    totals: dict[str, float] = {}
    for i in range(config.grad_accum):
        rows = slice(i * micro + mine.start, i * micro + mine.stop)  # (micro / world_size,) of micro-batch i
        part = index[rows]
        codes = data.codes[part].to(device)
        inputs = None if noisy is None else noisy[rows].to(device)
        conditions = [data.conditions[j] for j in part.tolist()]
        with sync_context(wrapped, sync=i == config.grad_accum - 1):
            with _autocast(device, config.precision):
                loss, metrics = wrapped(codes, conditions, dropped[rows], cfg, stage, inputs)
            (loss / config.grad_accum).backward()
        for key, value in {"loss": loss.item(), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + value / config.grad_accum
    totals = mean_over_processes(totals, place, device)  # gate_std: the mean of per-process values
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**totals, "grad_norm": full_norm(norm)}


def adapt(backbone: Backbone, run: Run, resume: bool = False) -> Adapter | None:
    """Adapt ``backbone`` (trained in place in stage 2) and write the adapter into ``run.out_dir``.

    Returns the adapter, or None when ``run.stop_after`` stopped the run, and under FSDP (whose modules
    stay sharded across processes; read the written folder back with :func:`flashar.adapter.load_adapter`).
    """
    config, place = run.config, run.place or current()
    run = with_held_out(run)
    check_run(backbone, run, place)
    torch.manual_seed(config.seed)
    teacher = frozen_copy(backbone) if distills_in_stage2(config) else None  # the base weights, before any resume
    model = AdaptModel(backbone, FlashARHead(backbone, config.branch), teacher).train()
    metadata = new_metadata(backbone, model.head, run.data.grid)  # the base fingerprint, before stage 2
    prepare_lora(model, config)
    position, opt_state = _start(model, run, resume, metadata.backbone_fingerprint)
    out = ensure_writable_dir(run.out_dir)  # created only now that nothing above can fail on bad input
    with folder_lock(out) if place.is_main else contextlib.nullcontext():  # one run per folder
        if place.is_main:
            remove_leftovers(out)
            _cut_metrics(out / METRICS, position if resume else None)
        return _train(model, run, place, metadata, position, opt_state)


def _train(model: AdaptModel, run: Run, place: Distributed, metadata: AdapterMetadata, position: Position,
           opt_state: dict | None) -> Adapter | None:
    """Both stages from ``position``, then the adapter."""
    config, backbone = run.config, model.backbone
    sharded = config.strategy == "fsdp" and place.active
    if sharded:
        shard_fsdp(model, backbone.fsdp_units(backbone.layers) + backbone.fsdp_units(model.head.vertical_block))
    for stage in (1, 2):
        cfg = config.stage1 if stage == 1 else config.stage2
        if stage < position.stage or cfg.steps == 0 or (stage == 2 and config.stage2_mode == "none"):
            continue
        if stage != position.stage:  # a new stage: first step, fresh moments, no evaluation yet
            position.stage, position.in_stage, position.best, opt_state = stage, 0, Best(), None
        if not _train_stage(model, run, place, position, opt_state):
            return None
    return _finish(model, run, place, metadata, position, sharded)


def _start(model: AdaptModel, run: Run, resume: bool, base: str) -> tuple[Position, dict | None]:
    """A fresh position, or the newest checkpoint's (its weights loaded into the still unsharded modules)."""
    config = run.config
    if not resume:
        return Position(1, 0, 0, Sampler(len(run.data), config.seed), base), None
    checkpoint = latest_checkpoint(run.out_dir)
    if checkpoint is None and (run.out_dir / "config.json").is_file():
        raise FlashARError(
            f"{run.out_dir} holds a finished adapter and no checkpoints to resume from (a finished run removes "
            f"them unless --keep-checkpoints); choose a new --out")
    if checkpoint is None:
        raise FlashARError(
            f"--resume was given but {run.out_dir / 'checkpoints'} holds no checkpoint; run without --resume")
    weights, opt_tensors, state = load_checkpoint(checkpoint)
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{checkpoint / 'state.json'} is not a checkpoint state; delete {checkpoint} to resume from the previous "
            "one")
    if not _same_config(state.get("config"), config) and not run.force_resume:
        raise FlashARError(
            f"{checkpoint} was written with a different adaptation config; resume with the same options, "
            f"use a new --out, or pass --force-resume to continue with these options")
    if state.get("data_fingerprint", _fingerprint(run)) != _fingerprint(run) and not run.force_resume:
        raise FlashARError(
            f"{checkpoint} was written while training (or evaluating) on other data; resume with the same "
            f"--data/--codes/--val-data, use a new --out, or pass --force-resume to continue on this data")
    if state.get("backbone_fingerprint", base) != base:
        raise CheckpointError(
            f"{checkpoint} was written while adapting another backbone (fingerprint {state['backbone_fingerprint']}, "
            f"this one is {base}); resume with the checkpoint it started from or use a new --out")
    try:
        load_trainable_state(model, weights)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{checkpoint} does not fit this model ({str(exc).strip().splitlines()[0][:160]}); "
                              f"resume with the same backbone and options or use a new --out") from None
    try:
        sampler = Sampler(len(run.data), config.seed, **state["sampler"])
        best = Best(**state.get("best", {}))
        position = Position(int(state["stage"]), int(state["in_stage"]), int(state["step"]), sampler, base, best)
        return position, optimizer_state(opt_tensors, state)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{checkpoint / 'state.json'} is malformed ({type(exc).__name__}: {str(exc)[:80]}); "
                              f"delete {checkpoint} to resume from the previous one") from None


def _same_config(saved: dict | None, config: AdaptConfig) -> bool:
    """Whether a checkpoint's config is this one; the strategy may change (the state is global), and so may
    whether checkpoints are kept at the end."""
    def strip(values):
        return {k: v for k, v in (values or {}).items() if k not in ("strategy", "keep_checkpoints")}

    return strip(saved) == strip(json.loads(config.model_dump_json()))


def data_fingerprint(data: TokenData) -> str:
    """A hash of the token grids and their conditions, in order (what the sampler's position refers to)."""
    digest = hashlib.sha256(data.codes.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(json.dumps(data.conditions).encode())
    return digest.hexdigest()[:16]


def _fingerprint(run: Run) -> str:
    """The training data's fingerprint, and the held-out data's after a '+' when there is some."""
    held = "" if run.val_data is None else "+" + data_fingerprint(run.val_data)
    return data_fingerprint(run.data) + held


def _train_stage(model: AdaptModel, run: Run, place: Distributed, position: Position, opt_state: dict | None) -> bool:
    """Train ``position.stage`` to its last step; False when ``run.stop_after`` stopped the run."""
    config, stage = run.config, position.stage
    cfg = config.stage1 if stage == 1 else config.stage2
    optimizer = torch.optim.AdamW(stage_parameters(model, stage, config), weight_decay=config.weight_decay)
    if opt_state is not None:
        optimizer.load_state_dict(shard_optimizer_state(optimizer, opt_state))
    # DDP is rebuilt per stage: it registers the parameters that require grad when it is built
    wrapped = wrap_ddp(model, place, model.backbone.device) if config.strategy == "ddp" and place.active else model
    if run.val_data is not None and position.best.step is None:  # the stage's start
        _evaluate(model, run, place, position)
    while position.in_stage < cfg.steps and not position.best.stopped:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(position.in_stage, cfg)
        began = time.perf_counter()
        metrics = train_step(wrapped, optimizer, position.sampler, run, cfg, place, stage)
        position.in_stage, position.step = position.in_stage + 1, position.step + 1
        if place.is_main:
            _log(run, {"step": position.step, "stage": stage, "lr": optimizer.param_groups[0]["lr"], **metrics,
                       "seconds": round(time.perf_counter() - began, 4)})
        ends = position.in_stage == cfg.steps
        if run.val_data is not None and (position.in_stage % config.eval_every == 0 or ends):
            _evaluate(model, run, place, position)
        ends = ends or position.best.stopped
        if ends:
            _restore_best(model, run, position)
        if position.step % config.checkpoint_every == 0 or ends:
            _checkpoint(model, optimizer, run, place, position)
        if run.stop_after is not None and position.step >= run.stop_after:
            return False
    return True


def _checkpoint(
    model: AdaptModel, optimizer: torch.optim.Optimizer, run: Run, place: Distributed, position: Position) -> None:
    """Gather the full state (collectives under FSDP), write it from the main process, then wait for it."""
    keep = place.is_main
    weights = full_tensors(trainable_state(model, position.stage, run.config), keep)
    moments = full_optimizer_state(optimizer, keep)
    if keep:
        save_checkpoint(run.out_dir, position.step, weights, moments, {
            "stage": position.stage, "in_stage": position.in_stage, "step": position.step,
            "sampler": position.sampler.state(), "world_size": place.world_size, "backbone_fingerprint": position.base,
            "data_fingerprint": _fingerprint(run), "best": asdict(position.best),
            "config": json.loads(run.config.model_dump_json())})
    barrier(place)


def _evaluate(model: AdaptModel, run: Run, place: Distributed, position: Position) -> None:
    """Held-out NLL per token of the FlashAR decoder and the raster model; log it, keep the best weights,
    count evaluations without improvement. Every process evaluates every grid (so all decide alike)."""
    config, data, best = run.config, run.val_data, position.best
    device, began = model.backbone.device, time.perf_counter()
    parts = _held_out_passes(model, run, data, len(data))
    sums = [sum(part[i] for part in parts) for i in range(2)]
    tokens = data.codes.numel()
    values = mean_over_processes(
        {"val_nll_flashar": sums[0] / tokens, "val_nll_raster": sums[1] / tokens}, place, device)
    if best.nll is None or values["val_nll_flashar"] < best.nll:
        best.nll, best.step, best.bad = values["val_nll_flashar"], position.step, 0
        weights = full_tensors(trainable_state(model, position.stage, config), place.is_main)
        if place.is_main:
            save_best(run.out_dir, position.stage, position.step, weights)
        barrier(place)
    else:
        best.bad += 1
        best.stopped = config.patience > 0 and best.bad >= config.patience
    if place.is_main:
        _log(run, {"step": position.step, "stage": position.stage, "in_stage": position.in_stage, **values,
             "best_step": best.step, "stopped_early": best.stopped, "seconds": round(time.perf_counter() - began, 4)})


def _held_out_passes(model: AdaptModel, run: Run, data: TokenData, count: int, **kwargs) -> list:
    """``model``'s outputs for the first ``count`` grids of ``data``, a micro-batch at a time, in eval mode
    (``kwargs`` pick the output: NLL sums by default). Through ``forward``, so FSDP gathers the weights."""
    config = run.config
    batch = config.batch_size // config.grad_accum
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]), _autocast(model.backbone.device, config.precision):
        # draws nothing; fork_rng guards the stream anyway
        parts = [
            model(data.codes[start : min(start + batch, count)], data.conditions[start : min(start + batch, count)],
            **kwargs) for start in range(0, count, batch)]
    model.train()
    return parts


def _restore_best(model: AdaptModel, run: Run, position: Position) -> None:
    """End a stage with the weights of its best held-out evaluation (read on every process)."""
    if position.best.step is None or position.best.step == position.step:
        return
    from torch.distributed.tensor import DTensor

    weights = load_best(run.out_dir, position.stage, position.best.step)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        load_full_state(model, weights)  # FSDP: each process keeps its shard of the full tensors
    else:
        load_trainable_state(model, weights)


def with_held_out(run: Run) -> Run:
    """``run`` with its held-out data: ``val_data``, or ``val_fraction`` of the data split off by seed."""
    fraction = run.config.val_fraction
    if fraction and run.val_data is not None:
        raise FlashARError("pass either held-out data (--val-data) or --val-fraction, not both")
    if not fraction:
        return run
    if len(run.data) < 2:
        raise DataError(f"--val-fraction {fraction} needs at least 2 images to split, got {len(run.data)}")
    train, held = run.data.split(fraction, run.config.seed)
    return replace(run, data=train, val_data=held)


def distills_in_stage2(config: AdaptConfig) -> bool:
    return bool(config.stage2.distill_weight) and config.stage2.steps > 0 and config.stage2_mode != "none"


def frozen_copy(backbone: Backbone) -> Backbone:
    """A frozen copy of the base backbone: stage 2's distillation teacher."""
    import copy

    return copy.deepcopy(backbone).eval().requires_grad_(False)


def _cut_metrics(path: Path, position: Position | None) -> None:
    """A fresh run starts an empty log; a resumed one keeps what its checkpoint covers (see
    :func:`truncate_metrics`), less the start evaluation of a stage it had not reached."""
    truncate_metrics(path, position.step if position else -1)
    if position is None or not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("stage", 0) <= position.stage]
    if len(kept) != len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept))


def _log(run: Run, record: dict[str, Any]) -> None:
    with open(run.out_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
    if run.on_step:
        run.on_step(record)


def _fit_coupling(model: AdaptModel, run: Run, place: Distributed, position: Position) -> float:
    """The copula correlation of the trained decoder on the held-out grids (or the training grids), logged;
    0 when ``fit_coupling`` is off. Every process computes it (the forward passes may be sharded)."""
    config = run.config
    if not config.fit_coupling:
        return 0.0
    data = run.val_data if run.val_data is not None else run.data
    count, began = min(len(data), config.coupling_grids), time.perf_counter()
    parts = _held_out_passes(model, run, data, count, intervals=True)
    lo, hi = torch.cat([lo for lo, _ in parts]), torch.cat([hi for _, hi in parts])
    lag = model.head.config.row_lag
    fit = fit_coupling(lo, hi, lag)
    if place.is_main:  # the NLL per token of the grids under the coupled sampler, against independent draws
        nll = {f"nll_{name}": -grid_log_likelihood(lo, hi, rho, lag).sum().item() / lo.numel() for name, rho in
               (("independent", 0.0), ("coupled", fit.rho))}
        _log(run, {"step": position.step, "stage": position.stage, "diagonal_coupling": fit.rho,
             "coupling_gain_nats_per_pair": round(fit.gain, 6), "coupling_pairs": fit.pairs, **nll,
             "coupling_grids": count, "held_out": run.val_data is not None,
             "seconds": round(time.perf_counter() - began, 4)})
    return fit.rho


def _finish(model: AdaptModel, run: Run, place: Distributed, metadata: AdapterMetadata, position: Position,
            sharded: bool) -> Adapter | None:
    """Write the adapter from the main process (after gathering FSDP shards); return it unless sharded."""
    config, keep = run.config, place.is_main
    mode = (
        "none" if position.stage < 2 or config.stage2_mode == "none" or config.stage2.steps == 0 else config.stage2_mode
    )
    weights_step = position.step if position.best.step is None else position.best.step  # _restore_best loaded it
    meta = metadata.model_copy(update={"stage": position.stage, "step": position.step, "weights_step": weights_step,
                                       "backbone_weights": mode,
                                       "lora_scaling": config.lora_alpha / config.lora_rank if mode == "lora" else None,
                                       "diagonal_coupling": _fit_coupling(model, run, place, position)})
    head = full_tensors(model.head.state_dict(), keep)
    backbone = full_tensors(model.backbone.state_dict(), keep) if mode == "full" else None
    lora = full_tensors(lora_state(model.backbone), keep) if mode == "lora" else None
    if keep:
        save_adapter(run.out_dir, meta, head, backbone, lora)
    barrier(place)
    if keep and not config.keep_checkpoints:
        remove_checkpoints(run.out_dir)
    if sharded:
        return None
    model.eval().requires_grad_(False)
    return Adapter(meta, model.head, model.backbone)


def check_run(backbone: Backbone, run: Run, place: Distributed = SINGLE) -> None:
    """Fail before any work on data or options that cannot train."""
    config = run.config
    if distills_in_stage2(config) and config.strategy == "fsdp" and place.active:
        raise FlashARError(
            "stage-2 distillation keeps a frozen copy of the backbone on every process, which --strategy fsdp "
            "is meant to avoid; use --strategy ddp or --stage2-distill-weight 0")
    shares = config.grad_accum * place.world_size
    if config.batch_size % shares:
        raise FlashARError(
            f"batch_size {config.batch_size} does not split into {config.grad_accum} micro-batch(es) on each of "
            f"{place.world_size} process(es); use a multiple of {shares}")
    check_config(config)
    _check_data(backbone, run.data)
    if config.branch.row_lag > run.data.grid[1]:
        raise DataError(
            f"--row-lag {config.branch.row_lag} exceeds the grid's width {run.data.grid[1]}; use a row lag of at most "
            f"the width (equal to it is raster order)")
    if run.val_data is not None:
        _check_data(backbone, run.val_data, "held-out ")
        if run.val_data.grid != run.data.grid:
            raise DataError(
                f"the held-out data forms {run.val_data.grid[0]}x{run.val_data.grid[1]} grids but the training data "
                f"{run.data.grid[0]}x{run.data.grid[1]}; use images of the same size (and the same --image-size)")


def check_config(config: AdaptConfig) -> None:
    """What a config alone shows cannot run: no training step, a missing optional package (checked by the
    CLI before the model loads and the data is tokenised)."""
    stage2 = config.stage2.steps if config.stage2_mode != "none" else 0
    if config.stage1.steps + stage2 == 0:
        raise FlashARError(
            "both adaptation stages have 0 steps, which would write an untrained adapter; set --stage1-steps "
            "and/or --stage2-steps")
    if uses_lora(config):
        require("peft", "lora")


def _check_data(backbone: Backbone, data: TokenData, which: str = "") -> None:
    if len(data) == 0:
        raise DataError(f"the {which}adaptation data holds no images; check --data (or --codes)")
    height, width = data.grid
    if height < 2 or width < 2:
        raise DataError(f"FlashAR needs a grid of at least 2x2 tokens, got {height}x{width}; use a larger --image-size")
    low, high = int(data.codes.min()), int(data.codes.max())
    if low < 0 or high >= backbone.codebook_size:
        raise DataError(
            f"the adaptation data holds token code {low if low < 0 else high}, outside this model's codebook "
            f"[0, {backbone.codebook_size}); extract the codes with the tokenizer this model was trained with")
    if backbone.condition_kind == "class":
        bad = [c for c in data.conditions if isinstance(c, bool) or not isinstance(c, int)
               or (backbone.num_classes is not None and not 0 <= c < backbone.num_classes)]
        if bad:
            raise DataError(
                f"this class-conditional backbone needs class ids in [0, {backbone.num_classes}) as labels, "
                f"got {bad[0]!r}; use a folder of class subfolders (or codes with matching labels)")
