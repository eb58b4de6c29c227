"""Markdown tables of the benchmark receipts in ``benchmarks/results/``, as quoted in the README.

    python benchmarks/tables.py digits benchmarks/results/digits_quality.json
    python benchmarks/tables.py latency benchmarks/results/latency_cpu.json
    python benchmarks/tables.py targets benchmarks/results/latency_cpu.json   # the CPU targets, checked

Nothing here measures: it only formats what ``digits_quality.py`` and ``latency.py`` wrote, with the
machine each receipt names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flashar.compare.report import markdown


def digits(report: dict) -> str:
    env = report["environment"]
    columns = ("fid", "kid", "inception_score", "precision", "recall", "class_accuracy", "two_sample_accuracy")
    formats = ("{:.1f}", "{:.0f}", "{:.2f}", "{:.3f}", "{:.3f}", "{:.3f}", "{:.3f}")
    row = lambda name, passes, m, nll: [name, passes, *(f.format(m[c]) for c, f in zip(columns, formats)), nll]
    rows = [row(name, str(m["forward_passes"]), m, f"{m['held_out_nll']:.4f}") for name, m in report["methods"].items()]
    rows += [row(f"real {name}", "-", m, "-") for name, m in report["real"].items()]
    table = markdown(["method", "passes", "FID-digits", "KID", "IS", "precision", "recall", "class acc", "2-sample acc",
                      "held-out NLL"], rows)
    timing = report["timing"]
    speed = "; ".join(f"{kind} (batch {t['batch']}): raster {t['raster']['median_seconds']:.3f} s, "
                      f"flashar {t['flashar']['median_seconds']:.3f} s, {t['speedup']:.2f}x" for kind, t in timing.items())
    checks = ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in report["checks"].items())
    return (f"{table}\n\n{report['samples_per_seed']} class-balanced samples per seed, seeds {report['seeds']}, "
            f"sampling {report['sampling']}; {env['cpu']}, {env['threads']} threads, torch {env['torch']}.\n"
            f"Speed, medians: {speed}.\nChecks: {checks}.")


def latency(report: dict) -> str:
    kernels = any("kernel_s" in r for r in report["rows"])  # receipts before the kernel replay lack it
    rows = [[r["model"], r["dtype"], r["grid"], str(r["batch"]), r["method"], str(r["forward_passes"]), f"{r['median_s']:.3f}",
             f"{r['vs_raster']:.2f}x", f"{r['ideal_s']:.3f}", f"{r['vs_roofline']:.2f}"]
            + ([f"{r['kernel_s']:.3f}", f"{r['vs_kernels']:.2f}"] if kernels else [])
            + [f"{r['compile_s']:.1f}", f"{r['graphs']}" + (f" (+{r['recompiles']})" if r.get("recompiles") else "") if "graphs" in r else "-"]
            for r in report["rows"]]
    table = markdown(["model", "dtype", "grid", "batch", "method / mode", "passes", "median s", "vs raster (same mode)",
                      "ideal s", "measured / ideal"] + (["kernels s", "measured / kernels"] if kernels else [])
                     + ["compile s", "graphs"], rows)
    where = report.get("gpu") or f"{report['cpu']}, {report['threads']} threads"
    peaks = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in report["matmul_gflops"].items())
    return f"{table}\n\n{where}, torch {report['torch']}; peak read bandwidth {report['bandwidth_gbs']:.1f} GB/s, matmul {peaks} (best probes)."


COMPILED = ("compiled", "max-autotune")


def expected_graphs(method: str) -> int:
    """Graphs a compiled method may build: one, or one per static diagonal size with flashar:buckets=N."""
    options = dict(item.split("=") for item in method.split("/")[0].partition(":")[2].split(";") if "=" in item)
    return int(options.get("buckets", 1))


def targets(report: dict) -> str:
    """The latency issue's CPU targets, checked against one receipt."""
    by_config: dict[tuple, dict[str, dict]] = {}
    for r in report["rows"]:
        by_config.setdefault((r["model"], r["dtype"], r["grid"], r["batch"]), {})[r["method"]] = r
    lines = []
    for (model, dtype, grid, batch), rows in by_config.items():
        where = f"{model} {dtype} {grid} batch {batch}"
        for mode in COMPILED:
            if f"flashar/{mode}" in rows and f"raster/{mode}" in rows:
                raster, flashar = rows[f"raster/{mode}"], rows[f"flashar/{mode}"]
                ratio = raster["median_s"] / flashar["median_s"]
                target = f" (target {10 if dtype == 'bfloat16' else 6}x)" if (model, grid, batch) == ("GPT-B", "32x32", 1) else ""
                kernels = f" (their eager kernels alone: {raster['kernel_s'] / flashar['kernel_s']:.2f}x)" if "kernel_s" in flashar else ""
                lines.append(f"{where}: flashar vs raster, both {mode}, {ratio:.2f}x{target}{kernels}")
            if f"flashar/{mode}" in rows and "flashar/eager" in rows:
                ratio = rows["flashar/eager"]["median_s"] / rows[f"flashar/{mode}"]["median_s"]
                lines.append(f"{where}: flashar {mode} vs eager {ratio:.2f}x (target 1.2x)")
    for method in dict.fromkeys(r["method"] for r in report["rows"]):
        closeness = [r["vs_roofline"] for r in report["rows"] if r["method"] == method]
        alone = [r["kernel_s"] / r["ideal_s"] for r in report["rows"] if r["method"] == method and "kernel_s" in r]
        kernels = f"; its eager kernels alone / ideal {min(alone):.2f}-{max(alone):.2f}" if alone else ""
        lines.append(f"{method}: measured / ideal {min(closeness):.2f}-{max(closeness):.2f} (target <= 2){kernels}")
    compiled = [r for r in report["rows"] if r["method"].endswith(COMPILED)]
    once = all(r["graphs"] <= expected_graphs(r["method"]) and r["recompiles"] == 0 for r in compiled)
    lines.append(f"compiled steps: one graph per static shape, built in the first generation, no recompiles: {'yes' if once else 'NO'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["digits", "latency", "targets"])
    parser.add_argument("receipt", type=Path)
    args = parser.parse_args()
    report = json.loads(args.receipt.read_text())
    print({"digits": digits, "latency": latency, "targets": targets}[args.kind](report))


if __name__ == "__main__":
    main()
