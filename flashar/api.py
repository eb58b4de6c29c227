"""The Python API: load a backbone, build a decoding method, generate and save images.

    from flashar import api
    backbone = api.load_backbone("llamagen", {"checkpoint": "c2i_B_256.pt", "vq_checkpoint": "vq_ds16_c2i.pt"})
    method = api.build_method("raster", backbone)
    result = api.generate(method, [207, 360], sampling=api.resolve_sampling(backbone, {"cfg_scale": 4.0}))
    api.save_images(backbone, result.codes, "out/")

The CLI commands are thin wrappers over these functions.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from flashar.attention import CPU_NATIVE
from flashar.backbone import Backbone
from flashar.card import decode_images
from flashar.config import CompileMode, Config, RuntimeConfig, SamplingConfig, flag_of
from flashar.config import validated  # noqa: F401 (public here too)
from flashar.batches import GenerateResult, generate_batches  # noqa: F401 (GenerateResult: public here too)
from flashar.decoding import Method
from flashar.errors import FlashARError, FlashARWarning
from flashar.io import atomic_path, check_writable_dir, ensure_writable_dir, save_png
from flashar.plugins import Registry, get_registry


def load_backbone(backend: str, options: Mapping[str, Any] | Config, runtime: RuntimeConfig | None = None,
                  registry: Registry | None = None) -> Backbone:
    """Load a backbone with a registered backend's options (see ``flashar backends``)."""
    spec = (registry or get_registry()).backend(backend)
    spec.check_available()
    runtime = runtime or RuntimeConfig()
    _check_device(runtime.device)
    _warn_slow_dtype(runtime)
    return spec.load(validated(spec.options, options, f"backend '{backend}'"), runtime)


def check_image_tokenizer(backend: str, options: Mapping[str, Any] | Config, needed_for: str,
                          registry: Registry | None = None) -> None:
    """Before loading: refuse when ``needed_for`` (writing images, tokenising data) needs the image tokenizer
    and the backend's optional tokenizer option (``BackendSpec.image_tokenizer``) was not given."""
    spec = (registry or get_registry()).backend(backend)
    name = spec.image_tokenizer
    if name is None:
        return
    given = getattr(options, name, None) if isinstance(options, Config) else dict(options or {}).get(name)
    if given is None:
        field = spec.options.model_fields.get(name)
        what = f" ({field.description.split(';')[0].rstrip('.')})" if field is not None and field.description else ""
        raise FlashARError(
            f"{needed_for} needs {backend}'s image tokenizer; pass {flag_of(spec.options, (name,))}{what}")


def check_data_source(backend: str, options: Mapping[str, Any] | Config, data_dir: str | Path | None = None,
                      codes_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                      val_dir: str | Path | None = None, registry: Registry | None = None) -> None:
    """Before loading: the adaptation data can be read (folder layout, metadata.jsonl, codes folder), the
    image tokenizer that tokenises it is given, and the token cache is writable."""
    from flashar.adapt.data import list_images, list_llamagen_codes

    if (data_dir is None) == (codes_dir is None):
        raise FlashARError("pass exactly one of --data DIR (images) or --codes DIR (pre-extracted codes)")
    spec = (registry or get_registry()).backend(backend)
    kind = spec.kind_of(validated(spec.options, options, f"backend '{backend}'"))
    if codes_dir is not None:
        list_llamagen_codes(codes_dir)
    for folder in (data_dir, val_dir):
        if folder is not None:
            list_images(folder, kind)
    if data_dir is not None or val_dir is not None:
        check_image_tokenizer(backend, options, "tokenising the images of --data/--val-data", registry)
        if cache_dir is not None:
            check_writable_dir(cache_dir, "--cache-dir")


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FlashARError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FlashARError(f"device '{device}' was requested but CUDA is not available here; use --device cpu")


def _warn_slow_dtype(runtime: RuntimeConfig) -> None:
    if torch.device(runtime.device).type == "cpu" and not CPU_NATIVE.get(getattr(torch, runtime.dtype), True):
        warnings.warn(
            f"this CPU has no native {runtime.dtype} matmuls (no AVX512 or AMX) and multiplies {runtime.dtype} at "
            f"about a tenth of float32's rate, so steps of many rows, FlashAR's diagonals among them, run several "
            f"times slower than in float32 (GPT-B FlashAR: 4x on an AVX2 EPYC); use --dtype float32", FlashARWarning,
            stacklevel=3)


