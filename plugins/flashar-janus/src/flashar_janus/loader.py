"""A transformers ``save_pretrained`` Janus folder -> :class:`~flashar_janus.backbone.JanusBackbone`.

The folder is what ``JanusForConditionalGeneration.save_pretrained`` (plus the tokenizer's and the
processor's ``save_pretrained``) writes, e.g. ``deepseek-community/Janus-Pro-1B``: ``config.json``,
``generation_config.json``, ``model.safetensors`` or shards with ``model.safetensors.index.json``, and
the tokenizer files. Loading is strict:

1. the headers of the safetensors files are checked key by key and shape by shape against a
   ``JanusForConditionalGeneration`` built on the ``meta`` device (``lm_head`` may be absent: it is
   tied to the text embedding);
2. only the image-generation tensors are read: the Llama model, ``generation_*`` and ``vqmodel``; the
   understanding tower (``vision_model``, ``aligner``) and ``lm_head`` are checked but never loaded;
3. the backbone and the VQ model are built on ``meta`` and filled by assignment (``strict=True``).

Key table (transformers -> flashar): ``model.language_model.X`` -> ``X``; ``model.generation_X`` ->
``generation_X``; ``model.vqmodel.X`` -> the VQ model's ``X``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flashar.sdk import CheckpointError, FlashARError, check_keys, file_in, load_json

TEXT_PREFIX, MODEL_PREFIX, VQ_PREFIX = "model.language_model.", "model.", "model.vqmodel."
UNUSED_PREFIXES = ("model.vision_model.", "model.aligner.", "lm_head.")
OFFICIAL_SAMPLING = {"cfg_scale": 5.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}  # generation_inference.py


def to_flashar_key(key: str) -> str | None:
    """A transformers checkpoint key -> the backbone's key (None for tensors the backbone does not hold)."""
    if key.startswith(TEXT_PREFIX):
        return key[len(TEXT_PREFIX) :]
    if key.startswith(MODEL_PREFIX + "generation_"):
        return key[len(MODEL_PREFIX) :]
    return None


def to_hf_key(key: str) -> str:
    """The backbone's key -> the transformers checkpoint key (inverse of :func:`to_flashar_key`)."""
    return MODEL_PREFIX + key if key.startswith("generation_") else TEXT_PREFIX + key


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a save_pretrained folder (one file, or the shards named by the index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(load_json(index).get("weight_map", {}).values()))
        return [file_in(folder, name, index) for name in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise CheckpointError(
        f"no model.safetensors or model.safetensors.index.json in {folder}; pass a folder written by "
        f"JanusForConditionalGeneration.save_pretrained"
    )


def read_shapes(files: list[Path]) -> dict[str, torch.Tensor]:
    """Key -> a shape-only ``meta`` tensor, from the safetensors headers (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes.update({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()})
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"could not read {path} as safetensors ({exc}); the file may be truncated or corrupt") from None
    return shapes


def read_tensors(files: list[Path], wanted) -> dict[str, torch.Tensor]:
    """The tensors whose key satisfies ``wanted(key)``, read to CPU."""
    from safetensors import safe_open

    tensors = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if wanted(k)})
    return tensors


def read_config(folder: Path):
    """The ``JanusConfig`` of the folder, checked to describe a Llama language model."""
    from transformers import JanusConfig

    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"no config.json in {folder}; pass a folder written by JanusForConditionalGeneration.save_pretrained")
    model_type = load_json(folder / "config.json").get("model_type")
    if model_type != "janus":
        raise CheckpointError(
            f"{folder}/config.json describes a '{model_type}' model, not 'janus'; pass a Janus or Janus-Pro folder")
    config = JanusConfig.from_pretrained(str(folder))
    if config.text_config.model_type != "llama":
        raise CheckpointError(
            f"{folder} has a '{config.text_config.model_type}' language model; flashar-janus supports Llama (Janus, "
            "Janus-Pro)")
    return config


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the full transformers model, built on ``meta``."""
    from transformers import JanusForConditionalGeneration

    with torch.device("meta"):
        model = JanusForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_vq(config, tensors: dict[str, torch.Tensor], folder: Path):
    from transformers.models.janus.modeling_janus import JanusVQVAE

    from flashar_janus.tokenizer import JanusVQTokenizer

    with torch.device("meta"):
        vq = JanusVQVAE(config.vq_config)
    state = {k[len(VQ_PREFIX) :]: v for k, v in tensors.items() if k.startswith(VQ_PREFIX)}
    check_keys({k: tuple(v.shape) for k, v in vq.state_dict().items()}, state, folder)
    vq.load_state_dict(state, strict=True, assign=True)
    return JanusVQTokenizer(vq)


def load_prompts(folder: Path, config, template: str):
    from transformers import AutoTokenizer

    from flashar_janus.prompt import PromptEncoder, special_ids

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not load the text tokenizer from {folder} ({str(exc).splitlines()[0][:120]}); "
                              f"save the tokenizer (or processor) into the folder") from None
    generation = _generation_json(folder)
    bos, boi, pad = special_ids(tokenizer, generation, config.text_config, str(folder))
    return PromptEncoder(tokenizer, bos, boi, pad, template)


def sampling_defaults(folder: Path) -> dict[str, Any]:
    """cfg scale and temperature from generation_config.json, else the official sampler's values."""
    generation = _generation_json(folder)
    values = dict(OFFICIAL_SAMPLING)
    for ours, theirs in (("cfg_scale", "guidance_scale"), ("temperature", "temperature"), ("top_k", "top_k"),
                         ("top_p", "top_p")):
        if generation.get(theirs) is not None:
            values[ours] = generation[theirs]
    return values


def _generation_json(folder: Path) -> dict[str, Any]:
    path = folder / "generation_config.json"
    return load_json(path) if path.is_file() else {}


def load_janus(folder: str | Path, template: str | None = None):
    """Strictly load the image-generation parts of a save_pretrained Janus folder (on CPU, file dtype)."""
    from flashar_janus import DEFAULT_TEMPLATE
    from flashar_janus.backbone import JanusBackbone

    folder = Path(folder)
    if not folder.is_dir():
        raise FlashARError(f"model folder not found: {folder}; pass --model-path DIR (a Janus save_pretrained folder)")
    config = read_config(folder)
    files = weight_files(folder)
    check_keys(expected_shapes(config), read_shapes(files), folder, optional=("lm_head.",))
    tensors = read_tensors(files, lambda k: not k.startswith(UNUSED_PREFIXES))
    with torch.device("meta"):
        backbone = JanusBackbone(config, sampling_defaults=sampling_defaults(folder))
    state = {to_flashar_key(k): v for k, v in tensors.items() if to_flashar_key(k) is not None}
    check_keys({k: tuple(v.shape) for k, v in backbone.state_dict().items()}, state, folder)
    backbone.load_state_dict(state, strict=True, assign=True)
    backbone.tokenizer = load_vq(config, tensors, folder)
    backbone.prompts = load_prompts(folder, config, template or DEFAULT_TEMPLATE)
    return backbone.eval()
