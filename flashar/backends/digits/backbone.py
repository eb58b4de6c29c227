"""The digits backbone: LlamaGen's GPT (the same class and code) with the gray-level tokenizer."""

from __future__ import annotations


import torch

from flashar.backends.digits import WEIGHTS_DIR
from flashar.backends.llamagen.backbone import LlamaGenBackbone



class DigitsBackbone(LlamaGenBackbone):
    backend_id = "digits"
    # CFG 1.5: the best FID-digits (against the shifted held-out split) of raster samples among CFG 1, 1.5, 2 and 3
    # (benchmarks/digits_cfg.py, receipt benchmarks/results/digits_cfg.json)
    sampling_defaults = {"cfg_scale": 1.5, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    default_adapter = WEIGHTS_DIR / "flashar"
    metric = "fid-digits"

    def reference_images(self) -> torch.Tensor:
        """The held-out test split, shifted as the training data is, as uint8 images (N, 3, 16, 16)."""
        from flashar.backends.digits.data import held_out_reference

        codes, _ = held_out_reference()
        return (self.decode(codes) * 255).round().to(torch.uint8)
