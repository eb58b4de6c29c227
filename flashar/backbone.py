"""The Backbone protocol: the only thing decoding methods and the FlashAR parts know about a model.

A backend subclasses :class:`Backbone`. The contract of every member, with the Janus plugin's answers, is the
one table in ``docs/writing-a-backend-plugin.md``; each member's docstring here gives its shapes. In short, a
backend supplies the code range (``codebook_size``, ``code_offset``), the conditioning prefix (``prefix``),
positions for any set of grid cells in any order (``cell_positions``), and the layers: ``embed``, ``layers`` and
``layer_forward`` (one block over a chunk of tokens with explicit positions, a boolean mask and a static KV
cache written at explicit slots), ``norm``, ``output`` and ``logits``, the one place hidden states become code
logits. :meth:`Backbone.forward` runs the layers and can return the hidden state entering layer ``tap``.

Decoding methods call only the compute members (``Backbone``'s own); the descriptive ones that the CLI,
``compare`` and ``adapt`` read (ids, image sizes, sampling defaults, tokenizer, metrics, adapters,
``architecture``) form :class:`~flashar.card.BackendCard`, which ``Backbone`` inherits; the conformance suite decodes
with the card hidden. Attention inside ``layer_forward`` goes through :func:`attention`, which picks the
kernel measured fastest for the device, dtype and chunk size.

Shapes: B batch rows, T tokens in a chunk, S cache slots, D width, V codebook size.
Masks are boolean, ``True`` = may attend, shape (B, 1, T, S) with a cache or (B, 1, T, T) without.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashar.attention import attention  # noqa: F401 (backends call it as flashar.backbone.attention)
from flashar.card import BackendCard
from flashar.compilation import mark_static
from flashar.errors import FlashARError


@dataclass
class Prefix:
    """The conditioning prefix of a batch, already embedded."""

    embeds: Tensor  # (B, P, D)
    valid: Tensor  # (B, P) bool; padded positions are False
    positions: Tensor  # (P, ...) backend position encoding of the prefix positions
    last: Tensor  # (B,) int64 index of the last valid position (its output predicts cell (0, 0))

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]


class KVCache:
    """Static key/value buffers, one (B, H_kv, S, hd) pair per layer, written by index at explicit slots.

    Shapes never change, so a decode step that writes here compiles once. Each layer has buffers of its
    own (not views of one stacked tensor): a compiled step then writes a slot in place instead of copying
    the layer's whole cache. ``device`` may list one device per layer (a model split over GPUs). On CUDA
    the buffers are marked as static addresses so a CUDA graph can replay writes into them.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | Sequence[torch.device]):
        devices: list[Any] = list(device) if isinstance(device, (list, tuple)) else [device] * num_layers
        shape = (batch, num_kv_heads, length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]  # L x (B, H_kv, S, hd)
        self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        mark_static(*self.k, *self.v)

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        return self.k[i], self.v[i]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self) -> None:
        for buffer in self.k + self.v:
            buffer.zero_()


def write_kv(
    kv: tuple[Tensor, Tensor], slots: Tensor, k: Tensor, v: Tensor, length: int | None = None) -> tuple[Tensor, Tensor]:
    """Write k, v (B, H_kv, T, hd) at ``slots`` (T,); return the first ``length`` cache slots (B, H_kv, S', hd).

    Backends pass ``length = mask.shape[-1]``: a method that knows its queries see only a prefix of the
    cache hands over a mask that long, and attention then reads no slot beyond it (None: the whole cache).
    """
    k_cache, v_cache = kv
    k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
    return k_cache[:, :, :length], v_cache[:, :, :length]


M = TypeVar("M", bound=nn.Module)


def copy_module(module: M, meta: bool = False) -> M:
    """A deep copy of ``module``; with ``meta`` its tensors are shape-only (no memory is copied)."""
    if not meta:
        return copy.deepcopy(module)
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


class PublishedModules:
    """Mixin for a backbone that is a published transformers model: the protocol names ``layers``, ``norm``
    and ``output`` are views of the model's own modules, at the attribute paths ``ALIASES`` names, so the
    weights keep their published keys. Assigning a protocol name replaces the module at its published place
    (``nn.Module.__setattr__`` would register a second child and duplicate its keys in the state dict).
    List it before :class:`Backbone`: ``class MyBackbone(PublishedModules, Backbone)``."""

    ALIASES: dict[str, tuple[str, ...]] = {}  # protocol name -> attribute path in the published module tree

    def _at(self, path: Sequence[str]):
        owner = self
        for part in path:
            owner = getattr(owner, part)
        return owner

    layers = property(lambda self: self._at(self.ALIASES["layers"]))
    norm = property(lambda self: self._at(self.ALIASES["norm"]))
    output = property(lambda self: self._at(self.ALIASES["output"]))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.ALIASES:
            *path, leaf = self.ALIASES[name]
            return setattr(self._at(path), leaf, value)
        super().__setattr__(name, value)


