"""Every user-facing setting, as frozen pydantic models (the CLI help reuses the descriptions).

Each default is written once, here. Backends may recommend other sampling values
(``Backbone.sampling_defaults``); values the user sets win over both.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from flashar.errors import FlashARError


CompileMode = Literal["default", "max-autotune"]  # how decode steps are compiled (flashar.compilation)
ImageSize = PositiveInt | tuple[PositiveInt, PositiveInt]  # pixels: one side, or (height, width)
IMAGE_SIZE_HELP = ("Image size in pixels: one side, or height and width as `H W` or `HxW`; default: the backend's "
                   "native size.")


Seed = Annotated[int, Field(ge=0, lt=2**63)]  # torch seeds are 64-bit; the trainer derives more seeds from it


class Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class SamplingConfig(Config):
    """How codes are drawn from the model's logits (shared by every decoding method)."""

    temperature: float = Field(1.0, ge=0.0, description="Softmax temperature; 0 means greedy (argmax).")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely codes (0 = off, 1 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0,
        description="Nucleus sampling: keep the smallest set of codes whose probability reaches p (1 = off).")
    cfg_scale: float = Field(1.0, ge=0.0,
        description="Classifier-free guidance scale: uncond + scale * (cond - uncond); 1 turns guidance off.")
    cfg_interval: int = Field(-1, ge=-1,
        description="Use guidance only for the first N+2 generated tokens (LlamaGen semantics); -1 = always.")

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


SAMPLING_LABELS = {"cfg_scale": "cfg", "top_k": "top-k", "top_p": "top-p", "temperature": "temperature",
                   "cfg_interval": "cfg-interval"}


def describe_sampling(values: dict[str, Any] | str) -> str:
    """``{"cfg_scale": 4.0, "top_k": 2000}`` -> "cfg 4.0, top-k 2000"; a phrase stays as it is."""
    if isinstance(values, str):
        return values
    return ", ".join(f"{SAMPLING_LABELS.get(k, k)} {v}" for k, v in values.items()) or "flashar's defaults"


class RuntimeConfig(Config):
    """Where and how the model runs."""

    device: str = Field("cpu", description="Torch device, e.g. cpu, cuda, cuda:1.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Compute dtype of the backbone.")
    compile: bool = Field(
        False, description="Compile the decode step with torch.compile(fullgraph=True) (CUDA graphs on GPU).")
    compile_mode: CompileMode = Field(
        "default",
        description="With --compile: max-autotune also benchmarks every matmul shape of the step at the first compile "
        "(on CPU inductor's C++ GEMM templates on the frozen weights vs oneDNN; on CUDA Triton templates) and keeps "
        "the fastest: a longer first compile (cached), faster steps.",
    )
    seed: Seed = Field(0, description="Seed of the torch.Generator that drives sampling.")

    @model_validator(mode="after")
    def _check_compile_mode(self):
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode {self.compile_mode} applies to compiled steps; add --compile")
        return self

    @property
    def compile_as(self) -> bool | CompileMode:
        """What methods take as ``compile``: False, or the compile mode."""
        return self.compile and self.compile_mode


class CompileSettings(Config):
    """Settings of every compiled step (the first two: inductor flags on CPU), read from the environment
    (``FLASHAR_<NAME>=0`` turns one off)."""

    freeze_weights: bool = Field(True, description="FLASHAR_FREEZE_WEIGHTS: weights become constants of the graph, "
                                 "prepacked for oneDNN (and for the C++ GEMM templates of max-autotune).")
    cpp_wrapper: bool = Field(True,
                              description="FLASHAR_CPP_WRAPPER: the graph's kernels are called from generated C++ "
                              "rather than Python, which saves a few milliseconds per step.")
    skip_guards: bool = Field(True,
        description="FLASHAR_SKIP_GUARDS: once a kept decode state has been through a whole "
        "generation of a fixed plan of steps (every method but SJD and GSD, whose steps depend on the "
        "data), later generations with it run those steps without evaluating torch.compile's guards "
        "(skip_guard_eval_unsafe), a host cost of every step.")
    onednn_fp32: bool = Field(True,
        description="FLASHAR_ONEDNN_FP32: on x86 CPUs not made by Intel, frozen fp32 linears are "
        "packed for oneDNN where inductor would pick MKL (a static row count, as raster's steps have); "
        "raster ran 1.77x faster on an AVX2 AMD EPYC (benchmarks/fp32_packing.py).")

    @classmethod
    def from_env(cls) -> CompileSettings:
        return cls(**{name: os.environ.get(f"FLASHAR_{name.upper()}", "1") != "0" for name in cls.model_fields})


