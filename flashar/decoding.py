"""The decode engine every method shares, written against the Backbone protocol only.

* :class:`Method`: the base of every registered method (``id``, a pydantic ``Options``, compiling as a
  constructor option) and the engine: a state per set of shapes, kept and reset in place, and the one loop
  (:meth:`Method.decode`) that drives a method's ``start`` and compiled ``_step`` over its plan.
* :func:`prefill` runs the prefix into a static cache; :func:`feed` runs one chunk of tokens over it under the
  boolean (B, 1, T, S) masks of :func:`key_mask`; :func:`guided` applies CFG.
* The native raster sequence that raster, SJD, GSD and ZipAR decode (:class:`TokenState` and its helpers).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections import OrderedDict
from typing import Any, Callable, ClassVar, Generic, Iterator, Sequence, TypeVar

import torch
from torch import Tensor

from flashar import geometry
from flashar.backbone import Backbone, KVCache, Prefix
from flashar.compilation import compile_step, guards_skipped, mark_static
from flashar.config import CompileMode, Config, SamplingConfig
from flashar.sampling import cfg_mix, refill_uniform, sample
from flashar.shapes import Plan, Shapes


class NoOptions(Config):
    """This method has no options of its own."""


@dataclass
class Generation:
    codes: Tensor  # (B, H, W) int64 on CPU
    num_forward_passes: int  # sequential backbone forward passes, prefill included
    state_bytes: int = 0  # memory the method allocated for decoding (caches, buffers)


def state_tensors(state: Any) -> list[Tensor]:
    """The tensors a method's state dataclass holds directly (its tables and buffers; caches hold their own)."""
    return [value for value in vars(state).values() if isinstance(value, Tensor)]


def state_nbytes(state: Any) -> int:
    """Bytes held by the tensors and caches of a method's state dataclass."""
    total = sum(t.numel() * t.element_size() for t in state_tensors(state))
    for value in vars(state).values():
        if isinstance(value, KVCache):
            total += value.nbytes
        elif isinstance(value, Prefix):
            total += value.embeds.numel() * value.embeds.element_size()
    return total


@dataclass
class DecodeState:
    """What every method's state holds; a method's state adds its tables and buffers."""

    prefix: Prefix
    grid: tuple[int, int]  # (H, W)
    sampling: SamplingConfig
    cache: KVCache  # backbone
    key_valid: Tensor  # (1 or B', S) valid prefix slots and every slot after the prefix
    plan: Plan  # every step's arguments (``flashar.shapes``)
    uniform: Tensor  # U[0, 1) for the next step's draws, refilled before each step (shape: the method's)
    generations: int = field(default=0, init=False)  # generations decoded with this state so far


State = TypeVar("State", bound=DecodeState)


