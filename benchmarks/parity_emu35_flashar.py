"""Parity of flashar's FlashAR decoding on Emu3.5 with the released reference decoder, on the same random weights.

The reference code is not part of flashar; point this script at a checkout of lxazjk/Emu3.5-FlashAR (HEAD
2d4a74e was used) and at a Python that can run it (transformers 4.48.2 plus omegaconf and einops; flashar
itself needs transformers 5, so the two sides run in two processes):

    python benchmarks/parity_emu35_flashar.py --reference-repo /path/to/Emu3.5-FlashAR \\
        --reference-python /path/to/venv-4.48/bin/python --out benchmarks/results/parity_emu35_flashar.json

Reference side (its own code only): build tiny random ``Emu3ForCausalLM`` models with the real vocabulary,
save each with ``save_pretrained`` (the base, as published), wrap it in ``Emuflashar`` as its trainer does,
perturb every weight (a "fine-tuned" backbone, trained gates), save the wrapper with the trainer's own
``_write_hf_checkpoint_dir`` (the released layout: config.json, checkpoint_meta.json, sharded safetensors)
and a tiny IBQ; then load both with the GenEval tool's ``load_model`` and decode greedily with
``Emuflashar.generate`` (``_generate_with_kv_cache``) from the tool's own prefixes, CFG uncond = the same
template with empty text. It also records the teacher-forced fused logits of its training ``forward``.

flashar side: ``--backend emu35 --model-path base --adapter released --method flashar``, greedy (top-k 1),
one prompt per batch like the reference; the same grids, the same fused logits, the same IBQ decode.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TEMPLATE = "<|extra_203|>You are a helpful assistant for t2i task. USER: {text} ASSISTANT: <|extra_100|>"
PROMPTS = ["a red car", "two cats sleeping on a green sofa", "a lighthouse at dusk"]
GRIDS = [(4, 4), (3, 5)]
CFG_SCALES = [5.0, 1.0]
# (name, layers, K, b): b below L - K, and the released recipe K = 4, b = L - 4
MODELS = [("L4_K2_b1", 4, 2, 1), ("L6_K4_b2", 6, 4, 2)]
TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1e6, attention_dropout=0.0,
            vocab_size=282926, tie_word_embeddings=False)
IBQ_YAML = {"ddconfig": {"double_z": False, "z_channels": 32, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                         "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0},
            "n_embed": 131072, "embed_dim": 8}


def cases():
    return [(prompt, grid, cfg) for grid in GRIDS for cfg in CFG_SCALES for prompt in PROMPTS]


# --- reference side: runs under --reference-python, imports only the reference repository ---------------

def reference_modules(repo: Path):
    sys.path[:0] = [str(repo), str(repo / "tools")]
    import generate_geneval_flashar as geneval
    from flashar.model import Emuflashar
    from flashar.utils.checkpoint_utils import _write_hf_checkpoint_dir
    from src.emu3p5 import Emu3Config, Emu3ForCausalLM

    return geneval, Emuflashar, _write_hf_checkpoint_dir, Emu3Config, Emu3ForCausalLM


def perturb(module: torch.nn.Module, generator: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def reference_build(repo: Path, work: Path, name: str, layers: int, num_blocks: int, branch_layer: int) -> None:
    """Base + released FlashAR checkpoint + IBQ, written by the reference code itself."""
    import yaml

    geneval, Emuflashar, write_checkpoint, Emu3Config, Emu3ForCausalLM = reference_modules(repo)
    generator = torch.Generator().manual_seed(layers)
    torch.manual_seed(layers)
    config = Emu3Config(num_hidden_layers=layers, **TINY)
    base = Emu3ForCausalLM(config).eval()
    perturb(base, generator, 0.1)  # beyond the 0.02 init, so logits separate
    base.to(torch.bfloat16).save_pretrained(work / name / "base", max_shard_size="50MB")
    wrapper = Emuflashar(base.model, vocab_size=config.vocab_size, hidden_size=config.hidden_size, pad_token_id=-100,
                         mask_token_id=config.pad_token_id, visual_token_offset=config.eoi_token_id + 1,
                         use_vertical_block=True, vertical_layers=num_blocks, vertical_start_layer=branch_layer,
                         lm_head=base.lm_head)
    perturb(wrapper, generator, 0.02)  # a fine-tuned backbone and heads, trained (non-0.5) gates
    perturb(wrapper.hv_gate_mlp, generator, 0.3)
    perturb(wrapper.hv_gate_corner, generator, 0.3)
    args = argparse.Namespace(model_path=str(work / name / "base"), tokenizer_path="", vq_path="", dtype="bf16",
                              hf_max_shard_size="60MB")
    write_checkpoint(str(work / name / "released"), state_dict=wrapper.to(torch.bfloat16).state_dict(), target=wrapper,
                     args=args, global_step=74000, epoch=None, save_reason="parity")
    vq = work / name / "vq"
    vq.mkdir(parents=True)
    (vq / "config.yaml").write_text(yaml.safe_dump(IBQ_YAML))
    from src.vision_tokenizer.ibq import IBQ

    torch.save({"state_dict": IBQ(**IBQ_YAML).state_dict()}, vq / "model.ckpt")


def reference_decode(repo: Path, work: Path, name: str) -> dict:
    """Greedy grids (GenEval tool: load_model, make_prefix, Emuflashar.generate) and teacher-forced logits."""
    geneval, *_ = reference_modules(repo)
    args = argparse.Namespace(model_path=str(work / name / "base"), ckpt_path=str(work / name / "released"),
                              vq_path=str(work / name / "vq"), tokenizer_path=str(repo / "src" / "tokenizer_emu3_ibq"),
                              dtype="fp32", device="cpu", visual_token_offset=-1, use_vertical_block=None,
                              vertical_layers=0, vertical_start_layer=-1, split_backbone=False)
    _, wrapper, tokenizer, vq, offset, device = geneval.load_model(args)
    out = {}
    for i, (prompt, (height, width), cfg) in enumerate(cases()):
        cond = geneval.make_prefix(tokenizer, prompt, TEMPLATE, height, width, device)
        uncond = geneval.make_prefix(tokenizer, "", TEMPLATE, height, width, device) if cfg > 1 else None
        with torch.no_grad():
            tokens = wrapper.generate(height=height, width=width, device=device, text_input_ids=cond, temperature=1.0,
                                      top_k=0, top_p=1.0, sample_logits=False, unconditional_text_input_ids=uncond,
                                      cfg_scale=cfg)
            codes = (tokens - offset).clamp_min(0)
            logits = reference_teacher_logits(wrapper, tokens, cond, uncond, height, width, offset)
            pixels = vq.decode_code(codes[None], shape=(1, height, width, IBQ_YAML["embed_dim"]))
        torch.save({"codes": codes, "logits": logits, "pixels": pixels}, work / name / f"reference_{i}.pt")
        out[i] = codes.tolist()
    return out


def reference_teacher_logits(wrapper, tokens, cond, uncond, height, width, offset):
    """Fused logits of the training forward for the decoded grid: rows [uncond; cond] right-padded (CFG)."""
    if uncond is None:
        ids, mask = cond, torch.ones_like(cond)
    else:
        ids, mask = wrapper._build_cfg_text_batch(cond, None, uncond, None)
    grid = tokens.view(1, -1).expand(ids.shape[0], -1)
    fused = wrapper(input_ids=grid, height=height, width=width, text_input_ids=ids, text_attention_mask=mask)["logits"]
    return fused[..., offset:].flatten(1, 2).float()  # (rows, H*W, codebook)


def reference_main(repo: Path, work: Path) -> None:
    torch.set_grad_enabled(False)
    grids = {}
    for name, layers, num_blocks, branch_layer in MODELS:
        reference_build(repo, work, name, layers, num_blocks, branch_layer)
        grids[name] = reference_decode(repo, work, name)
    (work / "reference.json").write_text(json.dumps(grids))


# --- flashar side ----------------------------------------------------------------------------------------

def flashar_compare(repo: Path, work: Path, name: str) -> dict:
    from flashar import api
    from flashar.config import SamplingConfig
    from flashar.teacher import flashar_logits

    options = {"model_path": work / name / "base", "tokenizer_path": repo / "src" / "tokenizer_emu3_ibq",
               "vq_path": work / name / "vq", "text_max_length": 0}
    backbone = api.load_backbone("emu35", options)
    method = api.build_method("flashar", backbone, {"adapter": work / name / "released"}, own_backbone=True)
    rows, max_diff, max_pixel_diff = [], 0.0, 0.0
    for i, (prompt, grid, cfg) in enumerate(cases()):
        ref = torch.load(work / name / f"reference_{i}.pt", weights_only=True)
        sampling = SamplingConfig(cfg_scale=cfg, top_k=1)
        size = (grid[0] * backbone.downsample, grid[1] * backbone.downsample)
        result = api.generate(method, [prompt], size, sampling, batch_size=1)
        prefix = backbone.prefix([prompt], cfg=cfg != 1.0, grid=grid, unconditional="empty")
        with torch.no_grad():
            fused = flashar_logits(method.backbone, method.head, prefix, ref["codes"][None]).fused  # [cond; uncond]
            pixels = backbone.tokenizer.model.decode_codes(ref["codes"][None])
        ours = fused if cfg == 1.0 else fused.flip(0)  # the reference's rows are [uncond; cond]
        max_diff = max(max_diff, (ours - ref["logits"]).abs().max().item())
        max_pixel_diff = max(max_pixel_diff, (pixels - ref["pixels"]).abs().max().item())
        same = (result.codes[0] == ref["codes"]).float().mean().item()
        rows.append({"prompt": prompt, "grid": list(grid), "cfg_scale": cfg, "token_agreement": same,
                     "distinct_codes": len(ref["codes"].unique()), "forward_passes": result.num_forward_passes})
    adapter = method.adapter.metadata
    return {"layers": backbone.num_layers, "K": adapter.num_blocks, "b": adapter.branch_layer,
            "identical_grids": all(r["token_agreement"] == 1.0 for r in rows), "cases": rows,
            "teacher_forced_fused_logits_max_abs_diff": max_diff, "ibq_decode_max_abs_diff": max_pixel_diff,
            "controls": controls(method, options, work, name)}


def controls(method, options: dict, work: Path, name: str) -> dict:
    """Token agreement with the reference when one ingredient is wrong: shows the comparison can fail."""
    from flashar import api
    from flashar.adapter import Adapter
    from flashar.methods.flashar import FlashAR

    base = api.load_backbone("emu35", options)  # the base weights, not the checkpoint's fine-tuned ones
    wrong_backbone = FlashAR(base, adapter=Adapter(method.adapter.metadata, method.head, base))
    native = api.load_backbone("emu35", options)
    native.load_state_dict(method.backbone.state_dict())
    native.prefix = lambda *a, **k: type(native).prefix(native, *a, **{**k, "unconditional": "native"})
    wrong_uncond = FlashAR(native, adapter=Adapter(method.adapter.metadata, method.head, native))
    return {"base_backbone_weights": agreement(wrong_backbone, work, name),
            "native_no_text_uncond": agreement(wrong_uncond, work, name)}


def agreement(method, work: Path, name: str) -> float:
    """Mean token agreement with the reference grids over the CFG cases."""
    from flashar import api
    from flashar.config import SamplingConfig

    scores = []
    for i, (prompt, grid, cfg) in enumerate(cases()):
        if cfg != 1.0:
            ref = torch.load(work / name / f"reference_{i}.pt", weights_only=True)
            size = (grid[0] * 16, grid[1] * 16)
            codes = api.generate(method, [prompt], size, SamplingConfig(cfg_scale=cfg, top_k=1), batch_size=1).codes
            scores.append((codes[0] == ref["codes"]).float().mean().item())
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-repo", type=Path, required=True)
    parser.add_argument("--reference-python", default=sys.executable, help="A Python that runs the reference code.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/parity_emu35_flashar.json"))
    parser.add_argument("--side", choices=["flashar", "reference"], default="flashar", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    repo = args.reference_repo.resolve()
    if args.side == "reference":
        return reference_main(repo, args.work)
    from flashar.compare import cpu_model  # this side only: the reference side runs without flashar

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([args.reference_python, __file__, "--side", "reference", "--reference-repo", str(repo),
                        "--work", str(work)], check=True)
        reference = json.loads((work / "reference.json").read_text())
        report = {"torch": torch.__version__, "machine": cpu_model(),
                  "threads": torch.get_num_threads(), "dtype": "float32", "reference": "lxazjk/Emu3.5-FlashAR "
                  "tools/generate_geneval_flashar.py load_model + Emuflashar.generate (greedy)",
                  "models": {name: flashar_compare(repo, work, name) for name in reference}}
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
