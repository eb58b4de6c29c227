"""GLM-Image's AR prior as a flashar :class:`~flashar.backbone.Backbone` (reference/emu35_glm.md §10).

The modules are transformers' own: ``GlmImageTextModel`` (the GLM text-image transformer) and the
``lm_head`` of ``GlmImageForConditionalGeneration``, whose 16,512 rows are the vision vocabulary; the
state dict is theirs under ``language_model.*`` and ``lm_head.weight``. The vision tower and VQ (which
only encode images) live in the image tokenizer, outside the state dict. Layers run through
:meth:`GlmImageBackbone.layer_forward`, which calls each decoder layer's sub-modules (biased q/k/v,
partial M-RoPE, the four sandwich norms, the fused gate-up MLP) with an explicit boolean mask and a
static KV cache, so every method gets the KV cache the official FlashAR port lacks.

Protocol choices:

* ids: a code is its own token id (offset 0), in the text embedding and in ``lm_head``;
* the prefix is ``prompt(caption, H, W) + preview``: the processor's text-to-image prompt, then the preview
  grid the model writes before the large grid (16 x 16 for a square image). The preview is generated here,
  raster order on the KV cache, once per (caption, grid): greedy, or sampled with the model's own
  ``generation_config`` values from a generator seeded by ``preview_seed``. So every method decodes the
  large grid after the same preview, and ``--seed`` drives the large grid only;
* positions: 3-D M-RoPE (temporal, height, width) handed around as float32 (T, 2, rotary_dim) [cos; sin]
  rows. Text token t takes (t, t, t); a grid whose positions start at ``base`` puts cell (r, c) at
  (base, base + r, base + c), and the next grid starts max(h, w) later (``GlmImageModel.get_rope_index``).
  Rows are left-padded: a row's text, preview and large grid then shift by the same amount on all three
  axes, which attention cannot see (it only sees differences), so every row computes what it would alone;
* CFG: GLM-Image has none at the AR stage (its guidance lives in the DiT); with ``cfg_scale != 1`` the
  unconditional rows are the prompt around an empty caption followed by the conditional row's preview;
* there is no row separator: the raster baseline and FlashAR share the native layout.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn
from transformers.models.glm_image.modeling_glm_image import (
    GlmImageTextModel, GlmImageTextRotaryEmbedding, apply_rotary_pos_emb,
)

from flashar.backbone import Backbone, Prefix, PublishedModules, attention, write_kv
from flashar.backends.glm_image.prompt import GlmImagePrompts, preview_grid
from flashar.errors import FlashARError


class GlmImageBackbone(PublishedModules, Backbone):
    backend_id = "glm_image"
    ALIASES = {"layers": ("language_model", "layers"), "norm": ("language_model", "norm"), "output": ("lm_head",)}
    condition_kind = "text"
    code_offset = 0
    downsample = 32
    default_image_size = 1024
    native_cfg = "logits"
    default_branch = {"num_blocks": 4}  # the official port: K = 4 vertical blocks at b = L - K (36 of 40)
    tokenizer_hint = "pass the GLM-Image download folder as --model-path"

    def __init__(self, config, prompts: GlmImagePrompts | None = None, tokenizer=None,
                 preview: Literal["sample", "greedy"] = "sample", preview_seed: int = 0,
                 sampling_defaults: dict[str, Any] | None = None):
        """``config`` a transformers ``GlmImageConfig``; ``prompts`` the processor wrapper; ``tokenizer`` the
        image tokenizer (codes <-> pixels)."""
        super().__init__()
        self.config = config
        text = config.text_config
        self.language_model = GlmImageTextModel(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vision_vocab_size, bias=False)
        self.codebook_size = config.vq_config.num_embeddings
        self.prompts, self.tokenizer = prompts, tokenizer
        self.preview_mode, self.preview_seed = preview, preview_seed
        self.sampling_defaults = dict(sampling_defaults or {"cfg_scale": 1.0})
        self._previews: dict[tuple, Tensor] = {}

    def reset_rotary(self) -> None:
        """Real rotary inverse frequencies (a non-persistent buffer, still on ``meta`` after loading).

        Positions are computed from a float32 copy kept out of the module tree, so ``.to(bfloat16)``
        cannot round the frequencies."""
        text = self.config.text_config
        self.language_model.rotary_emb = GlmImageTextRotaryEmbedding(text).to(self.device)
        self.__dict__["_rotary"] = GlmImageTextRotaryEmbedding(text)

    @property
    def num_kv_heads(self) -> int:
        return self.config.text_config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        text = self.config.text_config
        return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads

    def architecture(self) -> dict[str, Any]:
        text = self.config.text_config
        keys = ("vocab_size", "vision_vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings")
        return {"backend": self.backend_id, **{k: getattr(text, k) for k in keys},
                "rope_parameters": dict(text.rope_parameters), "codebook_size": self.codebook_size,
                "image_start_token_id": self.config.image_start_token_id}

    # --- conditioning --------------------------------------------------------------------------
    def prefix(self, conditions: Sequence[Any], *, cfg: bool, grid: tuple[int, int] | None = None,
               unconditional: Literal["native", "empty"] = "native") -> Prefix:
        """Rows ``[pad... prompt(caption) preview]``, then (``cfg``) ``[pad... prompt("") preview]`` with each
        conditional row's preview; ``native`` and ``empty`` coincide (GLM-Image has no AR-stage CFG)."""
        grid = self._grid(grid)
        if max(grid) > 4 * min(grid):
            raise FlashARError(
                f"grid {grid[0]}x{grid[1]} has an aspect ratio above 4, which GLM-Image's processor refuses")
        prompts = self._prompts()
        captions = [self._caption(c) for c in conditions]
        texts = [prompts.ids(c, grid) for c in captions]
        previews = [self.preview_codes(c, grid) for c in captions]
        if cfg:
            texts += [prompts.ids("", grid)] * len(captions)
            previews += previews
        text_length = max(len(t) for t in texts)
        num_preview = previews[0].numel()
        ids = torch.full((len(texts), text_length + num_preview), prompts.pad, dtype=torch.long, device=self.device)
        valid = torch.ones_like(ids, dtype=torch.bool)
        for i, (text, preview) in enumerate(zip(texts, previews)):
            start = text_length - len(text)  # left padding
            valid[i, :start] = False
            ids[i, start:text_length] = torch.tensor(text, device=self.device)
            ids[i, text_length:] = preview
        positions = self.prefix_positions(text_length, grid)
        last = torch.full((len(texts),), ids.shape[1] - 1, dtype=torch.long, device=self.device)
        return Prefix(self.embed(ids), valid, positions, last)

    def prefix_positions(self, text_length: int, grid: tuple[int, int]) -> Tensor:
        """(P, 2, rotary_dim) rows of a prefix of ``text_length`` text tokens and the preview of ``grid``."""
        text = torch.arange(text_length, device=self.device).expand(3, -1)  # (3, T)
        preview = grid_position_ids(preview_grid(*grid), text_length, self.device)
        return self.mrope(torch.cat([text, preview], dim=1))

    def preview_codes(self, caption: str, grid: tuple[int, int]) -> Tensor:
        """The preview grid (h * w,) the model writes for ``caption`` before a large ``grid``; memoised."""
        key = (caption, tuple(grid), self.preview_mode, self.preview_seed)
        if key not in self._previews:
            with torch.no_grad():
                self._previews[key] = self._generate_preview(caption, grid)
        return self._previews[key]

    def _generate_preview(self, caption: str, grid: tuple[int, int]) -> Tensor:
        """Raster decoding of the preview on a static cache, as ``GlmImageForConditionalGeneration.generate``."""
        from flashar.config import SamplingConfig
        from flashar.decoding import prefill
        from flashar.sampling import make_generator, sample

        text = torch.tensor(self._prompts().ids(caption, grid), device=self.device)[None]  # (1, n)
        length = text.shape[1]
        height, width = preview_grid(*grid)
        num_cells = height * width
        positions = self.mrope(torch.cat([torch.arange(length, device=self.device).expand(3, -1),
                                          grid_position_ids((height, width), length, self.device)], dim=1))
        cache = self.new_cache(1, length + num_cells)
        prefix = Prefix(self.embed(text), torch.ones_like(text, dtype=torch.bool), positions[:length],
                        torch.tensor([length - 1], device=self.device))
        h, _ = prefill(self, prefix, cache)  # (1, D) at the image-start token
        greedy = self.preview_mode == "greedy"
        values = {k: v for k, v in self.sampling_defaults.items() if k in ("temperature", "top_k", "top_p")}
        sampling = SamplingConfig(**({"top_k": 1} if greedy else values))
        generator = make_generator(self.preview_seed, self.device)
        codes = torch.zeros(num_cells, dtype=torch.long, device=self.device)
        for j in range(num_cells):
            uniform = None if greedy else torch.rand(1, generator=generator, device=self.device)
            codes[j] = sample(self.logits(h), uniform, sampling)[0]
            if j + 1 < num_cells:
                slot = length + j
                mask = torch.ones(1, 1, 1, slot + 1, dtype=torch.bool, device=self.device)
                h, _ = self(self.embed(codes[j].view(1, 1)), positions[slot : slot + 1], mask, cache,
                            torch.tensor([slot], device=self.device))
                h = h[:, 0]
        return codes

    def decode(self, codes: Tensor, conditions: Sequence[Any] | None = None) -> Tensor:
        """Codes (B, H, W) -> images (B, 3, 32H, 32W) through the DiT + VAE, under the prompts ``conditions``."""
        captions = None if conditions is None else [self._caption(c) for c in conditions]
        return self._image_tokenizer().decode(codes, captions)

    def _caption(self, condition: Any) -> str:
        if not isinstance(condition, str):
            raise FlashARError(f"GLM-Image is text-conditional; pass prompts (--prompt TEXT), got {condition!r}")
        return condition

    def _grid(self, grid: tuple[int, int] | None) -> tuple[int, int]:
        if grid is None:
            raise FlashARError("GLM-Image's prompt, preview and positions depend on the grid size; "
                               "pass grid=(H, W), e.g. grid=backbone.grid(1024)")
        return int(grid[0]), int(grid[1])

    def _prompts(self) -> GlmImagePrompts:
        if self.prompts is None:
            raise FlashARError(
                "no GLM-Image processor is loaded; pass the GLM-Image folder (with processor/) as --model-path")
        return self.prompts

    # --- positions and layers -------------------------------------------------------------------
    def mrope(self, position_ids: Tensor) -> Tensor:
        """M-RoPE ids (3, T) -> (T, 2, rotary_dim) float32 [cos; sin] rows (rotate-half on the rotary part)."""
        probe = torch.empty(0, dtype=torch.float32, device=position_ids.device)
        cos, sin = self.__dict__["_rotary"](probe, position_ids[:, None, :])  # each (1, T, rotary_dim)
        return torch.stack([cos[0], sin[0]], dim=1)

    def cell_positions(self, cells: Tensor, prefix_length: int, native: bool = False,
                       grid: tuple[int, int] | None = None) -> Tensor:
        """Large-grid cells start max(h, w) after the preview, whose h * w tokens end the prefix."""
        height, width = preview_grid(*self._grid(grid))
        base = prefix_length - height * width + max(height, width)
        ids = torch.stack([torch.full_like(cells[:, 0], base), base + cells[:, 0], base + cells[:, 1]])
        return self.mrope(ids)

    def embed(self, ids: Tensor) -> Tensor:
        return self.language_model.embed_tokens(ids.to(self.device))

    def layer_forward(self, layer, x, positions, mask, kv, slots):
        """One GLM decoder layer over x (B, T, D) with a bool mask (B, 1, T, S'); K/V written after RoPE."""
        attn = layer.self_attn
        batch, length, _ = x.shape
        heads = (batch, length, -1, self.head_dim)
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(heads).transpose(1, 2)  # (B, H, T, hd)
        k = attn.k_proj(h).view(heads).transpose(1, 2)  # (B, H_kv, T, hd)
        v = attn.v_proj(h).view(heads).transpose(1, 2)
        table = positions.to(x.dtype)
        q, k = apply_rotary_pos_emb(q, k, table[None, :, 0], table[None, :, 1])  # rotates the first rotary_dim dims
        if kv is not None:
            k, v = write_kv(kv, slots, k, v, mask.shape[-1])  # (B, H_kv, S', hd)
        y = attention(q, k, v, mask, scale=attn.scaling)  # (B, H, T, hd)
        x = x + layer.post_self_attn_layernorm(attn.o_proj(y.transpose(1, 2).reshape(batch, length, -1)))
        return x + layer.post_mlp_layernorm(layer.mlp(layer.post_attention_layernorm(x)))

    def fsdp_units(self, blocks: nn.ModuleList) -> list[nn.Module]:
        """``layer_forward`` calls a block's projections and MLP, not the block: shard those."""
        return [m for block in blocks for m in (block.self_attn.q_proj, block.self_attn.k_proj,
                                                block.self_attn.v_proj, block.self_attn.o_proj, block.mlp)]

    def read_adapter(self, path, copy_backbone: bool):
        """A checkpoint of the official GLM-Image FlashAR trainer (``flashar_full_step*.pt``), see :mod:`.released`."""
        from flashar.backends.glm_image.released import is_released, load_released

        return load_released(path, self, copy_backbone) if is_released(path) else None


def grid_position_ids(grid: tuple[int, int], base: int, device) -> Tensor:
    """M-RoPE ids (3, h * w) of an (h, w) grid whose positions start at ``base``: (base, base + r, base + c)."""
    height, width = grid
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([torch.full_like(rows, base), base + rows, base + cols])