def build_method(name: str, backbone: Backbone, options: Mapping[str, Any] | Config | None = None, *,
                 compile: bool | CompileMode = False, registry: Registry | None = None,
                 own_backbone: bool = False) -> Method:
    """A registered decoding method bound to ``backbone`` (see ``flashar methods``).

    ``own_backbone=True`` when no other method uses ``backbone``: an adapter's backbone weights are then
    loaded into it in place instead of into a copy (one large model in memory, not two).
    """
    cls = (registry or get_registry()).method(name)
    return cls(
        backbone, validated(cls.Options, options, f"method '{name}'"), compile=compile, own_backbone=own_backbone)


def resolve_branch(backbone: Backbone, config, given: Mapping[str, Any] | None = None):
    """``config`` (an AdaptConfig) with its branch from: library defaults < ``backbone.default_branch`` <
    what the user set (``given``: BranchConfig fields from flags or a config file)."""
    from flashar.config import BranchConfig

    values = {**backbone.default_branch, **{k: v for k, v in (given or {}).items() if v is not None}}
    return config.model_copy(update={"branch": validated(BranchConfig, values, "branch")})


def resolve_sampling(backbone: Backbone, overrides: Mapping[str, Any] | None = None) -> SamplingConfig:
    """Library defaults < the backend's recommended values < what the user set."""
    values = {**backbone.sampling_defaults, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return validated(SamplingConfig, values, "sampling")


def generate(method: Method, conditions: Sequence[Any], image_size: int | tuple[int, int] | None = None,
             sampling: SamplingConfig | None = None, batch_size: int = 8, seed: int = 0,
             on_batch: Callable[[int], None] | None = None,
             progress: Callable[[float], None] | None = None) -> GenerateResult:
    """Generate one token grid per condition, ``batch_size`` at a time, from one seeded generator.

    ``on_batch(n)`` after every batch of n images; ``progress(images)`` also during a batch, with the
    fraction of images its decode steps have made (increments summing to the number of conditions)."""
    backbone = method.backbone
    check_conditions(backbone, conditions)
    if batch_size < 1:
        raise FlashARError(f"batch size must be at least 1, got {batch_size}")
    return generate_batches(method, conditions, backbone.grid(image_size), sampling or resolve_sampling(backbone),
                            batch_size, seed, on_batch, progress)


def check_conditions(backbone: Backbone, conditions: Sequence[Any]) -> None:
    """Class ids for a class-conditional backbone, prompts for a text-conditional one, at least one."""
    if not conditions:
        raise FlashARError("nothing to generate: pass at least one class id (--classes) or prompt (--prompt)")
    if backbone.condition_kind == "class" and any(isinstance(c, str) for c in conditions):
        raise FlashARError(f"backend '{backbone.backend_id}' is class-conditional and takes class ids, not prompts; "
                           f"pass --classes, e.g. --classes 207,360")
    if backbone.condition_kind == "text" and not all(isinstance(c, str) for c in conditions):
        raise FlashARError(f"backend '{backbone.backend_id}' is text-conditional and takes prompts, not class ids; "
                           f"pass --prompt TEXT (repeat it for several images)")


def image_names(conditions: Sequence[Any]) -> list[str]:
    def label(c: Any) -> str:
        text = str(c) if not isinstance(c, str) else "".join(ch if ch.isalnum() else "_" for ch in c)[:40]
        return text.strip("_") or "prompt"

    return [f"{i:04d}_{label(c)}.png" for i, c in enumerate(conditions)]


def save_images(backbone: Backbone, codes: torch.Tensor, out_dir: str | Path, conditions: Sequence[Any],
                batch_size: int = 8) -> list[Path]:
    """Decode codes (N, H, W) to pixels and write one PNG per image."""
    paths = []
    for start in range(0, len(codes), batch_size):
        images = decode_images(backbone, codes[start : start + batch_size], conditions[start : start + batch_size])
        out_dir = ensure_writable_dir(out_dir)  # after the first decode: a missing tokenizer leaves no folder
        for image, name in zip(images, image_names(conditions)[start : start + batch_size]):
            save_png(image, out_dir / name)
            paths.append(out_dir / name)
    return paths


def write_outputs(backbone: Backbone, codes: torch.Tensor, conditions: Sequence[Any], out_dir: str | Path | None = None,
                  tokens_path: str | Path | None = None) -> list[Path]:
    """The token grids (``tokens_path``) first, then the images (``out_dir``); returns the image paths.

    Decoding is the expensive part, so its tokens are never lost: when writing the images fails (the image
    tokenizer, memory, disk), the tokens are saved (``tokens_path``, else ``tokens.npy`` in ``out_dir`` or
    the temporary folder) and the error says where."""
    saved = save_tokens(codes, tokens_path) if tokens_path is not None else None
    if out_dir is None:
        return []
    try:
        return save_images(backbone, codes, out_dir, conditions)
    except Exception as exc:
        saved = saved or _rescue_tokens(codes, Path(out_dir))
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlashARError(f"writing the images failed: {reason}; the decoded tokens are saved in {saved} "
                           f"(int64, shape {list(codes.shape)}; backbone.decode turns them into images)") from exc


def _rescue_tokens(codes: torch.Tensor, out_dir: Path) -> Path:
    import tempfile

    for folder in (out_dir, Path(tempfile.gettempdir())):
        try:
            folder = ensure_writable_dir(folder)
            path = folder / "tokens.npy"
            if path.exists():
                path = folder / f"tokens-{time.strftime('%Y%m%d-%H%M%S')}.npy"
            return save_tokens(codes, path)
        except (FlashARError, OSError):
            continue
    raise FlashARError(f"writing the images failed and the decoded tokens could not be saved in {out_dir} "
                       f"or the temporary folder either")


def check_image_paths(out_dir: str | Path, conditions: Sequence[Any]) -> None:
    """Fail before any work when a folder sits where :func:`save_images` will write an image."""
    for name in image_names(conditions):
        if (Path(out_dir) / name).is_dir():
            raise FlashARError(
                f"{Path(out_dir) / name} is a folder where an image would be written; choose another --out")


def check_tokens_path(path: str | Path) -> Path:
    """Check a ``--save-tokens`` target before any work: a .npy file in a writable folder."""
    path = Path(path)
    if path.suffix != ".npy":
        raise FlashARError(f"--save-tokens must name a .npy file, got {path}; e.g. --save-tokens tokens.npy")
    if path.is_dir():
        raise FlashARError(
            f"--save-tokens {path} is a folder; name a .npy file, e.g. --save-tokens {path / 'tokens.npy'}")
    check_writable_dir(path.parent, "--save-tokens path")
    return path


def save_tokens(codes: torch.Tensor, path: str | Path) -> Path:
    """Token grids as int64 .npy of shape (N, H, W)."""
    path = check_tokens_path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, codes.to(torch.int64).numpy())
    return path


