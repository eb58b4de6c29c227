"""Decoding machinery every method shares, written against the Backbone protocol only.

* :class:`Method` is the base of every registered decoding method: ``id``, a pydantic ``Options``, a
  ``generate`` that returns a :class:`Generation`, and compiling as an explicit constructor option.
* :func:`prefill` runs the prefix once into a static cache and returns the hidden states that predict
  cell (0, 0); :func:`key_mask` builds the boolean (B, 1, T, S) masks used over a static cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor

from flashar.backbone import Backbone, KVCache, Prefix
from flashar.compilation import compile_step, mark_dynamic_length
from flashar.config import CompileMode, Config, SamplingConfig
from flashar.sampling import cfg_mix


class NoOptions(Config):
    """This method has no options of its own."""


@dataclass
class Generation:
    codes: Tensor  # (B, H, W) int64 on CPU
    num_forward_passes: int  # sequential backbone forward passes, prefill included
    state_bytes: int = 0  # memory the method allocated for decoding (caches, buffers)


def state_nbytes(state: Any) -> int:
    """Bytes held by the tensors and caches of a method's state dataclass."""
    total = 0
    for value in vars(state).values():
        if isinstance(value, Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, KVCache):
            total += value.nbytes
        elif isinstance(value, Prefix):
            total += value.embeds.numel() * value.embeds.element_size()
    return total


class Method(ABC):
    """A decoding method: turns conditions into a token grid using only the Backbone protocol."""

    id: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type[Config]] = NoOptions
    requires_adapter: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, options: Config | None = None, *, compile: bool | CompileMode = False,
                 compile_backend: str | Callable = "inductor", adapter: Any = None, own_backbone: bool = False):
        """``compile``: True (or "default") compiles the step, "max-autotune" also autotunes its matmuls.
        ``own_backbone``: the caller lends ``backbone`` to this method alone, so the method may change it
        in place (e.g. load an adapter's backbone weights into it rather than into a copy)."""
        self.backbone = backbone
        self.options = options if options is not None else self.Options()
        self.adapter = adapter
        self.own_backbone = own_backbone
        self.compiled = bool(compile)
        self.static_shapes = self.compiled and backbone.device.type == "cuda"  # CUDA graphs replay fixed shapes
        mode = "default" if compile is True else compile
        self.autotuned = mode == "max-autotune"
        self.step = compile_step(self._step, backbone.device, compile_backend, mode) if compile else self._step

    def mark_dynamic(self, tensors, dim: int, longest: int, shortest: int = 2) -> None:
        """:func:`mark_dynamic_length` for this method's compiled step. With max-autotune, kernels are tuned
        for the longest size, not for the first call's (the shortest diagonal or window, which would leave
        the long steps that dominate a generation on kernels picked for a few rows)."""
        mark_dynamic_length(tensors, dim, longest, shortest, hint=longest if self.autotuned else None)

    def key_window(self, table: Tensor, length: int, bounds: tuple[int, int]) -> Tensor:
        """The first ``length`` entries of a per-slot table (S,): the cache slots a step's queries may see.

        A mask built over the window makes attention read only those slots (``write_kv``). With static
        shapes (CUDA graphs) the step gets the whole table and masks the rest; compiled elsewhere the window
        length is a dynamic dimension of the one graph, over ``bounds`` (the shortest and the longest window
        of a generation). No window may span all S slots (the last entry is never fed; FlashAR's last slot is
        scratch): it would be contiguous where shorter ones are not, and the compiler would specialise on it."""
        if self.static_shapes:
            return table
        window = table[:length]
        if self.compiled:
            self.mark_dynamic([window], 0, bounds[1], bounds[0])
        return window

    @abstractmethod
    def _step(self, *args, **kwargs):
        """The one static-shape, sync-free computation this method repeats (the compiled unit)."""

    @abstractmethod
    def generate(self, conditions: Sequence[Any], grid: tuple[int, int], sampling: SamplingConfig,
                 generator: torch.Generator) -> Generation:
        """Codes (B, H, W) for the conditions, drawing all randomness from ``generator``."""

    @staticmethod
    def num_forward_passes(height: int, width: int) -> int:
        """Sequential forward passes for an H x W grid (prefill included)."""
        raise NotImplementedError


def key_mask(key_valid: Tensor, key_ok: Tensor) -> Tensor:
    """(B, S) validity & (T, S) per-query visibility -> (B, 1, T, S) boolean attention mask."""
    return (key_valid[:, None, :] & key_ok[None, :, :])[:, None]


def prefill(backbone: Backbone, prefix: Prefix, cache: KVCache, tap: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Run the prefix into slots [0, P) of ``cache``.

    Returns the final-normed hidden state (B, D) and the tapped hidden state (B, D) at each row's last
    valid prefix position, the states that predict cell (0, 0).
    """
    length, device = prefix.length, prefix.embeds.device
    slots = torch.arange(length, device=device)
    key_ok = torch.zeros(length, cache.length, dtype=torch.bool, device=device)
    key_ok[:, :length] = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    key_valid = torch.ones(prefix.batch_size, cache.length, dtype=torch.bool, device=device)
    key_valid[:, :length] = prefix.valid
    mask = key_mask(key_valid, key_ok)[..., :length]  # attention reads the prefix slots only
    mask[:, 0, slots, slots] = True  # a padded position attends to itself, so no row is empty
    h, h_tap = backbone(prefix.embeds, prefix.positions, mask, cache, slots, tap=tap)
    rows = torch.arange(prefix.batch_size, device=device)
    return h[rows, prefix.last], (None if h_tap is None else h_tap[rows, prefix.last])


def image_key_valid(prefix: Prefix, cache_length: int) -> Tensor:
    """(B, S) bool: valid prefix slots and every slot after the prefix.

    When no prefix position is padded (class prefixes) it is (1, S): the masks built from it broadcast
    over the batch, so attention reads one (1, 1, T, S) mask instead of B copies. (One host read, in setup.)
    """
    rows = 1 if bool(prefix.valid.all()) else prefix.batch_size
    valid = torch.ones(rows, cache_length, dtype=torch.bool, device=prefix.valid.device)
    valid[:, : prefix.length] = prefix.valid[:rows]
    return valid


def guided(logits: Tensor, sampling: SamplingConfig, space: str = "logits", use_cfg: Tensor | None = None) -> Tensor:
    """Apply CFG to (2B, ..., V) rows [cond; uncond] when enabled; ``use_cfg`` (0-d bool) can switch it off."""
    if not sampling.use_cfg:
        return logits
    mixed = cfg_mix(logits, sampling.cfg_scale, space)
    if use_cfg is None:
        return mixed
    return torch.where(use_cfg, mixed, logits.chunk(2, dim=0)[0])