class Method(ABC, Generic[State]):
    """A decoding method: turns conditions into a token grid using only the Backbone protocol.

    A method supplies ``build`` (its state: cache, tables and buffers for one set of shapes), ``reset``
    (the buffers a generation must start from), ``start`` (prefill and the first prediction), the compiled
    ``_step`` and ``codes``; :meth:`decode` is the one loop. States are kept per (rows, grid, sampling,
    prefix shape) and reset in place, so a later generation with the same shapes allocates nothing and
    a CUDA graph recorded once replays for every generation (the last ``MAX_STATES`` shapes are kept).
    """

    id: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type[Config]] = NoOptions
    requires_adapter: ClassVar[bool] = False
    MAX_STATES: ClassVar[int] = 4

    def __init__(self, backbone: Backbone, options: Config | None = None, *, compile: bool | CompileMode = False,
                 compile_backend: str | Callable = "inductor", own_backbone: bool = False):
        """``compile``: True (or "default") compiles the step, "max-autotune" also autotunes its matmuls.
        ``own_backbone``: the caller lends ``backbone`` to this method alone, so a method that loads weights
        (FlashAR's adapter) may change it in place rather than a copy."""
        self.backbone = backbone
        self.options = options if options is not None else self.Options()
        self.compiled = bool(compile)
        self.shapes = Shapes.of(compile, backbone.device)
        self.step = self._step
        if compile:
            mode = "default" if compile is True else compile
            self.step = compile_step(self._step, backbone.device, compile_backend, mode)
        self._states: OrderedDict[tuple, State] = OrderedDict()

    # --- what a method supplies ---------------------------------------------------------------------
    def check_grid(self, grid: tuple[int, int]) -> None:
        """Raise a one-line error if this instance cannot decode an (H, W) grid (FlashAR: not its adapter's)."""

    def prefix(self, conditions: Sequence[Any], grid: tuple[int, int], sampling: SamplingConfig) -> Prefix:
        return self.backbone.prefix(conditions, cfg=sampling.use_cfg, grid=grid)

    @abstractmethod
    def build(self, prefix: Prefix, batch: int, grid: tuple[int, int], sampling: SamplingConfig) -> State:
        """Allocate the state of a generation of ``batch`` rows (tables filled, buffers reset by ``reset``);
        every tensor must be an attribute of the state, where the engine finds it (:func:`state_tensors`)."""

    def reset(self, state: State) -> None:
        """Put the buffers a generation mutates back to their start (caches and ``key_valid`` are done)."""

    @abstractmethod
    def start(self, state: State) -> None:
        """Prefill and predict the first entry (with the ``plan.first_draws`` uniforms just drawn)."""

    @abstractmethod
    def _step(self, *args, **kwargs):
        """The one static-shape, sync-free computation this method repeats (the compiled unit)."""

    @abstractmethod
    def codes(self, state: State) -> Generation:
        """The generation's codes (B, H, W) and pass count, read from the state after the loop."""

    def steps(self, state: State) -> Iterator[tuple[int, tuple]]:
        """(uniforms to refill, step arguments) of every step after ``start``; the plan's by default."""
        return zip(state.plan.draws, state.plan.args)

    def refill(self, state: State, draws: int, generator: torch.Generator | None) -> None:
        """Draw a step's randomness outside the compiled step (``draws`` rows of the uniform buffer, 0: all)."""
        refill_uniform(state.uniform[:draws] if draws else state.uniform, state.sampling, generator)

    # --- the engine ---------------------------------------------------------------------------------
    def setup(self, conditions: Sequence[Any], grid: tuple[int, int], sampling: SamplingConfig,
              prefix: Prefix | None = None) -> State:
        """A fresh state for these conditions: ``build``, then every tensor of the state marked as a static
        address (the state is kept across generations, so a CUDA graph reads its tables and mutates its
        buffers in place, with no input copies), then ``reset``."""
        prefix = prefix if prefix is not None else self.prefix(conditions, grid, sampling)
        state = self.build(prefix, len(conditions), (grid[0], grid[1]), sampling)
        mark_static(*state_tensors(state))
        self.reset(state)
        return state

    def state_for(self, conditions: Sequence[Any], grid: tuple[int, int], sampling: SamplingConfig) -> State:
        """The kept state for these shapes, reset in place, or a new one (least recently used is dropped)."""
        prefix = self.prefix(conditions, grid, sampling)
        key = (self.options, sampling, len(conditions), tuple(grid), tuple(prefix.embeds.shape),
               tuple(prefix.positions.shape), bool(prefix.valid.all()))
        state = self._states.pop(key, None)
        if state is None:
            state = self.setup(conditions, grid, sampling, prefix)
        else:
            state.prefix = prefix
            state.key_valid.copy_(image_key_valid(prefix, state.key_valid.shape[1]))
            for value in vars(state).values():
                if isinstance(value, KVCache):
                    value.reset()
            self.reset(state)
        self._states[key] = state
        while len(self._states) > self.MAX_STATES:
            self._states.popitem(last=False)
        return state

    def generate(self, conditions: Sequence[Any], grid: tuple[int, int], sampling: SamplingConfig,
                 generator: torch.Generator) -> Generation:
        """Codes (B, H, W) for the conditions, drawing all randomness from ``generator``."""
        return self.decode(self.state_for(conditions, grid, sampling), generator)

    def decode(self, state: State, generator: torch.Generator | None) -> Generation:
        """The one loop: prefill and first prediction, then every step; no host reads but the method's.

        From a state's second generation on, compiled steps skip their guards (:func:`guards_skipped`) when
        the plan lists every step: the first generation ran those same steps. (A data-dependent loop, as
        SJD's, may reach window lengths its first generation did not, so it keeps its guards.)"""
        replayed = self.compiled and state.generations > 0 and bool(state.plan.args)
        with torch.no_grad(), guards_skipped(replayed):
            self.refill(state, state.plan.first_draws, generator)
            self.start(state)
            for draws, args in self.steps(state):
                self.refill(state, draws, generator)
                self.step(state, *args)
        state.generations += 1
        result = self.codes(state)
        result.state_bytes = state_nbytes(state)
        return result

    @staticmethod
    def num_forward_passes(height: int, width: int) -> int:
        """Sequential forward passes for an H x W grid (prefill included), with the default options."""
        raise NotImplementedError

    def passes(self, grid: tuple[int, int]) -> int:
        """Sequential forward passes of this instance (its options and adapter) for a grid."""
        return self.num_forward_passes(*grid)

    def settings(self) -> dict[str, Any]:
        """The options this method runs with, as a report shows them (defaults resolved where a method can)."""
        return self.options.model_dump(mode="json", exclude_none=True)


