"""The GPU latency receipt in one run (< 8 minutes on one H100/H200): GPT-B every method, then a model ladder.

    python benchmarks/gpu_ladder.py --out benchmarks/results/latency_gpu_<gpu>.json
    python benchmarks/gpu_ladder.py --tiny --device cpu --out /tmp/ladder.json     # smoke test of the flow

1. LlamaGen GPT-B, 32x32, bf16, batch 1 with CFG: every method eager and compiled, through ``latency.py``'s
   ``run_config`` (roofline from the eager run's passes, kernel replay, and on CUDA kernels per step, host us
   per step and the launch floor).
2. The same GPT-B, raster and FlashAR compiled, through the other attention path (math when the configured
   one is auto or sdpa): the measurement that decides the CUDA default of ``flashar.backbone.attention``
   (FlexAttention, the third candidate, runs last, after the ladder, if the budget leaves time).
3. A ladder with random weights, bf16, batch 1 with CFG, raster against FlashAR, both compiled: an
   Emu3.5-34B-shaped stack (the real Qwen3 layers of the emu35 backend, 64 layers, 64 query / 8 KV heads of
   128, a stub text tokenizer; FlashAR with one branch block, as part 1) at 32x32, then LlamaGen GPT-L, GPT-XL,
   GPT-XXL and GPT-3B at 32x32 and 24x24. Eager runs of these would take minutes, so their bound is analytic: per
   pass, the weights the pass reads (layers, the code rows of the head; FlashAR also its branch blocks and vertical
   head) plus the mean KV window, against the measured bandwidth, or 2 x parameters x rows against the measured
   matmul peak. When the whole Emu3.5 stack does not fit in free memory, fewer layers run and the step time is scaled
   by the ratio of the 64-layer bound to the measured one (``layers_run`` says so).

Work runs in that order and stops starting new configurations after ``--budget-s`` seconds, naming what it
skipped. Options to compare on the GPU: ``--attention math|sdpa|flex`` (``FLASHAR_ATTENTION``, read at import, so
set before flashar loads), ``--coordinate-descent`` (inductor's coordinate-descent tuning), ``--buckets N``
(FlashAR's static diagonal sizes on CUDA).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
EMU35_34B = dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                 num_key_value_heads=8, head_dim=128, vocab_size=282926)
LADDER = ("GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(RESULTS / "latency_gpu.json"))
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new configuration after this")
    parser.add_argument("--methods", default="raster,flashar,flashar:buckets=4,zipar,sjd,gsd", help="part 1's methods")
    parser.add_argument("--ladder", default=",".join(LADDER))
    parser.add_argument("--grids", default="32,24", help="the ladder's grid sides, in order")
    parser.add_argument("--emu35-layers", type=int, default=64, help="at most this many layers of the Emu3.5 stack")
    parser.add_argument("--attention", choices=["auto", "math", "sdpa", "flex"], default=None)
    parser.add_argument("--coordinate-descent", action="store_true")
    parser.add_argument("--buckets", type=int, default=1, help="FlashAR's static diagonal sizes in the ladder")
    parser.add_argument("--repeats", type=int, default=2, help="timed generations of each part-1 method")
    parser.add_argument(
        "--ladder-repeats", type=int, default=1, help="timed generations in the ladder (after a warm-up)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (2 layers, 4x4 grid): checks the flow on CPU")
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.attention:
        os.environ["FLASHAR_ATTENTION"] = args.attention  # before flashar is imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch

    import latency

    if args.coordinate_descent:
        torch._inductor.config.coordinate_descent_tuning = True
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    device = torch.device(args.device)
    report = {"torch": torch.__version__, "device": str(device), "cpu": latency.cpu_model(),
              "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "options": {"attention": os.environ.get("FLASHAR_ATTENTION", "auto"),
              "coordinate_descent": args.coordinate_descent, "buckets": args.buckets}, "rows": [], "ladder": [],
              "skipped": [], "failed": []}
    peaks = latency.Peaks(device)
    peaks.probe("bfloat16")
    save = lambda: Path(args.out).write_text(__import__("json").dumps(report, indent=1) + "\n")  # noqa: E731
    over = lambda: time.perf_counter() - started > args.budget_s  # noqa: E731

    gpt_b = tiny_llamagen(device) if args.tiny else latency.random_backbone("GPT-B", torch.bfloat16, device)
    side = 4 if args.tiny else 32
    pm, infos = latency.build_manager(load_entry_points=False)
    registry = latency.Registry.from_manager(pm, infos)
    run_args = argparse.Namespace(compile="eager,compiled", repeats=args.repeats, warmup=1)
    try:  # part 1; a method that fails here must not cost the ladder
        rows = latency.run_config(
            run_args, registry, args.methods.split(","), gpt_b, "GPT-B", "bfloat16", (side, side), 1, peaks)
        peaks.probe("bfloat16")
        latency.apply_bounds(report, rows, peaks)
        report["rows"] = [row for row, _ in rows]
        del rows
    except Exception as error:  # noqa: BLE001 - recorded, and the receipt goes on
        record_failure(report, f"GPT-B {side}x{side} {args.methods}", error)
    save()
    del gpt_b
    release(device)

    # the other attention path on GPT-B (the A/B that decides the CUDA default), then the ladder
    other = "math" if report["options"]["attention"] in ("auto", "sdpa") else "sdpa"
    configs = [("GPT-B", 32, other), ("Emu3.5-34B", 32, None)]
    configs += [(m, g, None) for g in map(int, args.grids.split(",")) for m in args.ladder.split(",") if m]
    if device.type == "cuda" and report["options"]["attention"] != "flex":
        configs.append(("GPT-B", 32, "flex"))  # last, if the budget leaves time: FlexAttention (CUDA or eager only)

    def arm(model, grid_side, attention) -> list[dict]:
        try:
            return ladder_config(args, registry, model, 4 if args.tiny else grid_side, peaks, device, attention)
        finally:
            report["bandwidth_gbs"], report["node_us"] = peaks.bandwidth / 1e9, peaks.node_us
            report["matmul_gflops"] = {k: v / 1e9 for k, v in peaks.matmul.items()}
            release(device)

    run_arms(configs, arm, report, over, save)
    report["seconds"] = time.perf_counter() - started
    save()
    for row in report["ladder"]:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    print("skipped:", ", ".join(report["skipped"]) or "none", flush=True)
    print("failed:", "; ".join(report["failed"]) or "none", flush=True)


def run_arms(configs, arm, report: dict, over, save) -> None:
    """Each (model, grid side, attention path) in order, its rows into ``report["ladder"]``, saved after each,
    until ``over()``: the rest go to ``skipped``. An arm that raises (out of memory, a path that does not
    compile) goes to ``failed`` with its one-line reason and costs only itself: the GPU time is lent once."""
    for model, grid_side, attention in configs:
        label = f"{model} {grid_side}x{grid_side}" + (f" ({attention} attention)" if attention else "")
        if over():
            report["skipped"].append(label)
            continue
        try:
            report["ladder"] += arm(model, grid_side, attention)
        except Exception as error:  # noqa: BLE001 - recorded, and the receipt goes on
            record_failure(report, label, error)
        save()


def record_failure(report: dict, label: str, error: Exception) -> None:
    """``label: ErrorType: the message's first line`` under ``report["failed"]``."""
    reason = str(error).strip().splitlines()
    report["failed"].append(f"{label}: {type(error).__name__}" + (f": {reason[0]}" if reason else ""))


