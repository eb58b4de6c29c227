"""The two-stage FlashAR adaptation loop (reference/flashar_method.md §7).

Stage 1 trains the vertical branch, vertical head and gates with the backbone frozen (it keeps running
under the proximity mask); losses: fused CE + w_v * vertical CE + w_kd * KL to the frozen raster model
(T = 2) + w_gc * gate entropy. Stage 2 trains everything jointly (the backbone fully, or LoRA factors
through peft) with the backbone at ``lr * backbone_lr_factor``; distillation is off. Each stage has its
own AdamW (fresh moments) and its own warm-up / flat / cosine schedule.

The loop is deterministic on CPU: batches come from a seeded sampler whose position is checkpointed, so
``resume=True`` continues from the newest checkpoint and ends with the same adapter as an uninterrupted
run. Metrics go to ``metrics.jsonl``; the adapter (``config.json`` + ``model.safetensors``) is written
into the output folder at the end.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from flashar.adapt.checkpoint import latest_checkpoint, load_checkpoint, restore_optimizer, save_checkpoint
from flashar.adapt.data import TokenData
from flashar.adapter import Adapter, new_metadata
from flashar.backbone import Backbone, Prefix
from flashar.branch import FlashARHead
from flashar.config import AdaptConfig, StageConfig
from flashar.errors import FlashARError
from flashar.io import ensure_writable_dir
from flashar.lora import inject_lora, lora_state
from flashar.teacher import cross_entropy, distillation_kl, flashar_logits, raster_logits, vertical_cross_entropy


class Sampler:
    """Seeded, resumable batches over the dataset: a fresh permutation per epoch, plus condition dropout."""

    def __init__(self, size: int, seed: int, epoch: int = 0, cursor: int = 0):
        self.size, self.seed, self.epoch, self.cursor = size, seed, epoch, cursor
        self._order = self._permutation()

    def _permutation(self) -> Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))

    def next(self, count: int, drop_prob: float) -> tuple[Tensor, Tensor]:
        picked = []
        while len(picked) < count:
            if self.cursor == self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(count - len(picked), self.size - self.cursor)
            picked.append(self._order[self.cursor : self.cursor + take])
            self.cursor += take
        index = torch.cat(picked)
        rng = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 1_000_003 + self.cursor)
        return index, torch.rand(count, generator=rng) < drop_prob

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}


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


class AdaptModel(nn.Module):
    """Backbone + FlashAR parts; ``forward`` returns the stage's loss and metrics for one micro-batch."""

    def __init__(self, backbone: Backbone, head: FlashARHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, codes: Tensor, conditions: list, dropped: Tensor, cfg: StageConfig) -> tuple[Tensor, dict[str, float]]:
        both = self.backbone.prefix(conditions, cfg=True, grid=tuple(codes.shape[1:]), unconditional="empty")
        prefix = dropout_prefix(both, dropped)  # the uncond rows FlashAR decodes with (methods/flashar.py)
        out = flashar_logits(self.backbone, self.head, prefix, codes)
        ce = cross_entropy(out.fused, codes)
        loss, metrics = ce, {"ce": ce.item()}
        if cfg.aux_vertical_weight and codes.shape[1] > 1:
            aux = vertical_cross_entropy(out.vertical, codes)
            loss, metrics["aux_vertical"] = loss + cfg.aux_vertical_weight * aux, aux.item()
        if cfg.distill_weight:
            with torch.no_grad():  # the frozen raster model under its own causal mask is the teacher
                teacher = raster_logits(self.backbone, prefix, codes)
            kd = distillation_kl(teacher, out.vertical, codes.shape[2], cfg.distill_temperature)
            loss, metrics["distill"] = loss + cfg.distill_weight * kd, kd.item()
        if cfg.gate_entropy_weight:
            gc = self.head.gate_entropy_loss(self.backbone, out.h_left, out.v_up, out.kind)
            loss, metrics["gate_entropy"] = loss + cfg.gate_entropy_weight * gc, gc.item()
        interior = out.gate[:, out.kind == 0]
        metrics["gate_mean"] = interior.mean().item() if interior.numel() else 0.5
        metrics["gate_std"] = interior.float().std().item() if interior.numel() > 1 else 0.0
        return loss, metrics


