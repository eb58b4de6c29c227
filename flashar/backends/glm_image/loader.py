"""The published GLM-Image folder -> flashar modules (reference/emu35_glm.md §10.1).

``zai-org/GLM-Image`` is a diffusers pipeline folder; flashar reads two of its parts:

* ``vision_language_encoder/``: ``config.json`` (``model_type "glm_image"``), ``generation_config.json`` and
  the safetensors shards listed in ``model.safetensors.index.json`` (or one ``model.safetensors``). Every
  key and shape of the shard headers is checked against transformers' ``GlmImageForConditionalGeneration``
  built on ``meta``; then only the AR prior is read:

      model.language_model.X  ->  language_model.X   (embed_tokens, layers.{i}.*, norm)
      lm_head.weight          ->  lm_head.weight     (the 16,512-row vision vocabulary)
      model.visual.*, model.vqmodel.*  ->  the image tokenizer, read on first encode

* ``processor/``: transformers' ``GlmImageProcessor`` (tokenizer, chat template, image processor).

The DiT (``transformer/``), VAE (``vae/``), ``scheduler/`` and glyph encoder (``text_encoder/``, ``tokenizer/``)
belong to diffusers; the image tokenizer loads them through ``GlmImagePipeline`` on its first decode (:mod:`.pixels`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flashar.backends.glm_image.backbone import GlmImageBackbone
from flashar.backends.glm_image.pixels import DitSettings
from flashar.backends.glm_image.prompt import GlmImagePrompts
from flashar.backends.glm_image.tokenizer import GlmImageTokenizer
from flashar.errors import CheckpointError
from flashar.io import check_keys, load_json

VLE, PROCESSOR = "vision_language_encoder", "processor"
HINT = "pass the GLM-Image download folder (with vision_language_encoder/ and processor/) as --model-path"


def glm_image_config(folder: Path):
    """``vision_language_encoder/config.json`` -> a transformers ``GlmImageConfig`` (refusing other models)."""
    from transformers import GlmImageConfig

    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {folder}; {HINT}")
    raw = load_json(path)
    if raw.get("model_type") != "glm_image":
        raise CheckpointError(f"{path} is not a GLM-Image config (model_type {raw.get('model_type')!r}, expected "
                              f"'glm_image'); {HINT}")
    return GlmImageConfig.from_pretrained(folder)


def sampling_defaults(folder: Path) -> dict[str, Any]:
    """The model's own sampling values (``generation_config.json``), as flashar settings; no AR-stage CFG.

    ``top_k`` at or above the codebook means no top-k filtering (flashar samples codes only)."""
    path = folder / "generation_config.json"
    raw = load_json(path) if path.is_file() else {}
    values = {"temperature": 0.9, "top_k": 0, "top_p": 0.75} | {k: raw[k] for k in ("temperature", "top_p") if k in raw}
    if isinstance(raw.get("top_k"), int):
        values["top_k"] = raw["top_k"]
    return {"cfg_scale": 1.0, **values}


def load_glm_image(root: str | Path, dtype: torch.dtype, device: str | torch.device, dit: DitSettings,
                   preview: str = "sample", preview_seed: int = 0) -> GlmImageBackbone:
    """The backbone from a published GLM-Image folder: config, strict key/shape check, the AR prior's tensors.

    ``dit`` is how the image tokenizer's DiT samples when it makes pixels (read on first decode)."""
    from transformers import GlmImageForConditionalGeneration

    from flashar.backends.emu35.loader import iter_shard_tensors, shard_map, shard_shapes

    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"--model-path {root} is not a folder; {HINT}")
    vle = root / VLE
    config = glm_image_config(vle)
    shards = shard_map(vle, hint=HINT)
    with torch.device("meta"):
        reference = GlmImageForConditionalGeneration(config)
    check_keys({k: tuple(v.shape) for k, v in reference.state_dict().items()}, shard_shapes(shards), vle)
    del reference
    processor = load_processor(root / PROCESSOR)
    prompts = GlmImagePrompts(processor)
    if prompts.image_start != config.image_start_token_id:
        raise CheckpointError(
            f"the processor's {processor.bos_token!r} is token {prompts.image_start}, but the model's "
            f"image_start_token_id is {config.image_start_token_id}; use the processor published with the model")
    defaults = sampling_defaults(vle)
    if defaults["top_k"] >= config.vq_config.num_embeddings:
        defaults["top_k"] = 0
    with torch.device("meta"):
        model = GlmImageBackbone(
            config, prompts, preview=preview, preview_seed=preview_seed, sampling_defaults=defaults)
    names = {f"model.{k}" if k.startswith("language_model.") else k: k for k in model.state_dict()}
    state = {names[k]: v.to(device=device, dtype=dtype) for k, v in iter_shard_tensors({k: shards[k] for k in names})}
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rotary()
    model.tokenizer = GlmImageTokenizer(config, shards, processor.image_processor, root, dtype, dit).to(device)
    return model.eval()


def load_processor(folder: Path):
    from transformers import AutoProcessor

    if not (folder / "tokenizer_config.json").is_file():
        raise CheckpointError(f"no GLM-Image processor in {folder} (tokenizer_config.json is missing); {HINT}")
    try:
        return AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"could not read the GLM-Image processor in {folder} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120]}); {HINT}") from None
