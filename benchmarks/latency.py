"""Latency and roofline of every decoding method across grids, batches, dtypes and compile modes.

    python benchmarks/latency.py                       # the CPU table quoted in the README
    python benchmarks/latency.py --device cuda --dtypes bfloat16 --out benchmarks/results/latency_gpu.json

LlamaGen-B / -L architectures with random weights (speed does not depend on the weights, except for the
acceptance rates of speculative methods, which are reported), CFG on (batch rows doubled), one process:
for each configuration the methods run interleaved (``flashar.compare.timing``), eager, compiled and
compiled with max-autotune, after a warm-up that includes compilation. Medians; ``vs_raster`` compares
with raster in the same mode.

Roofline: the script measures this machine's read bandwidth and matmul throughput per dtype (the best of
several probes, repeated before and after every configuration: on a shared machine a single probe can
catch a slow moment and make every bound too loose; the final bounds use the highest figures seen), then
for each row computes an ideal time = sum over the method's forward passes of max(bytes read / bandwidth,
FLOPs / matmul throughput), where bytes are the weights plus the KV cache read by the step and FLOPs are
2 x matmul parameters x tokens fed by the eager run (padded slots included where it pads, as with
``flashar:buckets=N``) plus attention. ``vs roofline`` = measured / ideal. ``ideal_s_by_kind`` is the same
bound for the linears alone and for attention alone (its FLOPs are the two matmuls: the softmax's
exponentials, one per query and visible key, are in no bound).

Kernel time: the same eager run also records every matmul of the layers and heads and every attention
call, with their shapes, weights and cache slices, in order; replaying just those calls through the kernels
a compiled step runs (median of 3 replays) gives the time this machine's kernels need for the method's work
with nothing around them (no norms, RoPE, sampling, step dispatch); ``kernel_s_by_kind`` is each kind's
share of that replay (every call timed in place), so each kind can be set against its own bound with the
caches as warm or cold as the step leaves them (replayed alone, attention found its KV caches still in
the last-level cache). On CPU the linears are prepacked as
inductor's freezing packs them (oneDNN for bf16 and for a weight fed varying row counts, MKL for fp32 at
one row count, except off Intel CPUs, where flashar has it packed for oneDNN too), on CUDA they are
``F.linear``; attention is ``flashar.backbone.attention``, the path the backbones take on this device. ``vs kernels``
= measured / kernel time: what a method adds on top of its kernels; kernel time / ideal: how far the kernels
themselves run from the roofline. The fp32 matmul probe takes the better of MKL's ``a @ a`` and a prepacked oneDNN
linear (MKL's square matmul ran below what the packed kernels reach).

On CUDA each compiled row also gets what bounds a small model's step there: ``kernels_per_step`` (CUDA
kernels of 16 profiled step calls of one more generation, per call), ``host_us_per_step`` (median host time of a step
call, unsynchronised; ``host_us_per_step_guarded`` the same with FLASHAR_SKIP_GUARDS=0) and ``launch_floor_s`` =
passes x kernels per step x the measured time per node of a replayed CUDA graph (``node_us``); ``bound_s`` =
max(ideal, launch floor) is what the targets judge. The JSON and a PNG plot go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from flashar.adapter import Adapter, new_metadata
from flashar.attention import CPU_NATIVE, attention
from flashar.backends.llamagen.backbone import LlamaGenBackbone
from flashar.backends.llamagen.model import PRESETS, GPTConfig
from flashar.branch import FlashARHead
from flashar.cliutils import parse_methods
from flashar.compare import cpu_model
from flashar.compare.timing import time_methods
from flashar.compilation import onednn_fp32_wanted
from flashar.config import BranchConfig, SamplingConfig
from flashar.batches import synchronize
from flashar.plugins import Registry, build_manager

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("linear", "attention")  # the kernels the pass counter records, bounded and timed per kind too


def seconds(fn, device, runs: int) -> list[float]:
    """Wall time of each of ``runs`` calls of ``fn``, synchronised at both ends."""
    times = []
    for _ in range(runs):
        synchronize(device)
        began = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return times


def replay_by_kind(calls: list[tuple[str, Callable]], device) -> dict[str, float]:
    """Seconds of one in-order run of the (kind, call) list: in all ("all") and per kind, each call timed
    from the end of the one before (CUDA: events between the calls, read after one synchronisation; a span
    includes any time the GPU waited for the host to launch the call, as the replay as a whole did)."""
    if device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(calls) + 1)]
        synchronize(device)
        marks[0].record()
        for (_, call), mark in zip(calls, marks[1:]):
            call()
            mark.record()
        synchronize(device)
        spans = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    else:
        ends = [time.perf_counter()]
        for _, call in calls:
            call()
            ends.append(time.perf_counter())
        spans = [b - a for a, b in zip(ends, ends[1:])]
    times = {kind: 0.0 for kind in KINDS}
    for (kind, _), span in zip(calls, spans):
        times[kind] += span
    return {"all": sum(spans), **times}


def measure_bandwidth(device, mb: int = 512) -> float:
    """Peak read bandwidth in bytes/s: summing a large fp32 buffer (the fastest of 5, after one warm-up)."""
    x = torch.ones(mb * 2**20 // 4, device=device)
    return x.numel() * 4 / min(seconds(x.sum, device, 6)[1:])


def measure_matmul(device, dtype, n: int = 2048, budget_s: float = 0.05) -> float:
    """Peak dense matmul throughput in FLOP/s (the fastest of 5, after one warm-up; on CPU the better of
    ``a @ a`` and the prepacked linear a compiled step runs). The side shrinks from ``n`` (to a multiple of
    256, at least 512) where one product would take over ``budget_s`` by a 512-side probe: bf16 on a CPU
    without native bf16 (AVX2 only) runs at ~19 GFLOP/s, and one probe at side 2,048 took from 17 s to 6 minutes
    there."""
    small = torch.randn(512, 512, device=device, dtype=dtype)
    per_512 = min(seconds(lambda: small @ small, device, 3))
    n = max(512, min(n, int(512 * (budget_s / per_512) ** (1 / 3)) // 256 * 256))
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = min(seconds(lambda: a @ a, device, 6)[1:])
    if device.type == "cpu":
        linear = packed_linear(a, n)
        best = min(best, min(seconds(lambda: linear(a), device, 6)[1:]))
    return 2 * n**3 / best


def packed_linear(weight, rows: int, varying: bool = False):
    """``x -> x @ weight.T`` through the kernel inductor's freezing emits on CPU: the weight prepacked for
    ``rows`` rows (oneDNN for bf16/fp16, when the row count varies, or off Intel CPUs; MKL for fp32);
    ``F.linear`` where inductor packs nothing: off CPU, and for bf16/fp16 on a CPU whose oneDNN lacks that
    type (AVX2 only)."""
    mkldnn = torch.ops.mkldnn
    if not (
        weight.device.type == "cpu" and torch.backends.mkldnn.is_available() and CPU_NATIVE.get(weight.dtype, True)):
        return functools.partial(F.linear, weight=weight)
    if weight.dtype in (torch.bfloat16, torch.float16) or varying or not torch._C.has_mkl or onednn_fp32_wanted():
        packed = mkldnn._reorder_linear_weight(weight, rows)
        return lambda x: mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, None, rows)


def node_us(device, nodes: int = 256) -> float:
    """Microseconds per node of a replayed CUDA graph of ``nodes`` dependent one-element kernels (NaN off CUDA):
    the least a graph-replayed kernel costs, whatever it computes."""
    if device.type != "cuda":
        return float("nan")
    x = torch.zeros(1, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.add_(1)  # warm the kernel up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(nodes):
            x.add_(1)
    graph.replay()
    return min(seconds(graph.replay, device, 6)[1:]) / nodes * 1e6


def step_costs(method, conditions, grid, sampling, first: int = 8, count: int = 16) -> dict:
    """CUDA kernels per step (torch.profiler over step calls [first, first + count), or as many as the
    generation has) and the median host microseconds of a step call (calls 2-40, unsynchronised: before the
    launch queue fills, that is pure host work), from one more generation of a warm method. Off CUDA the
    kernel count is 0 (the flow still runs, for tests); ``run_config`` asks only on CUDA."""
    from flashar.sampling import make_generator

    device = method.backbone.device
    step, host = method.step, []
    activity = torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU
    prof = torch.profiler.profile(activities=[activity])
    profiled = []

    def timed(*args, **kwargs):
        if len(host) == first:
            synchronize(device)
            prof.start()
        began = time.perf_counter()
        out = step(*args, **kwargs)
        host.append(time.perf_counter() - began)
        if first < len(host) <= first + count:
            profiled.append(len(host))
            if len(host) == first + count:
                synchronize(device)
                prof.stop()
        return out

    method.step = timed
    try:
        method.generate(conditions, grid, sampling, make_generator(0, device))
        synchronize(device)
    finally:
        method.step = step
    if not profiled:
        return {"host_us_per_step": statistics.median(host[2:40] or host) * 1e6}
    if len(profiled) < count:  # a short generation: its last profiled step was its last step
        prof.stop()
    kernels = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"kernels_per_step": kernels / len(profiled),
            "host_us_per_step": statistics.median(host[2:40] or host) * 1e6}


@contextlib.contextmanager
def skip_guards_setting(value: str):
    """FLASHAR_SKIP_GUARDS set to ``value`` ("1" or "0") within, put back as it was after."""
    previous = os.environ.get("FLASHAR_SKIP_GUARDS")
    os.environ["FLASHAR_SKIP_GUARDS"] = value
    try:
        yield
    finally:
        os.environ.pop("FLASHAR_SKIP_GUARDS")
        if previous is not None:
            os.environ["FLASHAR_SKIP_GUARDS"] = previous


def guarded_host_us(method, conditions, grid, sampling) -> float:
    """``host_us_per_step`` of one more generation with FLASHAR_SKIP_GUARDS=0, every step evaluating its
    guards: beside the default's figure, what skipping them saves per step."""
    with skip_guards_setting("0"):
        return step_costs(method, conditions, grid, sampling)["host_us_per_step"]


