"""Tiny random models written in the official formats, for tests (no hub access here)."""

from __future__ import annotations

import atexit
import functools
import json
import lzma
import os
import shutil
import tempfile
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


def stripes(n: int = 24, grid: tuple[int, int] = (4, 4)):
    """Learnable token data: class c draws a grid whose rows repeat a class-specific pattern."""
    from flashar.adapt.data import TokenData

    gen = torch.Generator().manual_seed(0)
    conditions = [i % 4 for i in range(n)]
    codes = torch.stack([(torch.arange(grid[1]) * (c + 1) + torch.randint(0, 2, (grid[0], 1), generator=gen)) % 64
                         for c in conditions])
    return TokenData(codes.long(), conditions)


def write_class_folder(folder: Path, size: int = 8, per_class: int = 6, num_classes: int = 3) -> Path:
    """Random RGB images in one subfolder per class (0, 1, 2, ...)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in range(num_classes):
        (folder / str(label)).mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / str(label) / f"{i}.png")
    return folder


def cli_args(options: dict) -> list[str]:
    flags = {"config_file": "--model-config"}
    args = []
    for key, value in options.items():
        args += [flags.get(key, "--" + key.replace("_", "-")), str(value)]
    return args


# --- Emu3.5 ---------------------------------------------------------------------------------------

# The real Emu3.5 tokenizer files, kept in tests/data/emu35-tokenizer (README and LICENSE there): the vocabulary
# xz-compressed, the vision-token list generated. SHA-256 of the published files, which the restored ones must match.
EMU35_TOKENIZER_DATA = Path(__file__).resolve().parent / "data" / "emu35-tokenizer"
EMU35_TOKENIZER_SHA256 = {
    "emu3.tiktoken": "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
    "emu3_vision_tokens.txt": "f3c4f0aa4a971ff38ba4caf4c8e4a3968b4c938c5343579f3e64c4ce2d7659b1",
    "tokenizer_config.json": "da954ce34de8399a145221bec333e3d873f425e45febe7d8dff3a3fc6acc332d",
}
# Emu3.5's config.json fields, tiny sizes (reference/emu35_glm.md §12: real ids, decoupled head_dim, GQA).
TINY_EMU35 = {
    "architectures": ["Emu3ForCausalLM"], "model_type": "Emu3", "vocab_size": 282926, "hidden_size": 64,
    "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": None, "attention_dropout": 0.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
    "image_area": 1048576, "sliding_window": 4096, "max_window_layers": 28, "pad_token_id": 151643,
    "bos_token_id": 151849, "eos_token_id": 151850, "img_token_id": 151851, "boi_token_id": 151852,
    "eoi_token_id": 151853, "eol_token_id": 151846, "eof_token_id": 151847, "transformers_version": "4.48.2",
}
TINY_IBQ = {"ch": 32, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 1, "attn_resolutions": [4], "resolution": 64,
            "z_channels": 32, "in_channels": 3, "out_ch": 3, "codebook_size": 131072, "embed_dim": 8}


def emu35_vision_tokens() -> str:
    """The text of the published ``emu3_vision_tokens.txt``: three image markers, then one numbered visual
    token per code of the IBQ codebook (131,072), one per line."""
    markers = ["<|image token|>", "<|image start|>", "<|image end|>"]
    visual = [f"<|visual token {code:06d}|>" for code in range(131072)]
    return "".join(line + "\n" for line in markers + visual)


@functools.cache
def emu35_tokenizer_dir() -> Path:
    """A folder with the real tokenizer files as published (``emu3.tiktoken``, ``emu3_vision_tokens.txt``,
    ``tokenizer_config.json``), restored from tests/data once per process into a temporary folder."""
    folder, owner = Path(tempfile.mkdtemp(prefix="flashar-emu35-tokenizer-")), os.getpid()
    # Removed when the process that wrote it exits (not when a forked child that inherited the cache does).
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
    (folder / "emu3.tiktoken").write_bytes(lzma.decompress((EMU35_TOKENIZER_DATA / "emu3.tiktoken.xz").read_bytes()))
    (folder / "emu3_vision_tokens.txt").write_bytes(emu35_vision_tokens().encode())
    shutil.copy(EMU35_TOKENIZER_DATA / "tokenizer_config.json", folder)
    return folder


def emu35_tokenizer_files() -> list[Path]:
    """The three published tokenizer files, in :func:`emu35_tokenizer_dir`."""
    return [emu35_tokenizer_dir() / name for name in EMU35_TOKENIZER_SHA256]


def random_emu35_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights for every key of an Emu3.5 config (norm weights near 1), as the trainers publish them."""
    from flashar.backends.emu35.backbone import Emu35Backbone
    from flashar.backends.emu35.loader import qwen3_config

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Emu35Backbone(qwen3_config(config, "config.json")).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=generator)
        state[key] = (1.0 + 0.1 * value if len(shape) == 1 else value * (0.5 if "embed" in key else 0.15)).to(
            torch.bfloat16)
    return state


