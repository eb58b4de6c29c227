"""The digits default's quality bar, measured side by side in one process.

    python benchmarks/digits_quality.py --out benchmarks/results/digits_quality.json

For the shipped raster model and its FlashAR adapter (row lag 2, the default), the paper's anti-diagonal
order (row lag 1, with its fitted diagonal coupling and with independent draws, the paper's sampler), and,
to show what each stage buys, the default's stage-1-only adapter and naive lagged decoding of the
unadapted model (a fresh vertical branch cloned from the backbone, gates at 0.5), with the same
class-balanced conditions and seeds:

* held-out NLL (nats/token) on the test split shifted as the training data is, teacher forced in each
  method's own decoding order;
* FID-digits, KID, IS, precision, recall, class accuracy and the classifier two-sample accuracy of
  ``--samples`` images per seed, averaged over ``--seeds``, against the shifted test split
  (``Backbone.reference_images``); the same for real digits: the train split shifted as in training (the
  floor), unshifted (what a position-blind metric would have preferred), and the held-out validation split
  under the damage ladder of ``flashar.backends.digits.ladder`` (the metric must worsen along it); a grid
  of the first 100 samples of the first seed per method (and of real held-out digits) beside the receipt;
* speed: raster vs FlashAR timed interleaved in this process (medians): the latency of one image as
  ``flashar compare`` runs by default (eager; the speedup checked), the throughput at ``--batch-size``, and
  the latency with both decode steps compiled (reported).

The checks of the issue are evaluated and stored with the numbers (``checks`` for the default adapter,
``checks_row_lag_1`` for the row-lag-1 one).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from flashar import api
from flashar.adapter import Adapter, load_adapter, new_metadata
from flashar.backends.digits.data import held_out_reference, load_splits, shift
from flashar.backends.digits.ladder import ladder
from flashar.branch import FlashARHead
from flashar.compare import environment
from flashar.compare.metrics import Extractor, quality, to_uint8
from flashar.compare.report import sample_grid
from flashar.compare.timing import time_methods
from flashar.config import BranchConfig
from flashar.coupling import grid_log_likelihood, latent_intervals
from flashar.methods.flashar import FlashAR, FlashAROptions
from flashar.io import save_png
from flashar.methods.raster import Raster
from flashar.plugins import get_registry
from flashar.teacher import flashar_logits, raster_logits

WEIGHTS = Path(__file__).resolve().parents[1] / "flashar" / "backends" / "digits" / "weights"


def held_out_nll(backbone, codes, labels, head=None, coupling: float = 0.0, batch: int = 100) -> float:
    """NLL per token (nats) of held-out grids, teacher forced: raster, or the FlashAR decoder (``head``) with
    its draws along a diagonal coupled at ``coupling`` (0: independent, the sum of the cells' own NLLs)."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(codes), batch):
            prefix = backbone.prefix(labels[i : i + batch].tolist(), cfg=False, grid=tuple(codes.shape[1:]))
            grids = codes[i : i + batch]
            logits = (raster_logits(backbone, prefix, grids) if head is None
                      else flashar_logits(backbone, head, prefix, grids).fused)
            if coupling:
                total -= (
                    grid_log_likelihood(*latent_intervals(logits, grids), coupling, head.config.row_lag).sum().item())
            else:
                total += F.cross_entropy(logits.flatten(0, 1), grids.flatten(), reduction="sum").item()
    return total / codes.numel()


GRID_NAMES = {"flashar (row lag 1)": "flashar_lag1",
              "flashar (row lag 1, independent draws)": "flashar_lag1_independent",
              "flashar (stage 1 only)": "flashar_stage1", "naive diagonal (unadapted)": "naive"}
LAG1 = "flashar (row lag 1)"  # the paper's anti-diagonal order (``flashar-lag1/``)


def grid_path(receipt: Path, name: str) -> Path:
    """benchmarks/results/digits_quality.json -> digits_quality_<name>.png beside it (the README shows them)."""
    return receipt.with_name(f"{receipt.stem}_{GRID_NAMES.get(name, name)}.png")


def variants(backbone, adapters: Path = WEIGHTS):
    """name -> (method, head or None, backbone) for raster, the default adapter, the row-lag-1 adapter (with
    its fitted diagonal coupling, and with independent draws), the default after stage 1 only, and naive
    decoding in the default's order."""
    adapted = load_adapter(adapters / "flashar", backbone)
    lag1 = load_adapter(adapters / "flashar-lag1", backbone)
    stage1 = load_adapter(adapters / "flashar-stage1", backbone)
    torch.manual_seed(0)
    branch = BranchConfig(num_blocks=adapted.metadata.num_blocks, row_lag=adapted.head.config.row_lag)
    naive_head = FlashARHead(backbone, branch).eval()
    naive = Adapter(new_metadata(backbone, naive_head, adapted.metadata.grid), naive_head, backbone)
    return {
        "raster": (Raster(backbone), None, backbone),
        "flashar": (FlashAR(backbone, adapter=adapted), adapted.head, adapted.backbone),
        LAG1: (FlashAR(backbone, adapter=lag1), lag1.head, lag1.backbone),
        "flashar (row lag 1, independent draws)": (
            FlashAR(backbone, FlashAROptions(diagonal_coupling=0.0), adapter=lag1), lag1.head, lag1.backbone),
        "flashar (stage 1 only)": (FlashAR(backbone, adapter=stage1), stage1.head, stage1.backbone),
        "naive diagonal (unadapted)": (FlashAR(backbone, adapter=naive), naive_head, backbone),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: the backend's")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/digits_quality.json"))
    parser.add_argument("--adapters", type=Path, default=WEIGHTS,
                        help="folder holding flashar/, flashar-lag1/ and flashar-stage1/ [default: the shipped ones]")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    backbone = api.load_backbone("digits", {})
    splits = load_splits()
    spec = get_registry().metrics["fid-digits"]
    extractor = Extractor(spec.register(), spec.label, {}, spec.classify)
    reference = backbone.reference_images()
    held_out = held_out_reference()
    conditions = [i % 10 for i in range(args.samples)]
    sampling = api.resolve_sampling(backbone, {"cfg_scale": args.cfg_scale} if args.cfg_scale is not None else None)
    report = {"environment": environment(backbone.device, backbone.dtype), "sampling": sampling.model_dump(),
              "samples_per_seed": args.samples, "seeds": seeds, "methods": {}, "real": {}}
    score = lambda codes, labels: quality(to_uint8(backbone.decode(codes)), reference, extractor, labels.tolist())
    train_codes, train_labels = splits.train
    report["real"]["train, shifted as in training (floor)"] = score(
        shift(train_codes, torch.Generator().manual_seed(0)), train_labels)
    report["real"]["train, unshifted"] = score(train_codes, train_labels)
    save_png(sample_grid(to_uint8(backbone.decode(held_out[0][:: len(held_out[0]) // 100][:100]))),
             grid_path(args.out, "real"))
    val_codes, val_labels = torch.cat([splits.val[0]] * 3), splits.val[1].repeat(3)
    for rung, codes in ladder(val_codes).items():
        report["real"][f"validation, {rung}"] = score(codes, val_labels)
    for name, values in report["real"].items():
        print(name, json.dumps({k: round(v, 4) for k, v in values.items()}), flush=True)
    for name, (method, head, bb) in variants(backbone, args.adapters).items():
        per_seed = []
        for seed in seeds:
            result = api.generate(method, conditions, None, sampling, args.batch_size, seed)
            images = to_uint8(backbone.decode(result.codes))
            per_seed.append(quality(images, reference, extractor, conditions))
            if seed == seeds[0]:
                save_png(sample_grid(images[:100]), grid_path(args.out, name))
        averaged = {k: statistics.fmean(s[k] for s in per_seed) for k in per_seed[0]}
        # of the seeds' mean
        averaged["kid_std"] = math.fsum(s["kid_std"] ** 2 for s in per_seed) ** 0.5 / len(per_seed)
        report["methods"][name] = {**averaged, "per_seed": per_seed, "forward_passes": result.num_forward_passes,
                                   "held_out_nll": held_out_nll(bb, *held_out, head=head)}
        coupling = getattr(method, "coupling", 0.0)
        if coupling:  # the NLL of the sampler this row draws from: its diagonals coupled
            report["methods"][name].update(diagonal_coupling=coupling,
                held_out_nll_coupled=held_out_nll(bb, *held_out, head=head, coupling=coupling))
        print(name, json.dumps({k: round(v, 4) for k, v in averaged.items()}), flush=True)
    report["timing"] = {}
    folders = {"flashar": "flashar", LAG1: "flashar-lag1"}
    for kind, batch, compile in (("latency", 1, False), ("throughput", args.batch_size, False),
                                 ("latency, compiled", 1, True)):
        methods = {"raster": Raster(backbone, compile=compile),
                   **{name: FlashAR(backbone, compile=compile, adapter=load_adapter(args.adapters / folder, backbone))
                   for name, folder in folders.items()}}
        timed = time_methods(
            methods, conditions[:batch], backbone.grid(), {m: sampling for m in methods}, args.repeats, warmup=1)
        report["timing"][kind] = {"batch": batch, "speedup": timed["raster"].median / timed["flashar"].median, **{
            m: {"median_seconds": t.median, "seconds": t.seconds, "forward_passes": t.forward_passes,
                "speedup": timed["raster"].median / t.median} for m, t in timed.items()}}
    report["speedup"] = report["timing"]["latency"]["speedup"]
    report["checks"] = checks(report)
    report["checks_row_lag_1"] = checks(report, LAG1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k.startswith("checks")}, indent=2))


def checks(report, name: str = "flashar") -> dict[str, bool]:
    raster, flashar = report["methods"]["raster"], report["methods"][name]
    return {
        "fid_within_10_percent": flashar["fid"] <= 1.10 * raster["fid"],
        "class_accuracy_within_2_points": flashar["class_accuracy"] >= raster["class_accuracy"] - 0.02,
        "two_sample_accuracy_within_0.03": flashar["two_sample_accuracy"] <= raster["two_sample_accuracy"] + 0.03,
        "nll_at_most_10_percent_above": flashar.get("held_out_nll_coupled", flashar["held_out_nll"])
        <= 1.10 * raster["held_out_nll"],
        "at_least_4x_faster": report["timing"]["latency"][name]["speedup"] >= 4.0,
    }


if __name__ == "__main__":
    main()
