"""CUDA check of the peer methods (sjd, zipar, gsd) against raster, on random LlamaGen weights.

    python benchmarks/peers_cuda_check.py --out benchmarks/results/peers_cuda_check.json

1. Correctness on a tiny model: greedy SJD and ZipAR(w = W) give raster's tokens; each method compiled with
   inductor (CUDA graphs) gives the eager tokens, repeats itself from the same seed, and compiles one graph
   (recompiles and skipped CUDA graphs are logged by torch).
2. Cost per forward pass on a GPT-B-sized random model (16x16 grid, batch 8, CFG 4, top-k 2000, bf16):
   the first call (compile included) and a warm call, timed with device synchronisation. Random weights
   accept almost no drafts, so SJD/GSD pass counts here are not speed-ups; ZipAR's count is its schedule.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from flashar.backends.llamagen.backbone import LlamaGenBackbone
from flashar.backends.llamagen.model import GPTConfig
from flashar.config import SamplingConfig
from flashar.methods.gsd import GSD
from flashar.methods.raster import Raster
from flashar.methods.sjd import SJD
from flashar.methods.zipar import ZipAR
from flashar.sampling import make_generator

TINY = [(Raster, None), (SJD, SJD.Options(draft_length=4)), (SJD, SJD.Options(draft_length=4, coupling="maximal")),
        (ZipAR, ZipAR.Options(window=2)), (ZipAR, ZipAR.Options(window=2, mask_unwritten=False)),
        (GSD, GSD.Options(draft_length=4))]


def random_backbone(dtype: torch.dtype, **sizes) -> LlamaGenBackbone:
    torch.manual_seed(0)
    model = LlamaGenBackbone(GPTConfig(**sizes))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim > 1 else 0.05).add_(1.0 if p.ndim == 1 else 0.0)
    return model.to("cuda", dtype).eval()


def generate(method, conditions, grid, sampling, seed):
    result = method.generate(conditions, grid, sampling, make_generator(seed, "cuda"))
    torch.cuda.synchronize()
    return result


def check_tiny() -> list[dict]:
    backbone = random_backbone(
        torch.float32, dim=64, n_layer=3, n_head=4, multiple_of=32, vocab_size=64, num_classes=10)
    greedy, sampling, grid = SamplingConfig(cfg_scale=3.0, top_k=1), SamplingConfig(cfg_scale=3.0, top_k=8), (4, 5)
    raster = generate(Raster(backbone), [3, 7], grid, greedy, 0).codes
    rows = [
        {"check": "greedy sjd == raster",
         "ok": torch.equal(generate(SJD(backbone), [3, 7], grid, greedy, 0).codes, raster)},
        {
            "check": "greedy zipar(w=W) == raster",
            "ok": torch.equal(
                generate(ZipAR(backbone, ZipAR.Options(window=5)), [3, 7], grid, greedy, 0).codes, raster),
        },
    ]
    for cls, options in TINY:
        torch._dynamo.reset()
        counters.clear()
        compiled = cls(backbone, options, compile=True)
        first = generate(compiled, [3, 7], grid, sampling, 0)
        generate(compiled, [3, 7], grid, sampling, 1)
        again = generate(compiled, [3, 7], grid, sampling, 0)
        eager = generate(cls(backbone, options), [3, 7], grid, sampling, 0)
        rows.append({"check": f"{cls.id} {options!r}: compiled == eager", "ok": torch.equal(first.codes, eager.codes),
                     "repeatable": torch.equal(first.codes, again.codes), "graphs": counters["stats"]["unique_graphs"],
                     "passes": [first.num_forward_passes, eager.num_forward_passes]})
    return rows


def timing() -> list[dict]:
    backbone = random_backbone(torch.bfloat16, dim=768, n_layer=12, n_head=12, vocab_size=16384, num_classes=1000)
    sampling, rows = SamplingConfig(cfg_scale=4.0, top_k=2000), []
    for cls, options in [(Raster, None), (SJD, SJD.Options()), (ZipAR, ZipAR.Options()), (GSD, GSD.Options())]:
        torch._dynamo.reset()
        method = cls(backbone, options, compile=True)
        began = time.perf_counter()
        generate(method, list(range(8)), (16, 16), sampling, 0)
        first = time.perf_counter() - began
        began = time.perf_counter()
        result = generate(method, list(range(8)), (16, 16), sampling, 1)
        warm = time.perf_counter() - began
        rows.append({"method": cls.id, "first_s": round(first, 2), "warm_s": round(warm, 4),
                    "passes": result.num_forward_passes,
                    "ms_per_pass": round(warm / result.num_forward_passes * 1e3, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="Write the JSON receipt here.")
    parser.add_argument("--skip-timing", action="store_true", help="Only the correctness checks.")
    args = parser.parse_args()
    torch._logging.set_logs(perf_hints=True, recompiles=True)
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "python": platform.python_version(),
              "threads": torch.get_num_threads(), "tiny": check_tiny()}
    if not args.skip_timing:
        report["gpt_b_bf16_16x16_batch8"] = timing()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
