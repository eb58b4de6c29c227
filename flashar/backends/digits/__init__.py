"""The embedded default: handwritten digits (scikit-learn's bundled set) on a tiny LlamaGen GPT.

Everything ships inside the package: the raster weights, the FlashAR adapters produced from them by
``flashar adapt`` (``benchmarks/train_digits.py`` reproduces all of them) and the FID-digits feature CNN.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from flashar.config import Config, RuntimeConfig
from flashar.hookspecs import hookimpl
from flashar.plugins import BackendSpec, MetricSpec

WEIGHTS_DIR = Path(__file__).parent / "weights"  # the shipped checkpoint, adapter and reference set


class DigitsOptions(Config):
    checkpoint: Path = Field(WEIGHTS_DIR / "raster.safetensors",
                             description="Raster GPT weights (safetensors; the GPT config JSON sits beside it).")


def load(options: DigitsOptions, runtime: RuntimeConfig):
    import torch

    from flashar.backends.digits.backbone import DigitsBackbone
    from flashar.backends.digits.loader import load_raster
    from flashar.backends.digits.tokenizer import GrayTokenizer

    model = load_raster(options.checkpoint, DigitsBackbone, tokenizer=GrayTokenizer())
    return model.to(device=runtime.device, dtype=getattr(torch, runtime.dtype))


def _register_metric() -> str:
    from flashar.backends.digits.features import register

    return register()


def _classify(images):
    from flashar.backends.digits.features import classify_images

    return classify_images(images)


@hookimpl
def flashar_register_backends(register):
    register(
        BackendSpec(
            id="digits",
            description="Embedded default: scikit-learn's handwritten digits, 16x16 gray-level tokens, tiny LlamaGen "
            "GPT.",
            options=DigitsOptions,
            load=load,
            extra="digits",
            requires=("sklearn",),
            # = DigitsBackbone's (test_sampling_defaults)
            sampling_defaults={"cfg_scale": 1.5, "top_k": 0, "top_p": 1.0, "temperature": 1.0},
        )
    )


@hookimpl
def flashar_register_metrics(register):
    register(
        MetricSpec(id="fid-digits", description="FID/KID/IS/PRC on a digits CNN (FID-digits), plus class accuracy.",
        register=_register_metric, label="FID-digits", classify=_classify))
