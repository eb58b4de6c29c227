"""How a decode step is shaped: the one place that knows the three regimes.

A method lists its steps once, at setup: per step, the width of the index table it feeds (FlashAR's
diagonal) and the number of cache slots its queries may see (its key window). :meth:`Shapes.plan`
turns that into the arguments of every step, according to how the step runs:

* eager: every step at its exact sizes;
* compiled off CUDA: the same exact sizes, as the dynamic dimensions of one graph (``mark_dynamic``:
  one graph without padded compute);
* compiled on CUDA (CUDA graphs, which replay fixed shapes): tables padded to ``buckets`` widths (1 by
  default: one graph; N: N graphs, less padded compute) and attention over the whole cache, masked.

Key windows. A mask built over the first ``length`` slots makes attention read only those
(``backbone.write_kv``). No window is shorter than 2 slots (dynamo specialises on a size of 1, and on
sizes derived from it: ``plan``'s ``shortest``), and none spans all S slots: it would be contiguous where
the shorter ones are not and the compiler would specialise on it, so every cache keeps a last slot that
no query reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor

from flashar.attention import attention_setting
from flashar.errors import FlashARError


@dataclass(frozen=True)
class Shapes:
    """The regime of one method instance's step (fixed at construction)."""

    compiled: bool = False
    static: bool = False  # CUDA graphs: fixed shapes, padded
    autotuned: bool = False  # max-autotune: tune dynamic sizes for the longest, not the first call's

    @classmethod
    def of(cls, compile, device: torch.device) -> Shapes:
        shapes = cls(compiled=bool(compile), static=bool(compile) and device.type == "cuda",
                     autotuned=compile == "max-autotune")
        if shapes.compiled and not shapes.static and attention_setting() == "flex":
            raise FlashARError("FLASHAR_ATTENTION=flex runs eager or compiled on CUDA only: torch's CPU FlexAttention "
                "does not compile the dynamic lengths of a compiled CPU step; unset it or use math or sdpa")
        return shapes

    def mark_dynamic(self, tensors: Iterable[Tensor], dim: int, longest: int, shortest: int = 2) -> None:
        """Let ``dim`` of these tensors (index tables a step receives; everything sized from them follows) take any
        size in [shortest, longest] within the one compiled graph, off CUDA; CUDA graphs need static shapes, so
        there (and for sizes below 2, which dynamo specialises) the caller pads instead. Max-autotune optimises
        for the longest size rather than the first call's."""
        shortest = max(shortest, 2)
        for tensor in tensors:
            if tensor.device.type != "cuda" and shortest <= tensor.shape[dim] <= longest and longest > shortest:
                torch._dynamo.mark_dynamic(tensor, dim, min=shortest, max=longest,
                                           hint_override=longest if self.autotuned else None)

    def window(self, keys: Tensor, length: int, bounds: tuple[int, int]) -> Tensor:
        """The first ``length`` entries of a per-slot table (S,), or all S under CUDA graphs (masked);
        compiled elsewhere the length is dynamic over ``bounds`` (the shortest and longest window)."""
        if self.static:
            return keys
        window = keys[:length]
        if self.compiled:
            self.mark_dynamic([window], 0, bounds[1], bounds[0])
        return window

    def plan(self, steps: Tensor | None, keys: Tensor, key_lengths: list[int], draws: list[int] | int = 0,
             first_draws: int = 0, table: Tensor | None = None, widths: list[int] | None = None,
             buckets: int | None = None, shortest: int = 0) -> Plan:
        """The arguments ``(step id, [table], key window)`` of every step.

        steps (K,): the step ids (None: a data-dependent loop that asks ``Plan.window`` and whose
        ``key_lengths`` are just the shortest and longest window); keys (S,): a per-slot table the step reads a
        window of; key_lengths: the slots step k must see (raised to ``shortest``); draws: uniforms (rows of the
        method's buffer, 0: all) step k refills, ``first_draws`` those of the prefill's prediction; table (K', T)
        with widths (K,): an index table of which step k needs ``widths[k]`` columns (the used ones first, at least 2
        where it has them), cut to exact widths or padded to buckets (module docstring)."""
        key_lengths = [max(length, shortest) for length in key_lengths]
        assert not key_lengths or max(key_lengths) < len(keys), "a key window must not span the whole cache"
        bounds = (min(key_lengths, default=0), max(key_lengths, default=0))
        draws = draws if isinstance(draws, list) else [draws] * len(key_lengths)
        plan = Plan(self, keys, bounds, draws=draws, first_draws=first_draws)
        tables: list[tuple[Tensor, ...]] = [()] * len(key_lengths)
        if table is not None:
            assert widths is not None, "a table comes with the width each step uses"
            full = table.shape[1]
            need = [min(full, max(2, width)) for width in widths]  # as key windows: no width of 1 while the table has 2
            sizes, plan.widths = padded_widths(full, need, buckets or (1 if self.static else full))
            cut = {size: table[:, :size].contiguous() for size in sizes}
            if self.compiled and not self.static and buckets is None:
                self.mark_dynamic(cut.values(), 1, full)
            tables = [(cut[width],) for width in plan.widths]
        if steps is not None:
            plan.args = [(steps[k], *tables[k], self.window(keys, n, bounds)) for k, n in enumerate(key_lengths)]
        return plan


@dataclass
class Plan:
    """Every step's arguments, decided once at setup; ``window`` serves data-dependent loops."""

    shapes: Shapes
    keys: Tensor  # (S,)
    bounds: tuple[int, int]  # shortest and longest key window
    draws: list[int]  # uniforms step k refills (0: the whole buffer)
    first_draws: int = 0  # uniforms the prefill's prediction draws
    widths: list[int] = field(default_factory=list)  # table width step k uses (padded or exact)
    args: list[tuple] = field(default_factory=list)

    def window(self, length: int) -> Tensor:
        return self.shapes.window(self.keys, length, self.bounds)


def padded_widths(full: int, need: list[int], buckets: int) -> tuple[set[int], list[int]]:
    """Bucket widths ceil(full * i / buckets), i = 1..buckets, and the smallest one each step fits in."""
    sizes = sorted({-(-full * i // buckets) for i in range(1, buckets + 1)})
    chosen = [next(size for size in sizes if size >= n) for n in need]
    return set(chosen), chosen
