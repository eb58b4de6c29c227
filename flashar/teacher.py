"""Teacher-forced forwards over a whole grid: raster (causal) and FlashAR (proximity mask).

Both return, for every cell of the grid, the logits the model assigns to that cell's token given the
context its decoding order allows, so the negative log-likelihood of a held-out grid is one cross-entropy.
The FlashAR forward is the training forward of the adaptation (spec §6.1, §7.1) and, for a fixed grid,
gives exactly the logits the KV-cached anti-diagonal decoder computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flashar import geometry
from flashar.backbone import Backbone, Prefix
from flashar.branch import FIRST_COL, FlashARHead, cell_kinds


def grid_inputs(backbone: Backbone, prefix: Prefix, codes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[prefix | grid in raster order] embeddings (B, P+N, D), positions, and grid positions (N, ...)."""
    height, width = codes.shape[1:]
    ids = backbone.code_ids(codes.flatten(1).to(backbone.device))
    if ids.shape[0] != prefix.batch_size:  # CFG prefixes carry twice the rows; both halves see the same grid
        ids = ids.repeat(prefix.batch_size // ids.shape[0], 1)
    cells = geometry.raster_cells(height, width).to(backbone.device)
    cell_positions = backbone.cell_positions(cells, prefix.length, grid=(height, width))
    x = torch.cat([prefix.embeds, backbone.embed(ids)], dim=1)
    return x, torch.cat([prefix.positions, cell_positions]), cell_positions


def _at_last(h: Tensor, prefix: Prefix) -> Tensor:
    return h[torch.arange(h.shape[0], device=h.device), prefix.last]


def raster_logits(backbone: Backbone, prefix: Prefix, codes: Tensor) -> Tensor:
    """Logits (B, N, V) of every cell under the raster-causal mask: cell q is predicted from q-1."""
    height, width = codes.shape[1:]
    x, positions, _ = grid_inputs(backbone, prefix, codes)
    mask = geometry.sequence_mask(prefix.valid, geometry.causal_mask(height * width))
    h, _ = backbone(x, positions, mask)
    first = _at_last(h, prefix)[:, None]  # the last prefix state predicts cell 0
    return backbone.logits(torch.cat([first, h[:, prefix.length : -1]], dim=1))


@dataclass
class FlashAROutput:
    fused: Tensor  # (B, N, V) fused logits of every cell
    vertical: Tensor  # (B, N, V) vertical logits at (r, c), which predict (r+1, c)
    gate: Tensor  # (B, N) weight on the horizontal logits per target cell
    h_left: Tensor  # (B, N, D) features the gate read, for the entropy regulariser
    v_up: Tensor  # (B, N, D)
    kind: Tensor  # (N,) cell kinds


def flashar_logits(backbone: Backbone, head: FlashARHead, prefix: Prefix, codes: Tensor) -> FlashAROutput:
    """Teacher-forced FlashAR forward under the proximity mask (r'+c' <= r+c, or k*r'+c' <= k*r+c for the
    head's row lag k), spec §6.1 and §4."""
    batch, height, width = prefix.batch_size, *codes.shape[1:]
    num_cells = height * width
    x, positions, cell_positions = grid_inputs(backbone, prefix, codes)
    proximity = geometry.proximity_mask(height, width, head.config.row_lag).to(backbone.device)
    h, h_tap = backbone(x, positions, geometry.sequence_mask(prefix.valid, proximity), tap=head.branch_layer)
    image_mask = proximity[None, None].expand(batch, 1, num_cells, num_cells)
    v = head.vertical(backbone, h_tap[:, prefix.length :], cell_positions, image_mask)
    h_img = h[:, prefix.length :]
    left, up = (i.to(backbone.device) for i in geometry.neighbour_index(height, width))
    kind = cell_kinds(height, width).to(backbone.device)
    # Sources per target cell; the corner reads the last prefix state (final and layer-b), §4.
    h_left = torch.cat([h_img, _at_last(h, prefix)[:, None]], dim=1)[:, left]
    v_up = torch.cat([v, _at_last(h_tap, prefix)[:, None]], dim=1)[:, up]
    fused, gate = head.fuse(backbone, h_left, v_up, kind)
    return FlashAROutput(fused, head.vertical_logits(backbone, v), gate, h_left, v_up, kind)


IGNORE = -100  # a target cell the cross-entropies skip (F.cross_entropy's ignore_index)


def cross_entropy(logits: Tensor, codes: Tensor) -> Tensor:
    """Mean CE of logits (B, N, V) against codes (B, H, W) in raster order; cells holding IGNORE are skipped."""
    return F.cross_entropy(logits.flatten(0, 1), codes.flatten().to(logits.device), ignore_index=IGNORE)


def vertical_cross_entropy(vertical: Tensor, codes: Tensor) -> Tensor:
    """Auxiliary CE of vertical logits at (r, c) against the token at (r+1, c), rows r < H-1."""
    batch, height, width = codes.shape
    below = codes[:, 1:].reshape(batch, -1).to(vertical.device)
    return F.cross_entropy(vertical[:, : (height - 1) * width].flatten(0, 1), below.flatten())


def distillation_kl(teacher: Tensor, vertical: Tensor, width: int, temperature: float) -> Tensor:
    """T^2 * KL(teacher || vertical student) for targets (r+1, c) of rows r < H-1, spec §7.1(4).

    ``teacher`` (B, N, V) are raster logits per target cell; the student at (r, c) predicts cell
    (r, c) + W, so it is compared with the teacher's logits for that cell.
    """
    num = teacher.shape[1] - width
    return temperature**2 * _kl(teacher[:, width:], vertical[:, :num], temperature).mean()


def horizontal_distillation_kl(teacher: Tensor, horizontal: Tensor, kind: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(teacher || horizontal student) over the target cells whose fused logits read the horizontal
    ones (all but the first column), stage 2's optional distillation.

    ``teacher`` and ``horizontal`` (B, N, V) are logits per target cell: the frozen raster model's, and the
    adapted backbone's from the left neighbour under the proximity mask; ``kind`` (N,) the cell kinds.
    """
    used = kind != FIRST_COL
    return temperature**2 * _kl(teacher[:, used], horizontal[:, used], temperature).mean()


def _kl(teacher: Tensor, student: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) per position, (..., V) -> (...)."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)