class BranchConfig(Config):
    """The FlashAR vertical branch and fusion gate (arXiv 2605.09430 §3)."""

    num_blocks: int = Field(1, ge=1, description="K: backbone layers cloned into the vertical branch.")
    branch_layer: int | None = Field(None, ge=0,
        description="b: the branch reads the hidden state entering this layer and clones layers [b, b+K); default L-K.")
    gate: Literal["hidden", "logits", "scalar", "fixed"] = Field(
        "hidden",
        description="Fusion gate: per-position MLP on [left final hidden; upper vertical hidden] (the released "
        "Emu3.5 gate), per-position MLP on the detached logit pair, one learned scalar, or a fixed 0.5 average.",
    )
    gate_hidden: int | None = Field(
        None, gt=0, description="Gate MLP width; default max(64, d/8) for 'hidden', max(32, V/512) for 'logits'.")
    row_lag: int = Field(1, ge=1,
        description="Steps between the starts of consecutive rows in decoding and in the training mask: 1 is the "
        "paper's anti-diagonal (H+W-1 passes); k > 1 lets each cell also see the k-1 cells above and to its "
        "right, for k*(H-1)+W passes.")


class StageConfig(Config):
    """One adaptation stage."""

    steps: int = Field(..., ge=0, description="Optimizer steps in this stage.")
    lr: float = Field(..., gt=0, description="Peak learning rate of the FlashAR parts (branch, heads, gates).")
    backbone_lr_factor: float = Field(0.2, ge=0, description="Backbone learning rate = lr * this factor (stage 2).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    flat_steps: int = Field(0, ge=0, description="Steps at the peak rate after warm-up, before the cosine decay.")
    min_lr_factor: float = Field(0.05, ge=0, le=1, description="Cosine floor as a fraction of the peak rate.")
    aux_vertical_weight: float = Field(0.05, ge=0, description="Weight of the auxiliary vertical cross-entropy.")
    distill_weight: float = Field(0.0, ge=0,
        description="Weight of the KL distillation from the frozen raster model: onto the "
        "vertical logits in stage 1, onto the horizontal logits in stage 2 (which then keeps a frozen copy of the "
        "backbone).")
    distill_temperature: float = Field(2.0, gt=0, description="Temperature of the distillation KL.")
    gate_entropy_weight: float = Field(0.0, ge=0, description="Weight of the gate anti-collapse regulariser.")
    context_noise: float = Field(0.0, ge=0, lt=1,
        description="Fraction of the grid's tokens replaced by random codes in the "
        "training input (the losses skip those cells), so the model learns not to build on a wrongly "
        "sampled neighbour; cells of one diagonal are drawn independently, so decoding makes such errors.")


class AdaptConfig(Config):
    """Two-stage adaptation (spec §7)."""

    branch: BranchConfig = Field(default_factory=BranchConfig)
    stage1: StageConfig = Field(
        default_factory=lambda: StageConfig(
            steps=1000, lr=5e-5, flat_steps=500, distill_weight=0.2, aux_vertical_weight=0.05)
    )
    stage2: StageConfig = Field(
        default_factory=lambda: StageConfig(
            steps=2000, lr=1.75e-5, backbone_lr_factor=0.2, flat_steps=500, aux_vertical_weight=0.05)
    )
    stage2_mode: Literal["full", "lora", "none"] = Field(
        "full", description="Stage 2 trains the whole backbone, LoRA adapters on it, or nothing.")
    lora_rank: int = Field(8, gt=0, description="LoRA rank (stage2_mode=lora).")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (stage2_mode=lora).")
    batch_size: int = Field(8, gt=0, description="Sequences per optimizer step (global).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm to this value (0 = off).")
    condition_dropout: float = Field(0.1, ge=0, lt=1,
        description="Replace a sample's condition by the unconditional one with this probability (keeps CFG working).")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="bf16 autocast (auto: on CUDA only).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    checkpoint_every: int = Field(200, gt=0, description="Write a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: bool = Field(False,
                                   description="Keep the resumable checkpoints (the checkpoints/ sub-folder of --out) "
                                   "when the run finishes; by default only the adapter and its metrics remain.")
    val_fraction: float = Field(0.0, ge=0, lt=1,
                                description="Hold out this fraction of the data (a split seeded by --seed) "
                                "for held-out NLL; 0 = none unless held-out data is given.")
    eval_every: int = Field(100, gt=0,
                            description="With held-out data: evaluate its NLL under the FlashAR decoder and the raster "
                            "model every N optimizer steps, and at the start and end of each stage.")
    patience: int = Field(0, ge=0,
                          description="With held-out data: stop a stage early after this many evaluations without "
                          "a better FlashAR NLL (0 = never); each stage ends with its best weights either way.")
    fit_coupling: bool = Field(True, description="After training, fit the Gaussian copula that couples the draws of "
        "neighbouring cells on one anti-diagonal (flashar.coupling) on the held-out grids (the training "
        "grids when none are held out) and store its correlation in the adapter.")
    coupling_grids: int = Field(512, gt=0, description="Grids the coupling fit reads at most.")
    seed: Seed = Field(0, description="Seed for data order and initialisation.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: replicate the model in every process (ddp) or shard weights, gradients and "
        "optimizer state across them with FSDP2 (fsdp, for backbones that do not fit one GPU). Ignored in one process.")

    @model_validator(mode="after")
    def _check_batch(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        return self


class AdapterMetadata(Config):
    """``config.json`` of an adapter folder: enough to rebuild the FlashAR parts and check compatibility."""

    format: Literal["flashar-adapter"] = "flashar-adapter"
    flashar_version: str
    backend: str = Field(..., description="Backend id of the base backbone.")
    backbone_fingerprint: str = Field(..., description="Fingerprint of the base backbone the adapter was trained from.")
    backbone_architecture: dict = Field(default_factory=dict)
    grid: tuple[int, int] | None = Field(...,
                                         description="Token grid (H, W) the adapter was trained for; None when the "
                                         "checkpoint does not record one (any grid is then accepted).")
    branch: BranchConfig
    branch_layer: int = Field(..., ge=0, description="b, resolved.")
    num_blocks: int = Field(..., ge=1, description="K.")
    stage: int = Field(0, ge=0, le=2, description="Last completed adaptation stage.")
    step: int = Field(0, ge=0, description="Optimizer steps taken in total.")
    weights_step: int | None = Field(None, ge=0, description="Optimizer step whose weights the adapter holds: the best "
                                     "held-out evaluation of its last stage, else the last step (None: not recorded).")
    backbone_weights: Literal["none", "full", "lora"] = Field(
        "none", description="What the adapter holds of the backbone.")
    lora_scaling: float | None = Field(None, description="alpha / rank of the stored LoRA factors.")
    diagonal_coupling: float = Field(0.0, ge=0.0, lt=1.0, description="Correlation of the Gaussian copula that couples "
                                     "the draws of neighbouring cells on one anti-diagonal, fitted by `flashar adapt` "
                                     "on held-out grids (0: independent draws, the paper's sampler).")


class CompareConfig(Config):
    """``flashar compare``: every method on the same backbone, conditions and seeds."""

    methods: list[str] = Field(default_factory=lambda: ["raster", "flashar"], min_length=1,
        description="Method ids, or variants ID:OPTION=VALUE;OPTION=VALUE with option values of their own, in report "
        "order.")
    num_samples: int = Field(1000, gt=0,
        description="Images per method and seed for the quality metrics (class-balanced for class-conditional "
        "backends).")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1,
                              description="Sampling seeds; quality metrics are averaged over them.")
    batch_size: int = Field(100, gt=0,
        description="Images per forward batch for the quality metrics, and the batch throughput (images/s) is timed "
        "at.")
    latency_batch_size: int = Field(
        1, gt=0, description="Images per timed batch for the latency and speedup columns (1: the wait for one image).")
    repeats: int = Field(
        5, gt=0, description="Timed runs per method after warm-up, interleaved across methods; medians are reported.")
    warmup: int = Field(1, ge=0, description="Untimed warm-up runs per method (they include compilation).")
    image_size: ImageSize | None = Field(None, description=IMAGE_SIZE_HELP)
    metrics: bool = Field(
        True, description="Compute FID/KID/IS/precision/recall with torch-fidelity (needs flashar[metrics]).")


C = TypeVar("C", bound=Config)


def validated(model: type[C], values: Mapping[str, Any] | Config | None, what: str) -> C:
    """Build a pydantic config, turning validation errors into one-line :class:`FlashARError`."""
    if isinstance(values, model):
        return values
    try:
        return model(**dict(values or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a check across fields: its message names them
            raise FlashARError(f"invalid {what} options: {message}") from None
        where = ".".join(str(p) for p in first["loc"])
        raise FlashARError(f"invalid {what} option '{where}' ({flag_of(model, first['loc'])}): {message} "
                           f"(got {first.get('input')!r})") from None


def flag_of(model: type[Config], loc: tuple) -> str:
    """The command-line flag of a config field: ``("stage1", "lr")`` -> ``--stage1-lr`` (a field may name its own)."""
    field = model.model_fields.get(str(loc[0]))
    extra = field.json_schema_extra if field is not None else None
    own = extra.get("flag") if isinstance(extra, dict) else None
    names = [p for p in loc if isinstance(p, str)]  # list indices (seeds.1) are not part of the flag
    if model.__name__ == "AdaptConfig" and names[0] == "branch":
        names = names[1:]  # branch fields are top-level flags (--num-blocks)
    return "--" + (own if isinstance(own, str) else "-".join(names).replace("_", "-"))