def random_backbone(preset: str, dtype, device) -> LlamaGenBackbone:
    torch.manual_seed(0)
    model = LlamaGenBackbone(GPTConfig(**PRESETS[preset]), preset=preset)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.ndim > 1 else torch.nn.init.ones_(p)
    return model.to(device=device, dtype=dtype).eval()


def flashar_adapter(backbone, grid) -> Adapter:
    head = FlashARHead(backbone, BranchConfig(num_blocks=1))
    return Adapter(new_metadata(backbone, head, grid), head, backbone)


COMPILE = {"eager": False, "compiled": True, "max-autotune": "max-autotune"}  # --compile names -> Method(compile=...)


def build_methods(registry, specs, backbone, grid, compile_modes):
    """``{"spec/mode": method}`` for method specs as ``flashar compare --methods`` takes them ("flashar:buckets=4")."""
    methods = {}
    adapter = flashar_adapter(backbone, grid)
    for (spec, (name, options)), mode in itertools.product(
        parse_methods(",".join(specs), registry).items(), compile_modes):
        cls = registry.method(name)
        kwargs = {"adapter": adapter} if name == "flashar" else {}
        methods[f"{spec}/{mode}"] = cls(backbone, cls.Options(**options), compile=COMPILE[mode], **kwargs)
    return methods


