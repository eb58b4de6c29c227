"""Emu3.5(-Image) as a flashar :class:`~flashar.backbone.Backbone` (reference/emu35_glm.md).

The language model is transformers' ``Qwen3Model`` plus an untied ``lm_head``: Emu3.5's decoder is the same
architecture (QK-norm before rotate-half RoPE, GQA, decoupled head_dim, SwiGLU, no biases; the spec's
"Project decision"), so the backbone's state dict is the published checkpoint's (``model.layers.{i}...``,
``model.norm``, ``model.embed_tokens``, ``lm_head``). ``layers``, ``norm`` and ``output`` are views of
those modules. Layers run through :meth:`Emu35Backbone.layer_forward`, which calls each decoder layer's
submodules with an explicit boolean mask and a static KV cache, so one decode step compiles once.

Protocol choices (spec §4-§6):

* positions: 1-D RoPE over the whole sequence, handed around as a float32 (T, 2, head_dim) table of
  [cos; sin] rows. The prefix takes 0..P-1; cell (r, c) takes P + r*W + c in flashar's layout and
  P + r*(W+1) + c natively, where column W is the EOL slot (the image starts right after IMG, the last
  prefix token);
* the prefix is ``t2i template + BOI "H*W" IMG``, so it depends on the grid: ``prefix`` and
  ``cell_positions`` take ``grid=(H, W)``. Rows are [cond; uncond] (the reference runs uncond separately),
  padded with the pad id; every row's grid starts at the padded length P. The native rows (raster and the
  training-free methods, ``unconditional="native"``) are always left-padded, so a batched row computes
  exactly what Emu3.5's unbatched sampler computes (see :func:`pad_rows`); the FlashAR decoder's rows
  (``unconditional="empty"``) are padded on the ``prefix_padding`` side (right by default, as the released
  FlashAR code trains and decodes);
* only the visual rows [151854, 151854 + 131072) of ``lm_head`` are ever multiplied (``Backbone.logits``);
* native CFG mixes log-probabilities; the raster baseline forces EOL after every row but the last and
  stops when the grid is complete (the EOI the native model then emits is neither sampled nor fed);
* FlashAR: the uncond rows are the t2i template around an empty prompt (``unconditional="empty"``, the
  released decoder's choice), K = 4 by default, and the released checkpoint loads through
  :meth:`Emu35Backbone.read_adapter` (:mod:`.released`).
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn
from transformers import Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

from flashar.backbone import Backbone, KVCache, Prefix, PublishedModules, attention, write_kv
from flashar.backends.emu35 import SAMPLING
from flashar.backends.emu35.placement import Placement
from flashar.errors import FlashARError


class Emu35Backbone(PublishedModules, Backbone):
    tokenizer_hint = "pass --vq-path (the Emu3.5-VisionTokenizer folder)"
    backend_id = "emu35"
    ALIASES = {"layers": ("model", "layers"), "norm": ("model", "norm"), "output": ("lm_head",)}
    condition_kind = "text"
    code_offset = 151854
    codebook_size = 131072
    downsample = 16
    default_image_size = 512
    row_end_token = 151846  # EOL, <|extra_200|>
    native_cfg = "log_softmax"
    sampling_defaults = SAMPLING
    default_branch = {"num_blocks": 4}  # the released FlashAR recipe: K = 4 vertical blocks, b = L - K (60 of 64)

    def __init__(self, config, text=None, vision=None, text_max_length: int | None = 128,
                 prefix_padding: Literal["right", "left"] = "right", placement: Placement | None = None):
        """``config`` a transformers ``Qwen3Config``; ``text`` an :class:`Emu35TextTokenizer`; ``vision`` an
        :class:`IBQTokenizer`; ``placement`` where the layers live (default: wherever the module is moved)."""
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.text, self.tokenizer, self.text_max_length = text, vision, text_max_length
        self.prefix_padding, self.placement = prefix_padding, placement

    def reset_rotary(self) -> None:
        """Rebuild the rotary inverse frequencies (a non-persistent buffer) after loading onto real devices."""
        self.model.rotary_emb = Qwen3RotaryEmbedding(self.config).to(self.device)

    def new_cache(self, batch: int, length: int, num_layers: int | None = None) -> KVCache:
        """A static cache; with layers split over GPUs, each layer's buffers sit beside it (the last
        ``num_layers`` layers' devices for a branch cache, matching the default branch of the last K layers)."""
        if self.placement is None or not self.placement.is_split:
            return super().new_cache(batch, length, num_layers)
        devices = self.placement.layer_devices[-(num_layers or self.num_layers) :]
        return KVCache(
            len(devices), batch, self.num_kv_heads, (length + 7) // 8 * 8, self.head_dim, self.dtype, devices)

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    def architecture(self) -> dict[str, Any]:
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings")
        return {"backend": self.backend_id, **{k: getattr(self.config, k) for k in keys},
                "rope_parameters": dict(self.config.rope_parameters)}

    # --- conditioning (spec §4-§5) ------------------------------------------------------------------
    def prefix(self, conditions: Sequence[Any], *, cfg: bool, grid: tuple[int, int] | None = None,
               unconditional: Literal["native", "empty"] = "native") -> Prefix:
        """Rows ``[template(prompt) + BOI "H*W" IMG]`` for every prompt, then (``cfg``) the unconditional rows:
        Emu3.5's "no_text" template (``native``, its own sampler) or the t2i template around an empty prompt
        (``empty``, what the released FlashAR code decodes with, spec §5.1, emu35_glm.md §6). Native rows
        are left-padded whatever ``prefix_padding`` says: the raster baseline is Emu3.5's own sampler."""
        height, width = self._grid(grid)
        text = self._text()
        image = text.image_prefix(height, width)
        rows = [text.template(self._prompt(c), self.text_max_length) + image for c in conditions]
        if cfg:
            uncond = text.template(None if unconditional == "native" else "")
            rows += [uncond + image] * len(conditions)
        side = "left" if unconditional == "native" else self.prefix_padding
        ids, valid, last = pad_rows(rows, text.ids.pad, side)  # (B, P), (B, P), (B,)
        positions = self.rope(torch.arange(ids.shape[1], device=self.device))
        return Prefix(self.embed(ids.to(self.device)), valid.to(self.device), positions, last.to(self.device))

    def _prompt(self, condition: Any) -> str:
        if not isinstance(condition, str):
            raise FlashARError(f"Emu3.5 is text-conditional; pass prompts (--prompt TEXT), got {condition!r}")
        return condition

    def _grid(self, grid: tuple[int, int] | None) -> tuple[int, int]:
        if grid is None:
            raise FlashARError("Emu3.5's prefix and positions depend on the grid size; "
                               "pass grid=(H, W), e.g. grid=backbone.grid(512)")
        height, width = grid
        if not (0 < height < 1000 and 0 < width < 1000):
            raise FlashARError(
                f"grid {height}x{width} is outside what Emu3.5's size text can say; use 1..999 tokens per side")
        return height, width

    def _text(self):
        if self.text is None:
            raise FlashARError("no Emu3.5 text tokenizer is loaded; pass --model-path (or --tokenizer-path) "
                               "with emu3.tiktoken and emu3_vision_tokens.txt")
        return self.text

    def read_adapter(self, path, copy_backbone: bool):
        """The released Emu3.5 FlashAR checkpoint (``lxazjk/Emu3.5-Image-FlashAR``), see :mod:`.released`."""
        from flashar.backends.emu35.released import is_released, load_released

        return load_released(path, self, copy_backbone) if is_released(path) else None

    # --- positions and layers -------------------------------------------------------------------
    def rope(self, position_ids: Tensor) -> Tensor:
        """1-D position ids (T,) -> (T, 2, head_dim) float32 [cos; sin] rows (rotate-half layout)."""
        probe = torch.empty(0, dtype=torch.float32, device=position_ids.device)
        cos, sin = self.model.rotary_emb(probe, position_ids[None])  # each (1, T, hd)
        return torch.stack([cos[0], sin[0]], dim=1)

    def cell_positions(self, cells: Tensor, prefix_length: int, native: bool = False,
                       grid: tuple[int, int] | None = None) -> Tensor:
        _, width = self._grid(grid)
        stride = width + 1 if native else width  # native rows carry an EOL slot at column W
        return self.rope(prefix_length + cells[:, 0] * stride + cells[:, 1])

    def embed(self, ids: Tensor) -> Tensor:
        table = self.model.embed_tokens.weight
        return self.model.embed_tokens(ids.to(table.device)).to(self.device)

    def layer_forward(self, layer, x, positions, mask, kv, slots):
        """One Qwen3 decoder layer over x (B, T, D) with a bool mask (B, 1, T, S); K/V written after RoPE.

        Runs on the layer's device and returns on x's device (a no-op unless the layers are split)."""
        home, device = x.device, layer.input_layernorm.weight.device
        x, positions, mask = x.to(device), positions.to(device), mask.to(device)
        return self._layer(layer, x, positions, mask, kv, None if slots is None else slots.to(device)).to(home)

    def fsdp_units(self, blocks: nn.ModuleList) -> list[nn.Module]:
        """``_layer`` calls the projections and the MLP of a block, not the block: shard those (the norms
        are small and stay with the root)."""
        return [m for block in blocks for m in (block.self_attn.q_proj, block.self_attn.k_proj,
                                                block.self_attn.v_proj, block.self_attn.o_proj, block.mlp)]

    def _layer(self, layer, x: Tensor, positions: Tensor, mask: Tensor, kv, slots) -> Tensor:
        attn = layer.self_attn
        batch, length, _ = x.shape
        heads = (batch, length, -1, self.head_dim)
        h = layer.input_layernorm(x)
        q = attn.q_norm(attn.q_proj(h).view(heads)).transpose(1, 2)  # (B, H, T, hd); QK-norm before RoPE
        k = attn.k_norm(attn.k_proj(h).view(heads)).transpose(1, 2)  # (B, H_kv, T, hd)
        v = attn.v_proj(h).view(heads).transpose(1, 2)
        q, k = apply_rope(q, k, positions.to(x.dtype))
        if kv is not None:
            k, v = write_kv(kv, slots, k, v, mask.shape[-1])  # (B, H_kv, S', hd)
        y = attention(q, k, v, mask, scale=attn.scaling)  # (B, H, T, hd)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(batch, length, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    # --- images ---------------------------------------------------------------------------------


def pad_rows(rows: list[list[int]], pad_id: int, side: str) -> tuple[Tensor, Tensor, Tensor]:
    """Token rows -> ids (B, P) padded with ``pad_id``, valid (B, P) bool, last valid index (B,).

    Right padding (the released FlashAR code) starts every row's grid at the padded length P, so a shorter
    row sees a gap of P - len positions before its grid. Left padding shifts each row as a whole, and
    RoPE attention only sees position differences, so every row computes exactly what it would alone
    (Emu3.5's own sampler runs cond and uncond unbatched).
    """
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        start = length - len(row) if side == "left" else 0
        ids[i, start : start + len(row)] = torch.tensor(row)
        valid[i, start : start + len(row)] = True
    last = torch.tensor([length - 1 if side == "left" else len(r) - 1 for r in rows])
    return ids, valid, last


def apply_rope(q: Tensor, k: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q (B, H, T, hd) and k (B, H_kv, T, hd) by table (T, 2, hd) with transformers' rotate-half RoPE."""
    cos, sin = table[None, :, 0], table[None, :, 1]  # (1, T, hd); unsqueezed to (1, 1, T, hd) inside
    return apply_rotary_pos_emb(q, k, cos, sin)
