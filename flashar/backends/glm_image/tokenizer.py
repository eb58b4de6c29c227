"""GLM-Image's image tokenizer: pixels -> large-grid codes, and codes -> pixels where diffusers can.

* Encoding is the published vision-language encoder's own path (``zai-org/GLM-Image``'s image-to-image
  branch, and the official FlashAR trainer's ``pretokenize_glm``): the processor's image processor
  (resize to half size, CLIP normalisation, 16-pixel patches), ``GlmImageVisionModel``, then the VQ's
  ``quant_conv`` and nearest l2-normalised code (``GlmImageVQVAE.encode``). An H*32 x W*32 image gives the
  (H, W) large grid. The vision tower and VQ (``model.visual.*``, ``model.vqmodel.*`` of the checkpoint)
  are read from the shards on first use, so generating never holds them.
* Decoding runs GLM-Image's 7 B DiT and VAE through diffusers' own ``GlmImagePipeline`` (:mod:`.pixels`),
  loaded from the published folder on first use: the large grid, upsampled 2x, is denoised under the
  caption. Without diffusers this raises one line naming the pip command; flashar then works on tokens only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from flashar.backends.glm_image import pixels
from flashar.errors import FlashARError


class GlmImageTokenizer:
    """Codes <-> images for GLM-Image's large grid (see the module docstring)."""

    def __init__(self, config, shards: dict[str, Path], image_processor, root: Path, dtype: torch.dtype,
                 dit: pixels.DitSettings):
        """``dtype`` is the DiT's, VAE's and glyph encoder's (the encoder side always runs in float32)."""
        self.config, self.shards, self.image_processor, self.root = config, shards, image_processor, root
        self.dtype, self.dit = dtype, dit
        self.visual = self.vqmodel = self.pipeline = None
        self.device = torch.device("cpu")

    def to(self, device) -> GlmImageTokenizer:
        self.device = torch.device(device)
        for module in (self.visual, self.vqmodel, self.pipeline):
            if module is not None:
                module.to(self.device)
        return self

    def _load_encoder(self) -> None:
        from transformers.models.glm_image.modeling_glm_image import GlmImageVisionModel, GlmImageVQVAE

        from flashar.backends.emu35.loader import iter_shard_tensors

        with torch.device("meta"):
            visual, vqmodel = GlmImageVisionModel(self.config.vision_config), GlmImageVQVAE(self.config.vq_config)
        wanted = {k: k for k in self.shards if k.startswith(("model.visual.", "model.vqmodel."))}
        state = dict(iter_shard_tensors({k: self.shards[k] for k in wanted}))
        for prefix, module in (("model.visual.", visual), ("model.vqmodel.", vqmodel)):
            part = {k.removeprefix(prefix): v.float() for k, v in state.items() if k.startswith(prefix)}
            module.load_state_dict(part, strict=True, assign=True)  # keys and shapes were checked at load
            module.to(self.device).eval()
        self.visual, self.vqmodel = visual, vqmodel  # neither has buffers, so nothing is left on meta

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H*32, W*32) in [0, 1] -> large-grid codes (B, H, W)."""
        if self.visual is None:
            self._load_encoder()
        codes = []
        for image in images:
            height, width = image.shape[-2] // 32, image.shape[-1] // 32
            inputs = self.image_processor(images=[image.float().cpu()], do_rescale=False, return_tensors="pt")
            grid = inputs["image_grid_thw"]  # (1, 3) = (1, h, w) patches
            if tuple(grid[0, 1:].tolist()) != (height, width):
                raise FlashARError(
                    f"GLM-Image's image processor turns a {image.shape[-2]}x{image.shape[-1]} image into a "
                    f"{grid[0, 1]}x{grid[0, 2]} grid, not {height}x{width}; use sizes that are multiples of 32 "
                    "within its pixel limits (e.g. 1024x1024)")
            pixels = inputs["pixel_values"].to(self.device)
            features = self.visual(pixels, grid_thw=grid.to(self.device)).pooler_output  # (h*w, C)
            features = features.view(1, height, width, -1).permute(0, 3, 1, 2)  # (1, C, h, w)
            codes.append(self.vqmodel.encode(features).image_tokens.view(height, width))
        return torch.stack(codes).long().cpu()

    def decode(self, codes: Tensor, captions: list[str] | None = None) -> Tensor:
        """Large-grid codes (B, H, W) -> images (B, 3, H*32, W*32) in [0, 1] through the DiT and VAE.

        ``captions`` are the prompts the codes were drawn for; the DiT reads only their quoted text (glyphs),
        so without them it decodes as for a prompt without quotes."""
        captions = [""] * len(codes) if captions is None else list(captions)
        if len(captions) != len(codes):
            raise FlashARError(f"{len(codes)} code grids but {len(captions)} captions; pass one caption per grid")
        if self.pipeline is None:
            self.pipeline = pixels.load_pipeline(self.root, self.dtype, self.device)
        return pixels.decode(self.pipeline, codes, captions, self.dit, self.device)