def ensure_output(out_dir: str | Path, resume: bool = False) -> Path:
    """Check an adaptation output folder before any work: writable, and not silently overwritten.

    Creates nothing: the trainer makes the folder when it starts writing.
    """
    from flashar.adapt.checkpoint import latest_checkpoint

    out_dir = Path(out_dir)
    taken = out_dir.is_dir() and (latest_checkpoint(out_dir) is not None
                                  or any((out_dir / name).exists() for name in ("config.json", "model.safetensors")))
    if taken and not resume:
        raise FlashARError(
            f"{out_dir} already holds an adapter or checkpoints; pass --resume to continue it or choose a new --out")
    return check_writable_dir(out_dir)


def load_data(backbone: Backbone, data_dir: str | Path | None = None, codes_dir: str | Path | None = None,
              image_size: int | tuple[int, int] | None = None, cache_dir: str | Path | None = None,
              progress: Callable[[int, int], None] | None = None):
    """Adaptation data from an image folder (tokenised once, cached; ``progress(done, total)`` while
    tokenising) or from pre-extracted LlamaGen codes."""
    from flashar.adapt.data import load_llamagen_codes, tokenize_folder

    if (data_dir is None) == (codes_dir is None):
        raise FlashARError("pass exactly one of --data DIR (images) or --codes DIR (pre-extracted codes)")
    if codes_dir is not None:
        data = load_llamagen_codes(codes_dir, backbone.grid(image_size))
        expected = data.grid if image_size is None else backbone.grid(image_size)
        if data.grid != expected:
            raise FlashARError(f"the codes in {codes_dir} form {data.grid[0]}x{data.grid[1]} grids, not "
                               f"{expected[0]}x{expected[1]}; drop --image-size or re-extract")
        return data
    if cache_dir is not None:
        check_writable_dir(cache_dir, "--cache-dir")
    assert data_dir is not None  # exactly one of the two was given
    return tokenize_folder(backbone, data_dir, image_size, Path(cache_dir) if cache_dir else None, progress=progress)