def release(device) -> None:
    """Drop compiled graphs (and the CUDA-graph pools holding the last model's memory) before the next model."""
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def tiny_llamagen(device, **sizes):
    import torch

    from flashar.backends.llamagen.backbone import LlamaGenBackbone
    from flashar.backends.llamagen.model import GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(**({"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "multiple_of": 64} | sizes))
    return LlamaGenBackbone(cfg, preset="tiny").to(device=device, dtype=torch.bfloat16).eval()


class StubText:
    """Just enough of Emu3.5's text tokenizer for a prefix: a fixed 40-token template and image prefix."""

    class ids:  # noqa: N801 (mirrors Emu35TextTokenizer.ids)
        pad = 0

    def template(self, prompt, max_length=None):
        return list(range(1, 33))

    def image_prefix(self, height, width):
        return list(range(100, 108))


def emu35_stack(device, layers: int, tiny: bool):
    """An Emu3.5-shaped backbone with random weights, ``layers`` of its 64 layers (tiny: 2 layers, width 64)."""
    import torch

    from flashar.backends.emu35.backbone import Emu35Backbone
    from flashar.backends.emu35.loader import qwen3_config

    sizes = dict(EMU35_34B, num_hidden_layers=layers)
    if tiny:
        sizes |= dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    raw = {"model_type": "Emu3", "architectures": ["Emu3ForCausalLM"], "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "max_position_embeddings": 32768, "hidden_act": "silu", "tie_word_embeddings": False, **sizes}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # so that to_empty allocates bf16, not 4 bytes a parameter
    try:
        with torch.device("meta"):
            backbone = Emu35Backbone(qwen3_config(raw, "config.json"), text=StubText())
    finally:
        torch.set_default_dtype(default)
    backbone = backbone.to_empty(device=device)
    with torch.no_grad():
        for p in backbone.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    backbone.reset_rotary()
    return backbone.eval()


def emu35_layers_that_fit(device, wanted: int) -> int:
    """Layers of the Emu3.5 stack (with FlashAR's cloned block and vertical head) that fit in free memory."""
    import torch

    if device.type != "cuda":
        return wanted
    per_layer = 2 * (5120 * (8192 + 2 * 1024) + 8192 * 5120 + 3 * 5120 * 25600)  # bytes, bf16
    fixed = 2 * 3 * 282926 * 5120 + per_layer + 8 * 2**30  # embeddings, head, vertical head, branch block; slack
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(wanted, (free - fixed) // per_layer))


def ladder_config(args, registry, model, side, peaks, device, attention: str | None = None) -> list[dict]:
    """Raster and FlashAR compiled on one model and grid: per step time, kernels, host time, bounds.
    ``attention`` runs it with that attention path instead of the configured one."""
    import torch

    import flashar.attention

    torch._dynamo.reset()
    configured = flashar.attention.ATTENTION
    flashar.attention.ATTENTION = attention or configured  # read while tracing: set before the first compile
    try:
        rows = ladder_rows(args, registry, model, side, peaks, device)
    finally:
        flashar.attention.ATTENTION = configured
    for row in rows:
        row["attention"] = attention or configured
    return rows


def ladder_rows(args, registry, model, side, peaks, device) -> list[dict]:
    import torch

    import latency
    from flashar.compare.timing import time_methods

    layers_run = None
    if model == "Emu3.5-34B":
        layers_run = emu35_layers_that_fit(device, args.emu35_layers)
        backbone, conditions = emu35_stack(device, layers_run, args.tiny), ["a photo"]
    else:
        backbone = tiny_llamagen(device) if args.tiny else latency.random_backbone(model, torch.bfloat16, device)
        conditions = [207]
    grid = (side, side)
    sampling = latency.SamplingConfig(cfg_scale=4.0, top_k=min(2000, backbone.codebook_size), temperature=1.0)
    methods = latency.build_methods(
        registry, ["raster", f"flashar:buckets={args.buckets}"], backbone, grid, ["compiled"])
    timings = time_methods(methods, conditions, grid, {n: sampling for n in methods}, args.ladder_repeats, 1)
    rows = []
    for name, t in timings.items():
        row = {"model": model, "grid": f"{side}x{side}", "method": name, "forward_passes": t.forward_passes,
               "median_s": t.median, "compile_s": t.compile_seconds, "graphs": t.graphs, "recompiles": t.recompiles,
               **(latency.step_costs(methods[name], conditions, grid, sampling) if device.type == "cuda" else {})}
        ideal = analytic_ideal(backbone, name.startswith("flashar"), grid, t.forward_passes, peaks)
        if layers_run is not None and layers_run < EMU35_34B["num_hidden_layers"] and not args.tiny:
            full = analytic_ideal(backbone, name.startswith("flashar"), grid, t.forward_passes, peaks,
                                  layers=EMU35_34B["num_hidden_layers"])
            row |= {"layers_run": layers_run, "measured_s": t.median, "median_s": t.median * full / ideal}  # scaled
            ideal = full
        floor = t.forward_passes * row.get("kernels_per_step", float("nan")) * peaks.node_us * 1e-6
        row |= {"us_per_step": row["median_s"] / t.forward_passes * 1e6, "ideal_s": ideal, "launch_floor_s": floor,
                "bound_s": max(ideal, floor) if floor == floor else ideal}
        row["vs_bound"] = row["median_s"] / row["bound_s"]
        rows.append(row)
    raster, flashar = rows
    flashar["vs_raster"] = raster["median_s"] / flashar["median_s"]
    flashar["ideal_vs_raster"] = raster["bound_s"] / flashar["bound_s"]
    del methods, backbone
    return rows


def analytic_ideal(backbone, is_flashar: bool, grid, passes: int, peaks, layers: int | None = None) -> float:
    """Seconds: sum over passes of max(bytes / bandwidth, FLOPs / matmul peak), batch 1 with CFG (2 rows)."""
    height, width = grid
    elt = 2  # bf16
    per_layer = sum(p.numel() for p in backbone.layers[0].parameters() if p.ndim > 1)
    layers = layers or backbone.num_layers
    head = backbone.codebook_size * backbone.dim
    kv_per_slot = 2 * backbone.num_kv_heads * backbone.head_dim * elt * 2  # K and V, 2 rows
    mean_keys = height * width / 2 + 40  # the mean window, with a prefix of ~40 tokens
    rows = 2 * height * width / passes  # mean rows a pass feeds (1 cell per row for raster)
    layers_read, heads = (layers + 1, 2) if is_flashar else (layers, 1)  # FlashAR: one branch block, a second head
    params = layers_read * per_layer + heads * head
    step_bytes = params * elt + layers_read * mean_keys * kv_per_slot
    step_flops = 2 * params * rows
    step = max(step_bytes / peaks.bandwidth, step_flops / peaks.matmul["bfloat16"])
    return passes * step


if __name__ == "__main__":
    main()
