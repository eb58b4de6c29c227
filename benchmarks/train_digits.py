"""Reproduce the digits default's shipped weights: raster GPT, FID-digits CNN, FlashAR adapters.

    python benchmarks/train_digits.py --out flashar/backends/digits/weights [--parts raster,features,adapt]

1. The raster model, a tiny LlamaGen-architecture GPT (flashar's llamagen code), is trained on the train
   split with next-token cross-entropy, LlamaGen's dropouts and 10% class dropout (null class for CFG)
   and random shifts; the learning rate drops when the validation NLL plateaus, and training stops when
   it has not improved for ``--patience`` epochs; the best epoch is kept.
2. The feature CNN behind FID-digits and class accuracy is trained on the same train split, under the
   same random shifts, so that its features follow shape rather than position.
3. The FlashAR adapters are produced from the raster weights by the real CLI: ``--adapt-augment``
   randomly shifted copies of the train split (the raster model saw only shifted digits) are written as
   a class-folder of PNGs and ``flashar adapt --backend digits`` runs on it three times: the default
   adapter (``flashar/``) with both stages and ``--row-lag 2`` (46 passes; each cell also sees the cell
   above and to its right), the paper's anti-diagonal order (``flashar-lag1/``, 31 passes) and the
   default's stage 1 alone (``flashar-stage1/``, for the ablation in the README). 2 shifted copies of the
   validation split are held out: each stage ends with its best held-out weights and stops after 3
   evaluations without improvement, stage 2 distils from the frozen raster model (weight 1.0), and the
   diagonal coupling is fitted on the held-out grids at the end (each adapter's ``metrics.jsonl`` has the
   curves and the fit).

Everything is seeded; the JSON receipt (``train_digits.json``) records the curves and the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flashar.compare import cpu_model
from flashar.backends.digits.data import LEVELS, MAX_SHIFT, held_out_reference, load_splits, shift
from flashar.backends.digits.features import DigitsCNN
from flashar.backends.digits.loader import RASTER_CONFIG, save_raster
from flashar.backends.llamagen.backbone import LlamaGenBackbone
from flashar.backends.llamagen.model import GPTConfig
from flashar.adapt.model import dropout_prefix
from flashar.teacher import raster_logits

from digits_quality import held_out_nll  # benchmarks/ (this script's folder)


# Adaptation recipe for the tiny model (the library defaults are Emu3.5's, for a 34B backbone).
ADAPT_ARGS = ("--stage1-steps 300 --stage1-lr 1e-3 --stage1-warmup-steps 20 --stage1-flat-steps 150 "
              "--stage1-distill-weight 0.2 --stage2-steps 1000 --stage2-lr 5e-4 --stage2-backbone-lr-factor 0.5 "
              "--stage2-warmup-steps 20 --stage2-flat-steps 300 --batch-size 32 --checkpoint-every 100 "
              "--eval-every 100 --patience 3 --stage2-distill-weight 1.0")


def add_dropout(model: LlamaGenBackbone, p: float) -> None:
    """LlamaGen's training dropouts (token, residual, FFN; all 0.1 officially) as forward hooks, so the
    library's inference model stays dropout-free; active only in train mode."""
    def hook(module, inputs, output):
        return F.dropout(output, p, training=module.training)

    for module in [model.tok_embeddings, model.cls_embedding] + [m for layer in model.layers
                                                                  for m in (layer.attention.wo, layer.feed_forward.w2)]:
        module.register_forward_hook(hook)


