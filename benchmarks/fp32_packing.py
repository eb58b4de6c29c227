"""Compiled fp32 raster steps with frozen linears packed for MKL (inductor's choice) against oneDNN, side by side.

    OMP_NUM_THREADS=2 python benchmarks/fp32_packing.py --threads 2 --out benchmarks/results/fp32_packing_avx2.json

Inductor packs a frozen fp32 linear with a static row count (raster's steps: 2 rows with CFG) for MKL, and
flashar repacks it for oneDNN on x86 CPUs not made by Intel (``flashar.compilation.onednn_fp32_wanted``).
This measures both on any x86 CPU, whatever the rule says there: two compiled raster instances over one
random-weight LlamaGen backbone, one compiled with the switch off (``FLASHAR_ONEDNN_FP32=0``: MKL), the other
compiled under :func:`flashar.compilation.onednn_fp32_linears`, timed in interleaved rounds
(``flashar.compare.timing``). Prints and writes the medians and their ratio, with the CPU named, and how
many codes the two generations share (the kernels sum in different orders; with random weights one draw
that differs sends the rest of the image apart).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from latency import random_backbone  # noqa: E402

from flashar.compare import cpu_model  # noqa: E402
from flashar.compare.timing import time_methods  # noqa: E402
from flashar.compilation import onednn_fp32_linears  # noqa: E402
from flashar.config import SamplingConfig  # noqa: E402
from flashar.methods.raster import Raster  # noqa: E402
from flashar.sampling import make_generator  # noqa: E402

def run(args) -> dict:
    if not (torch._C.has_mkl and torch.backends.mkldnn.is_available()):
        raise SystemExit("fp32_packing.py compares MKL with oneDNN: it needs an x86 build of torch with both")
    with torch.no_grad():
        return measure(args)


def measure(args) -> dict:
    backbone = random_backbone(args.model, torch.float32, torch.device("cpu"))
    grid, sampling, conditions = ((args.grid, args.grid), SamplingConfig(cfg_scale=4.0, top_k=2000),
                                  [args.class_id] * args.batch)
    os.environ["FLASHAR_ONEDNN_FP32"] = "0"  # read when a step is compiled: both start from inductor's choice
    methods = {"mkl": Raster(backbone, compile=True), "onednn": Raster(backbone, compile=True)}
    with onednn_fp32_linears():  # the first generation compiles the step; the packing is chosen then
        methods["onednn"].generate(conditions, grid, sampling, make_generator(0, backbone.device))
    timings = time_methods(methods, conditions, grid, {name: sampling for name in methods}, args.repeats, warmup=1)
    mkl, onednn = timings["mkl"], timings["onednn"]
    report = {"torch": torch.__version__, "cpu": cpu_model(), "threads": torch.get_num_threads(), "model": args.model,
              "grid": f"{args.grid}x{args.grid}", "batch": args.batch, "passes": mkl.forward_passes,
              "mkl_s": mkl.seconds, "onednn_s": onednn.seconds, "mkl_median_s": mkl.median,
              "onednn_median_s": onednn.median, "onednn_speedup": mkl.median / onednn.median,
              "same_codes": (mkl.codes == onednn.codes).float().mean().item(),
              "graphs": {name: t.graphs for name, t in timings.items()}}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="GPT-B")
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--class-id", type=int, default=207, help="the class every image is conditioned on")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--out", default="", help="where to write the JSON receipt (e.g. benchmarks/results/fp32_packing.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
