"""The LlamaGen backend (FoundationVision/LlamaGen GPT-B ... GPT-3B, c2i and t2i, VQ-16 / VQ-8).

Registered as an ordinary flashar plugin. Importing this package is cheap; the model code loads on use.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from flashar.config import Config, RuntimeConfig
from flashar.hookspecs import hookimpl
from flashar.plugins import BackendSpec


class LlamaGenOptions(Config):
    checkpoint: Path = Field(
        ..., description="GPT checkpoint as published (.pt with a 'model' entry or a bare state dict) or .safetensors.")
    gpt_model: str | None = Field(None,
        description="Size preset as in the official scripts (GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B, ...); default: "
        "read off the checkpoint.")
    config_file: Path | None = Field(None, description="JSON file of GPTConfig fields, for a custom size.",
                                     json_schema_extra={"flag": "model-config"})
    vq_checkpoint: Path | None = Field(
        None, description="VQ tokenizer checkpoint (e.g. vq_ds16_c2i.pt); needed to write images and to tokenise data.")
    vq_model: str = Field("VQ-16", description="VQ preset: VQ-16 or VQ-8.")
    vq_config: Path | None = Field(
        None, description="JSON file of VQConfig fields, for a custom tokenizer (overrides --vq-model).")
    t5_path: Path | None = Field(None, description="Local FLAN-T5-XL folder, for text-conditional (t2i) models.")


def load(options: LlamaGenOptions, runtime: RuntimeConfig):
    import torch

    from flashar.backends.llamagen.loader import load_gpt, load_vq

    dtype = getattr(torch, runtime.dtype)
    vq = None
    if options.vq_checkpoint is not None:
        vq = load_vq(options.vq_checkpoint, options.vq_model, vq_config_from(options.vq_config))
    if vq is not None:
        vq.model.to(runtime.device)
    text = None
    if options.t5_path is not None:
        from flashar.backends.llamagen.text import T5TextEncoder

        text = T5TextEncoder(options.t5_path, runtime.device)
    model = load_gpt(options.checkpoint, options.gpt_model, options.config_file, tokenizer=vq, text_encoder=text)
    if vq is not None and vq.codebook_size != model.codebook_size:
        from flashar.errors import CheckpointError

        raise CheckpointError(
            f"the VQ tokenizer {options.vq_checkpoint} has {vq.codebook_size} codes but the GPT's vocabulary has "
            f"{model.codebook_size}; pass the --vq-checkpoint (and --vq-model/--vq-config) the GPT was trained with"
        )
    return model.to(device=runtime.device, dtype=dtype)


def vq_config_from(path: Path | None):
    if path is None:
        return None
    from flashar.config import validated
    from flashar.backends.llamagen.tokenizer import VQConfig
    from flashar.io import load_json

    return validated(VQConfig, load_json(path), f"VQ config {path}")


def _condition_kind(options: LlamaGenOptions) -> str | None:
    """Text with a text encoder; otherwise only the checkpoint knows (c2i, or a t2i model missing --t5-path)."""
    return "text" if options.t5_path is not None else None


# LlamaGen's sample_c2i.py defaults: CFG 4.0, top-k 2000 (the backbone's sampling_defaults)
SAMPLING = {"cfg_scale": 4.0, "top_k": 2000, "top_p": 1.0, "temperature": 1.0}


@hookimpl
def flashar_register_backends(register):
    register(BackendSpec(
        id="llamagen",
        description="LlamaGen GPT (c2i/t2i) with its VQ tokenizer, from the official checkpoints.",
        options=LlamaGenOptions,
        load=load,
        extra="llamagen",
        image_tokenizer="vq_checkpoint",
        condition_kind=_condition_kind,
        sampling_defaults=SAMPLING,
    ))
