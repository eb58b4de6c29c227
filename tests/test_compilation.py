"""How flashar compiles decode steps: inductor on CPU runs with weight freezing, switchable off."""

from __future__ import annotations

import torch

from flashar.compilation import compile_step


def _flags_seen(monkeypatch, device="cpu", backend="inductor"):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # record what the step runs under
    compile_step(lambda: seen.append(torch._inductor.config.freezing), device, backend)()
    return seen


def test_cpu_inductor_steps_trace_with_frozen_weights(monkeypatch):
    monkeypatch.delenv("FLASHAR_FREEZE_WEIGHTS", raising=False)
    assert _flags_seen(monkeypatch) == [True]
    assert not torch._inductor.config.freezing, "the flag is set around the step only, never globally"


def test_freezing_can_be_switched_off_and_stays_off_for_other_backends(monkeypatch):
    monkeypatch.setenv("FLASHAR_FREEZE_WEIGHTS", "0")
    assert _flags_seen(monkeypatch) == [False]
    monkeypatch.delenv("FLASHAR_FREEZE_WEIGHTS")
    assert _flags_seen(monkeypatch, backend="eager") == [False]
