"""Official LlamaGen files -> flashar modules (reference/llamagen.md §3, §9.3).

GPT checkpoints come as ``.pt`` with a ``model`` entry (DDP releases) or a bare state dict (FSDP
releases: XXL, 3B), or as safetensors. They are read with ``torch.load(weights_only=True)``, stripped of
wrapper prefixes and of the known non-parameter extras (``freqs_cis``, KV-cache buffers), checked key by
key and shape by shape against a model built on the ``meta`` device, then loaded strictly.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from flashar.backends.llamagen.backbone import LlamaGenBackbone
from flashar.backends.llamagen.model import PRESETS, GPTConfig
from flashar.backends.llamagen.tokenizer import VQ_PRESETS, VQConfig, VQModel, VQTokenizer
from flashar.errors import CheckpointError, FlashARError, UnknownNameError
from flashar.io import check_keys, load_json, load_weights, select_state_dict, strip_prefixes

# n_head cannot be read from shapes; the released widths map to one preset each (spec §9.3).
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1536: 24, 2048: 32, 2560: 40, 3200: 32, 4096: 32}


def read_gpt_state(path: str | Path) -> dict[str, torch.Tensor]:
    state = select_state_dict(load_weights(path), path, marker="tok_embeddings.weight")
    state = strip_prefixes(state)
    return {k: v for k, v in state.items() if k != "freqs_cis" and "kv_cache" not in k}


def infer_config(state: dict[str, torch.Tensor], preset: str | None = None, config_file: str | Path | None = None,
                 cls_token_num: int | None = None) -> GPTConfig:
    """The GPT config: from ``--model-config`` JSON, else a named preset, else read off the shapes."""
    if config_file is not None:
        try:
            return GPTConfig(**load_json(config_file))
        except ValueError as exc:
            raise FlashARError(f"invalid model config {config_file}: {exc}") from None
    vocab, dim = state["tok_embeddings.weight"].shape
    n_layer = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k)))
    is_t2i = "cls_embedding.cap_proj.fc1.weight" in state
    sizes = {"dim": dim, "n_layer": n_layer, "vocab_size": vocab, "model_type": "t2i" if is_t2i else "c2i"}
    if preset is not None:
        if preset not in PRESETS:
            raise UnknownNameError(f"unknown GPT model '{preset}'; choose one of {', '.join(PRESETS)}")
        sizes["n_head"] = PRESETS[preset]["n_head"]
    elif dim in HEADS_BY_WIDTH:
        sizes["n_head"] = HEADS_BY_WIDTH[dim]
    else:
        raise CheckpointError(f"cannot infer the number of heads for width {dim}; pass --gpt-model or --model-config")
    if is_t2i:
        sizes["caption_dim"] = state["cls_embedding.cap_proj.fc1.weight"].shape[1]
        sizes["cls_token_num"] = cls_token_num or 120
    else:
        rows = state["cls_embedding.embedding_table.weight"].shape[0]
        sizes["num_classes"] = rows - 1  # the last row is the null class
    return GPTConfig(**sizes)


def check_preset(cfg: GPTConfig, preset: str | None, path: str | Path) -> None:
    if preset is None:
        return
    expected = PRESETS[preset]
    if (cfg.dim, cfg.n_layer) != (expected["dim"], expected["n_layer"]):
        raise CheckpointError(
            f"{path} holds a model of width {cfg.dim} with {cfg.n_layer} layers, not {preset} "
            f"(width {expected['dim']}, {expected['n_layer']} layers); pass the matching --gpt-model"
        )


def build_gpt(cfg: GPTConfig, state: dict[str, torch.Tensor], path: str | Path, preset: str | None = None,
              backbone_cls: type[LlamaGenBackbone] = LlamaGenBackbone, **components) -> LlamaGenBackbone:
    """Build on ``meta``, check every key and shape, then load strictly by assignment."""
    with torch.device("meta"):
        model = backbone_cls(cfg, preset=preset, **components)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_gpt(path: str | Path, preset: str | None = None, config_file: str | Path | None = None,
             cls_token_num: int | None = None, **components) -> LlamaGenBackbone:
    state = read_gpt_state(path)
    if "tok_embeddings.weight" not in state:
        raise CheckpointError(
            f"{path} is not a LlamaGen GPT checkpoint (no tok_embeddings.weight); pass the GPT weights "
            f"with --checkpoint (a VQ tokenizer goes to --vq-checkpoint)")
    cfg = infer_config(state, preset, config_file, cls_token_num)
    check_preset(cfg, preset, path)
    return build_gpt(cfg, state, path, preset, **components)


def load_vq(path: str | Path, preset: str = "VQ-16", config: VQConfig | None = None) -> VQTokenizer:
    """The VQ tokenizer from an official ``vq_ds16_c2i.pt``-style file (or safetensors)."""
    if config is None:
        if preset not in VQ_PRESETS:
            raise UnknownNameError(f"unknown VQ model '{preset}'; choose one of {', '.join(VQ_PRESETS)}")
        config = VQ_PRESETS[preset]
    state = strip_prefixes(select_state_dict(load_weights(path), path, marker="quantize.embedding.weight"))
    with torch.device("meta"):
        model = VQModel(config)
    state.setdefault("quantize.codebook_used", torch.zeros(65536))  # a training statistic some exports omit
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    return VQTokenizer(model.float().eval())
