"""Parity of flashar's LlamaGen backend with the official LlamaGen code, on the same random weights.

The official repository is not part of flashar; point this script at a checkout of
FoundationVision/LlamaGen (commit ce98ec4 was used):

    python benchmarks/parity_llamagen.py --official-repo /path/to/LlamaGen --out benchmarks/results/parity_llamagen.json

It builds official models with random weights (GPT-B c2i at 16x16 and a small t2i model), saves them in
the official ``{"model": state_dict}`` .pt format, loads them through flashar's loader, and compares:
greedy tokens (top-k 1, CFG 4.0) from the official ``generate`` against flashar's raster method,
teacher-forced logits, and the VQ-16 decoder/encoder. Prints and writes the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from flashar.compare import cpu_model
from flashar.backends.llamagen.loader import load_gpt, load_vq
from flashar.config import SamplingConfig
from flashar.methods.raster import Raster
from flashar.sampling import make_generator


def official_modules(repo: Path):
    sys.path.insert(0, str(repo))
    from autoregressive.models import generate as official_generate
    from autoregressive.models import gpt as official_gpt
    from tokenizer.tokenizer_image import vq_model as official_vq

    return official_gpt, official_generate, official_vq


def random_official_gpt(gpt, **kwargs):
    model = gpt.Transformer(gpt.ModelArgs(**kwargs)).eval()
    with torch.no_grad():
        model.output.weight.normal_(0, 0.02)  # the official init zeroes the head; give it real logits
    return model


def save_official(model, path: Path) -> None:
    torch.save({"model": model.state_dict()}, path)


def compare_c2i(gpt, generate, tmp: Path) -> dict:
    torch.manual_seed(0)
    grid = 16
    official = random_official_gpt(gpt, dim=768, n_layer=12, n_head=12, block_size=grid * grid, num_classes=1000,
                                   cls_token_num=1)
    save_official(official, tmp / "c2i_B_256.pt")
    ours = load_gpt(tmp / "c2i_B_256.pt", preset="GPT-B")
    classes = [207, 360, 387, 974]
    with torch.no_grad():
        official_tokens = generate.generate(official, torch.tensor(classes), grid * grid, cfg_scale=4.0, top_k=1,
                                            top_p=1.0, temperature=1.0, sample_logits=True)
    result = Raster(ours).generate(
        classes, (grid, grid), SamplingConfig(cfg_scale=4.0, top_k=1), make_generator(0, "cpu"))
    same = (result.codes.flatten(1) == official_tokens.long()).float().mean().item()
    return {"model": "GPT-B c2i, 16x16, random weights", "classes": classes, "greedy_token_agreement": same,
            "identical": bool(same == 1.0), "forward_passes": result.num_forward_passes}


def compare_t2i(gpt, generate, tmp: Path) -> dict:
    torch.manual_seed(1)
    grid, batch = 8, 2
    official = random_official_gpt(gpt, dim=256, n_layer=4, n_head=4, block_size=grid * grid, cls_token_num=120,
                                   model_type="t2i", caption_dim=2048)
    save_official(official, tmp / "t2i_small.pt")
    config = {"dim": 256, "n_layer": 4, "n_head": 4, "model_type": "t2i", "cls_token_num": 120, "num_classes": 1000}
    (tmp / "t2i.json").write_text(json.dumps(config))
    features = torch.randn(batch, 120, 2048)
    mask = torch.zeros(batch, 120, dtype=torch.bool)
    mask[0, -7:], mask[1, -30:] = True, True  # left padded, as the official sampler lays them out
    features = features * mask[..., None]
    with torch.no_grad():
        official_tokens = generate.generate(official, features, grid * grid, emb_masks=mask.long(), cfg_scale=4.0,
                                            top_k=1, top_p=1.0, temperature=1.0, sample_logits=True)
    ours = load_gpt(tmp / "t2i_small.pt", config_file=tmp / "t2i.json", text_encoder=lambda prompts: (features, mask))
    result = Raster(ours).generate(
        ["a", "b"], (grid, grid), SamplingConfig(cfg_scale=4.0, top_k=1), make_generator(0, "cpu"))
    same = (result.codes.flatten(1) == official_tokens.long()).float().mean().item()
    return {"model": "t2i (dim 256, 4 layers, 120 caption tokens), 8x8", "greedy_token_agreement": same,
            "identical": bool(same == 1.0)}


def compare_vq(vq_model, tmp: Path) -> dict:
    torch.manual_seed(2)
    official = vq_model.VQ_16().eval()
    torch.save({"model": official.state_dict()}, tmp / "vq_ds16_c2i.pt")
    ours = load_vq(tmp / "vq_ds16_c2i.pt")
    codes = torch.randint(0, 16384, (1, 4, 4))
    with torch.no_grad():
        ref = official.decode_code(codes.flatten(), [1, 8, 4, 4])
        got = ours.model.decode_codes(codes)
        image = torch.rand(1, 3, 64, 64) * 2 - 1
        ref_codes = official.encode(image)[2][2].view(1, 4, 4)
        got_codes = ours.model.encode_codes(image)
    return {"decode_max_abs_diff": (ref - got).abs().max().item(),
            "encode_identical": bool((ref_codes == got_codes).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-repo", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/parity_llamagen.json"))
    args = parser.parse_args()
    gpt, generate, vq_model = official_modules(args.official_repo)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        report = {
            "torch": torch.__version__, "machine": cpu_model(),
            "threads": torch.get_num_threads(), "dtype": "float32",
            "c2i": compare_c2i(gpt, generate, Path(tmp)),
            "t2i": compare_t2i(gpt, generate, Path(tmp)),
            "vq": compare_vq(vq_model, Path(tmp)),
        }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
