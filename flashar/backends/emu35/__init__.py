"""The Emu3.5 backend (BAAI Emu3.5 / Emu3.5-Image, 34 B, with the IBQ vision tokenizer).

Registered as an ordinary flashar plugin. Importing this package is cheap; transformers and tiktoken load on use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from flashar.config import Config, RuntimeConfig
from flashar.errors import CheckpointError
from flashar.hookspecs import hookimpl
from flashar.plugins import BackendSpec


class Emu35Options(Config):
    model_path: Path = Field(..., description="Emu3.5(-Image) folder as published: config.json, "
                             "model.safetensors.index.json and its bf16 shards (and the tokenizer files).")
    tokenizer_path: Path | None = Field(None, description="Folder with emu3.tiktoken and emu3_vision_tokens.txt; "
                                        "default: --model-path.")
    vq_path: Path | None = Field(None, description="Emu3.5-VisionTokenizer folder (config.json + model.safetensors, "
                                 "or config.yaml + model.ckpt); needed to write images and to tokenise data.")
    device_map: Literal["auto"] | None = Field(None, description="'auto' splits the decoder layers evenly over every "
        "visible GPU (embedding on the first, lm_head on the last); --device is then ignored.")
    text_max_length: int = Field(128, ge=0, description="Cut the prompt so the text template is at most this many "
                                 "tokens (FlashAR's training length); 0 = no limit.")
    prefix_padding: Literal["right", "left"] = Field("right",
        description="Pad the FlashAR decoder's shorter prompt rows "
        "(adapt and --method flashar) on the right (the released FlashAR code) "
        "or on the left (every row then computes what it would alone). Raster and "
        "the training-free methods always pad left: they are Emu3.5's own sampler.")


def load(options: Emu35Options, runtime: RuntimeConfig):
    import torch

    from flashar.backends.emu35.loader import load_language_model, load_vision, qwen3_config
    from flashar.io import load_json
    from flashar.backends.emu35.placement import Placement
    from flashar.backends.emu35.text import Emu35TextTokenizer

    if not options.model_path.is_dir():
        raise CheckpointError(
            f"--model-path {options.model_path} is not a folder; pass the Emu3.5(-Image) download folder")
    config_file = options.model_path / "config.json"
    qwen3_config(load_json(config_file), config_file)  # a wrong folder fails here, before the tokenizer is read
    placement = Placement.from_options(runtime.device, options.device_map)
    text = Emu35TextTokenizer(options.tokenizer_path or options.model_path)
    vision = None
    if options.vq_path is not None:
        vision = load_vision(options.vq_path)
        vision.model.to(placement.devices[-1])
    return load_language_model(options.model_path, getattr(torch, runtime.dtype), placement, text, vision,
                               options.text_max_length or None, options.prefix_padding)


# Emu3.5-Image's recommended t2i sampling (the backbone's sampling_defaults)
SAMPLING = {"cfg_scale": 5.0, "top_k": 5120, "top_p": 1.0, "temperature": 1.0}


@hookimpl
def flashar_register_backends(register):
    register(BackendSpec(
        id="emu35",
        description="Emu3.5(-Image) on transformers' Qwen3 modules, with its text tokenizer and IBQ vision tokenizer.",
        options=Emu35Options,
        load=load,
        extra="emu35",
        requires=("transformers", "tiktoken"),
        image_tokenizer="vq_path",
        condition_kind="text",
        sampling_defaults=SAMPLING,
    ))
