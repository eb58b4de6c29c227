"""What skipping torch.compile's guard evaluation saves: one process, the same compiled methods, generations
alternating between FLASHAR_SKIP_GUARDS=1 (the default) and 0.

    OMP_NUM_THREADS=2 python benchmarks/guards.py --out benchmarks/results/guards_cpu.json

Each method is built compiled on the embedded digits default and warmed up (its first generation, guarded,
compiles). Then ``--repeats`` rounds each time one generation of one image with guards skipped and one
with them evaluated, in alternating order, so a slow moment of a shared machine hits both alike. Both must
draw the same codes. The receipt holds every time, the medians, skipped / guarded and the time saved per
decode step, with the CPU (or GPU) and thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from flashar import api
from flashar.compare import cpu_model
from flashar.compare.timing import timed_run
from flashar.config import RuntimeConfig
from latency import skip_guards_setting  # benchmarks/, this script's folder

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="raster,flashar,zipar")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "guards_cpu.json")
    args = parser.parse_args()
    backbone = api.load_backbone("digits", {}, RuntimeConfig(device=args.device))
    sampling, grid = api.resolve_sampling(backbone, {}), backbone.grid()
    report = {"cpu": cpu_model(), "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__, "backend": "digits",
              "grid": list(grid), "batch": 1, "methods": {}}
    for name in args.methods.split(","):
        method = api.build_method(name, backbone, {}, compile=True)
        timed_run(method, [3], grid, sampling, 0)  # the first generation: guarded, compiles
        seconds, codes = {"1": [], "0": []}, {}
        for i in range(args.repeats):
            for setting in ("1", "0") if i % 2 == 0 else ("0", "1"):
                with skip_guards_setting(setting):
                    result, elapsed, _ = timed_run(method, [3], grid, sampling, 0)
                seconds[setting].append(elapsed)
                codes[setting] = result.codes
        skipped, guarded = statistics.median(seconds["1"]), statistics.median(seconds["0"])
        steps = result.num_forward_passes - 1
        report["methods"][name] = {"skipped_s": seconds["1"], "guarded_s": seconds["0"], "median_skipped_s": skipped,
                                   "median_guarded_s": guarded, "skipped_over_guarded": skipped / guarded,
                                   "saved_us_per_step": (guarded - skipped) / steps * 1e6, "steps": steps,
                                   "same_codes": bool(torch.equal(codes["1"], codes["0"]))}
        print(f"{name:8s} guarded {guarded * 1e3:7.1f} ms  skipped {skipped * 1e3:7.1f} ms  skipped/guarded "
              f"{skipped / guarded:.3f}  saved {(guarded - skipped) / steps * 1e6:5.0f} us per step  same codes "
              f"{report['methods'][name]['same_codes']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