def dropout_prefix(both: Prefix, dropped: Tensor) -> Prefix:
    """Rows [cond; uncond] -> one row per sample: the unconditional one where ``dropped`` (CFG training)."""
    batch = both.batch_size // 2
    pick = torch.arange(batch, device=both.embeds.device) + batch * dropped.to(both.embeds.device).long()
    return Prefix(both.embeds[pick], both.valid[pick], both.positions, both.last[pick])


@dataclass
class Run:
    """What the loop needs besides the model: data, config, where to write, how to report."""

    data: TokenData
    config: AdaptConfig
    out_dir: Path
    on_step: Callable[[dict[str, Any]], None] | None = None
    stop_after: int | None = None  # stop (as if killed) after this many optimizer steps: for tests


def stage_parameters(model: AdaptModel, stage: int, config: AdaptConfig) -> list[dict]:
    """AdamW param groups for a stage; sets requires_grad so the frozen parts get no gradients."""
    model.backbone.requires_grad_(False)
    model.head.requires_grad_(True)
    cfg = config.stage1 if stage == 1 else config.stage2
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr, "name": "flashar"}]
    if stage == 2 and config.stage2_mode == "full":
        model.backbone.requires_grad_(True)
        groups.append({"params": list(model.backbone.parameters()), "lr": cfg.lr * cfg.backbone_lr_factor, "name": "backbone"})
    elif stage == 2 and config.stage2_mode == "lora":
        params = [p for n, p in model.backbone.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        groups.append({"params": params, "lr": cfg.lr * cfg.backbone_lr_factor, "name": "lora"})
    for group in groups:
        group["initial_lr"] = group["lr"]
    return groups


def trainable_state(model: AdaptModel, stage: int, config: AdaptConfig) -> dict[str, Tensor]:
    state = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    if stage == 2 and config.stage2_mode == "full":
        state.update({f"backbone.{k}": v for k, v in model.backbone.state_dict().items()})
    elif stage == 2 and config.stage2_mode == "lora":
        state.update({f"lora.{k}": v for k, v in lora_state(model.backbone).items()})
    return state


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def train_step(model: AdaptModel, optimizer: torch.optim.Optimizer, sampler: Sampler, run: Run, cfg: StageConfig) -> dict[str, float]:
    """One optimizer step over ``batch_size`` samples in ``grad_accum`` micro-batches."""
    config, data, device = run.config, run.data, model.backbone.device
    index, dropped = sampler.next(config.batch_size, config.condition_dropout)
    micro = config.batch_size // config.grad_accum
    totals: dict[str, float] = {}
    for i in range(config.grad_accum):
        part = index[i * micro : (i + 1) * micro]
        codes = data.codes[part].to(device)
        conditions = [data.conditions[j] for j in part.tolist()]
        with _autocast(device, config.precision):
            loss, metrics = model(codes, conditions, dropped[i * micro : (i + 1) * micro], cfg)
        (loss / config.grad_accum).backward()
        for key, value in {"loss": loss.item(), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + value / config.grad_accum
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**totals, "grad_norm": float(norm)}


def _restore(model: AdaptModel, checkpoint: Path, config: AdaptConfig) -> tuple[dict, dict, dict]:
    weights, opt_tensors, state = load_checkpoint(checkpoint)
    if state.get("config") != json.loads(config.model_dump_json()):
        raise FlashARError(f"{checkpoint} was written with a different adaptation config; resume with the same options or use a new --out")
    if state["stage"] == 2 and config.stage2_mode == "lora":
        inject_lora(model.backbone, config.lora_rank, config.lora_alpha)
    model.head.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("head.")})
    backbone = {k[9:]: v for k, v in weights.items() if k.startswith("backbone.")}
    if backbone:
        model.backbone.load_state_dict(backbone)
    lora = {k[5:]: v for k, v in weights.items() if k.startswith("lora.")}
    if lora:
        from flashar.lora import load_lora_state

        load_lora_state(model.backbone, lora)
    return weights, opt_tensors, state


