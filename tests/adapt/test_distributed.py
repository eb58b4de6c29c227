"""Data-parallel adaptation on CPU with gloo: two processes compute what one does, and checkpoints move
between process counts and strategies.

Tolerance: a two-process step computes each half-batch's gradient separately and gloo sums the halves in
another order than one process's matmul does, so weights agree to float32 rounding, not bit for bit.
AdamW divides by sqrt(v), which turns a ~1e-7 relative gradient difference into the same relative
difference of the update; after a few steps the worst tensor differs by < 1e-5 of its largest value.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import adapt_config, cli_args, random_gpt, steps_logged, stripes, write_class_folder, write_llamagen

from flashar import api
from flashar.adapt.distributed import Distributed, session, shard_rows
from flashar.adapt.trainer import Run, adapt
from flashar.config import AdaptConfig, StageConfig
from flashar.io import load_weights

RTOL, ATOL = 1e-5, 1e-6


def config(**kw):
    """Small learning rates: the ranks' float sums stay within RTOL of one process's."""
    return adapt_config(lr1=1e-4, lr2=5e-5, **kw)


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, strategy: str, stop_after: int | None, resume: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with session("cpu") as (place, _):
        adapt(random_gpt(), Run(stripes(), config(strategy=strategy), Path(out), stop_after=stop_after, place=place),
              resume=resume)


def two_processes(out: Path, strategy: str = "ddp", stop_after: int | None = None, resume: bool = False) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(out), strategy, stop_after, resume), nprocs=2, join=True)


def one_process(out: Path, stop_after: int | None = None, resume: bool = False) -> None:
    adapt(random_gpt(), Run(stripes(), config(), out, stop_after=stop_after), resume=resume)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process")
    one_process(out)
    return out


def adapt_args(tmp_path: Path, out: str) -> list[str]:
    options = write_llamagen(tmp_path / "model")
    if not (tmp_path / "images").exists():
        write_class_folder(tmp_path / "images", per_class=4)
    args = ["adapt", "-b", "llamagen", *cli_args(options), "--data", tmp_path / "images", "--image-size", 8,
            "--stage1-steps", 2, "--stage2-steps", 2, "--batch-size", 4, "--grad-accum", 2, "--checkpoint-every", 2,
            "--cache-dir", tmp_path / "cache", "--out", tmp_path / out]
    return [str(a) for a in args]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "flashar",
               *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_torchrun_two_processes_match_one_process(tmp_path, registry, strategy):
    """`torchrun --nproc-per-node 2 -m flashar adapt` (gloo) ends with the adapter of one process and the
    same global batch, logs every step once, and only the main process writes."""
    from click.testing import CliRunner

    from flashar.cli import cli

    single = CliRunner().invoke(cli, adapt_args(tmp_path, "one"), obj=registry)
    assert single.exit_code == 0, single.output
    result = torchrun(adapt_args(tmp_path, "two") + ["--strategy", strategy])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_adapter(tmp_path / "one", tmp_path / "two")
    assert steps_logged(tmp_path / "two") == [1, 2, 3, 4]
    assert result.stderr.count("adapter written to") == 1  # the main process alone reports
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name != ".flashar.lock") == [
        "config.json", "metrics.jsonl", "model.safetensors"]


def held_out_config(strategy: str = "ddp") -> AdaptConfig:
    return config(strategy=strategy, val_fraction=0.25, eval_every=1, patience=1, keep_checkpoints=True).model_copy(
        update={"stage2": StageConfig(steps=3, lr=1.0, flat_steps=1)})


def _held_out_worker(rank: int, world: int, port: int, out: str, strategy: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with session("cpu") as (place, _):
        adapt(random_gpt(), Run(stripes(), held_out_config(strategy), Path(out), place=place))


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_evaluate_held_out_data_and_stop_as_one_does(tmp_path, strategy):
    """Every process evaluates the whole held-out split, so they stop together; a stage-2 learning rate far
    too high stops stage 2 early and restores its best (the start) weights, sharded under FSDP."""
    adapt(random_gpt(), Run(stripes(), held_out_config(), tmp_path / "one"))
    mp.spawn(_held_out_worker, args=(2, free_port(), str(tmp_path / "two"), strategy), nprocs=2, join=True)
    assert_same_adapter(tmp_path / "one", tmp_path / "two")
    held = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
             if "val_nll_flashar" in line] for name in ("one", "two")]
    assert [(r["stage"], r["step"], r["best_step"], r["stopped_early"]) for r in held[0]] == \
           [(r["stage"], r["step"], r["best_step"], r["stopped_early"]) for r in held[1]]
    assert held[0][-1]["stopped_early"] and held[0][-1]["best_step"] < held[0][-1]["step"]


@pytest.mark.parametrize("first, then", [("ddp", "one"), pytest.param("one", "fsdp", marks=pytest.mark.slow),
                                         pytest.param("fsdp", "one", marks=pytest.mark.slow)])
def test_a_checkpoint_resumes_with_another_process_count(tmp_path, reference, first, then):
    """Stopped in stage 2 after step 5 (checkpoint at step 4: moments of the backbone and the head), resumed
    with the other process count: the adapter matches the uninterrupted one-process run."""
    out = tmp_path / "run"
    if first == "one":
        one_process(out, stop_after=5)
    else:
        two_processes(out, first, stop_after=5)
    assert json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())["world_size"] == (
        1 if first == "one" else 2)
    if then == "one":
        one_process(out, resume=True)
    else:
        two_processes(out, then, resume=True)
    assert_same_adapter(reference, out)
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]


def _emu35_worker(rank: int, world: int, port: int, options: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with session("cpu") as (place, _):
        adapt(
            api.load_backbone("emu35", options), Run(prompt_data(), emu35_config(grad_accum=1), Path(out), place=place))


def prompt_data():
    from flashar.adapt.data import TokenData

    codes = torch.randint(0, 131072, (8, 3, 3), generator=torch.Generator().manual_seed(0))
    return TokenData(codes, ["a red cat", "a dog", "a blue sky at night", "x"] * 2)


def emu35_config(grad_accum: int) -> AdaptConfig:
    return AdaptConfig(stage1=StageConfig(steps=2, lr=1e-4), stage2=StageConfig(steps=2, lr=5e-5), batch_size=4,
                       grad_accum=grad_accum, checkpoint_every=2, strategy="fsdp", precision="fp32")


@pytest.mark.slow
def test_fsdp_shards_emu35_by_its_own_units(tmp_path):
    """Emu3.5 runs a block's projections itself (``fsdp_units``). Its prompts are right-padded to the longest
    row of a micro-batch, so two processes match one process that accumulates the same two micro-batches."""
    from helpers import write_emu35

    try:
        options = write_emu35(tmp_path / "model")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    adapt(api.load_backbone("emu35", options), Run(prompt_data(), emu35_config(grad_accum=2), tmp_path / "one"))
    mp.spawn(_emu35_worker, args=(2, free_port(), options, str(tmp_path / "two")), nprocs=2, join=True)
    assert_same_adapter(tmp_path / "one", tmp_path / "two")


def test_each_process_takes_a_contiguous_share_of_every_micro_batch():
    shares = [shard_rows(6, Distributed(rank=r, world_size=3, active=True)) for r in range(3)]
    assert shares == [slice(0, 2), slice(2, 4), slice(4, 6)]


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_on_cuda_matches_one_process(tmp_path, registry, strategy):
    """nccl, one process per GPU (up to 2), ``cuda:LOCAL_RANK``: the adapter of a plain one-GPU run (fp32, so
    only reduction order differs)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from click.testing import CliRunner

    from flashar.cli import cli

    gpus = min(2, torch.cuda.device_count())
    cuda = ["--device", "cuda", "--precision", "fp32"]
    single = CliRunner().invoke(cli, adapt_args(tmp_path, "one") + cuda, obj=registry)
    assert single.exit_code == 0, single.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus), "-m",
               "flashar", *adapt_args(tmp_path, "many"), *cuda, "--strategy", strategy]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    wa, wb = load_weights(tmp_path / "one" / "model.safetensors"), load_weights(tmp_path / "many" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
