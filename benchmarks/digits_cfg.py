"""Choose the digits default's CFG scale by raster's quality under the corrected metric.

    python benchmarks/digits_cfg.py --out benchmarks/results/digits_cfg.json

Raster samples of the shipped model at each ``--scales`` value (the same class-balanced conditions and seed),
scored like ``digits_quality.py`` (FID-digits etc. against the shifted held-out split). The default CFG of
the digits backend is the scale with the lowest FID-digits here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flashar import api
from flashar.compare import environment
from flashar.compare.metrics import Extractor, quality, to_uint8
from flashar.methods.raster import Raster
from flashar.plugins import get_registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1.0,1.5,2.0,3.0")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/digits_cfg.json"))
    args = parser.parse_args()
    backbone = api.load_backbone("digits", {})
    spec = get_registry().metrics["fid-digits"]
    extractor = Extractor(spec.register(), spec.label, {}, spec.classify)
    reference = backbone.reference_images()
    conditions = [i % 10 for i in range(args.samples)]
    method = Raster(backbone)
    report = {"environment": environment(backbone.device, backbone.dtype), "samples": args.samples, "seed": args.seed,
              "scales": {}}
    for scale in (float(s) for s in args.scales.split(",")):
        sampling = api.resolve_sampling(backbone, {"cfg_scale": scale})
        result = api.generate(method, conditions, None, sampling, 100, args.seed)
        report["scales"][str(scale)] = quality(
            to_uint8(backbone.decode(result.codes)), reference, extractor, conditions)
        print(scale, json.dumps({k: round(v, 4) for k, v in report["scales"][str(scale)].items()}), flush=True)
    report["best"] = min(report["scales"], key=lambda s: report["scales"][s]["fid"])
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("lowest FID-digits at CFG", report["best"])


if __name__ == "__main__":
    main()
