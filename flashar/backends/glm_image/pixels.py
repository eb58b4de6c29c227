"""GLM-Image's pixel decoder: large-grid codes -> images through diffusers' own ``GlmImagePipeline``.

The published ``zai-org/GLM-Image`` folder is a diffusers pipeline folder. Besides the AR prior that flashar
runs itself, it holds the parts that make pixels:

    transformer/   GlmImageTransformer2DModel, the 7 B DiT
    vae/           AutoencoderKL (8x, 16 latent channels)
    scheduler/     FlowMatchEulerDiscreteScheduler
    text_encoder/  T5EncoderModel, the glyph encoder (it reads the quoted text of the prompt)
    tokenizer/     its byte-level tokenizer (ByT5)

flashar builds ``GlmImagePipeline`` from these with neither the AR model nor its processor, and calls it with
``prior_token_ids``, so the pipeline skips its own AR stage. Everything after that is diffusers' code: the
glyph conditioning, the flow-matching schedule, CFG on the DiT, the latent unpacking and the VAE decode.
flashar only upsamples the large grid 2x (nearest), as the pipeline does with the codes its AR model writes:
one 32-pixel code becomes four 16-pixel DiT patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flashar.errors import CheckpointError, MissingExtraError
from flashar.io import load_json

PARTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
MIN_DIFFUSERS = "0.42"  # the release these calls were written and tested against (0.42.1)


@dataclass(frozen=True)
class DitSettings:
    """How the DiT samples (``GlmImageOptions.dit_*``, which hold the defaults): flow steps, CFG scale, noise seed."""

    steps: int
    guidance_scale: float
    seed: int


def require_diffusers():
    """``GlmImagePipeline`` from an installed diffusers recent enough, else one line naming the pip command."""
    from packaging.version import Version

    fix = (
        f"run: pip install 'diffusers>={MIN_DIFFUSERS}' (part of flashar[glm_image]), or drop --out to keep tokens only"
    )
    try:
        import diffusers
    except ImportError:
        raise MissingExtraError(
            "writing GLM-Image pixels needs the Python package 'diffusers' (GLM-Image's DiT and VAE), "
            f"which is not installed; {fix}") from None
    if Version(diffusers.__version__) < Version(MIN_DIFFUSERS):
        raise MissingExtraError(f"writing GLM-Image pixels needs diffusers >= {MIN_DIFFUSERS} (GlmImagePipeline), but "
                                f"diffusers {diffusers.__version__} is installed; {fix}")
    from diffusers import GlmImagePipeline

    return GlmImagePipeline


def load_pipeline(root: Path, dtype: torch.dtype, device: torch.device):
    """``GlmImagePipeline`` from the published folder's DiT, VAE, scheduler and glyph encoder (no AR model)."""
    GlmImagePipeline = require_diffusers()
    missing = [f"{part}/" for part in PARTS if not (root / part).is_dir()]
    missing += [] if (root / "model_index.json").is_file() else ["model_index.json"]
    if missing:
        raise CheckpointError(f"GLM-Image pixels need the diffusers parts of the published folder, but {root} lacks "
            f"{', '.join(missing)}; download all of zai-org/GLM-Image, or drop --out to keep tokens only")
    classes = load_json(root / "model_index.json")
    parts = {part: _load_part(root, part, classes.get(part), dtype) for part in PARTS}
    pipeline = GlmImagePipeline(**parts, vision_language_encoder=None, processor=None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def _load_part(root: Path, part: str, named: list | None, dtype: torch.dtype):
    """One published part by the class ``model_index.json`` names for it, loaded strictly: a weight the
    class lacks, one it needs that the folder lacks, or one of another shape is an error, not a warning."""
    import importlib

    if not (isinstance(named, list) and len(named) == 2 and named[0] in ("diffusers", "transformers")):
        raise CheckpointError(f"{root / 'model_index.json'} names no diffusers or transformers class for {part!r} "
                              f"(got {named!r}); download all of zai-org/GLM-Image")
    cls = getattr(importlib.import_module(named[0]), named[1], None)
    if cls is None:
        raise CheckpointError(
            f"{root / 'model_index.json'} names {named[0]}.{named[1]} for {part!r}, which the installed "
            f"{named[0]} lacks; upgrade it")
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):  # tokenizer, scheduler: no weights
        return cls.from_pretrained(root / part)
    refuse = lambda found: CheckpointError(f"{root / part} does not hold the weights of {named[1]} ({found}); "
                                           f"re-download zai-org/GLM-Image")
    try:
        model, info = cls.from_pretrained(root / part, dtype=dtype, output_loading_info=True)
    except (ValueError, RuntimeError) as exc:  # diffusers refuses a mis-shaped weight itself, at length
        raise refuse(str(exc).split(". ")[0].replace("Cannot load  because ", "")) from None
    problems = {
        kind.replace("_", " "): info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: sorted(map(str, keys)) for kind, keys in problems.items() if keys}
    if problems:
        raise refuse(
            "; ".join(
                f"{kind} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for kind, keys in problems.items())
        )
    return model.eval()


def upsample(codes: Tensor) -> Tensor:
    """Large grid (H, W) -> the DiT's prior tokens (1, 2H * 2W): each code repeated over a 2 x 2 block."""
    return codes.repeat_interleave(2, dim=0).repeat_interleave(2, dim=1).reshape(1, -1)


@torch.no_grad()
def decode(pipeline, codes: Tensor, captions: list[str], settings: DitSettings, device: torch.device) -> Tensor:
    """Codes (B, H, W) and their captions -> images (B, 3, 32H, 32W) in [0, 1], float32.

    One pipeline call per image, as GLM-Image is published (batch 1), each with noise from a CPU generator
    seeded ``settings.seed``: an image depends on its codes, caption and seed only, never on its batch."""
    images = []
    for grid, caption in zip(codes, captions):
        height, width = grid.shape
        out = pipeline(prompt=caption, prior_token_ids=upsample(grid.long()).to(device), height=32 * height,
                       width=32 * width, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                       generator=torch.Generator().manual_seed(settings.seed), output_type="pt")
        images.append(out.images[0].float())  # (3, 32H, 32W)
    return torch.stack(images)
