"""flashar-janus: DeepSeek's Janus and Janus-Pro text-to-image models as a flashar backend.

An out-of-tree flashar plugin: this package registers the ``janus`` backend through the ``flashar``
entry-point group (see ``pyproject.toml``). Importing it is cheap; transformers loads on use.

    flashar generate --backend janus --model-path Janus-Pro-1B --prompt "a red fox in the snow" --out out/
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from flashar.sdk import BackendSpec, Config, RuntimeConfig, hookimpl

__version__ = "0.1.0"

DEFAULT_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:"


class JanusOptions(Config):
    model_path: Path = Field(..., description="A Janus or Janus-Pro folder written by transformers' save_pretrained "
                             "(config.json, model*.safetensors, generation_config.json, tokenizer), e.g. Janus-Pro-1B.")
    prompt_template: str = Field(DEFAULT_TEMPLATE, description="Chat template around each prompt, with {prompt}; "
                                                              "BOS is prepended and <begin_of_image> appended.")


def load(options: JanusOptions, runtime: RuntimeConfig):
    import torch

    from flashar_janus.loader import load_janus

    if "{prompt}" not in options.prompt_template:
        from flashar.sdk import FlashARError

        raise FlashARError(f"--prompt-template must contain '{{prompt}}', got {options.prompt_template!r}")
    backbone = load_janus(options.model_path, options.prompt_template)
    backbone.tokenizer.model.to(runtime.device)
    return backbone.to(device=runtime.device, dtype=getattr(torch, runtime.dtype))


@hookimpl
def flashar_register_backends(register):
    register(BackendSpec(
        id="janus",
        description="DeepSeek Janus / Janus-Pro text-to-image (transformers save_pretrained folder).",
        options=JanusOptions,
        load=load,
        condition_kind="text",
        sampling_defaults="CFG, temperature, top-k and top-p from the model's generation_config.json",
    ))