class PassCounter:
    """Records, per forward pass, the bytes read and FLOPs of every layer and head call of one generation,
    and the matmul and attention calls themselves (``kernels``) for :meth:`kernel_seconds`."""

    def __init__(self, backbone):
        self.backbone, self.passes, self.kernels = backbone, [], []

    def __enter__(self):
        bb = self.backbone
        self._forward, self._layer, self._logits = bb.forward, bb.layer_forward, bb.logits

        def forward(*args, **kwargs):
            self.passes.append({kind: {"bytes": 0.0, "flops": 0.0} for kind in KINDS})
            return self._forward(*args, **kwargs)

        def layer_forward(layer, x, positions, mask, kv, slots):
            rows, tokens, dim = x.shape
            keys = mask.shape[-1]  # the cache slots attention reads
            weights = [p for p in layer.parameters() if p.ndim > 1]
            params = sum(w.numel() for w in weights)
            elt = x.element_size()
            kv_dim = 2 * bb.num_kv_heads * bb.head_dim
            linear, attention = self.passes[-1]["linear"], self.passes[-1]["attention"]
            linear["bytes"] += params * elt
            linear["flops"] += 2 * params * rows * tokens
            attention["bytes"] += rows * keys * kv_dim * elt if kv is not None else 0
            attention["flops"] += 4 * rows * tokens * keys * dim
            self.kernels += [("linear", w, rows * tokens) for w in weights]
            self.kernels.append(("attention", (rows, dim // bb.head_dim, tokens, bb.head_dim), mask, kv))
            return self._layer(layer, x, positions, mask, kv, slots)

        def logits(h, head=None):
            weight = (head or bb.output).weight
            rows = h.numel() // h.shape[-1]
            if self.passes:
                self.passes[-1]["linear"]["bytes"] += bb.codebook_size * weight.shape[1] * h.element_size()
                self.passes[-1]["linear"]["flops"] += 2 * rows * bb.codebook_size * weight.shape[1]
                self.kernels.append(("linear", weight[bb.code_offset : bb.code_offset + bb.codebook_size], rows))
            return self._logits(h, head)

        bb.forward, bb.layer_forward, bb.logits = forward, layer_forward, logits
        return self

    def __exit__(self, *exc):
        for name in ("forward", "layer_forward", "logits"):
            delattr(self.backbone, name)  # drop the instance overrides

    def ideal_seconds(self, bandwidth: float, flops_per_second: float, kinds: tuple[str, ...] = KINDS) -> float:
        """Sum over passes of max(bytes / bandwidth, FLOPs / throughput) of the calls of these kinds."""
        def cost(p: dict, key: str) -> float:
            return sum(p[kind][key] for kind in kinds)

        return sum(max(cost(p, "bytes") / bandwidth, cost(p, "flops") / flops_per_second) for p in self.passes)

    def kernel_seconds(self, repeats: int = 3) -> dict[str, float]:
        """Median time of replaying the recorded matmul and attention calls in order ("all"), and of each kind's
        share of that same replay (``KINDS``, every call timed where it runs); frees the record.

        Each kind is timed inside the in-order replay, not replayed alone: alone, attention re-read caches that
        had stayed in the last-level cache since its previous call (78 MB for GPT-B 32x32 against the 300 MiB L3
        of the receipts' Xeon), where a step reads them after the weights have streamed through."""
        calls, self.kernels = self._replay_calls(), []
        device = self.backbone.device
        replays = [replay_by_kind(calls, device) for _ in range(repeats)]
        return {kind: statistics.median(r[kind] for r in replays) for kind in ("all", *KINDS)}

    def _replay_calls(self) -> list[tuple[str, Callable]]:
        """(kind, zero-argument call) of every recorded kernel, on the real weights and cache slices, inputs made
        up front, each weight prepacked once (for the most rows it is fed, as a dynamic length's hint)."""
        bb, inputs = self.backbone, {}

        def made(*shape):  # one random input per shape, shared by the calls of that shape
            if shape not in inputs:
                inputs[shape] = torch.randn(shape, dtype=bb.dtype, device=bb.device)
            return inputs[shape]

        def key(weight):  # the head's weight is a fresh slice per pass: same memory, new tensor
            return weight.data_ptr(), tuple(weight.shape)

        rows_of: dict[tuple, set[int]] = {}
        for kind, *args in self.kernels:
            if kind == "linear":
                rows_of.setdefault(key(args[0]), set()).add(args[1])
        linears, calls = {}, []
        for kind, *args in self.kernels:
            if kind == "linear":
                weight, rows = args
                seen = rows_of[key(weight)]
                if key(weight) not in linears:
                    linears[key(weight)] = packed_linear(weight, max(seen), varying=len(seen) > 1)
                calls.append(("linear", functools.partial(linears[key(weight)], made(rows, weight.shape[1]))))
                continue
            shape, mask, kv = args
            q = made(*shape)
            k, v = (t[:, :, : mask.shape[-1]] for t in kv) if kv is not None else (q, q)
            calls.append(("attention", functools.partial(attention, q, k, v, mask)))
        return calls


def count_passes(method, conditions, grid, sampling) -> PassCounter:
    from flashar.sampling import make_generator

    with PassCounter(method.backbone) as counter:
        method.generate(conditions, grid, sampling, make_generator(0, method.backbone.device))
    return counter


class Peaks:
    """The highest read bandwidth and matmul throughput (per dtype) probed so far in this run."""

    def __init__(self, device):
        self.device, self.bandwidth, self.matmul = device, 0.0, {}
        self.node_us = float("inf") if device.type == "cuda" else float("nan")  # the fastest graph node seen

    def probe(self, dtype_name: str) -> None:
        self.bandwidth = max(self.bandwidth, measure_bandwidth(self.device))
        if self.device.type == "cuda":
            self.node_us = min(self.node_us, node_us(self.device))
        self.matmul[dtype_name] = max(
            self.matmul.get(dtype_name, 0.0), measure_matmul(self.device, getattr(torch, dtype_name)))

    def bound(self, counter: PassCounter | None, dtype_name: str, kinds: tuple[str, ...] = KINDS) -> float:
        return (
            float("nan") if counter is None else counter.ideal_seconds(self.bandwidth, self.matmul[dtype_name], kinds))


def apply_bounds(report: dict, rows: list[tuple[dict, PassCounter | None]], peaks: Peaks) -> None:
    """(Re)compute every row's ideal time from the highest peaks seen so far."""
    report["bandwidth_gbs"] = peaks.bandwidth / 1e9
    report["matmul_gflops"] = {k: v / 1e9 for k, v in peaks.matmul.items()}
    report["node_us"] = peaks.node_us
    for row, counter in rows:
        row["ideal_s"] = peaks.bound(counter, row["dtype"])
        row["ideal_s_by_kind"] = {kind: peaks.bound(counter, row["dtype"], (kind,)) for kind in KINDS}
        row["vs_roofline"] = row["median_s"] / row["ideal_s"]
        floor = row["forward_passes"] * row.get("kernels_per_step", float("nan")) * peaks.node_us * 1e-6
        row["launch_floor_s"] = floor
        row["bound_s"] = max(row["ideal_s"], floor) if floor == floor else row["ideal_s"]  # NaN off CUDA
        row["vs_bound"] = row["median_s"] / row["bound_s"]


def run(args) -> dict:
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    pm, infos = build_manager(load_entry_points=False)
    registry = Registry.from_manager(pm, infos)
    names = list(parse_methods(args.methods, registry))
    report = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
              "cpu": cpu_model(), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "bandwidth_gbs": 0.0, "matmul_gflops": {}, "rows": []}
    peaks, rows = Peaks(device), []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for preset in args.models.split(","):
            backbone = random_backbone(preset, dtype, device)
            for side, batch in itertools.product(map(int, args.grids.split(",")), map(int, args.batches.split(","))):
                peaks.probe(dtype_name)
                rows += run_config(args, registry, names, backbone, preset, dtype_name, (side, side), batch, peaks)
                peaks.probe(dtype_name)  # again after: one probe per dtype can catch a slow moment
                report["rows"] = [row for row, _ in rows]
                apply_bounds(report, rows, peaks)
                RESULTS.mkdir(exist_ok=True)
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_config(args, registry, names, backbone, preset, dtype_name, grid, batch,
               peaks: Peaks) -> list[tuple[dict, PassCounter | None]]:
    torch._dynamo.reset()
    sampling = SamplingConfig(cfg_scale=4.0, top_k=2000, temperature=1.0)
    conditions = [207 + i for i in range(batch)]
    methods = build_methods(registry, names, backbone, grid, args.compile.split(","))
    # the bound counts the passes of an eager run (a compiled step cannot be instrumented); same passes either way
    eager = {n: m for n, m in methods.items() if n.endswith("/eager")} or build_methods(
        registry, names, backbone, grid, ["eager"])
    passes = {n: count_passes(m, conditions, grid, sampling) for n, m in eager.items()}
    timings = time_methods(methods, conditions, grid, {n: sampling for n in methods}, args.repeats, args.warmup)
    # after timing: same warm machine
    kernel_times = {name: counter.kernel_seconds() for name, counter in passes.items()}
    rows = []
    for name, t in timings.items():
        spec, mode = name.rsplit("/", 1)
        counter = passes.get(f"{spec}/eager")
        raster = timings.get(f"raster/{mode}")  # the baseline in the same compile mode
        row = {"model": preset, "dtype": dtype_name, "grid": f"{grid[0]}x{grid[1]}", "batch": batch, "method": name,
            "forward_passes": t.forward_passes, "median_s": t.median, "seconds": t.seconds,
            "compile_s": t.compile_seconds, "graphs": t.graphs, "recompiles": t.recompiles,
            "vs_raster": raster.median / t.median if raster else float("nan"),
            "kernel_s": kernel_times.get(f"{spec}/eager", {}).get("all", float("nan")),
            "kernel_s_by_kind": {kind: kernel_times.get(f"{spec}/eager", {}).get(kind, float("nan")) for kind in KINDS}}
        row["vs_kernels"] = t.median / row["kernel_s"]
        if mode != "eager" and backbone.device.type == "cuda":
            row |= step_costs(methods[name], conditions, grid, sampling)
            row["host_us_per_step_guarded"] = guarded_host_us(methods[name], conditions, grid, sampling)
        bound = peaks.bound(counter, dtype_name)  # provisional: the final bounds use the run's highest peaks
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "seconds"}
                         | {"ideal_s": round(bound, 3), "vs_roofline": round(t.median / bound, 3)}), flush=True)
        rows.append((row, counter))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="GPT-B,GPT-L")
    parser.add_argument("--grids", default="16,24,32")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--methods", default="raster,flashar,flashar:buckets=4,sjd,zipar,gsd",
                        help="method ids, with options as id:key=value;key=value")
    parser.add_argument(
        "--compile", default="eager,compiled,max-autotune", help=f"compile modes, of {', '.join(COMPILE)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "latency_cpu.json"))
    args = parser.parse_args()
    report = run(args)
    from tables import plot  # benchmarks/, this script's folder

    plot(report, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
