"""Where Emu3.5's tensors live: one device, or the decoder layers split over several GPUs.

Emu3.5 is 34.1 B parameters (68.2 GB in bf16, spec §9.3): one H200 holds it with room to spare, an 80 GB H100
only just. ``device_map="auto"`` splits the 64 decoder layers into contiguous, equal runs over the visible
GPUs (pipeline style, one GPU busy at a time): the embedding sits with the first run, the final norm and
``lm_head`` with the last. Every tensor the protocol hands out (embeddings, hidden states, logits) lives on
the last device, ``backbone.device``; a layer moves its inputs to its own device and its output back, and
each layer's KV cache sits beside the layer.
"""

from __future__ import annotations

import re

import torch

from flashar.errors import FlashARError

LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


class Placement:
    """The device of every published key, for ``devices`` (one, or a split in layer order)."""

    def __init__(self, devices: list[torch.device]):
        self.devices = devices
        self.layer_devices: list[torch.device] = []

    @classmethod
    def from_options(cls, device: str, device_map: str | None) -> Placement:
        if device_map is None:
            return cls([torch.device(device)])
        count = torch.cuda.device_count()
        if count == 0:
            raise FlashARError("device_map 'auto' splits the layers over CUDA GPUs, but none is visible; "
                               "drop --device-map or run on a GPU machine")
        return cls([torch.device("cuda", i) for i in range(count)])

    def plan(self, num_layers: int) -> None:
        """Layer i goes to device floor(i * n / L): contiguous runs of (nearly) equal length."""
        n = len(self.devices)
        self.layer_devices = [self.devices[i * n // num_layers] for i in range(num_layers)]

    def device_of(self, key: str) -> torch.device:
        if match := LAYER_KEY.match(key):
            return self.layer_devices[int(match.group(1))]
        return self.devices[0] if key.startswith("model.embed_tokens") else self.devices[-1]

    @property
    def is_split(self) -> bool:
        return len(set(self.devices)) > 1

