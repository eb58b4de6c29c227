"""The backend conformance suite: the tests every backbone backend runs, in-tree or out-of-tree.

Decoding methods (raster, FlashAR, the peers) and the FlashAR parts know a model only through the
:class:`~flashar.backbone.Backbone` protocol. This module turns that protocol into pytest tests, so a
backend that passes them works with every method without further glue.

How to use it
-------------
In your backend's test module (``tests/backends/test_<id>.py`` in-tree, ``plugins/flashar-<id>/tests/``
out-of-tree), subclass :class:`BackboneConformance` and

1. implement ``make_backbone(tmp_path)``: build a tiny random model (2-3 layers, a few dozen channels, a
   codebook of tens of codes), write it **in the backend's official checkpoint format** into
   ``tmp_path``, and load it back through the backend's real loader, e.g. with
   ``flashar.api.load_backbone("<id>", options, registry=self.registry())``. The backbone needs its image
   tokenizer (decode/encode) and whatever turns conditions into a prefix (a text tokenizer, ...);
2. set ``conditions`` to a batch your backend accepts (class ids, or prompts of different lengths so that
   prefix padding is exercised), ``grid`` to a token grid the model supports, and ``cfg_scale``;
3. for an out-of-tree plugin, list its plugin module(s) in ``plugins`` so :meth:`registry` can find it
   without relying on installed entry points;
4. optionally implement ``save_backbone(backbone, folder)``: write a loaded backbone back in the official
   format and return the load options; the round-trip test then loads it again and compares;
5. when image tokens share the text vocabulary (``code_offset`` > 0), implement
   ``vocabulary_ids(backbone, codes)``: the ids the official tokenizer files give the codes, looked up
   without ``code_offset`` (Emu3.5: the order of ``emu3_vision_tokens.txt``).

Then run ``python -m pytest <your test file>``. Every check below runs on CPU in about a second:

* geometry: ``grid`` follows the downsampling factor; widths (``dim``), the code range, the logits;
  ``sampling_defaults`` are valid sampling settings;
* prefixes: rows ``[cond; uncond]`` (flashar's CFG order, whatever the model's own), a bool validity
  mask, a valid last position, a positions tensor with a leading token axis;
* positions for any set of cells, in any order;
* the cached forward over chunks in any order (raster, and anti-diagonals under the proximity mask)
  equals the full no-cache forward;
* the layer tap (the hidden state entering layer b), cloned layers, and ``logits(h, head)`` honouring a
  copy of ``output`` (how the FlashAR vertical head reuses the backbone's head);
* raster decoding equals a greedy full-recompute reference of the native layout, and its decode step
  traces with ``fullgraph=True`` into one graph (``slow``: inductor); with CFG, a batch of conditions
  decodes as each condition alone (the baseline is the model's own sampler, whatever the padding);
* every registered method decodes with the backend card hidden (``card_hidden``): methods read only the
  compute members of :class:`~flashar.backbone.Backbone`, never its :class:`~flashar.card.BackendCard`;
* the other methods on this backbone: FlashAR (a random head and gates) decodes greedily the argmax of its
  teacher-forced fused logits in H + W - 1 passes, ZipAR with a full-row window and greedy speculative
  Jacobi decoding give raster's tokens, ZipAR with a one-token window its pass count;
* the ids ``code_ids`` gives codes are the ids the model's own vocabulary gives them (implement
  :meth:`BackboneConformance.vocabulary_ids` when image tokens share the text vocabulary, ``code_offset``
  > 0; a wrong offset is otherwise self-consistent);
* ``decode`` gives images in [0, 1] and ``encode`` gives codes of the grid's shape;
* save -> load round trip of the official format (when ``save_backbone`` is implemented).

A test that fails names the protocol rule it checks; fix the backend, not the test. Add backend-specific
tests (parity with the official implementation, loader errors) beside the subclass.

Example (the Janus plugin, ``plugins/flashar-janus/tests/test_janus.py``)::

    import flashar_janus
    from flashar import api
    from flashar.testing import BackboneConformance

    class TestJanusConformance(BackboneConformance):
        conditions = ["a red fox", "two cats on a sofa"]
        grid = (3, 3)
        plugins = [flashar_janus]

        def make_backbone(self, tmp_path):
            folder = write_tiny_janus(tmp_path / "janus")  # save_pretrained of a tiny random model
            return api.load_backbone("janus", {"model_path": folder}, registry=self.registry())

        def save_backbone(self, backbone, folder):  # the backbone's weights back into a save_pretrained folder
            return {"model_path": save_backbone_folder(backbone, folder)}

(The real test writes the tiny folder once per session in a fixture, since writing takes seconds.)
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest
import torch

from flashar import geometry
from flashar.backbone import Backbone
from flashar.card import CARD_MEMBERS
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
    cells = geometry.raster_cells(*grid).to(backbone.device)
    positions = torch.cat([prefix.positions, backbone.cell_positions(cells, prefix.length, grid=grid)])
    mask = geometry.sequence_mask(prefix.valid, image_mask.to(backbone.device))
    h, h_tap = backbone(x, positions, mask, tap=tap)
    cut = prefix.length
    return h[:, cut:], (None if h_tap is None else h_tap[:, cut:])


def cached_forward(backbone: Backbone, conditions, codes: torch.Tensor, chunks: list[torch.Tensor],
                   key_step: torch.Tensor, cfg: bool = True, windowed: bool = False) -> torch.Tensor:
    """Prefill, then feed the grid in ``chunks`` (lists of raster indices) into a static cache.

    A query at raster index i may see image keys j with key_step[j] <= key_step[i]. Returns the hidden
    states (B', N, D) gathered back into raster order. ``windowed`` (chunks in raster order): each mask
    stops after the chunk's last slot, and every image slot holds NaN until it is written, so a backbone
    that reads past the mask's length returns NaN.
    """
    height, width = grid = tuple(codes.shape[1:])
    prefix = backbone.prefix(conditions, cfg=cfg, grid=grid)
    num_cells = height * width
    cache = backbone.new_cache(prefix.batch_size, prefix.length + num_cells)
    prefill(backbone, prefix, cache)
    cells = geometry.raster_cells(height, width).to(backbone.device)
    ids = backbone.code_ids(codes.flatten(1).to(backbone.device))
    ids = torch.cat([ids, ids]) if cfg else ids
    slot_step = torch.full((cache.length,), -1, device=backbone.device)
    slot_step[prefix.length : prefix.length + num_cells] = key_step.to(backbone.device)
    key_valid = torch.ones(prefix.batch_size, cache.length, dtype=torch.bool, device=backbone.device)
    key_valid[:, : prefix.length] = prefix.valid
    key_valid[:, prefix.length + num_cells :] = False
    out = torch.zeros(prefix.batch_size, num_cells, backbone.dim, dtype=backbone.dtype, device=backbone.device)
    if windowed:
        for buffer in cache.k + cache.v:
            buffer[:, :, prefix.length :] = float("nan")
    for chunk in chunks:
        chunk = chunk.to(backbone.device)
        mask = key_mask(key_valid, slot_step[None, :] <= key_step.to(backbone.device)[chunk][:, None])
        if windowed:
            mask = mask[..., : prefix.length + int(chunk.max()) + 1]
        h, _ = backbone(backbone.embed(ids[:, chunk]), backbone.cell_positions(cells[chunk], prefix.length, grid=grid),
                        mask, cache, prefix.length + chunk)
        out[:, chunk] = h
    return out


def greedy_reference(backbone: Backbone, conditions, grid: tuple[int, int], cfg_scale: float) -> torch.Tensor:
    """Greedy raster decoding by full recompute of the native sequence at every token (no cache)."""
    height, width = grid
    cfg = cfg_scale != 1.0
    prefix = backbone.prefix(conditions, cfg=cfg, grid=grid)
    cells, is_cell = geometry.raster_sequence(height, width, backbone.row_end_token is not None)
    positions_all = backbone.cell_positions(cells.to(backbone.device), prefix.length, native=True, grid=grid)
    tokens = torch.zeros(len(conditions), 0, dtype=torch.long, device=backbone.device)
    for j in range(len(cells)):
        ids = torch.cat([tokens, tokens]) if cfg else tokens
        x = torch.cat([prefix.embeds, backbone.embed(ids)], dim=1)
        positions = torch.cat([prefix.positions, positions_all[:j]])
        mask = geometry.sequence_mask(prefix.valid, geometry.causal_mask(j))
        h, _ = backbone(x, positions, mask)
        last = h[:, -1] if j else h[torch.arange(h.shape[0]), prefix.last]
        logits = backbone.logits(last)
        if cfg:
            if backbone.native_cfg == "log_softmax":
                logits = torch.log_softmax(logits, -1)
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg_scale * (cond - uncond)
        token = (backbone.code_ids(logits.argmax(-1)) if is_cell[j]
                 else torch.full_like(tokens[:, 0], backbone.row_end_token))
        tokens = torch.cat([tokens, token[:, None]], dim=1)
    return (tokens[:, is_cell.to(backbone.device)] - backbone.code_offset).view(len(conditions), height, width).cpu()


def raster_hidden(backbone: Backbone, codes: torch.Tensor) -> torch.Tensor:
    """Image tokens alone (no prefix) through the causal no-cache forward -> final hidden (B, N, D)."""
    num_cells = codes[0].numel()
    x = backbone.embed(backbone.code_ids(codes.flatten(1).to(backbone.device)))
    grid = tuple(codes.shape[1:])
    positions = backbone.cell_positions(geometry.raster_cells(*grid).to(backbone.device), 0, grid=grid)
    mask = geometry.causal_mask(num_cells).to(backbone.device)[None, None].expand(len(codes), 1, num_cells, num_cells)
    return backbone(x, positions, mask)[0]


@contextmanager
def card_hidden(backbone: Backbone) -> Iterator[Backbone]:
    """Within the block, reading any :class:`~flashar.card.BackendCard` member of ``backbone`` raises
    an AssertionError naming it: what a decoding method may not need."""
    base = type(backbone)

    class Hidden(base):
        def __getattribute__(self, name: str):
            if name in CARD_MEMBERS:
                raise AssertionError(
                    f"decoding read the backend card's {name!r}; a method may call only the compute protocol")
            return super().__getattribute__(name)

    backbone.__class__ = Hidden
    try:
        yield backbone
    finally:
        backbone.__class__ = base


class BackboneConformance:
    """Inherit, set ``conditions`` (and ``grid``, ``plugins``) and implement ``make_backbone(tmp_path)``."""

    conditions: list[Any] = [0, 1]
    grid: tuple[int, int] = (3, 4)
    cfg_scale: float = 3.0
    plugins: list[Any] = []  # plugin modules/objects to register besides the built-ins (out-of-tree backends)

    def make_backbone(self, tmp_path) -> Backbone:
        """A tiny random backbone, written in the official format and loaded through the real loader."""
        raise NotImplementedError

    def save_backbone(self, backbone: Backbone, folder: Path) -> Mapping[str, Any] | None:
        """Write ``backbone`` in the official format under ``folder``; return its load options (None: skip)."""
        return None

    def vocabulary_ids(self, backbone: Backbone, codes: torch.Tensor) -> torch.Tensor | None:
        """The vocabulary ids of ``codes`` as the official tokenizer files define them, found without
        ``backbone.code_offset``; None when image tokens have an embedding table of their own (id = code)."""
        return None

    def registry(self):
        """A fresh registry: the built-ins plus ``plugins`` (installed entry points are not loaded)."""
        from flashar.plugins import Registry, build_manager

        pm, infos = build_manager(load_entry_points=False)
        for i, plugin in enumerate(self.plugins):
            pm.register(plugin, name=getattr(plugin, "__name__", f"conformance-plugin-{i}"))
        return Registry.from_manager(pm, infos)

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
        if backbone.downsample > 1:  # with one token per pixel every size is a multiple
            with pytest.raises(Exception, match="multiple"):
                backbone.grid(backbone.downsample * height + 1)

    def test_widths_code_range_and_sampling_defaults(self, backbone):
        from flashar.api import resolve_sampling

        assert backbone.backend_id and backbone.condition_kind in ("class", "text")
        assert backbone.codebook_size > 0 and backbone.code_offset >= 0
        codes = self.random_codes(backbone)
        x = backbone.embed(backbone.code_ids(codes.flatten(1).to(backbone.device)))
        assert x.shape == (len(self.conditions), codes[0].numel(), backbone.dim), "embed gives (B, T, dim)"
        assert backbone.prefix(self.conditions, cfg=False, grid=self.grid).embeds.shape[-1] == backbone.dim
        logits = backbone.logits(x)
        assert logits.shape == (*x.shape[:2], backbone.codebook_size) and logits.dtype == torch.float32
        resolve_sampling(backbone)  # the backend's recommended sampling values are valid settings

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
        cells = geometry.raster_cells(*self.grid).to(backbone.device)
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
            ref, _ = full_forward(backbone, self.conditions, codes, geometry.causal_mask(num_cells))
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

    def test_attention_reads_only_the_slots_the_mask_spans(self, backbone):
        """Methods hand over a mask as long as the cache prefix their queries may see (``write_kv``)."""
        codes = self.random_codes(backbone)
        num_cells = codes[0].numel()
        chunks = list(torch.arange(num_cells).split(3))
        with torch.no_grad():
            ref, _ = full_forward(backbone, self.conditions, codes, geometry.causal_mask(num_cells))
            got = cached_forward(backbone, self.conditions, codes, chunks, torch.arange(num_cells), windowed=True)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=ATOL)

    def test_diagonal_chunks_in_cache_match_proximity_forward(self, backbone):
        codes = self.random_codes(backbone)
        index, valid = geometry.diagonal_slots(*self.grid)
        with torch.no_grad():
            ref, _ = full_forward(backbone, self.conditions, codes, geometry.proximity_mask(*self.grid))
            chunks = [row[ok] for row, ok in zip(index, valid)]
            got = cached_forward(backbone, self.conditions, codes, chunks, geometry.step_ids(*self.grid))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=ATOL)

    def test_tap_is_hidden_state_entering_layer(self, backbone):
        codes = self.random_codes(backbone)
        mask = geometry.causal_mask(codes[0].numel())
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
        cells = geometry.raster_cells(1, 5).to(backbone.device)
        positions = backbone.cell_positions(cells, 0, grid=(1, 5))
        mask = geometry.causal_mask(5).to(backbone.device)[None, None].expand(2, 1, 5, 5)
        with torch.no_grad():
            torch.testing.assert_close(backbone.layer_forward(clones[0], x, positions, mask, None, None),
                                       backbone.layer_forward(original, x, positions, mask, None, None))
        with pytest.raises(Exception):
            backbone.clone_layers(backbone.num_layers, 1)

    def test_logits_use_the_given_copy_of_the_output_head(self, backbone):
        # FlashAR's vertical head is a copy of ``output`` passed as ``head``; it must replace ``output``
        # wherever the backend turns hidden states into code logits.
        h = torch.randn(2, 3, backbone.dim, dtype=backbone.dtype, device=backbone.device)
        head = copy.deepcopy(backbone.output)
        with torch.no_grad():
            torch.testing.assert_close(backbone.logits(h, head), backbone.logits(h))
            head.weight.add_(torch.randn_like(head.weight))
            assert not torch.allclose(backbone.logits(h, head), backbone.logits(h))

    # --- decoding -------------------------------------------------------------------------------
    def test_raster_greedy_matches_full_recompute(self, backbone):
        from flashar.methods.raster import Raster

        sampling = SamplingConfig(cfg_scale=self.cfg_scale, top_k=1)
        result = Raster(backbone).generate(self.conditions, self.grid, sampling, make_generator(0, backbone.device))
        with torch.no_grad():
            expected = greedy_reference(backbone, self.conditions, self.grid, self.cfg_scale)
        assert torch.equal(result.codes, expected)
        assert result.codes.min() >= 0 and result.codes.max() < backbone.codebook_size

    def test_raster_with_cfg_decodes_each_condition_as_alone(self, backbone):
        """Native rows of a batch (prompts of different lengths) compute what each computes alone, as the
        model's own unbatched sampler does: padding must not shift a row's positions."""
        from flashar.methods.raster import Raster

        sampling = SamplingConfig(cfg_scale=self.cfg_scale, top_k=1)
        method = Raster(backbone)
        batched = method.generate(self.conditions, self.grid, sampling, make_generator(0, backbone.device)).codes
        alone = torch.cat([method.generate([c], self.grid, sampling, make_generator(0, backbone.device)).codes
                           for c in self.conditions])
        assert torch.equal(batched, alone), "a native prefix row must not depend on the other rows of its batch"

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
        got = Raster(backbone, compile=True).generate(
            self.conditions, self.grid, sampling, make_generator(0, backbone.device))
        eager = Raster(backbone).generate(self.conditions, self.grid, sampling, make_generator(0, backbone.device))
        assert torch.equal(got.codes, eager.codes)

    # --- the other methods on this backbone -----------------------------------------------------
    def _greedy(self):
        return SamplingConfig(cfg_scale=self.cfg_scale, top_k=1)

    def _raster_codes(self, backbone: Backbone) -> torch.Tensor:
        from flashar.methods.raster import Raster

        return (Raster(backbone)
                .generate(self.conditions, self.grid, self._greedy(), make_generator(0, backbone.device)) .codes)

    def _random_flashar(self, backbone: Backbone):
        """FlashAR with a random vertical block and position-dependent gates (trained gates are not 0.5)."""
        from flashar.adapter import Adapter, new_metadata
        from flashar.branch import FlashARHead
        from flashar.config import BranchConfig
        from flashar.methods.flashar import FlashAR

        torch.manual_seed(0)
        head = FlashARHead(backbone, BranchConfig(num_blocks=1))
        with torch.no_grad():
            for name, p in head.named_parameters():
                if "gate" in name or "mix" in name:
                    p.normal_(0, 0.3)
        return FlashAR(backbone, adapter=Adapter(new_metadata(backbone, head, self.grid), head, backbone))

    def test_flashar_greedy_is_the_argmax_of_its_teacher_forced_logits(self, backbone):
        """FlashAR's cached anti-diagonal decoder (a random vertical block and gates) on this backbone
        equals the teacher-forced forward of the same parts, in H + W - 1 passes."""
        from flashar.teacher import flashar_logits

        method = self._random_flashar(backbone)
        result = method.generate(self.conditions, self.grid, self._greedy(), make_generator(0, backbone.device))
        assert result.num_forward_passes == sum(self.grid) - 1
        with torch.no_grad():
            prefix = backbone.prefix(self.conditions, cfg=True, grid=self.grid, unconditional="empty")
            cond, uncond = flashar_logits(backbone, method.head, prefix, result.codes).fused.chunk(2)
        expected = (uncond + self.cfg_scale * (cond - uncond)).argmax(-1).view(len(self.conditions), *self.grid)
        assert torch.equal(result.codes, expected.cpu())

    def test_every_method_decodes_with_the_card_hidden(self, backbone):
        """Decoding methods talk only to the compute protocol: every registered method (FlashAR with a random
        head) decodes this backbone while reading any BackendCard member raises."""
        methods = [cls(backbone) for cls in self.registry().methods.values() if not cls.requires_adapter]
        methods.append(self._random_flashar(backbone))
        sampling = SamplingConfig(cfg_scale=self.cfg_scale)
        with card_hidden(backbone):
            for method in methods:
                result = method.generate(self.conditions, self.grid, sampling, make_generator(0, backbone.device))
                assert result.codes.shape == (len(self.conditions), *self.grid), method.id
        assert isinstance(backbone.backend_id, str)  # visible again

    def test_zipar_with_a_full_row_window_is_raster_and_counts_its_passes(self, backbone):
        from flashar.methods.zipar import ZipAR, ZipAROptions, num_passes

        height, width = self.grid
        full = ZipAR(backbone, ZipAROptions(window=width)).generate(self.conditions, self.grid, self._greedy(),
                                                                    make_generator(0, backbone.device))
        assert torch.equal(full.codes, self._raster_codes(backbone))
        narrow = ZipAR(backbone, ZipAROptions(window=1)).generate(self.conditions, self.grid, self._greedy(),
                                                                  make_generator(0, backbone.device))
        cells, _ = geometry.raster_sequence(height, width, backbone.row_end_token is not None)
        # rows hold their row ends
        assert narrow.num_forward_passes == num_passes(torch.bincount(cells[:, 0]).tolist(), 1)
        assert narrow.codes.shape == (len(self.conditions), *self.grid)
        assert narrow.codes.min() >= 0 and narrow.codes.max() < backbone.codebook_size

    def test_greedy_speculative_decoding_gives_raster_tokens(self, backbone):
        from flashar.methods.sjd import SJD, SJDOptions

        result = SJD(backbone, SJDOptions(draft_length=3)).generate(self.conditions, self.grid, self._greedy(),
                                                                     make_generator(0, backbone.device))
        assert torch.equal(result.codes, self._raster_codes(backbone))
        assert result.num_forward_passes <= self.grid[0] * self.grid[1] + self.grid[0]  # at most raster's passes

    def test_embedded_code_ids_are_the_vocabulary_ids(self, backbone):
        codes = torch.tensor([0, 1, backbone.codebook_size - 1])
        official = self.vocabulary_ids(backbone, codes)
        if official is None:
            assert backbone.code_offset == 0, ("image tokens share the vocabulary (code_offset > 0): implement "
                                               "vocabulary_ids from the official tokenizer files to check the offset")
            official = codes
        assert torch.equal(backbone.code_ids(codes).cpu(), torch.as_tensor(official).cpu()), \
            "code_ids must give each code the id the model's own tokenizer gives it"
        x = backbone.embed(backbone.code_ids(codes[None]).to(backbone.device))  # every code id is embeddable
        assert x.shape == (1, 3, backbone.dim)

    def test_encode_gives_codes_of_the_grid(self, backbone):
        height, width = self.grid
        images = torch.rand(len(self.conditions), 3, height * backbone.downsample, width * backbone.downsample,
                            generator=torch.Generator().manual_seed(2))
        codes = backbone.encode(images)
        assert codes.shape == (len(self.conditions), height, width) and codes.dtype == torch.long
        assert codes.min() >= 0 and codes.max() < backbone.codebook_size

    # --- the backend's own checkpoint format ----------------------------------------------------
    def test_save_then_load_gives_the_same_backbone(self, backbone, tmp_path):
        from flashar.api import load_backbone

        options = self.save_backbone(backbone, tmp_path / "saved")
        if options is None:
            pytest.skip(f"{type(self).__name__} does not implement save_backbone")
        loaded = load_backbone(backbone.backend_id, options, registry=self.registry()).eval()
        ours, theirs = backbone.state_dict(), loaded.state_dict()
        assert sorted(ours) == sorted(theirs)
        for key, value in ours.items():
            assert torch.equal(theirs[key].to(value.device, value.dtype), value), key
        assert loaded.fingerprint() == backbone.fingerprint()
        codes = self.random_codes(backbone)
        with torch.no_grad():
            torch.testing.assert_close(raster_hidden(loaded, codes), raster_hidden(backbone, codes))
        assert torch.equal(loaded.decode(codes), backbone.decode(codes))

    def test_decode_gives_images(self, backbone):
        codes = self.random_codes(backbone)
        images = backbone.decode(codes)
        assert images.shape[:2] == (len(self.conditions), 3) or images.shape[:2] == (len(self.conditions), 1)
        assert images.shape[2:] == (self.grid[0] * backbone.downsample, self.grid[1] * backbone.downsample)
        assert images.min() >= 0 and images.max() <= 1
