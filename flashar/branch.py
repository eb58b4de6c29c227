"""The FlashAR parts that wrap any backbone: vertical branch, vertical head and fusion gates.

FlashAR (arXiv 2605.09430; reference/flashar_method.md §3-§4). The backbone's own head is the horizontal
head: the final hidden state at (r, c) predicts (r, c+1). The vertical branch clones K backbone layers
[b, b+K), reads the hidden state entering layer b, runs the clones over image cells only (no prefix keys),
then a fresh RMSNorm and a vertical head (a copy of the output head): its output at (r, c) predicts
(r+1, c). A gate g in (0, 1) mixes the two logit vectors proposed for the same target cell:

    logits(r, c) = g * H(r, c-1) + (1 - g) * V(r-1, c)

First row: horizontal only (g = 1); first column: vertical only (g = 0). The corner (0, 0) mixes the
horizontal head on the last prefix state with the vertical head applied directly to that state's layer-b
hidden (the released Emu3.5 model's quirk, §4) under a separate corner gate.

Module names follow the released Emu3.5 FlashAR checkpoint: ``vertical_block``, ``vertical_norm``,
``vertical_head``, ``hv_gate_mlp``, ``hv_gate_corner``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flashar import geometry
from flashar.backbone import Backbone, KVCache, copy_module
from flashar.config import BranchConfig

# Kinds of target cell (§4).
INTERIOR, FIRST_ROW, FIRST_COL, CORNER = 0, 1, 2, 3


def cell_kinds(height: int, width: int) -> Tensor:
    """The kind of every cell in raster order, (H*W,) int64."""
    rows, cols = geometry.raster_cells(height, width).unbind(1)
    kind = torch.full((height * width,), INTERIOR)
    kind[(rows == 0) & (cols > 0)] = FIRST_ROW
    kind[(cols == 0) & (rows > 0)] = FIRST_COL
    kind[0] = CORNER
    return kind


def _zero_linear(d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias)
    nn.init.zeros_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class FlashARHead(nn.Module):
    """Vertical branch + vertical head + gates for one backbone (its horizontal head is ``backbone.output``)."""

    def __init__(self, backbone: Backbone, cfg: BranchConfig, meta: bool = False):
        """Clone the parts from ``backbone``; ``meta=True`` builds shapes only, to load weights into."""
        super().__init__()
        self.config = cfg
        self.branch_layer = resolve_branch_layer(backbone, cfg)
        self.vertical_block = backbone.clone_layers(self.branch_layer, cfg.num_blocks, meta=meta)
        self.vertical_norm = backbone.new_norm(meta=meta)
        self.vertical_head = copy_module(backbone.output, meta)
        factory = torch.device("meta") if meta else torch.device(backbone.device)
        with factory:
            self._make_gates(backbone, cfg)
        if not meta:
            self.to(dtype=backbone.dtype)

    def _make_gates(self, backbone: Backbone, cfg: BranchConfig) -> None:
        dim = backbone.dim
        if cfg.gate == "hidden":
            width = cfg.gate_hidden or max(64, dim // 8)
            self.hv_gate_mlp = nn.Sequential(nn.Linear(2 * dim, width, bias=False), nn.SiLU(), _zero_linear(width, 1))
            self.hv_gate_corner = _zero_linear(dim, 1)
        elif cfg.gate == "logits":
            width = cfg.gate_hidden or max(32, backbone.codebook_size // 512)
            first = nn.Linear(2 * backbone.codebook_size, width, bias=False)
            nn.init.normal_(first.weight, std=(2 * backbone.codebook_size) ** -0.5)
            self.hv_gate_mlp = nn.Sequential(first, nn.SiLU(), _zero_linear(width, 1))
        elif cfg.gate == "scalar":
            self.hv_mix = nn.Parameter(torch.zeros(()))  # sigmoid(0) = 0.5

    # --- the vertical branch --------------------------------------------------------------------
    def vertical(self, backbone: Backbone, tapped: Tensor, positions: Tensor, mask: Tensor,
                 cache: KVCache | None = None, slots: Tensor | None = None) -> Tensor:
        """Vertical blocks + norm over tapped hidden states of image cells (B, T, D) -> (B, T, D)."""
        x = tapped
        for i, block in enumerate(self.vertical_block):
            x = backbone.layer_forward(block, x, positions, mask, None if cache is None else cache.layer(i), slots)
        return self.vertical_norm(x)

    def vertical_logits(self, backbone: Backbone, v: Tensor) -> Tensor:
        """Code logits of the vertical head, through the backend's own logits map (``Backbone.logits``)."""
        return backbone.logits(v, self.vertical_head)

    # --- fusion -------------------------------------------------------------------------------------
    def gate(self, h_left: Tensor, v_up: Tensor, logits_h: Tensor, logits_v: Tensor, kind: Tensor) -> Tensor:
        """g (..., 1) in float32: weight on the horizontal logits, per target cell, before boundary rules."""
        gate = self.config.gate
        if gate == "fixed":
            return torch.full_like(logits_h[..., :1], 0.5)
        if gate == "scalar":
            return torch.sigmoid(self.hv_mix.float()).expand_as(logits_h[..., :1])
        if gate == "logits":
            pair = _normalised_pair(logits_h, logits_v).to(next(self.hv_gate_mlp.parameters()).dtype)
            return torch.sigmoid(self.hv_gate_mlp(pair).float())
        interior = self.hv_gate_mlp(torch.cat([h_left, v_up], dim=-1))
        corner = self.hv_gate_corner(h_left)
        return torch.sigmoid(torch.where(kind[..., None] == CORNER, corner, interior).float())

    def fuse(self, backbone: Backbone, h_left: Tensor, v_up: Tensor, kind: Tensor) -> tuple[Tensor, Tensor]:
        """Fused logits (..., V) float32 and gate (...,) for target cells of the given kinds.

        h_left: final hidden of the left neighbour (the last prefix state for the corner);
        v_up: vertical hidden of the upper neighbour (the raw layer-b prefix state for the corner).
        """
        logits_h = backbone.logits(h_left)
        logits_v = self.vertical_logits(backbone, v_up)
        g = self.gate(h_left, v_up, logits_h, logits_v, kind)
        mixed = g * logits_h + (1 - g) * logits_v
        kind = kind[..., None]
        fused = torch.where(kind == FIRST_ROW, logits_h, torch.where(kind == FIRST_COL, logits_v, mixed))
        gate = torch.where(kind == FIRST_ROW, 1.0, torch.where(kind == FIRST_COL, 0.0, g))
        return fused, gate[..., 0]

    def gate_entropy_loss(self, backbone: Backbone, h_left: Tensor, v_up: Tensor, kind: Tensor) -> Tensor:
        """1 - mean binary entropy (bits) of the interior gates, from detached features: trains the gate only."""
        h_left, v_up = h_left.detach(), v_up.detach()
        with torch.no_grad():  # only the logit-pair gate reads the logits
            needs_logits = self.config.gate == "logits"
            logits_h = backbone.logits(h_left) if needs_logits else h_left[..., :1].float()
            logits_v = self.vertical_logits(backbone, v_up) if needs_logits else logits_h
        g = self.gate(h_left, v_up, logits_h, logits_v, kind)[..., 0].clamp(1e-6, 1 - 1e-6)
        g = g[kind.expand_as(g) == INTERIOR]
        entropy = -(g * g.log() + (1 - g) * (1 - g).log()) / math.log(2.0)
        return 1 - entropy.mean() if g.numel() else g.sum()

    def new_cache(self, backbone: Backbone, batch: int, length: int) -> KVCache:
        """A static cache for the vertical blocks (image cells only)."""
        return backbone.new_cache(batch, length, num_layers=len(self.vertical_block))


def _normalised_pair(logits_h: Tensor, logits_v: Tensor) -> Tensor:
    """The logit-pair gate's features: detached, finite, row-centred, RMS-normalised, clipped (§3.4 [LG])."""
    pair = torch.cat([logits_h, logits_v], dim=-1).detach().float()
    pair = torch.nan_to_num(pair, nan=0.0, posinf=30.0, neginf=-30.0)
    pair = pair - pair.mean(-1, keepdim=True)
    pair = pair / pair.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    return pair.clamp(-6, 6)


def resolve_branch_layer(backbone: Backbone, cfg: BranchConfig) -> int:
    """b: the configured branch layer, or L - K."""
    from flashar.errors import FlashARError

    num_layers = backbone.num_layers
    b = num_layers - cfg.num_blocks if cfg.branch_layer is None else cfg.branch_layer
    if cfg.num_blocks > num_layers or b < 0 or b + cfg.num_blocks > num_layers:
        raise FlashARError(
            f"a vertical branch of K={cfg.num_blocks} blocks from layer b={b} does not fit a backbone with "
            f"{num_layers} layers; choose b + K <= {num_layers}"
        )
    return b