def train_raster(args, splits, log) -> tuple[LlamaGenBackbone, dict]:
    torch.manual_seed(args.seed)
    cfg = GPTConfig(**RASTER_CONFIG)
    model = LlamaGenBackbone(cfg)
    for p in model.parameters():  # LlamaGen's init: N(0, 0.02) for weights, zero output head
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.02)
    torch.nn.init.zeros_(model.output.weight)
    add_dropout(model, args.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=args.patience // 3)
    codes, labels = splits.train
    gen = torch.Generator().manual_seed(args.seed)
    best, best_state, stale, curve = float("inf"), None, 0, []
    for epoch in range(args.max_epochs):
        model.train()
        order = torch.randperm(len(codes), generator=gen)
        began = time.perf_counter()
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            batch = shift(codes[idx], gen)
            prefix = dropout_prefix(
                model.prefix(labels[idx].tolist(), cfg=True, grid=(16, 16)), torch.rand(len(idx), generator=gen) < 0.1)
            loss = F.cross_entropy(raster_logits(model, prefix, batch).flatten(0, 1), batch.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.eval()
        val = held_out_nll(model, *splits.val)
        plateau.step(val)
        curve.append({"epoch": epoch, "val_nll": val, "train_loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                      "seconds": time.perf_counter() - began})
        log(f"raster epoch {epoch}: val NLL {val:.4f} nats/token ({curve[-1]['seconds']:.0f}s)")
        if val < best - 1e-4:
            best, best_state, stale = val, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            stale += 1
            if stale >= args.patience:
                break
    model.load_state_dict(best_state)
    return model.eval(), {"curve": curve, "best_val_nll": best, "epochs": len(curve),
                          "stopped_early": stale >= args.patience}


def train_cnn(args, splits, log) -> tuple[DigitsCNN, dict]:
    torch.manual_seed(args.seed)
    net = DigitsCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    codes, labels = splits.train
    gen = torch.Generator().manual_seed(args.seed + 1)
    steps = args.cnn_epochs * -(-len(codes) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for epoch in range(args.cnn_epochs):
        order = torch.randperm(len(codes), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            logits = net.classify(DigitsCNN.from_codes(shift(codes[idx], gen, MAX_SHIFT)))
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    net.eval()
    with torch.no_grad():  # on shifted digits, as the samples it judges are
        acc = lambda codes, labels: (
            (net.classify(DigitsCNN.from_codes(codes)).argmax(-1) == labels).float().mean().item())
        val_codes, val_labels = splits.val
        result = {"val_accuracy": acc(shift(val_codes, torch.Generator().manual_seed(args.seed + 3)), val_labels),
                  "test_accuracy": acc(*held_out_reference())}
    log(f"feature CNN: val accuracy {result['val_accuracy']:.3f}, test accuracy {result['test_accuracy']:.3f}")
    return net, result


def write_png_folder(codes: torch.Tensor, labels: torch.Tensor, folder: Path) -> None:
    for i, (grid, label) in enumerate(zip(codes, labels.tolist())):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        gray = (grid.numpy() * 255 // (LEVELS - 1)).astype(np.uint8)
        Image.fromarray(np.stack([gray] * 3, axis=-1)).save(folder / str(label) / f"{i:05d}.png")


def run_adapt(weights: Path, data: Path, out: Path, extra: list[str], log) -> None:
    cmd = [sys.executable, "-m", "flashar", "adapt", "--backend", "digits", "--checkpoint",
           str(weights / "raster.safetensors"), "--data", str(data), "--out", str(out), "--cache-dir",
           str(data.parent / "cache"), *extra]
    log("running: " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("flashar/backends/digits/weights"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-epochs", type=int, default=300)
    parser.add_argument("--patience", type=int, default=15,
        help="epochs without a better validation NLL before stopping (the LR drops 0.3x after a third of it)")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--cnn-epochs", type=int, default=60)
    parser.add_argument("--parts", default="raster,features,adapt",
                        help="what to (re)build; the others are read from --out [default: %(default)s]")
    parser.add_argument("--adapt-augment", type=int, default=8,
        help="randomly shifted copies of each training image for adaptation (the raster model saw only shifted digits)")
    parser.add_argument("--adapt-args", default=ADAPT_ARGS, help="flags for `flashar adapt` [default: %(default)s]")
    parser.add_argument("--adapters", default="flashar,flashar-lag1,flashar-stage1",
                        help="which adapters to build [default: %(default)s]")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    log = lambda msg: print(msg, flush=True)
    splits = load_splits()
    args.out.mkdir(parents=True, exist_ok=True)
    receipt_path = args.out / "train_digits.json"
    parts = set(args.parts.split(","))
    receipt = json.loads(receipt_path.read_text()) if receipt_path.is_file() and "raster" not in parts else {}
    receipt.update({"torch": torch.__version__, "machine": cpu_model(), "threads": torch.get_num_threads()})
    if "raster" in parts:
        model, receipt["raster"] = train_raster(args, splits, log)
        save_raster(model, args.out)
    if "features" in parts:
        cnn, receipt["feature_cnn"] = train_cnn(args, splits, log)
        cnn.save(args.out / "features.safetensors")
    if "adapt" in parts:
        receipt.update({"adapt_args": args.adapt_args, "adapt_augment": args.adapt_augment})
        adapt(args, splits, log)
    receipt_path.write_text(json.dumps(receipt, indent=2) + "\n")


def adapt(args, splits, log) -> None:
    """The FlashAR adapters of the default through the real CLI, on shifted copies of the train split, with
    shifted copies of the validation split as held-out data (best weights per stage, early stopping)."""
    with tempfile.TemporaryDirectory() as tmp:
        gen = torch.Generator().manual_seed(args.seed + 2)
        for (codes, labels), folder, copies in ((splits.train, "train", args.adapt_augment), (splits.val, "val", 2)):
            augmented = torch.cat([shift(codes, gen) for _ in range(copies)])  # shifted as the raster model saw them
            write_png_folder(augmented, labels.repeat(copies), Path(tmp) / folder)
        variants = {"flashar": ["--row-lag", "2"], "flashar-lag1": [],
                    "flashar-stage1": ["--row-lag", "2", "--stage2-mode", "none"]}
        for name in args.adapters.split(","):
            target = args.out / name
            shutil.rmtree(target, ignore_errors=True)
            extra = ["--val-data", str(Path(tmp) / "val")] + variants[name] + args.adapt_args.split()
            run_adapt(args.out, Path(tmp) / "train", Path(tmp) / name, extra, log)
            target.mkdir()
            for file in ("config.json", "model.safetensors", "metrics.jsonl"):
                shutil.copy(Path(tmp) / name / file, target / file)


if __name__ == "__main__":
    main()