def key_mask(key_valid: Tensor, key_ok: Tensor) -> Tensor:
    """(B, S) validity & (T, S) per-query visibility -> (B, 1, T, S) boolean attention mask."""
    return (key_valid[:, None, :] & key_ok[None, :, :])[:, None]


def prefill(backbone: Backbone, prefix: Prefix, cache: KVCache, tap: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Run the prefix into slots [0, P) of ``cache``.

    Returns the final-normed hidden state (B, D) and the tapped hidden state (B, D) at each row's last
    valid prefix position, the states that predict cell (0, 0).
    """
    device = prefix.embeds.device
    slots = torch.arange(prefix.length, device=device)
    # the training mask over the prefix alone (causal over valid positions, a padded one sees itself): attention
    # reads the prefix slots only
    mask = geometry.sequence_mask(prefix.valid, torch.zeros(0, 0, dtype=torch.bool))
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


def guided(logits: Tensor, sampling: SamplingConfig, space: str = "logits", entries: Tensor | None = None) -> Tensor:
    """Apply CFG to (2B, ..., V) rows [cond; uncond] when enabled. ``entries`` (0-d, or one per logit row
    (..., T)): the native-sequence entries the logits predict; guidance then applies to the first
    ``cfg_interval + 2`` entries only (LlamaGen's interval; -1: all), the conditional logits elsewhere."""
    if not sampling.use_cfg:
        return logits
    mixed = cfg_mix(logits, sampling.cfg_scale, space)
    if entries is None or sampling.cfg_interval < 0:
        return mixed
    return torch.where((entries <= sampling.cfg_interval + 1)[..., None], mixed, logits.chunk(2, dim=0)[0])


def feed(backbone: Backbone, state: DecodeState, ids: Tensor, positions: Tensor, visible: Tensor, slots: Tensor,
         tap: int | None = None) -> tuple[Tensor, Tensor | None]:
    """One backbone forward over a chunk of T token ids (B, T) (both CFG halves get them) at ``positions``,
    writing cache ``slots`` (T,); query t sees the slots where ``visible`` (T, S') is True, S' the key window."""
    if state.sampling.use_cfg:
        ids = torch.cat([ids, ids])
    mask = key_mask(state.key_valid[:, : visible.shape[-1]], visible)
    return backbone(backbone.embed(ids), positions, mask, state.cache, slots, tap=tap)


# --- the native raster sequence (raster, SJD and GSD, ZipAR) ------------------------------------------------
@dataclass
class TokenState(DecodeState):
    """A state over the token ids of the backbone's own raster sequence: M entries, the cells, plus a forced
    row-end entry after every row but the last on backbones that have a ``row_end_token`` (Emu3.5's EOL)."""

    num_entries: int  # M
    forced: Tensor  # (M + pad,) token id forced at entry j (row ends), -1 where sampled
    tokens: Tensor  # (B, M + pad) token ids


@dataclass
class SequenceState(TokenState):
    """Entries fed in sequence order: entry j at cache slot P + j (raster, SJD and GSD)."""

    positions: Tensor  # (M + pad, ...) native position of every entry (padding repeats the last cell's)
    slots: Tensor  # (M + pad,) cache slot of every entry, P + j


def native_sequence(backbone: Backbone, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Cells (M, 2) of the native sequence and the token forced at each entry (M,), -1 where sampled."""
    cells, is_cell = geometry.raster_sequence(*grid, backbone.row_end_token is not None)
    return cells, torch.where(is_cell, -1, -1 if backbone.row_end_token is None else backbone.row_end_token)


def sequence_fields(backbone: Backbone, prefix: Prefix, grid: tuple[int, int], batch: int,
                    pad: int = 0) -> tuple[Tensor, dict[str, Any]]:
    """The cells (M, 2) and :class:`SequenceState`'s fields for ``batch`` rows, with ``pad`` entries past
    the sequence (never forced, never committed)."""
    cells, forced = native_sequence(backbone, grid)
    num_entries, device = len(cells), backbone.device
    entry = torch.arange(num_entries + pad)
    return cells, dict(
        num_entries=num_entries,
        positions=backbone.cell_positions(cells[entry.clamp(max=num_entries - 1)].to(device), prefix.length,
                                          native=True, grid=grid),
        slots=(prefix.length + entry).to(device),
        forced=torch.cat([forced, forced.new_full((pad,), -1)]).to(device),
        tokens=torch.zeros(batch, num_entries + pad, dtype=torch.long, device=device))


def causal_chunk(backbone: Backbone, state: SequenceState, entries: Tensor, keys: Tensor) -> Tensor:
    """Final hidden states (B', T, D) of the entries (T,) fed in one chunk, each query seeing the slots up to
    its own (later, stale slots hidden); ``keys`` (S',) is the window of slot indices attention reads."""
    slots = state.slots.index_select(0, entries)
    return feed(backbone, state, state.tokens.index_select(1, entries), state.positions.index_select(0, entries),
                keys[None, :] <= slots[:, None], slots)[0]


def commit(backbone: Backbone, state: TokenState, entries: Tensor, codes: Tensor) -> None:
    """Store codes (B, T) at the entries (T,) of ``state.tokens`` as token ids, the token ``state.forced`` holds
    (a row end) where an entry has one."""
    forced = state.forced.index_select(0, entries)[None, :]
    state.tokens.index_copy_(1, entries, torch.where(forced >= 0, forced, backbone.code_ids(codes)))


def start_sequence(backbone: Backbone, state: TokenState, uniform: Tensor) -> None:
    """Prefill, then sample entry 0 (cell (0, 0)) with the uniforms (B,)."""
    h, _ = prefill(backbone, state.prefix, state.cache)
    code = sample(guided(backbone.logits(h), state.sampling, backbone.native_cfg), uniform, state.sampling)
    state.tokens[:, 0] = backbone.code_ids(code)


def sequence_codes(backbone: Backbone, state: TokenState) -> Tensor:
    """The grid (B, H, W) of codes on CPU, read from the sequence's sampled entries."""
    forced, tokens = state.forced[: state.num_entries], state.tokens[:, : state.num_entries]
    return (tokens[:, forced < 0] - backbone.code_offset).view(-1, *state.grid).cpu()
