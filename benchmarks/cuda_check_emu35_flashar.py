"""CUDA check of FlashAR on Emu3.5 with a checkpoint in the released layout (tiny random models).

Run from the repository root on a GPU machine (the tests' helpers write the tiny models, with the real
tokenizer files kept in tests/data/emu35-tokenizer):

    python benchmarks/cuda_check_emu35_flashar.py /tmp/emu35_check

Prints JSON: the released checkpoint loaded in place on the device, the cached decoder's logits against
the teacher-forced forward (float32), greedy decoding against the argmax of the teacher-forced raw-logit
CFG, and the compiled step (inductor, CUDA graphs) against the eager one in float32 and bfloat16. Without
CUDA it runs the same checks on CPU (inductor without CUDA graphs).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, "tests")
from helpers import write_emu35, write_emu35_flashar  # noqa: E402

from flashar import api  # noqa: E402
from flashar.config import RuntimeConfig, SamplingConfig  # noqa: E402
from flashar.teacher import flashar_logits  # noqa: E402

PROMPTS, GRID, IMAGE_SIZE, CFG = ["a red car", "two cats on a sofa"], (4, 4), 64, 5.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build(files: tuple[dict, Path], dtype: str, compile: bool):
    options, released = files
    backbone = api.load_backbone("emu35", options, RuntimeConfig(device=DEVICE, dtype=dtype))
    return api.build_method("flashar", backbone, {"adapter": released}, compile=compile, own_backbone=True)


def fused(method, codes: torch.Tensor) -> torch.Tensor:
    """Teacher-forced fused logits (2B, N, V), rows [cond; uncond] with the empty-prompt uncond."""
    prefix = method.backbone.prefix(PROMPTS, cfg=True, grid=GRID, unconditional="empty")
    with torch.no_grad():
        return flashar_logits(method.backbone, method.head, prefix, codes).fused


def exactness(files) -> dict:
    began = time.perf_counter()
    method = build(files, "float32", compile=False)
    report = {"load_seconds": round(time.perf_counter() - began, 2),
              "head_device": str(method.head.vertical_head.weight.device)}
    codes = torch.randint(0, 131072, (len(PROMPTS), *GRID), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = method.teacher_logits(PROMPTS, codes, SamplingConfig(cfg_scale=CFG))
    report["cached_vs_teacher_max_abs_diff"] = (cached - fused(method, codes)).abs().max().item()
    greedy = api.generate(method, PROMPTS, IMAGE_SIZE, SamplingConfig(cfg_scale=CFG, top_k=1), batch_size=len(PROMPTS))
    cond, uncond = fused(method, greedy.codes).chunk(2)
    argmax = (uncond + CFG * (cond - uncond)).argmax(-1).view(len(PROMPTS), *GRID).cpu()
    report["greedy_is_teacher_argmax"] = bool(torch.equal(argmax, greedy.codes))
    return report


def compiled_vs_eager(files, dtype: str) -> dict:
    method = build(files, dtype, compile=True)
    greedy = SamplingConfig(cfg_scale=CFG, top_k=1)
    began = time.perf_counter()
    first = api.generate(method, PROMPTS, IMAGE_SIZE, greedy, batch_size=len(PROMPTS))
    report = {"first_call_seconds": round(time.perf_counter() - began, 2)}
    again = api.generate(method, PROMPTS, IMAGE_SIZE, greedy, batch_size=len(PROMPTS))
    sampled = api.generate(method, PROMPTS, IMAGE_SIZE, SamplingConfig(cfg_scale=CFG, top_k=5120), batch_size=2, seed=1)
    method.step = method._step  # the same weights, eager
    eager = api.generate(method, PROMPTS, IMAGE_SIZE, greedy, batch_size=len(PROMPTS))
    report.update(compiled_vs_eager_agreement=(first.codes == eager.codes).float().mean().item(),
                  replay_identical=bool(torch.equal(first.codes, again.codes)),
                  forward_passes=sampled.num_forward_passes,
                  sampled_codes_in_range=bool(sampled.codes.min() >= 0 and sampled.codes.max() < 131072))
    return report


def main() -> None:
    root = Path(sys.argv[1])
    options = write_emu35(root, num_hidden_layers=4)
    files = (options, write_emu35_flashar(root / "released", options["model_path"], num_blocks=2, branch_layer=1))
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
              "float32_exact": exactness(files),
              **{dtype: compiled_vs_eager(files, dtype) for dtype in ("float32", "bfloat16")}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
