"""Markdown tables (and latency plots) of the benchmark receipts in ``benchmarks/results/``, as quoted in the README.

    python benchmarks/tables.py digits benchmarks/results/digits_quality.json
    python benchmarks/tables.py latency benchmarks/results/latency_cpu_bf16.json
    python benchmarks/tables.py targets benchmarks/results/latency_cpu_fp32.json  # the targets, on its machine
    python benchmarks/tables.py ladder benchmarks/results/latency_gpu.json    # gpu_ladder.py's model ladder
    python benchmarks/tables.py plot benchmarks/results/latency_cpu_fp32.json     # (re)draws latency_cpu_fp32.png

Nothing here measures: it only formats what ``digits_quality.py`` and ``latency.py`` wrote, with the
machine each receipt names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flashar.compare.report import markdown, plus_minus


def digits(report: dict) -> str:
    env = report["environment"]
    columns = ("inception_score", "precision", "recall", "class_accuracy", "two_sample_accuracy")
    formats = ("{:.2f}", "{:.3f}", "{:.3f}", "{:.3f}", "{:.3f}")
    kid = lambda m: plus_minus(m["kid"], m.get("kid_std", 0.0))  # with its spread over torch-fidelity's subsets
    row = lambda name, passes, m, nll: [name, passes, f"{m['fid']:.1f}", kid(m),
                                        *(f.format(m[c]) for c, f in zip(columns, formats)), nll]
    nll = lambda m: (f"{m['held_out_nll']:.4f}"
                     + (f" ({m['held_out_nll_coupled']:.4f} coupled)" if "held_out_nll_coupled" in m else ""))
    rows = [row(name, str(m["forward_passes"]), m, nll(m)) for name, m in report["methods"].items()]
    rows += [row(f"real {name}", "-", m, "-") for name, m in report["real"].items()]
    table = markdown(["method", "passes", "FID-digits", "KID", "IS", "precision", "recall", "class acc", "2-sample acc",
                      "held-out NLL"], rows)
    def speed(t: dict) -> str:
        timed = [m for m in t if isinstance(t[m], dict) and m != "raster"]
        # older receipts: flashar's only
        speedup = lambda m: t[m].get("speedup", t["speedup"] if m == "flashar" else None)
        return f"raster {t['raster']['median_seconds']:.3f} s, " + ", ".join(
            f"{m} {t[m]['median_seconds']:.3f} s ({speedup(m):.2f}x)" for m in timed)

    speeds = "; ".join(f"{kind} (batch {t['batch']}): {speed(t)}" for kind, t in report["timing"].items())
    # checks_row_lag_K
    label = lambda key: "" if key == "checks" else f" (row lag {key.removeprefix('checks_row_lag_')})"
    checks = "\n".join(
        f"Checks{label(key)}: " + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in report[key].items()) + "."
        for key in report if key == "checks" or key.startswith("checks_row_lag_"))
    return (f"{table}\n\n{report['samples_per_seed']} class-balanced samples per seed, seeds {report['seeds']}, "
            f"sampling {report['sampling']}; {env['cpu']}, {env['threads']} threads, torch {env['torch']}.\n"
            f"Speed, medians: {speeds}.\n{checks}")


def latency(report: dict) -> str:
    kernels = any("kernel_s" in r for r in report["rows"])  # receipts before the kernel replay lack it
    rows = [[r["model"], r["dtype"], r["grid"], str(r["batch"]), r["method"], str(r["forward_passes"]),
            f"{r['median_s']:.3f}", f"{r['vs_raster']:.2f}x", f"{r['ideal_s']:.3f}", f"{r['vs_roofline']:.2f}"]
            + ([f"{r['kernel_s']:.3f}", f"{r['vs_kernels']:.2f}"] if kernels else []) + [f"{r['compile_s']:.1f}",
            f"{r['graphs']}" + (f" (+{r['recompiles']})" if r.get("recompiles") else "") if "graphs" in r else "-"]
            for r in report["rows"]]
    table = markdown(["model", "dtype", "grid", "batch", "method / mode", "passes", "median s", "vs raster (same mode)",
                      "ideal s", "measured / ideal"] + (["kernels s", "measured / kernels"] if kernels else [])
                     + ["compile s", "graphs"], rows)
    where = machine(report)
    peaks = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in report["matmul_gflops"].items())
    bandwidth = f"peak read bandwidth {report['bandwidth_gbs']:.1f} GB/s"
    text = f"{table}\n\n{where}, torch {report['torch']}; {bandwidth}, matmul {peaks} (best probes)."
    split = kernels_by_kind(report["rows"])
    if split:
        text += "\n\n" + split
    steps = [r for r in report["rows"] if "kernels_per_step" in r]
    if steps:  # CUDA receipts: what bounds a small model's step there
        guarded = lambda r: f" ({r['host_us_per_step_guarded']:.0f})" if "host_us_per_step_guarded" in r else ""
        rows = [[r["model"], r["grid"], r["method"], f"{r['median_s'] / r['forward_passes'] * 1e6:.0f}",
                f"{r['kernels_per_step']:.0f}", f"{r['host_us_per_step']:.0f}{guarded(r)}",
                f"{r['ideal_s'] / r['forward_passes'] * 1e6:.0f}",
                f"{r['launch_floor_s'] / r['forward_passes'] * 1e6:.0f}", f"{r['vs_bound']:.2f}"] for r in steps]
        text += "\n\n" + markdown(
            ["model", "grid", "method / mode", "us per step", "kernels per step", "host us per step",
            "roofline us per step", "launch floor us per step", "measured / bound"], rows)
        text += (f"\n\nLaunch floor: kernels per step x {report['node_us']:.2f} us per replayed graph node (measured). "
                 "Host us per step: guards skipped (in brackets: evaluated, FLASHAR_SKIP_GUARDS=0).")
    return text


def ladder(report: dict) -> str:
    """The GPU model ladder of ``gpu_ladder.py``: per step time, kernels, host time and bounds."""
    def label(r):
        return (r["model"] + (f" ({r['layers_run']} layers run, scaled)" if "layers_run" in r else "")
            + (f", {r['attention']} attention" if r.get("attention", "auto") != report["options"]["attention"] else ""))

    rows = [
        [label(r), r["grid"], r["method"], str(r["forward_passes"]), f"{r['median_s']:.3f}", f"{r['us_per_step']:.0f}",
        f"{r.get('kernels_per_step', float('nan')):.0f}", f"{r.get('host_us_per_step', float('nan')):.0f}",
        f"{r['ideal_s'] / r['forward_passes'] * 1e6:.0f}", f"{r['launch_floor_s'] / r['forward_passes'] * 1e6:.0f}",
        f"{r['vs_bound']:.2f}",
        f"{r['vs_raster']:.2f}x (ideal {r['ideal_vs_raster']:.2f}x)" if "vs_raster" in r else "-"]
        for r in report["ladder"]]
    table = markdown(["model", "grid", "method / mode", "passes", "median s", "us per step", "kernels per step",
                      "host us per step", "roofline us per step", "launch floor us per step", "measured / bound",
                      "vs raster"], rows)
    where = machine(report)
    skipped = f" Skipped for time: {', '.join(report['skipped'])}." if report["skipped"] else ""
    failed = f" Failed: {'; '.join(report['failed'])}." if report.get("failed") else ""  # receipts before it had none
    return (f"{table}\n\n{where}, torch {report['torch']}, options {report['options']}; "
            f"{report['node_us']:.2f} us per graph node.{skipped}{failed}")


COMPILED = ("compiled", "max-autotune")


def expected_graphs(method: str) -> int:
    """Graphs a compiled method may build: one, or one per static diagonal size with flashar:buckets=N."""
    options = dict(item.split("=") for item in method.split("/")[0].partition(":")[2].split(";") if "=" in item)
    return int(options.get("buckets", 1))


def kernels_by_kind(rows: list[dict]) -> str:
    """Where the replayed kernels' time goes: the linears alone and attention alone, each against its own
    roofline, one line per method and configuration (the replay is the eager run's, shared by every mode)."""
    lines, seen = [], set()
    for r in rows:
        spec = r["method"].rsplit("/", 1)[0]
        key = (r["model"], r["dtype"], r["grid"], r["batch"], spec)
        if "kernel_s_by_kind" not in r or key in seen:
            continue
        seen.add(key)
        cells = []
        for kind in ("linear", "attention"):
            measured, ideal = r["kernel_s_by_kind"][kind], r["ideal_s_by_kind"][kind]
            cells += [f"{measured:.3f}", f"{ideal:.3f}", f"{measured / ideal:.2f}"]
        lines.append([*map(str, key), *cells])
    return markdown(["model", "dtype", "grid", "batch", "method", "linears s", "linears ideal s", "linears / ideal",
                     "attention s", "attention ideal s", "attention / ideal"], lines) if lines else ""


def bound(row: dict) -> float:
    """The bound a row is judged against: max(roofline, launch floor) where the receipt has the floor."""
    return row.get("bound_s", row["ideal_s"])


def machine(report: dict) -> str:
    """The machine a receipt names: its GPU, or its CPU and threads."""
    return report.get("gpu") or f"{report['cpu']}, {report['threads']} threads"


def plot(report: dict, path: Path):
    """One bar per row, median seconds on a log scale, with the row's bound and twice it (the target) marked."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * len(rows)), dpi=120)
    places = range(len(rows))[::-1]  # the receipt's first row on top
    ax.barh(places, [r["median_s"] for r in rows], color=["tab:blue" if r["method"].endswith("eager") else "tab:orange"
                                                          for r in rows])
    bounds = [bound(r) for r in rows]
    ax.scatter(bounds, places, marker="|", s=200, color="black", label="bound", zorder=3)
    ax.scatter([2 * b for b in bounds], places, marker="|", s=200, color="grey", label="2x bound", zorder=3)
    ax.set_yticks(list(places), [f"{r['model']} {r['dtype']} {r['grid']} b{r['batch']}  {r['method']}" for r in rows],
                  fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("seconds per batch (median); blue eager, orange compiled")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(machine(report), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return fig


def targets(report: dict) -> str:
    """The latency targets, relative to the machine that wrote the receipt (its own probes and bounds):

    * every compiled method within 2x of its own bound;
    * compiled FlashAR vs compiled raster at least 0.8 x the ideal ratio of their bounds on this machine;
    * every compiled method at least 1.2x faster than its eager run;
    * one graph per static shape, none built while timed.
    """
    by_config: dict[tuple, dict[str, dict]] = {}
    for r in report["rows"]:
        by_config.setdefault((r["model"], r["dtype"], r["grid"], r["batch"]), {})[r["method"]] = r
    lines, verdicts = [], []

    def check(ok: bool, text: str) -> None:
        verdicts.append(ok)
        lines.append(f"{'met    ' if ok else 'NOT met'}  {text}")

    for (model, dtype, grid, batch), rows in by_config.items():
        where = f"{model} {dtype} {grid} batch {batch}"
        for name, row in rows.items():
            spec, mode = name.rsplit("/", 1)
            if mode not in COMPILED:
                continue
            check(row["median_s"] <= 2 * bound(row),
                  f"{where}: {name} at {row['median_s'] / bound(row):.2f}x its bound (target <= 2)")
            if f"{spec}/eager" in rows:
                speedup = rows[f"{spec}/eager"]["median_s"] / row["median_s"]
                check(speedup >= 1.2, f"{where}: {name} {speedup:.2f}x faster than eager (target >= 1.2)")
            if spec.partition(":")[0] == "flashar" and f"raster/{mode}" in rows:
                raster = rows[f"raster/{mode}"]
                ratio, ideal = raster["median_s"] / row["median_s"], bound(raster) / bound(row)
                kernels = f"; kernels alone {raster['kernel_s'] / row['kernel_s']:.2f}x" if "kernel_s" in row else ""
                check(ratio >= 0.8 * ideal, f"{where}: {name} vs raster/{mode} {ratio:.2f}x; this machine's ideal "
                      f"{ideal:.2f}x, target >= {0.8 * ideal:.2f}x{kernels}")
    if report.get("gpu"):
        for ok, text in gpu_targets(report):
            check(ok, text)
    compiled = [r for r in report["rows"] if r["method"].endswith(COMPILED)]
    if all("graphs" in r for r in compiled):  # older receipts did not record them
        once = all(r["graphs"] <= expected_graphs(r["method"]) and r["recompiles"] == 0 for r in compiled)
        check(once, "compiled steps: one graph per static shape, built in the first generation, no recompiles")
    else:
        lines.append("graphs per compiled step: not recorded in this receipt")
    where = machine(report)
    lines.append(f"{sum(verdicts)} of {len(verdicts)} targets met on {where}")
    return "\n".join(lines)


def gpu_targets(report: dict) -> list[tuple[bool, str]]:
    """The issue's absolute GPU targets, where the receipt has the rows they name."""
    found = []
    rows = {
        (r["model"], r["grid"], r["method"]): r for r in report["rows"] if r["batch"] == 1 and r["dtype"] == "bfloat16"}
    raster, flashar = rows.get(("GPT-B", "32x32", "raster/compiled")), rows.get(("GPT-B", "32x32", "flashar/compiled"))
    if raster:
        step = raster["median_s"] / raster["forward_passes"] * 1e3
        found.append((step <= 0.35, f"GPT-B 32x32 compiled raster {step:.3f} ms per step (target <= 0.35)"))
    if raster and flashar:
        ratio = raster["median_s"] / flashar["median_s"]
        found.append((ratio >= 12, f"GPT-B 32x32 compiled flashar vs raster {ratio:.2f}x (target >= 12)"))
    for r in report.get("ladder", []):
        if r["model"] == "Emu3.5-34B" and r["grid"] == "32x32" and r["method"].startswith("flashar"):
            scaled = f" ({r['layers_run']} layers run, scaled)" if "layers_run" in r else ""
            found.append((r["median_s"] <= 2.0,
                         f"Emu3.5-34B-shaped 32x32 FlashAR image {r['median_s']:.2f} s{scaled} (target <= 2.0)"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["digits", "latency", "targets", "ladder", "plot"])
    parser.add_argument("receipt", type=Path)
    args = parser.parse_args()
    report = json.loads(args.receipt.read_text())
    if args.kind == "plot":
        plot(report, args.receipt.with_suffix(".png"))
        return
    print({"digits": digits, "latency": latency, "targets": targets, "ladder": ladder}[args.kind](report))


if __name__ == "__main__":
    main()