def write_two_shards(folder: Path, state: dict[str, torch.Tensor], first: tuple[str, ...]) -> None:
    """``state`` as Hugging Face writes it: two safetensors shards (keys starting with ``first`` in the
    first) and ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    keys = [k for k in state if k.startswith(first)]
    shards = {"model-00001-of-00002.safetensors": keys,
              "model-00002-of-00002.safetensors": [k for k in state if k not in keys]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(folder / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": {k: name for name, names in shards.items() for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_emu35(folder: Path, seed: int = 0, **overrides) -> dict:
    """A tiny Emu3.5 in the published layout: config.json, two bf16 shards + index, the real tokenizer files,
    and a tiny IBQ (config.json + model.safetensors) in ``folder/vq``; returns the backend options."""
    config = {**TINY_EMU35, **overrides}
    model_dir, vq_dir = folder / "emu35", folder / "vq"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    state = random_emu35_state(config, seed)
    write_two_shards(model_dir, state, first=("model.embed_tokens", "model.layers.0."))
    for path in emu35_tokenizer_files():
        shutil.copy(path, model_dir / path.name)
    write_ibq(vq_dir, seed + 100)
    return {"model_path": model_dir, "vq_path": vq_dir}


def random_ibq(seed: int = 0):
    from flashar.backends.emu35.tokenizer import IBQ, IBQConfig

    torch.manual_seed(seed)
    return IBQ(IBQConfig(**TINY_IBQ)).eval()


def write_ibq(folder: Path, seed: int = 0, layout: str = "safetensors") -> Path:
    """A tiny IBQ as published: config.json + model.safetensors, or config.yaml + model.ckpt ({"state_dict": ...})."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = random_ibq(seed).state_dict()
    if layout == "safetensors":
        (folder / "config.json").write_text(
            json.dumps({"model_type": "Emu3p5VisionVQ", "architectures": ["Emu3p5VisionVQModel"], "double_z": False,
            "dropout": 0.0, **TINY_IBQ}))
        save_file(state, str(folder / "model.safetensors"))
    else:
        dd = {k: v for k, v in TINY_IBQ.items() if k not in ("codebook_size", "embed_dim")}
        yaml = {"ddconfig": {**dd, "double_z": False, "dropout": 0.0}, "n_embed": TINY_IBQ["codebook_size"],
                "embed_dim": TINY_IBQ["embed_dim"], "beta": 0.25, "use_entropy_loss": False}
        (folder / "config.yaml").write_text(json.dumps(yaml))  # JSON is valid YAML
        torch.save({"state_dict": state}, folder / "model.ckpt")
    return folder


