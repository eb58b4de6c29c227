"""What adaptation trains: the backbone plus its FlashAR parts, the loss of one micro-batch, and which
parameters each stage updates (reference/flashar_method.md §7).

Stage 1 trains the vertical branch, vertical head and gates with the backbone frozen; losses: fused CE
+ w_v * vertical CE + w_kd * KL from the frozen raster model to the vertical logits (T = 2) + w_gc * gate
entropy. Stage 2 trains everything jointly (the backbone fully, or LoRA factors through peft) with the
backbone at ``lr * backbone_lr_factor``; its optional distillation is a KL from a frozen copy of the raster
model to the horizontal logits, which keeps the adapted backbone's left-neighbour predictions near the
original model's (off by default). Every loss is a mean over equal-sized samples, so the mean of per-process
shard losses is the loss of the whole batch (what data-parallel training relies on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashar.backbone import Backbone, Prefix
from flashar.branch import FlashARHead
from flashar.config import AdaptConfig, StageConfig
from flashar.coupling import latent_intervals
from flashar.lora import inject_lora, lora_state
from flashar.teacher import (IGNORE, cross_entropy, distillation_kl, flashar_logits, horizontal_distillation_kl,
                             raster_logits, vertical_cross_entropy)


class AdaptModel(nn.Module):
    """Backbone + FlashAR parts; ``forward`` returns the stage's loss and metrics for one micro-batch."""

    def __init__(self, backbone: Backbone, head: FlashARHead, teacher: Backbone | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        # stage 2's frozen raster model; not a submodule: never trained, saved, sharded or wrapped by DDP
        object.__setattr__(self, "teacher", teacher)

    def forward(self, codes: Tensor, conditions: list, dropped: Tensor | None = None, cfg: StageConfig | None = None,
                stage: int = 1, inputs: Tensor | None = None, intervals: bool = False):
        """The loss and metrics of a stage for one micro-batch; without ``cfg`` the held-out NLL sums of
        :meth:`nll_sums` (evaluated through ``forward`` so FSDP's root hooks gather the weights).

        ``inputs`` are the grids the model reads when they differ from the targets ``codes`` (context noise):
        the cross-entropies skip the cells whose input token was replaced. ``intervals``: instead, the
        latent intervals of the held-out grids under the fused decoder (:func:`flashar.coupling.latent_intervals`)."""
        if intervals:
            return latent_intervals(self._fused(codes, conditions), codes)
        if cfg is None:
            return self.nll_sums(codes, conditions)
        inputs = codes if inputs is None else inputs
        targets = codes.masked_fill(inputs != codes, IGNORE)
        both = self.backbone.prefix(conditions, cfg=True, grid=tuple(codes.shape[1:]), unconditional="empty")
        prefix = dropout_prefix(both, dropped)  # the uncond rows FlashAR decodes with (methods/flashar.py)
        out = flashar_logits(self.backbone, self.head, prefix, inputs)
        ce = cross_entropy(out.fused, targets)
        loss, metrics = ce, {"ce": ce.item()}
        if cfg.aux_vertical_weight and codes.shape[1] > 1:
            aux = vertical_cross_entropy(out.vertical, targets)
            loss, metrics["aux_vertical"] = loss + cfg.aux_vertical_weight * aux, aux.item()
        if cfg.distill_weight and stage == 1:
            with torch.no_grad():  # the frozen raster model under its own causal mask is the teacher
                teacher = raster_logits(self.backbone, prefix, inputs)
            kd = distillation_kl(teacher, out.vertical, codes.shape[2], cfg.distill_temperature)
            loss, metrics["distill"] = loss + cfg.distill_weight * kd, kd.item()
        elif cfg.distill_weight:
            kd = horizontal_distillation_kl(self._teacher_logits(conditions, dropped, inputs),
                                            self.backbone.logits(out.h_left), out.kind, cfg.distill_temperature)
            loss, metrics["distill"] = loss + cfg.distill_weight * kd, kd.item()
        if cfg.gate_entropy_weight:
            gc = self.head.gate_entropy_loss(self.backbone, out.h_left, out.v_up, out.kind)
            loss, metrics["gate_entropy"] = loss + cfg.gate_entropy_weight * gc, gc.item()
        interior = out.gate[:, out.kind == 0]
        metrics["gate_mean"] = interior.mean().item() if interior.numel() else 0.5
        metrics["gate_std"] = interior.float().std().item() if interior.numel() > 1 else 0.0
        return loss, metrics

    @torch.no_grad()
    def _teacher_logits(self, conditions: list, dropped: Tensor, codes: Tensor) -> Tensor:
        """Raster logits (B, N, V) of the frozen copy of the base backbone, on its own prefix embeddings."""
        both = self.teacher.prefix(conditions, cfg=True, grid=tuple(codes.shape[1:]), unconditional="empty")
        return raster_logits(self.teacher, dropout_prefix(both, dropped), codes)

    @torch.no_grad()
    def nll_sums(self, codes: Tensor, conditions: list) -> tuple[float, float]:
        """Summed NLL (nats) of a batch of held-out grids (B, H, W) under their conditions, teacher-forced:
        under the fused FlashAR decoder in its anti-diagonal order, and under the raster model (the current
        backbone, causal mask)."""
        target = codes.flatten().to(self.backbone.device)
        fused = self._fused(codes, conditions)
        raster = raster_logits(self.backbone, self._prefix(codes, conditions), codes)
        return tuple(
            F.cross_entropy(logits.flatten(0, 1).float(), target, reduction="sum").item() for logits in (fused, raster))

    def _prefix(self, codes: Tensor, conditions: list) -> Prefix:
        """The FlashAR decoder's rows (for Emu3.5 padded as in training), for held-out evaluation."""
        return self.backbone.prefix(conditions, cfg=False, grid=tuple(codes.shape[1:]), unconditional="empty")

    def _fused(self, codes: Tensor, conditions: list) -> Tensor:
        return flashar_logits(self.backbone, self.head, self._prefix(codes, conditions), codes).fused


def dropout_prefix(both: Prefix, dropped: Tensor) -> Prefix:
    """Rows [cond; uncond] -> one row per sample: the unconditional one where ``dropped`` (CFG training)."""
    batch = both.batch_size // 2
    pick = torch.arange(batch, device=both.embeds.device) + batch * dropped.to(both.embeds.device).long()
    return Prefix(both.embeds[pick], both.valid[pick], both.positions, both.last[pick])


def uses_lora(config: AdaptConfig) -> bool:
    return config.stage2_mode == "lora" and config.stage2.steps > 0


def prepare_lora(model: AdaptModel, config: AdaptConfig) -> None:
    """Inject the stage-2 LoRA layers before training starts (frozen until stage 2; B = 0, so stage 1 sees
    the base model unchanged). Injecting up front lets FSDP shard them with their blocks; a seed of their
    own makes their initial values the same however many processes run."""
    if uses_lora(config) and not any("lora_" in n for n, _ in model.backbone.named_parameters()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            inject_lora(model.backbone, config.lora_rank, config.lora_alpha)


def stage_parameters(model: AdaptModel, stage: int, config: AdaptConfig) -> list[dict]:
    """AdamW param groups for a stage; sets requires_grad so the frozen parts get no gradients."""
    model.backbone.requires_grad_(False)
    model.head.requires_grad_(True)
    cfg = config.stage1 if stage == 1 else config.stage2
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr, "name": "flashar"}]
    if stage == 2 and config.stage2_mode == "full":
        model.backbone.requires_grad_(True)
        groups.append(
            {"params": list(model.backbone.parameters()), "lr": cfg.lr * cfg.backbone_lr_factor, "name": "backbone"})
    elif stage == 2 and config.stage2_mode == "lora":
        params = [p for n, p in model.backbone.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        groups.append({"params": params, "lr": cfg.lr * cfg.backbone_lr_factor, "name": "lora"})
    for group in groups:
        group["initial_lr"] = group["lr"]
    return groups


def trainable_state(model: AdaptModel, stage: int, config: AdaptConfig) -> dict[str, Tensor]:
    """The weights a checkpoint of ``stage`` holds (FSDP shards stay DTensors; the caller gathers them)."""
    state = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    if stage == 2 and config.stage2_mode == "full":
        state.update({f"backbone.{k}": v for k, v in model.backbone.state_dict().items()})
    elif stage == 2 and config.stage2_mode == "lora":
        state.update({f"lora.{k}": v for k, v in lora_state(model.backbone).items()})
    return state


def load_trainable_state(model: AdaptModel, weights: dict[str, Tensor]) -> None:
    """The inverse of :func:`trainable_state`, into the unsharded modules."""
    from flashar.lora import load_lora_state

    model.head.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("head.")})
    backbone = {k[9:]: v for k, v in weights.items() if k.startswith("backbone.")}
    if backbone:
        model.backbone.load_state_dict(backbone)
    lora = {k[5:]: v for k, v in weights.items() if k.startswith("lora.")}
    if lora:
        load_lora_state(model.backbone, lora)
