"""Pure geometry of the token grid, in the paper's vocabulary (FlashAR, arXiv 2605.09430 §2).

* H, W: the token grid (rows, columns); a cell is (r, c); its raster index is i = r * W + c.
* s = r + c: the step id (anti-diagonal) of a cell; D = H + W - 1 diagonals. With a row lag k > 1 (each row
  starts k steps after the row above) the step id is s = k * r + c and D = k * (H - 1) + W; the cell above
  and to the right, (r - 1, c + j) for j < k, is then decoded before (r, c). k = 1 is the paper's wavefront,
  k = W is raster order. Every function below takes ``lag`` (default 1) and calls a step's cells its diagonal.
* P: prefix length (conditioning positions before the grid).
* b: the branch layer; K: the number of vertical blocks.
* The horizontal head at (r, c) predicts (r, c + 1); the vertical head at (r, c) predicts (r + 1, c).

Every function here is a plain tensor computation on CPU; methods move the results to their device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def raster_cells(height: int, width: int) -> Tensor:
    """All cells in raster order, (H*W, 2) int64 of (row, col)."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return torch.stack([rows, cols], dim=1)


def step_ids(height: int, width: int, lag: int = 1) -> Tensor:
    """s = k * r + c for every cell in raster order, (H*W,) int64."""
    cells = raster_cells(height, width)
    return lag * cells[:, 0] + cells[:, 1]


def num_diagonals(height: int, width: int, lag: int = 1) -> int:
    return lag * (height - 1) + width


def diagonal_width(height: int, width: int, lag: int = 1) -> int:
    """T: the most cells one diagonal holds, min(H, ceil(W / k))."""
    return min(height, -(-width // lag))


def diagonal_slots(height: int, width: int, lag: int = 1) -> tuple[Tensor, Tensor]:
    """Raster indices of every diagonal, padded to T = :func:`diagonal_width` slots.

    Returns ``index`` (D, T) int64 and ``valid`` (D, T) bool. Within a diagonal the cells are ordered by
    increasing row (top-right to bottom-left); padded slots hold index H*W (one past the grid, a scratch
    cell) and valid False.
    """
    if not 1 <= lag <= width:
        raise ValueError(f"row lag {lag} must lie in [1, {width}] for a grid {width} cells wide")
    s = torch.arange(num_diagonals(height, width, lag))[:, None]
    top = (s - width + lag).clamp(min=0) // lag  # the first row whose cell on diagonal s lies inside the grid
    rows = top + torch.arange(diagonal_width(height, width, lag))[None, :]
    cols = s - lag * rows
    valid = (rows < height) & (cols >= 0)
    return torch.where(valid, rows * width + cols, height * width), valid


def proximity_mask(height: int, width: int, lag: int = 1) -> Tensor:
    """Image-to-image training mask (H*W, H*W) bool: (r, c) may attend (r', c') iff s' <= s (k*r' + c' <= k*r + c)."""
    s = step_ids(height, width, lag)
    return s[None, :] <= s[:, None]


def causal_mask(length: int) -> Tensor:
    """Plain raster-causal mask (length, length) bool."""
    return torch.ones(length, length, dtype=torch.bool).tril()


def sequence_mask(prefix_valid: Tensor, image_mask: Tensor) -> Tensor:
    """Full training mask (B, 1, P + N, P + N) bool over [prefix | grid] (spec §6.1).

    Prefix -> prefix is causal over valid positions (a padded row sees only itself); image -> prefix sees
    every valid prefix position; prefix -> image is blocked; image -> image is ``image_mask`` (N, N).
    """
    batch, prefix_len = prefix_valid.shape
    num_cells = image_mask.shape[0]
    total = prefix_len + num_cells
    mask = torch.zeros(batch, total, total, dtype=torch.bool, device=prefix_valid.device)
    prefix_causal = causal_mask(prefix_len).to(prefix_valid.device) & prefix_valid[:, None, :]
    mask[:, :prefix_len, :prefix_len] = prefix_causal | torch.eye(
        prefix_len, dtype=torch.bool, device=prefix_valid.device)
    mask[:, prefix_len:, :prefix_len] = prefix_valid[:, None, :]
    mask[:, prefix_len:, prefix_len:] = image_mask.to(prefix_valid.device)
    return mask[:, None]


def neighbour_index(height: int, width: int) -> tuple[Tensor, Tensor]:
    """For every cell (raster order): the raster index of its left and upper neighbour, or H*W if none."""
    cells = raster_cells(height, width)
    idx = torch.arange(height * width)
    left = torch.where(cells[:, 1] > 0, idx - 1, height * width)
    up = torch.where(cells[:, 0] > 0, idx - width, height * width)
    return left, up


def raster_sequence(height: int, width: int, with_row_ends: bool) -> tuple[Tensor, Tensor]:
    """The native raster sequence: cells (M, 2) and ``is_cell`` (M,) bool.

    With row ends (e.g. Emu3.5's EOL) every row but the last is followed by a slot (r, W) that holds the
    row-end token, so M = H * W + H - 1; otherwise M = H * W.
    """
    columns = width + 1 if with_row_ends else width
    cells = raster_cells(height, columns)
    if with_row_ends:
        cells = cells[:-1]  # no row end after the last row
    return cells, cells[:, 1] < width