def write_emu35_flashar(folder: Path, model_path: Path, num_blocks: int, branch_layer: int, seed: int = 1,
                        **config_overrides) -> Path:
    """A FlashAR checkpoint of the tiny base at ``model_path`` in the released layout (lxazjk/Emu3.5-Image-FlashAR,
    written by the reference trainer's ``_write_hf_checkpoint_dir``): the whole ``Emuflashar`` state dict under its
    published names in two bf16 shards + index, ``config.json`` (``emu3_flashar``), ``checkpoint_meta.json``.

    The backbone is the base plus noise (a fine-tuned copy), the vertical blocks copies of layers [b, b+K) plus
    noise, and the gates are random (trained gates are not 0.5)."""
    from safetensors.torch import load_file

    base = {}
    for shard in sorted(model_path.glob("model-*.safetensors")):
        base.update(load_file(str(shard)))
    config = json.loads((model_path / "config.json").read_text())
    generator = torch.Generator().manual_seed(seed)
    noisy = lambda t, scale=0.02: (t.float() + scale * torch.randn(t.shape, generator=generator)).to(torch.bfloat16)
    state = {("backbone." + k[len("model."):]): noisy(v) for k, v in base.items() if k.startswith("model.")}
    state["horizontal_head.weight"] = noisy(base["lm_head.weight"])
    for j in range(num_blocks):
        source = f"model.layers.{branch_layer + j}."
        state.update(
            {f"vertical_block.{j}.{k[len(source) :]}": noisy(v) for k, v in base.items() if k.startswith(source)})
    dim = config["hidden_size"]
    width = max(64, dim // 8)
    state["vertical_norm.weight"] = noisy(torch.ones(dim), 0.1)
    state["vertical_head.weight"] = noisy(base["lm_head.weight"])
    for name, shape, scale in (("hv_gate_mlp.0.weight", (width, 2 * dim), 0.1),
                               ("hv_gate_mlp.2.weight", (1, width), 0.3), ("hv_gate_mlp.2.bias", (1,), 0.3),
                               ("hv_gate_corner.weight", (1, dim), 0.3), ("hv_gate_corner.bias", (1,), 0.3)):
        state[name] = noisy(torch.zeros(shape), scale)
    folder.mkdir(parents=True, exist_ok=True)
    write_two_shards(folder, state, first=("backbone.embed_tokens", "backbone.layers.0."))
    released = {"model_type": "emu3_flashar", "architectures": ["Emuflashar"], "format": "hf_safetensors",
                "format_version": 1, "base_model_name_or_path": str(model_path), "tokenizer_name_or_path": "",
                "vq_model_name_or_path": "", "torch_dtype": "bf16", "vocab_size": config["vocab_size"],
                "hidden_size": dim, "visual_token_offset": config["eoi_token_id"] + 1, "use_vertical_block": True,
                "vertical_layers": num_blocks, "vertical_start_layer": branch_layer, "backbone_config": config,
                **config_overrides}
    (folder / "config.json").write_text(json.dumps(released, indent=2))
    (folder / "checkpoint_meta.json").write_text(json.dumps({"format": "hf_safetensors", "global_step": 74000,
                                                             "epoch": None, "save_reason": "final"}))
    (folder / "configuration.json").write_text(json.dumps({"framework": "pytorch", "task": "text-to-image"}))
    return folder


def adapt_config(steps1: int = 3, steps2: int = 3, lr1: float = 3e-3, lr2: float = 1e-3, **overrides):
    """A tiny two-stage adaptation for the trainer tests: distillation and one warm-up step in stage 1, one flat step
    in stage 2, batches of 4 in two micro-batches, a checkpoint every 2 steps; ``overrides`` replace any field."""
    from flashar.config import AdaptConfig, StageConfig

    return AdaptConfig(**{"stage1": StageConfig(steps=steps1, lr=lr1, distill_weight=0.2, warmup_steps=1),
                          "stage2": StageConfig(steps=steps2, lr=lr2, flat_steps=1), "batch_size": 4, "grad_accum": 2,
                          "checkpoint_every": 2, **overrides})


def steps_logged(out: Path) -> list[int]:
    """The steps of an adaptation's training records (not the held-out evaluations or the coupling fit)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]
