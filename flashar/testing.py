"""A conformance suite for backends, to run with pytest.

A backend's test module subclasses :class:`BackboneConformance` and implements ``make_backbone``: build a
tiny random model, write it in the backend's official checkpoint format, and load it back through the
backend's real loader. The inherited tests then check the Backbone protocol the decoding methods rely on:

* geometry and the code range;
* prefixes: rows ``[cond; uncond]``, a validity mask, the last valid position;
* positions for any set of cells, in any order;
* the cached forward over chunks in any order (raster or anti-diagonal) equals the full no-cache forward;
* the layer tap (the hidden state entering layer b) and cloned layers;
* raster decoding equals a greedy full-recompute reference of the native layout;
* the raster step traces with ``fullgraph=True`` and compiles once per generation (``slow``: inductor);
* decoding codes to images.

Example::

    class TestMyBackend(BackboneConformance):
        conditions = [0, 1]
        def make_backbone(self, tmp_path):
            write_my_checkpoint(tmp_path / "model.safetensors")
            return flashar.api.load_backbone("mine", {"checkpoint": tmp_path / "model.safetensors"})
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from flashar import grid as G
from flashar.backbone import Backbone
from flashar.compilation import CompileCounter
from flashar.config import SamplingConfig
from flashar.decoding import key_mask, prefill
from flashar.sampling import make_generator

ATOL = 1e-4


def full_forward(backbone: Backbone, conditions, codes: torch.Tensor, image_mask: torch.Tensor, cfg: bool = True,
                 tap: int | None = None):
    """Reference: the whole [prefix | grid in raster order] sequence in one no-cache forward.

    codes (B, H, W); image_mask (N, N) over raster cells. Returns (hidden over the grid, tapped hidden).
    """
    grid = tuple(codes.shape[1:])
    prefix = backbone.prefix(conditions, cfg=cfg, grid=grid)
    ids = backbone.code_ids(codes.flatten(1).to(backbone.device))
    ids = torch.cat([ids, ids]) if cfg else ids
    x = torch.cat([prefix.embeds, backbone.embed(ids)], dim=1)
    cells = G.raster_cells(*grid).to(backbone.device)
    positions = torch.cat([prefix.positions, backbone.cell_positions(cells, prefix.length, grid=grid)])
    mask = G.sequence_mask(prefix.valid, image_mask.to(backbone.device))
    h, h_tap = backbone(x, positions, mask, tap=tap)
    cut = prefix.length
    return h[:, cut:], (None if h_tap is None else h_tap[:, cut:])


def cached_forward(backbone: Backbone, conditions, codes: torch.Tensor, chunks: list[torch.Tensor],
                   key_step: torch.Tensor, cfg: bool = True) -> torch.Tensor:
    """Prefill, then feed the grid in ``chunks`` (lists of raster indices) into a static cache.

    A query at raster index i may see image keys j with key_step[j] <= key_step[i]. Returns the hidden
    states (B', N, D) gathered back into raster order.
    """
    height, width = grid = tuple(codes.shape[1:])
    prefix = backbone.prefix(conditions, cfg=cfg, grid=grid)
    num_cells = height * width
    cache = backbone.new_cache(prefix.batch_size, prefix.length + num_cells)
    prefill(backbone, prefix, cache)
    cells = G.raster_cells(height, width).to(backbone.device)
    ids = backbone.code_ids(codes.flatten(1).to(backbone.device))
    ids = torch.cat([ids, ids]) if cfg else ids
    slot_step = torch.full((cache.length,), -1, device=backbone.device)
    slot_step[prefix.length : prefix.length + num_cells] = key_step.to(backbone.device)
    key_valid = torch.ones(prefix.batch_size, cache.length, dtype=torch.bool, device=backbone.device)
    key_valid[:, : prefix.length] = prefix.valid
    key_valid[:, prefix.length + num_cells :] = False
    out = torch.zeros(prefix.batch_size, num_cells, backbone.dim, dtype=backbone.dtype, device=backbone.device)
    for chunk in chunks:
        chunk = chunk.to(backbone.device)
        mask = key_mask(key_valid, slot_step[None, :] <= key_step.to(backbone.device)[chunk][:, None])
        h, _ = backbone(backbone.embed(ids[:, chunk]), backbone.cell_positions(cells[chunk], prefix.length, grid=grid), mask,
                        cache, prefix.length + chunk)
        out[:, chunk] = h
    return out


def greedy_reference(backbone: Backbone, conditions, grid: tuple[int, int], cfg_scale: float) -> torch.Tensor:
    """Greedy raster decoding by full recompute of the native sequence at every token (no cache)."""
    height, width = grid
    cfg = cfg_scale != 1.0
    prefix = backbone.prefix(conditions, cfg=cfg, grid=grid)
    cells, is_cell = G.raster_sequence(height, width, backbone.row_end_token is not None)
    positions_all = backbone.cell_positions(cells.to(backbone.device), prefix.length, native=True, grid=grid)
    tokens = torch.zeros(len(conditions), 0, dtype=torch.long, device=backbone.device)
    for j in range(len(cells)):
        ids = torch.cat([tokens, tokens]) if cfg else tokens
        x = torch.cat([prefix.embeds, backbone.embed(ids)], dim=1)
        positions = torch.cat([prefix.positions, positions_all[:j]])
        mask = G.sequence_mask(prefix.valid, G.causal_mask(j))
        h, _ = backbone(x, positions, mask)
        last = h[:, -1] if j else h[torch.arange(h.shape[0]), prefix.last]
        logits = backbone.logits(last)
        if cfg:
            if backbone.native_cfg == "log_softmax":
                logits = torch.log_softmax(logits, -1)
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg_scale * (cond - uncond)
        token = backbone.code_ids(logits.argmax(-1)) if is_cell[j] else torch.full_like(tokens[:, 0], backbone.row_end_token)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
    return (tokens[:, is_cell.to(backbone.device)] - backbone.code_offset).view(len(conditions), height, width).cpu()


class BackboneConformance:
    """Inherit, set ``conditions`` and implement ``make_backbone(tmp_path)``."""

    conditions: list[Any] = [0, 1]
    grid: tuple[int, int] = (3, 4)
    cfg_scale: float = 3.0

    def make_backbone(self, tmp_path) -> Backbone:
        raise NotImplementedError

    @pytest.fixture
    def backbone(self, tmp_path) -> Backbone:
        torch.manual_seed(0)
        return self.make_backbone(tmp_path).eval()

    def random_codes(self, backbone: Backbone) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        return torch.randint(0, backbone.codebook_size, (len(self.conditions), *self.grid), generator=generator)

    # --- geometry and prefix --------------------------------------------------------------------
    def test_grid_follows_downsampling(self, backbone):
        height, width = self.grid
        assert backbone.grid((height * backbone.downsample, width * backbone.downsample)) == (height, width)
        with pytest.raises(Exception, match="multiple"):
            backbone.grid(backbone.downsample * height + 1)

    def test_prefix_rows_are_cond_then_uncond(self, backbone):
        cond = backbone.prefix(self.conditions, cfg=False, grid=self.grid)
        both = backbone.prefix(self.conditions, cfg=True, grid=self.grid)
        batch = len(self.conditions)
        assert both.batch_size == 2 * batch and cond.batch_size == batch
        assert torch.equal(both.embeds[:batch], cond.embeds)
        assert not torch.equal(both.embeds[batch:], cond.embeds)
        assert both.valid.dtype == torch.bool and both.valid.shape == both.embeds.shape[:2]
        rows = torch.arange(2 * batch)
        assert both.valid[rows, both.last].all(), "the last position must be valid"
        assert both.positions.shape[0] == both.length

    def test_empty_unconditional_rows_keep_the_conditional_rows(self, backbone):
        cond = backbone.prefix(self.conditions, cfg=False, grid=self.grid)
        both = backbone.prefix(self.conditions, cfg=True, grid=self.grid, unconditional="empty")
        batch = len(self.conditions)
        assert both.batch_size == 2 * batch
        assert torch.equal(both.embeds[:batch][both.valid[:batch]], cond.embeds[cond.valid])  # any padding side
        assert both.valid[torch.arange(2 * batch), both.last].all()

    def test_positions_do_not_depend_on_order(self, backbone):
        cells = G.raster_cells(*self.grid).to(backbone.device)
        order = torch.randperm(len(cells), generator=torch.Generator().manual_seed(0)).to(backbone.device)
        prefix_length = backbone.prefix(self.conditions, cfg=False, grid=self.grid).length
        in_order = backbone.cell_positions(cells, prefix_length, grid=self.grid)
        shuffled = backbone.cell_positions(cells[order], prefix_length, grid=self.grid)
        assert torch.equal(shuffled, in_order[order])
        assert not torch.equal(in_order[0], in_order[1]), "different cells need different positions"

    # --- forward, cache, tap, clones ------------------------------------------------------------
    def test_raster_chunks_in_cache_match_full_forward(self, backbone):
        codes = self.random_codes(backbone)
        num_cells = codes[0].numel()
        with torch.no_grad():
            ref, _ = full_forward(backbone, self.conditions, codes, G.causal_mask(num_cells))
            sizes = [1, 2, 3] * num_cells
            chunks, start = [], 0
            for size in sizes:
                if start >= num_cells:
                    break
                chunk = torch.arange(start, min(num_cells, start + size))
                chunks.append(chunk.flip(0))  # any order inside a chunk
                start += size
            got = cached_forward(backbone, self.conditions, codes, chunks, torch.arange(num_cells))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=ATOL)

    def test_diagonal_chunks_in_cache_match_proximity_forward(self, backbone):
        codes = self.random_codes(backbone)
        index, valid = G.diagonal_slots(*self.grid)
        with torch.no_grad():
            ref, _ = full_forward(backbone, self.conditions, codes, G.proximity_mask(*self.grid))
            chunks = [row[ok] for row, ok in zip(index, valid)]
            got = cached_forward(backbone, self.conditions, codes, chunks, G.step_ids(*self.grid))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=ATOL)

    def test_tap_is_hidden_state_entering_layer(self, backbone):
        codes = self.random_codes(backbone)
        mask = G.causal_mask(codes[0].numel())
        tap = backbone.num_layers - 1
        with torch.no_grad():
            _, h_tap = full_forward(backbone, self.conditions, codes, mask, tap=tap)
            layers, backbone.layers = backbone.layers, backbone.layers[:tap]
            try:  # with only the first b layers, the tap at b is the output of those layers
                _, h_first = full_forward(backbone, self.conditions, codes, mask, tap=tap)
            finally:
                backbone.layers = layers
            _, h_zero = full_forward(backbone, self.conditions, codes, mask, tap=0)
        torch.testing.assert_close(h_tap, h_first, atol=ATOL, rtol=ATOL)
        ids = backbone.code_ids(codes.flatten(1).to(backbone.device))
        torch.testing.assert_close(h_zero, backbone.embed(torch.cat([ids, ids])))

    def test_cloned_layers_compute_like_the_originals(self, backbone):
        clones = backbone.clone_layers(backbone.num_layers - 1, 1)
        original = backbone.layers[-1]
        assert clones[0] is not original
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(clones.parameters(), original.parameters()))
        x = torch.randn(2, 5, backbone.dim, dtype=backbone.dtype, device=backbone.device)
        cells = G.raster_cells(1, 5).to(backbone.device)
        positions = backbone.cell_positions(cells, 0, grid=(1, 5))
        mask = G.causal_mask(5).to(backbone.device)[None, None].expand(2, 1, 5, 5)
        with torch.no_grad():
            torch.testing.assert_close(backbone.layer_forward(clones[0], x, positions, mask, None, None),
                                       backbone.layer_forward(original, x, positions, mask, None, None))
        with pytest.raises(Exception):
            backbone.clone_layers(backbone.num_layers, 1)

    # --- decoding -------------------------------------------------------------------------------
    def test_raster_greedy_matches_full_recompute(self, backbone):
        from flashar.methods.raster import Raster

        sampling = SamplingConfig(cfg_scale=self.cfg_scale, top_k=1)
        result = Raster(backbone).generate(self.conditions, self.grid, sampling, make_generator(0, backbone.device))
        with torch.no_grad():
            expected = greedy_reference(backbone, self.conditions, self.grid, self.cfg_scale)
        assert torch.equal(result.codes, expected)
        assert result.codes.min() >= 0 and result.codes.max() < backbone.codebook_size

    def test_raster_step_compiles_once(self, backbone):
        from flashar.methods.raster import Raster

        torch._dynamo.reset()
        counter = CompileCounter()
        sampling = SamplingConfig(cfg_scale=self.cfg_scale, top_k=4)
        compiled = Raster(backbone, compile=True, compile_backend=counter)
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = compiled.generate(self.conditions, self.grid, sampling, make_generator(3, backbone.device))
        eager = Raster(backbone).generate(self.conditions, self.grid, sampling, make_generator(3, backbone.device))
        assert counter.frames == 1
        assert torch.equal(got.codes, eager.codes)

    @pytest.mark.slow
    def test_raster_step_compiles_with_inductor(self, backbone):
        from flashar.methods.raster import Raster

        torch._dynamo.reset()
        sampling = SamplingConfig(cfg_scale=self.cfg_scale, top_k=1)
        got = Raster(backbone, compile=True).generate(self.conditions, self.grid, sampling, make_generator(0, backbone.device))
        eager = Raster(backbone).generate(self.conditions, self.grid, sampling, make_generator(0, backbone.device))
        assert torch.equal(got.codes, eager.codes)

    def test_decode_gives_images(self, backbone):
        codes = self.random_codes(backbone)
        images = backbone.decode(codes)
        assert images.shape[:2] == (len(self.conditions), 3) or images.shape[:2] == (len(self.conditions), 1)
        assert images.shape[2:] == (self.grid[0] * backbone.downsample, self.grid[1] * backbone.downsample)
        assert images.min() >= 0 and images.max() <= 1
