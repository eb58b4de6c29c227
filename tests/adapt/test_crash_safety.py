"""Crash safety: a run killed with SIGKILL and rerun with --resume ends with the adapter of an uninterrupted
run, bit for bit, and logs every step once; leftovers of a kill (staging folders, a cut metrics line) are
never picked up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import adapt_config, cli_args, random_gpt, steps_logged, stripes, write_class_folder, write_llamagen

from flashar.adapt.trainer import Run, adapt
from flashar.api import ensure_output
from flashar.errors import FlashARError
from flashar.io import load_weights


def adapt_process(tmp_path: Path, out: str, resume: bool = False) -> subprocess.Popen:
    options = write_llamagen(tmp_path / "model")
    args = ["adapt", "-b", "llamagen", *cli_args(options), "--data", tmp_path / "images", "--image-size", 8,
            "--stage1-steps", 30, "--stage2-steps", 30, "--batch-size", 4, "--checkpoint-every", 4,
            "--cache-dir", tmp_path / "cache", "--out", tmp_path / out] + (["--resume"] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run: the same float sums
    return subprocess.Popen([sys.executable, "-m", "flashar", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path} appeared: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.005)


def assert_bitwise_same(a: Path, b: Path) -> None:
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    write_class_folder(tmp_path / "images")
    full = adapt_process(tmp_path, "full")
    assert full.wait(timeout=300) == 0, full.stderr.read()[-2000:]  # also fills the token cache
    killed = adapt_process(tmp_path, "cut")
    wait_for(tmp_path / "cut" / "checkpoints" / "step-00000008", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert not (tmp_path / "cut" / "config.json").exists(), "the run finished before the kill; make it longer"
    again = adapt_process(tmp_path, "cut")
    assert again.wait(timeout=300) != 0 and "pass --resume" in again.stderr.read()
    resumed = adapt_process(tmp_path, "cut", resume=True)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert_bitwise_same(tmp_path / "full", tmp_path / "cut")
    assert steps_logged(tmp_path / "cut") == list(range(1, 61))
    assert not list((tmp_path / "cut" / "checkpoints").glob(".staging-*"))


def test_leftovers_of_a_kill_are_never_picked_up(tmp_path):
    """A half-written checkpoint (staging folder), a metrics line cut mid-write and steps logged after the
    last checkpoint: --resume ignores the first, drops the others, and ends where an uninterrupted run ends."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    adapt(random_gpt(), Run(stripes(), adapt_config(keep_checkpoints=True), full))
    # checkpoint at step 4, step 5 logged
    adapt(random_gpt(), Run(stripes(), adapt_config(keep_checkpoints=True), cut, stop_after=5))
    staging = cut / "checkpoints" / ".staging-x"
    staging.mkdir()
    (staging / "weights.safetensors").write_bytes(b"\x00" * 10)
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    ensure_output(cut, resume=True)
    adapt(random_gpt(), Run(stripes(), adapt_config(), cut), resume=True)
    assert_bitwise_same(full, cut)
    assert steps_logged(cut) == [1, 2, 3, 4, 5, 6]
    assert not staging.exists()