def adapt(backbone: Backbone, data, config, out_dir: str | Path, resume: bool = False, on_step=None, place=None,
          val_data=None, force_resume: bool = False):
    """Two-stage adaptation; writes ``config.json`` + ``model.safetensors`` into ``out_dir``.

    ``val_data`` (or ``config.val_fraction``) is the held-out data the stages are evaluated on. With
    ``resume``, a checkpoint written on other data or with another config is refused unless ``force_resume``.
    Under torchrun every process calls this with the same arguments (``place`` from
    :func:`flashar.adapt.distributed.session`); the main process writes.
    """
    from flashar.adapt.trainer import Run
    from flashar.adapt.trainer import adapt as run_adaptation

    run = Run(data, config, Path(out_dir), on_step=on_step, place=place, val_data=val_data, force_resume=force_resume)
    return run_adaptation(backbone, run, resume=resume)


def held_out_curve(out_dir: str | Path) -> list[dict[str, Any]]:
    """The held-out evaluations an adaptation logged in ``metrics.jsonl``, in order."""
    from flashar.adapt.trainer import METRICS

    path = Path(out_dir) / METRICS
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in records if "val_nll_flashar" in r]


def quality_inputs(backbone: Backbone, config, fid_weights=None, reference_dir=None, registry: Registry | None = None):
    """(extractor, reference uint8 images) for compare, or (None, None) when no metric can run here."""
    from flashar.compare.metrics import FOLDS, Extractor, inception_extractor, load_image_folder

    if not config.metrics:
        return None, None
    registry = registry or get_registry()
    extractor = None
    if fid_weights is not None:
        extractor = inception_extractor(fid_weights)
    elif backbone.metric is not None and backbone.metric in registry.metrics:
        spec = registry.metrics[backbone.metric]
        from flashar.errors import require

        require("torch_fidelity", "metrics")
        extractor = Extractor(spec.register(), spec.label, {}, spec.classify)
    height, width = backbone.grid(config.image_size)
    size = (height * backbone.downsample, width * backbone.downsample)
    reference = load_image_folder(reference_dir, size) if reference_dir is not None else backbone.reference_images()
    if extractor is None or reference is None:
        raise FlashARError(
            "quality metrics need a feature extractor and real images for this backend; pass --fid-weights FILE "
            "and --reference-images DIR, or --no-metrics for speed only")
    if config.num_samples < 2 * FOLDS:
        raise FlashARError(
            f"quality metrics need at least {2 * FOLDS} images per method; pass --num-samples {2 * FOLDS} "
            "or more, or --no-metrics for speed only")
    return extractor, reference


def check_quality_files(fid_weights=None, reference_dir=None) -> None:
    """Before loading: the files ``flashar compare`` reads after decoding exist."""
    for path, flag, want in ((fid_weights, "--fid-weights", "file"), (reference_dir, "--reference-images", "folder")):
        if path is not None and not (Path(path).is_file() if want == "file" else Path(path).is_dir()):
            raise FlashARError(f"{flag} {path} is not a {want}; check the path")


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FlashARError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise FlashARError(f"{path} holds no prompts; write one prompt per line")
    return prompts


def compare(methods, sampling, config, extractor, reference, prompts=None, progress=None, samples: bool = False,
            on_run=None):
    """Time and score methods on one backbone (see :mod:`flashar.compare`); ``samples``: keep decoded
    samples of every method for the sample grids even when no metric is computed."""
    from flashar.compare import run_compare

    return run_compare(methods, sampling, config, extractor, reference, prompts, progress, samples, on_run)
