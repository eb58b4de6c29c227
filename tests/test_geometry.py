"""Grid geometry and masks (spec §6.1), checked as properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashar import geometry


@given(st.integers(1, 7), st.integers(1, 7), st.data())
@settings(max_examples=60, deadline=None)
def test_proximity_mask_allows_exactly_earlier_or_same_diagonals(height, width, data):
    mask = geometry.proximity_mask(height, width)
    q = data.draw(st.integers(0, height * width - 1))
    k = data.draw(st.integers(0, height * width - 1))
    (r, c), (r2, c2) = divmod(q, width), divmod(k, width)
    assert bool(mask[q, k]) == (r2 + c2 <= r + c)
    assert mask[q, q]  # a cell always sees itself


@given(st.integers(1, 5), st.integers(1, 5), st.lists(st.booleans(), min_size=1, max_size=5))
@settings(max_examples=60, deadline=None)
def test_sequence_mask_prefix_rules(height, width, valid_bits):
    valid = torch.tensor([valid_bits, list(reversed(valid_bits))])
    prefix_len, num_cells = valid.shape[1], height * width
    mask = geometry.sequence_mask(valid, geometry.proximity_mask(height, width))[:, 0]
    assert not mask[:, :prefix_len, prefix_len:].any()  # the prefix never sees the image
    assert torch.equal(mask[:, prefix_len:, :prefix_len], valid[:, None, :].expand(-1, num_cells, -1))
    for b in range(2):
        for i in range(prefix_len):
            for j in range(prefix_len):
                expected = (j <= i and bool(valid[b, j])) or i == j
                assert bool(mask[b, i, j]) == expected


@given(st.integers(1, 9), st.integers(1, 9))
@settings(max_examples=40, deadline=None)
def test_diagonals_cover_every_cell_once_in_row_order(height, width):
    index, valid = geometry.diagonal_slots(height, width)
    assert index.shape == (height + width - 1, min(height, width))
    cells = index[valid]
    assert sorted(cells.tolist()) == list(range(height * width))
    steps = geometry.step_ids(height, width)
    for s, (row, ok) in enumerate(zip(index, valid)):
        assert (steps[row[ok]] == s).all()
        rows = row[ok] // width
        assert torch.all(rows[1:] > rows[:-1])  # top-right to bottom-left
        assert (row[~ok] == height * width).all()


@given(st.integers(1, 7), st.integers(1, 7), st.data())
@settings(max_examples=60, deadline=None)
def test_a_row_lag_orders_cells_by_k_r_plus_c_and_keeps_both_sources_earlier(height, width, data):
    lag = data.draw(st.integers(1, width))
    index, valid = geometry.diagonal_slots(height, width, lag)
    assert index.shape[0] == geometry.num_diagonals(height, width, lag) == lag * (height - 1) + width
    assert sorted(index[valid].tolist()) == list(range(height * width)) and valid.any(1).all()  # no empty diagonal
    # a diagonal's cells come first
    assert torch.equal(valid, torch.arange(valid.shape[1]) < valid.sum(1, keepdim=True))
    steps = geometry.step_ids(height, width, lag)
    for s, (row, ok) in enumerate(zip(index, valid)):
        assert (steps[row[ok]] == s).all() and torch.all(row[ok][1:] // width > row[ok][:-1] // width)
    left, up = geometry.neighbour_index(height, width)
    has = lambda i: i < height * width  # noqa: E731
    cells = torch.arange(height * width)
    assert (steps[left[has(left)]] == steps[cells[has(left)]] - 1).all()  # the left source: the diagonal before
    assert (steps[up[has(up)]] == steps[cells[has(up)]] - lag).all()  # the upper one: k diagonals before
    mask = geometry.proximity_mask(height, width, lag)
    q, k = data.draw(st.integers(0, height * width - 1)), data.draw(st.integers(0, height * width - 1))
    (r, c), (r2, c2) = divmod(q, width), divmod(k, width)
    assert bool(mask[q, k]) == (lag * r2 + c2 <= lag * r + c)


def test_a_row_lag_of_the_width_is_raster_order():
    assert torch.equal(geometry.proximity_mask(3, 4, 4), geometry.causal_mask(12))
    assert geometry.diagonal_slots(3, 4, 4)[0].flatten().tolist() == list(range(12))
    with pytest.raises(ValueError, match="row lag 5"):
        geometry.diagonal_slots(3, 4, 5)


def test_native_sequence_with_row_ends():
    cells, is_cell = geometry.raster_sequence(2, 3, with_row_ends=True)
    assert cells.tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2]]
    assert is_cell.tolist() == [True, True, True, False, True, True, True]