def test_a_folder_with_only_a_staging_checkpoint_is_a_fresh_start(tmp_path):
    """Killed while writing its first checkpoint: nothing to resume, so a plain rerun may use the folder."""
    (tmp_path / "checkpoints" / ".staging-x").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    ensure_output(tmp_path)
    with pytest.raises(FlashARError, match="holds no checkpoint"):
        adapt(random_gpt(), Run(stripes(), adapt_config(), tmp_path), resume=True)
    adapt(random_gpt(), Run(stripes(), adapt_config(), tmp_path))
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_leftovers_of_a_kill_during_the_final_write_or_pruning_are_removed(tmp_path):
    """A stray temporary file of the adapter's config, an old checkpoint half deleted (by a version that
    pruned in place) and one half pruned: the next run removes them all."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    adapt(random_gpt(), Run(stripes(), adapt_config(keep_checkpoints=True), full))
    adapt(random_gpt(), Run(stripes(), adapt_config(keep_checkpoints=True), cut, stop_after=5))
    stray = cut / ".config.json.k1ll3d.tmp"
    stray.write_text("{")
    half_deleted = cut / "checkpoints" / "step-00000001"
    half_deleted.mkdir()
    (half_deleted / "state.json").write_text("{}")
    (cut / "checkpoints" / ".pruning-step-00000002").mkdir()
    adapt(random_gpt(), Run(stripes(), adapt_config(keep_checkpoints=True), cut), resume=True)
    assert_bitwise_same(full, cut)
    assert not stray.exists() and not half_deleted.exists()
    assert [p.name for p in (cut / "checkpoints").iterdir()] == sorted(p.name for p in (full / "checkpoints").iterdir())


def test_a_kill_while_pruning_never_leaves_a_half_checkpoint(tmp_path, monkeypatch):
    import shutil

    from flashar.adapt import checkpoint

    class Killed(BaseException):
        pass

    def killed_midway(path, ignore_errors=False):
        next(p for p in Path(path).iterdir()).unlink()  # one file gone, then the process dies
        raise Killed

    adapt(random_gpt(), Run(stripes(), adapt_config(), tmp_path, stop_after=4))  # step-00000004 + one older
    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        adapt(random_gpt(), Run(stripes(), adapt_config(), tmp_path), resume=True)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", shutil.rmtree)
    assert all(checkpoint.is_complete(p) for p in (tmp_path / "checkpoints").glob("step-*"))


def test_leftover_cleanup_keeps_the_best_weights_and_resume_ends_with_them(tmp_path):
    """A run with held-out data killed in stage 1 has checkpoints/best-stage1/ beside its step-* checkpoints:
    the cleanup of a kill's leftovers (here a half-pruned best folder and a staging folder) keeps it, and the
    resumed run ends with the uninterrupted run's adapter; the finished folder holds no checkpoints."""
    from flashar.adapt.checkpoint import remove_leftovers

    cfg = adapt_config(val_fraction=0.25, eval_every=1, patience=2)
    full, cut = tmp_path / "full", tmp_path / "cut"
    adapt(random_gpt(), Run(stripes(), cfg, full))
    adapt(random_gpt(), Run(stripes(), cfg, cut, stop_after=3))
    root = cut / "checkpoints"
    best = sorted(p.name for p in (root / "best-stage1").iterdir())
    (root / ".pruning-best-stage1").mkdir()
    (root / ".staging-k1ll3d").mkdir()
    remove_leftovers(cut)
    assert sorted(p.name for p in root.iterdir()) == ["best-stage1", "step-00000002", "step-00000003"]
    assert sorted(p.name for p in (root / "best-stage1").iterdir()) == best == ["best.json", "weights.safetensors"]
    adapt(random_gpt(), Run(stripes(), cfg, cut), resume=True)
    assert_bitwise_same(full, cut)
    assert sorted(p.name for p in cut.iterdir() if p.name != ".flashar.lock") == ["config.json", "metrics.jsonl",
                                                                                 "model.safetensors"]


def test_resume_with_other_held_out_data_is_refused_unless_forced(tmp_path):
    """The data fingerprint covers the held-out split too: its best weights and early stop depend on it."""
    cfg = adapt_config(eval_every=1)
    adapt(random_gpt(), Run(stripes(), cfg, tmp_path, stop_after=2, val_data=stripes(4)))
    with pytest.raises(FlashARError, match="other data"):
        adapt(random_gpt(), Run(stripes(), cfg, tmp_path, val_data=stripes(5)), resume=True)
    adapt(random_gpt(), Run(stripes(), cfg, tmp_path, val_data=stripes(5), force_resume=True), resume=True)
    assert (tmp_path / "model.safetensors").is_file()
