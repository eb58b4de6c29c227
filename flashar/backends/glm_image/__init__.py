"""The GLM-Image backend (zai-org/GLM-Image: a 9 B AR prior on transformers' GLM-Image modules).

Registered as an ordinary flashar plugin. Importing this package is cheap; transformers loads on use.
FlashAR accelerates the large grid (32 x 32 at 1024 x 1024) after the preview grid, as the official port
(``lxazjk/GLM-Image-FlashAR``) does; see docs/glm_image.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from flashar.config import Config, RuntimeConfig
from flashar.hookspecs import hookimpl
from flashar.plugins import BackendSpec


PIXELS = {"commands": ["generate", "compare"]}  # the DiT turns codes into pixels: nothing `adapt` runs


class GlmImageOptions(Config):
    model_path: Path = Field(...,
                             description="GLM-Image folder as published (zai-org/GLM-Image): vision_language_encoder/ "
                             "(config.json, generation_config.json, safetensors shards + index) and processor/.")
    preview: Literal["sample", "greedy"] = Field("sample",
        description="How the preview grid GLM-Image writes before the "
        "large grid is drawn: sampled with the model's generation_config values, "
        "or greedy. Drawn once per prompt, so every method sees the same preview.")
    preview_seed: int = Field(0, description="Seed of the preview grid's sampling (the large grid follows --seed).")
    dit_steps: int = Field(50, ge=1,
                           description="Flow-matching steps of GLM-Image's DiT when it turns the large grid into "
                           "pixels (--out; GlmImagePipeline's num_inference_steps).", json_schema_extra=PIXELS)
    dit_guidance_scale: float = Field(1.5, ge=0.0,
        description="Classifier-free guidance scale of the DiT (GlmImagePipeline's guidance_scale; 1 turns it off).",
        json_schema_extra=PIXELS)
    dit_seed: int = Field(0,
                          description="Seed of the DiT's starting noise, the same for every image: an image depends on "
                          "its codes, prompt and this seed only.", json_schema_extra=PIXELS)


def load(options: GlmImageOptions, runtime: RuntimeConfig):
    import torch

    from flashar.backends.glm_image.loader import load_glm_image
    from flashar.backends.glm_image.pixels import DitSettings

    dit = DitSettings(options.dit_steps, options.dit_guidance_scale, options.dit_seed)
    return load_glm_image(options.model_path, getattr(torch, runtime.dtype), runtime.device, dit, options.preview,
                          options.preview_seed)


@hookimpl
def flashar_register_backends(register):
    register(BackendSpec(
        id="glm_image",
        description="GLM-Image's AR prior on transformers' GLM-Image modules (preview grid, then the large grid).",
        options=GlmImageOptions,
        load=load,
        extra="glm_image",
        requires=("transformers",),
        condition_kind="text",
        sampling_defaults="temperature, top-k and top-p from the model's generation_config.json; CFG off",
    ))
