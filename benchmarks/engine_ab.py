"""Decode latency of two commits of flashar side by side: did a change to the engine cost speed?

    OMP_NUM_THREADS=2 python benchmarks/engine_ab.py --base 5f1d897^1 --head 5f1d897 \\
        --out benchmarks/results/engine_ab.json

The two commits are checked out into temporary git worktrees, and each is timed in its own Python process
(``PYTHONPATH`` set to that checkout). The processes run in alternation, base then head, for ``--rounds``
rounds, so a slow moment of a shared machine hits both sides alike. A process loads the embedded digits
default, builds each method eager and compiled, warms each up once (which compiles), and then times
``--repeats`` generations of one image (batch 1) with each method, interleaved. It uses only what both
commits have: ``api.load_backbone``, ``api.build_method``, ``api.resolve_sampling`` and
``compare.timing.timed_run``. ``--model GPT-B`` (or another LlamaGen preset) times that architecture with
random weights at ``--grid`` and ``--dtype`` instead, built by the checkout's ``benchmarks/latency.py`` with its
sampling (CFG 4, top-k 2000): for changes whose cost shows only at real vocabulary and model sizes. The receipt holds
every run's seconds and, per method and mode, the median of each side, the ratio head / base (below 1: the head is
faster), the CPU and the thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, sys, torch
from flashar import api
from flashar.compare.timing import timed_run
methods, repeats, modes = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3].split(",")
model, side, dtype = sys.argv[4:]
if model == "digits":
    backbone = api.load_backbone("digits", {})
    sampling, conditions, grid = api.resolve_sampling(backbone, {}), [3], backbone.grid()
    built = {(m, mode): api.build_method(m, backbone, {}, compile=(mode == "compiled"))
             for m in methods for mode in modes}
else:  # a LlamaGen preset with random weights, built as the checkout's latency.py builds it
    sys.path.insert(0, "benchmarks")
    import latency
    from flashar.config import SamplingConfig
    from flashar.plugins import Registry, build_manager
    backbone = latency.random_backbone(model, getattr(torch, dtype), torch.device("cpu"))
    sampling, conditions, grid = SamplingConfig(cfg_scale=4.0, top_k=2000, temperature=1.0), [207], (int(side),) * 2
    registry = Registry.from_manager(*build_manager(load_entry_points=False))
    built = latency.build_methods(registry, methods, backbone, grid, modes)
    built = {tuple(k.rsplit("/", 1)): m for k, m in built.items()}
seconds = {f"{m} {mode}": [] for m, mode in built}
for key, method in built.items():
    timed_run(method, conditions, grid, sampling, 0)  # warm-up (compiles)
for _ in range(repeats):
    for (m, mode), method in built.items():
        seconds[f"{m} {mode}"].append(timed_run(method, conditions, grid, sampling, 0)[1])
import flashar
print("RESULT " + json.dumps({"module": flashar.__file__, "seconds": seconds}))
"""


def checkout(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(where), rev], check=True)
    return where


def run_side(tree: Path, args: argparse.Namespace, cache: Path) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(tree), "TORCHINDUCTOR_CACHE_DIR": str(cache / tree.name)}
    worker = [args.methods, str(args.repeats), args.modes, args.model, str(args.grid), args.dtype]
    out = subprocess.run([sys.executable, "-c", WORKER, *worker], env=env, cwd=tree, check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    # an installed flashar shadowed the checkout
    if not Path(result["module"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the worker imported {result['module']}, not the checkout in {tree}")
    return result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit before the change")
    parser.add_argument("--head", default="HEAD", help="the commit after it [default: %(default)s]")
    parser.add_argument("--methods", default="raster,flashar,zipar")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per method and mode in each process")
    parser.add_argument(
        "--modes", default="eager,compiled", help="compile modes, of eager and compiled [default: %(default)s]")
    parser.add_argument("--model", default="digits",
        help="digits (the embedded default) or a LlamaGen preset (GPT-B, GPT-L) with random weights [default: "
        "%(default)s]")
    parser.add_argument("--grid", type=int, default=16, help="grid side for a LlamaGen preset [default: %(default)s]")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of a LlamaGen preset [default: %(default)s]")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_ab.json"))
    args = parser.parse_args()
    from flashar.compare import cpu_model

    revs = {
        side: subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", rev], check=True, capture_output=True, text=True).stdout.strip()
        for side, rev in (("base", args.base), ("head", args.head))
    }
    runs: dict[str, dict[str, list[float]]] = {"base": {}, "head": {}}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {side: checkout(rev, Path(tmp) / side) for side, rev in revs.items()}
        try:
            for round_ in range(args.rounds):
                for side, tree in trees.items():
                    for key, seconds in run_side(tree, args, Path(tmp) / "cache").items():
                        runs[side].setdefault(key, []).extend(seconds)
                    print(f"round {round_ + 1}/{args.rounds} {side} done", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    medians = {key: {side: statistics.median(runs[side][key]) for side in runs} for key in runs["base"]}
    report = {"cpu": cpu_model(), "threads": os.environ.get("OMP_NUM_THREADS"), "python": sys.version.split()[0],
              "revisions": revs, "rounds": args.rounds, "repeats": args.repeats, "batch": 1, "backend": "digits"
              if args.model == "digits"
              else f"llamagen {args.model} random weights {args.grid}x{args.grid} {args.dtype}", "medians_s": medians,
              "head_over_base": {k: m["head"] / m["base"] for k, m in medians.items()}, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for key, m in medians.items():
        print(f"{key:18s} base {m['base'] * 1000:8.1f} ms  head {m['head'] * 1000:8.1f} ms  head/base "
              f"{m['head'] / m['base']:.3f}")


if __name__ == "__main__":
    main()
