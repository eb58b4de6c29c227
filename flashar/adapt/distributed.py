"""Multi-process adaptation on PyTorch's own distributed stack: torchrun, DDP and FSDP2.

``torchrun --nproc-per-node N -m flashar adapt ...`` starts N processes and describes them in the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``);
:func:`session` joins that process group (nccl on CUDA, each process on ``cuda:LOCAL_RANK``; gloo on CPU).
Without torchrun everything here is a no-op and the trainer runs as one process.

Data parallelism: every process draws the same global batch from the seeded sampler and takes its
contiguous share of every micro-batch (:func:`shard_rows`), so with ``batch_size = grad_accum * N * m``
each process computes m rows per micro-batch and the averaged gradient equals the one-process gradient
of the same global batch (the losses are means over equal-sized shares). ``strategy="ddp"`` wraps the
model in DistributedDataParallel, rebuilt per stage because each stage trains a different parameter set;
``strategy="fsdp"`` shards it once with FSDP2 (``fully_shard`` per transformer block, per vertical block,
then the root), and per-stage freezing is done through ``requires_grad``.

Checkpoints hold global state only: the sampler position and the full (gathered) weights and optimizer
moments, in the layout a one-process optimizer uses. A run checkpointed with any process count and
either strategy resumes with any other (:func:`full_tensors` gathers FSDP shards;
:func:`shard_optimizer_state` cuts a full state back into this process's shards).
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flashar.errors import FlashARError


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: its rank among ``world_size`` processes; ``active`` once a group exists."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Distributed()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)
    except (TypeError, ValueError):
        raise FlashARError(f"environment variable {name}={text!r} is not an integer; launch with torchrun") from None


def init_from_env(device: str) -> tuple[Distributed, str]:
    """Join the process group torchrun describes; returns (this process's place, its device)."""
    if not launched_by_torchrun():
        return SINGLE, device
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK", 0)
    if torch.device(device).type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local >= count:
            raise FlashARError(f"process with LOCAL_RANK {local} has no GPU (this machine has {count}); "
                               f"start at most {count} processes per node, or use --device cpu")
        device = f"cuda:{local}"  # one GPU per process, whatever index --device named
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        is_cuda = torch.device(device).type == "cuda"
        dist.init_process_group("nccl" if is_cuda else "gloo", device_id=torch.device(device) if is_cuda else None)
    return Distributed(rank, world, local, True), device


@contextmanager
def session(device: str) -> Iterator[tuple[Distributed, str]]:
    """:func:`init_from_env` for the duration of a command; leaves the process group at the end.

    After a normal run the processes wait for each other before leaving: one that tore its group down while
    another was still in a last collective (gloo on CPU) could abort the other ("terminate called without
    an active exception"). Leaving also collects garbage around ``destroy_process_group``: FSDP wrappers sit
    in reference cycles that hold the group, and a gloo group first freed during interpreter shutdown can
    abort the process the same way."""
    place, device = init_from_env(device)
    try:
        yield place, device
        barrier(place)
    finally:
        if place.active and dist.is_initialized():
            gc.collect()  # drop the cycles (FSDP state, hooks) that still reference the group
            dist.destroy_process_group()
            gc.collect()  # and free the group itself while the interpreter is whole


def current() -> Distributed:
    """This process's place in an already initialised process group (one process if there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), True)
    return SINGLE


def barrier(place: Distributed) -> None:
    if place.active:
        dist.barrier()


@contextmanager
def main_first(place: Distributed) -> Iterator[None]:
    """Run the block on the main process first (it fills a cache), then on the others (they read it)."""
    if not place.is_main:
        barrier(place)
    yield
    if place.is_main:
        barrier(place)


def shard_rows(count: int, place: Distributed) -> slice:
    """This process's contiguous share of ``count`` rows; ``count`` is a multiple of the world size."""
    share = count // place.world_size
    return slice(place.rank * share, (place.rank + 1) * share)


def mean_over_processes(values: dict[str, float], place: Distributed, device: torch.device) -> dict[str, float]:
    """Average per-process metrics (every process holds the same keys); a no-op for one process."""
    if place.world_size == 1:
        return values
    keys = sorted(values)
    total = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)  # (num_keys,)
    dist.all_reduce(total)
    return dict(zip(keys, (total / place.world_size).tolist()))


# --- wrappers -----------------------------------------------------------------------------------------
def wrap_ddp(model: nn.Module, place: Distributed, device: torch.device) -> nn.Module:
    """DDP over the parameters that currently require grad (build a new wrapper when that set changes).

    ``find_unused_parameters``: a backbone may hold trainable weights the loss never reads (stage 2 trains
    all of them); DDP then marks them ready instead of waiting for their gradients. It costs one graph
    walk per forward (and a one-time warning when nothing is unused); ``static_graph`` would avoid it
    but does not combine with ``no_sync``, which gradient accumulation needs.
    """
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def shard_fsdp(model: nn.Module, units: list[nn.Module]) -> None:
    """FSDP2 in place: ``fully_shard`` every unit (a transformer block), then the root (everything else)."""
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit)
    fully_shard(model)


def sync_context(wrapped: nn.Module, sync: bool):
    """DDP all-reduces on the last micro-batch of a step only; accumulation before it stays local."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel) and not sync:
        return wrapped.no_sync()
    return nullcontext()


# --- full state for checkpoints -----------------------------------------------------------------------
def _full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()  # collective: every process calls it in the same order
    return value


def full_tensors(state: dict[str, Any], keep: bool = True) -> dict[str, Any]:
    """Every FSDP shard (DTensor) gathered to its full value, detached on CPU; ``keep=False`` drops the
    result (non-main processes take part in the gathers but write nothing)."""
    out = {}
    for key, value in state.items():
        value = _full(value)
        if keep:
            out[key] = value.detach().cpu() if torch.is_tensor(value) else value
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
    """``optimizer.state_dict()`` with FSDP-sharded moments gathered: the layout one process would save."""
    state = optimizer.state_dict()
    entries = {pid: full_tensors(values, keep) for pid, values in state["state"].items()}
    return {"state": entries, "param_groups": state["param_groups"]}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state (as saved) cut into this process's shards where the parameters are DTensors."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, entries in state["state"].items():
        param = params[int(pid)]
        if not isinstance(param, DTensor):
            continue
        for name, value in entries.items():
            if torch.is_tensor(value) and tuple(value.shape) == tuple(param.shape):
                # every process holds the full value, so each cuts its own shard (no communication)
                local = value.to(param.to_local().device)
                entries[name] = distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)
    return state


def load_full_state(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """Full trainable weights (``trainable_state`` keys: ``head.*``, ``backbone.*``, ``lora.*``) into an
    FSDP-sharded model; every process passes the same tensors and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    names = {name.replace(".default", ""): name for name in model.state_dict()}  # peft's adapter name dropped
    full = {names["backbone." + key[5:]] if key.startswith("lora.") else key: value for key, value in weights.items()}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))


def full_norm(norm: Tensor) -> float:
    """The gradient norm as a float (FSDP returns it as a replicated DTensor)."""
    return float(_full(norm))
