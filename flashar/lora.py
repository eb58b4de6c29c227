"""LoRA for stage-2 adaptation through the peft library, and merging stored factors back on load.

Training injects peft LoRA layers into the backbone's linear layers (``peft.inject_adapter_in_model``);
an adapter stores only the factors (``<module>.lora_A.weight``, ``<module>.lora_B.weight``) and its
scaling alpha / r. Loading merges W + scaling * B @ A into a copy of the backbone without needing peft.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flashar.errors import CheckpointError, require


def inject_lora(backbone: nn.Module, rank: int, alpha: float, targets: list[str] | None = None) -> list[nn.Parameter]:
    """Add LoRA layers to the backbone's linear layers (all of them inside ``layers`` by default)."""
    require("peft", "lora")
    from peft import LoraConfig, inject_adapter_in_model

    if targets is None:
        targets = sorted(
            {name.split(".")[-1] for name, m in backbone.layers.named_modules() if isinstance(m, nn.Linear)})
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    inject_adapter_in_model(config, backbone)
    return [p for n, p in backbone.named_parameters() if "lora_" in n]


def lora_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors, keyed by the module they modify: ``layers.0.attention.wqkv.lora_A.weight``."""
    return {
        name.replace(".default", ""): p.detach().clone() for name, p in backbone.named_parameters() if "lora_" in name}


def merge_lora(backbone: nn.Module, factors: dict[str, torch.Tensor], scaling: float | None, path: Path) -> None:
    """W += scaling * B @ A for every stored pair; every pair must name an existing linear layer."""
    if scaling is None:
        raise CheckpointError(f"adapter {path} stores LoRA factors but no lora_scaling in its config.json")
    modules = dict(backbone.named_modules())
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in factors})
    with torch.no_grad():
        for name in targets:
            a, b = factors.get(f"{name}.lora_A.weight"), factors.get(f"{name}.lora_B.weight")
            layer = modules.get(name)
            if a is None or b is None or not isinstance(layer, nn.Linear):
                raise CheckpointError(
                    f"adapter {path} has LoRA factors for '{name}', which is not a linear layer of this backbone")
            layer.weight += (scaling * (b.float() @ a.float())).to(device=layer.weight.device, dtype=layer.weight.dtype)


def load_lora_state(backbone: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Copy stored factors into the injected LoRA parameters (names as written by :func:`lora_state`)."""
    params = {name.replace(".default", ""): p for name, p in backbone.named_parameters() if "lora_" in name}
    missing = sorted(set(params) - set(factors))
    if missing:
        raise CheckpointError(f"the checkpoint lacks LoRA factors for {missing[:3]}; resume with the same --lora-rank")
    with torch.no_grad():
        for name, value in factors.items():
            params[name].copy_(value)