def adapt(backbone: Backbone, run: Run, resume: bool = False) -> Adapter | None:
    """Adapt ``backbone`` (trained in place in stage 2) and write the adapter into ``run.out_dir``."""
    config, out = run.config, ensure_writable_dir(run.out_dir)
    check_run(backbone, run)
    fingerprint = backbone.fingerprint()  # of the base weights, before stage 2 changes them
    torch.manual_seed(config.seed)
    model = AdaptModel(backbone, FlashARHead(backbone, config.branch)).train()
    sampler, stage, in_stage, step = Sampler(len(run.data), config.seed), 1, 0, 0
    checkpoint = latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        raise FlashARError(f"--resume was given but {out / 'checkpoints'} holds no checkpoint; run without --resume")
    opt_tensors = state = None
    if checkpoint is not None:
        _, opt_tensors, state = _restore(model, checkpoint, config)
        stage, in_stage, step = state["stage"], state["in_stage"], state["step"]
        sampler = Sampler(len(run.data), config.seed, **state["sampler"])
    for current in (1, 2):
        cfg = config.stage1 if current == 1 else config.stage2
        if current < stage or cfg.steps == 0 or (current == 2 and config.stage2_mode == "none"):
            continue
        if current == 2 and config.stage2_mode == "lora" and not any("lora_" in n for n, _ in backbone.named_parameters()):
            inject_lora(backbone, config.lora_rank, config.lora_alpha)
        optimizer = torch.optim.AdamW(stage_parameters(model, current, config), weight_decay=config.weight_decay)
        if state is not None and state["stage"] == current and in_stage < cfg.steps:
            restore_optimizer(optimizer, opt_tensors, state)
        in_stage = in_stage if current == stage else 0
        while in_stage < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(in_stage, cfg)
            began = time.perf_counter()
            metrics = train_step(model, optimizer, sampler, run, cfg)
            in_stage, step = in_stage + 1, step + 1
            record = {"step": step, "stage": current, "lr": optimizer.param_groups[0]["lr"], **metrics,
                      "seconds": round(time.perf_counter() - began, 4)}
            _log(out, record, run.on_step)
            if step % config.checkpoint_every == 0 or in_stage == cfg.steps:
                save_checkpoint(out, step, trainable_state(model, current, config), optimizer, {
                    "stage": current, "in_stage": in_stage, "step": step, "sampler": sampler.state(),
                    "config": json.loads(config.model_dump_json())})
            if run.stop_after is not None and step >= run.stop_after:
                return None
        stage = current
    return _finish(model, run, fingerprint, stage, step)


def _log(out: Path, record: dict[str, Any], on_step: Callable | None) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if on_step:
        on_step(record)


def _finish(model: AdaptModel, run: Run, fingerprint: str, stage: int, step: int) -> Adapter:
    config = run.config
    model.eval().requires_grad_(False)
    mode = "none" if stage < 2 or config.stage2_mode == "none" or config.stage2.steps == 0 else config.stage2_mode
    meta = new_metadata(model.backbone, model.head, run.data.grid, stage=stage, step=step).model_copy(update={
        "backbone_fingerprint": fingerprint, "backbone_weights": mode,
        "lora_scaling": config.lora_alpha / config.lora_rank if mode == "lora" else None})
    adapter = Adapter(meta, model.head, model.backbone)
    adapter.save_pretrained(run.out_dir, lora_state=lora_state(model.backbone) if mode == "lora" else None)
    return adapter


def check_run(backbone: Backbone, run: Run) -> None:
    """Fail before any work on data or options that cannot train."""
    config, data = run.config, run.data
    if len(data) == 0:
        raise FlashARError("the adaptation data holds no images")
    if config.stage2.distill_weight:
        raise FlashARError("distillation needs the frozen raster model and is only available in stage 1; set stage2.distill_weight to 0")
    if backbone.condition_kind == "class" and any(not isinstance(c, int) for c in data.conditions):
        raise FlashARError("this class-conditional backbone needs class-id labels (a folder of class subfolders)")
    height, width = data.grid
    if height < 2 or width < 2:
        raise FlashARError(f"FlashAR needs a grid of at least 2x2 tokens, got {height}x{width}")
