"""Tiny random models written in the official formats, for tests (no hub access here)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flashar.backends.llamagen.backbone import LlamaGenBackbone
from flashar.backends.llamagen.model import GPTConfig
from flashar.backends.llamagen.tokenizer import VQConfig, VQModel

TINY_GPT = dict(dim=64, n_layer=3, n_head=4, multiple_of=32, vocab_size=64, num_classes=10)
TINY_VQ = dict(channels=32, ch_mult=(1, 2), z_channels=32, codebook_size=64, num_res_blocks=1)


def random_gpt(seed: int = 0, **overrides) -> LlamaGenBackbone:
    torch.manual_seed(seed)
    model = LlamaGenBackbone(GPTConfig(**{**TINY_GPT, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim > 1 else 0.05).add_(1.0 if p.ndim == 1 else 0.0)
    return model.eval()


def write_llamagen(folder: Path, seed: int = 0, layout: str = "model", **overrides) -> dict:
    """Write a tiny GPT as the official trainers do, its JSON config and a tiny VQ; return CLI options."""
    folder.mkdir(parents=True, exist_ok=True)
    model = random_gpt(seed, **overrides)
    state = model.state_dict()
    gpt_path = folder / ("gpt.safetensors" if layout == "safetensors" else "gpt.pt")
    if layout == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(gpt_path))
    else:
        torch.save({"model": state} if layout == "model" else state, gpt_path)
    (folder / "gpt.json").write_text(json.dumps({**TINY_GPT, **overrides}))
    torch.manual_seed(seed + 100)
    vq = VQModel(VQConfig(**TINY_VQ))
    torch.save({"model": vq.state_dict()}, folder / "vq.pt")
    (folder / "vq.json").write_text(json.dumps(TINY_VQ))
    return {"checkpoint": gpt_path, "config_file": folder / "gpt.json", "vq_checkpoint": folder / "vq.pt",
            "vq_config": folder / "vq.json"}


def cli_args(options: dict) -> list[str]:
    flags = {"config_file": "--model-config"}
    args = []
    for key, value in options.items():
        args += [flags.get(key, "--" + key.replace("_", "-")), str(value)]
    return args