class Backbone(nn.Module, BackendCard):
    """A pretrained raster-scan AR image model, seen through the protocol of the module docstring: the
    compute members below, which decoding methods and the FlashAR parts call, and the card it inherits."""

    codebook_size: int  # V: codes are [0, V)
    code_offset: int = 0  # token id of code 0 in the model's vocabulary
    # emitted after every row but the last (Emu3.5's EOL); the native sequence forces it
    row_end_token: int | None = None
    native_cfg: Literal["logits", "log_softmax"] = "logits"  # the space of the model's own CFG (raster honours it)

    layers: nn.ModuleList
    norm: nn.Module
    output: nn.Linear

    # --- geometry -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dim(self) -> int:
        return self.output.weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.output.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    # --- what a backend implements --------------------------------------------------------------
    @abstractmethod
    def prefix(self, conditions: Sequence[Any], *, cfg: bool, grid: tuple[int, int] | None = None,
               unconditional: Literal["native", "empty"] = "native") -> Prefix:
        """Embed the conditions (class ids or prompts) for an (H, W) ``grid``; the last valid position of each
        row predicts cell (0, 0). The grid is passed because some prefixes spell it out (Emu3.5's
        ``BOI "H*W" IMG``); backends whose prefix does not depend on it ignore it.

        With ``cfg`` the rows are ``[cond; uncond]`` (flashar's order, whatever the model's own), and
        ``unconditional`` picks the uncond rows: ``"native"`` is the model's own unconditional input (what
        its raster sampler uses), ``"empty"`` the conditional template around an empty condition (what FlashAR
        adapters are trained and decoded with); backends where the two coincide (a null class) ignore it.
        Native rows must compute what the model's own sampler computes for each condition alone (pad so that
        a shorter row keeps its relative positions, e.g. on the left with RoPE): raster with CFG is the
        baseline every method is measured against."""

    @abstractmethod
    def cell_positions(self, cells: Tensor, prefix_length: int, native: bool = False,
                       grid: tuple[int, int] | None = None) -> Tensor:
        """Position encoding (T, ...) of grid cells ``cells`` (T, 2) = (row, col) of an (H, W) ``grid``.

        ``native=True`` asks for the model's own raster layout, where a column index equal to W denotes
        the ``row_end_token`` slot; otherwise cells sit at prefix_length + row * W + col. Tokens may be fed in
        any order and keep their raster geometry; the tensor is opaque to methods except that its first axis
        indexes tokens.
        """

    @abstractmethod
    def embed(self, ids: Tensor) -> Tensor:
        """Token ids (B, T) of the model's vocabulary -> embeddings (B, T, D)."""

    @abstractmethod
    def layer_forward(self, layer: nn.Module, x: Tensor, positions: Tensor, mask: Tensor,
                      kv: tuple[Tensor, Tensor] | None, slots: Tensor | None) -> Tensor:
        """Run one block (of ``layers``, or a clone of one) on x (B, T, D); write its K/V at ``slots``.

        ``mask`` (B, 1, T, S') covers the first S' slots of the cache: attention reads only those
        (``write_kv(kv, slots, k, v, mask.shape[-1])``)."""

    # --- shared machinery -----------------------------------------------------------------------
    def forward(self, x: Tensor, positions: Tensor, mask: Tensor, cache: KVCache | None = None,
                slots: Tensor | None = None, tap: int | None = None) -> tuple[Tensor, Tensor | None]:
        """All layers over x (B, T, D) -> (final-normed hidden (B, T, D), hidden entering layer ``tap``)."""
        h_tap = None
        for i, layer in enumerate(self.layers):
            if i == tap:
                h_tap = x
            x = self.layer_forward(layer, x, positions, mask, None if cache is None else cache.layer(i), slots)
        if tap == self.num_layers:
            h_tap = x
        return self.norm(x), h_tap

    def logits(self, h: Tensor, head: nn.Linear | None = None) -> Tensor:
        """float32 logits over the codebook (..., V) from normed hidden states, with ``head`` or ``output``.

        ``head`` is a copy of ``output`` (same type and shape, FlashAR's vertical head). A backend whose head
        is more than one linear map (Janus: an MLP before the final projection) overrides this and ``dim``.
        """
        weight = (head or self.output).weight[self.code_offset : self.code_offset + self.codebook_size]
        return F.linear(h, weight).float()

    def code_ids(self, codes: Tensor) -> Tensor:
        """Codes in [0, V) -> token ids of the model's vocabulary."""
        return codes + self.code_offset

    def new_cache(self, batch: int, length: int, num_layers: int | None = None) -> KVCache:
        """A zeroed static cache for ``batch`` rows and ``length`` slots (rounded up to a multiple of 8)."""
        length = (length + 7) // 8 * 8
        return KVCache(num_layers or self.num_layers, batch, self.num_kv_heads, length, self.head_dim,
                       self.dtype, self.device)

    @property
    def num_kv_heads(self) -> int:
        raise NotImplementedError

    @property
    def head_dim(self) -> int:
        raise NotImplementedError

    def clone_layers(self, start: int, count: int, meta: bool = False) -> nn.ModuleList:
        """Independent copies of layers [start, start + count), for the FlashAR vertical branch.

        ``meta=True`` copies only the structure (parameters on the meta device), for loading weights into.
        """
        if start < 0 or count < 1 or start + count > self.num_layers:
            raise FlashARError(
                f"cannot clone layers [{start}, {start + count}) from a backbone with {self.num_layers} layers; "
                f"choose branch_layer + num_blocks <= {self.num_layers}"
            )
        return nn.ModuleList(copy_module(self.layers[i], meta) for i in range(start, start + count))

    def new_norm(self, meta: bool = False) -> nn.Module:
        """A fresh final-norm-like module with unit weights (the vertical branch's norm)."""
        norm = copy_module(self.norm, meta)
        if not meta:
            with torch.no_grad():
                norm.get_parameter("weight").fill_(1.0)
        return norm
