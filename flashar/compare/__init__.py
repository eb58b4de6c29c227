"""``flashar compare``: every decoding method on one backbone, side by side.

Every method gets the same conditions (class-balanced, or the given prompts) and the same seeds.
Speed comes from :mod:`flashar.compare.timing` (warm-up, interleaved repeats, medians); quality from
:mod:`flashar.compare.metrics` (torch-fidelity), averaged over the seeds. The report holds one row per
method and is rendered as a table, JSON, sample grids and a speed-vs-quality plot
(:mod:`flashar.compare.report`).
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from flashar import __version__
from flashar.attention import CPU_AMX
from flashar.backbone import Backbone
from flashar.card import decode_images
from flashar.compare.metrics import Extractor, quality, to_uint8
from flashar.compare.timing import Timing, time_methods
from flashar.compilation import cpuinfo
from flashar.config import CompareConfig, SamplingConfig
from flashar.batches import generate_batches
from flashar.decoding import Method
from flashar.errors import FlashARError


@dataclass
class CompareReport:
    backend: str
    grid: tuple[int, int]
    config: dict[str, Any]
    environment: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)  # method -> uint8 images of the first seed
    metric_label: str = "FID"

    def as_json(self) -> dict[str, Any]:
        return {"flashar_version": __version__, "backend": self.backend, "grid": list(self.grid), "config": self.config,
                "environment": self.environment, "fid_label": self.metric_label, "methods": self.rows}


def cpu_model() -> str:
    """The CPU's model name (Linux; else what the platform module knows) and the widest vector units torch
    uses on it, e.g. "AMD EPYC (AVX2)" or "Intel(R) Xeon(R) Processor (AVX512, AMX)": the same name covers
    CPUs whose bf16 matmuls differ by 100x."""
    name = cpuinfo("model name") or platform.processor() or platform.machine()
    units = [torch.backends.cpu.get_cpu_capability()] + (["AMX"] if CPU_AMX else [])
    return f"{name} ({', '.join(units)})"


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "dtype": str(dtype).replace("torch.", ""), "cpu": cpu_model(), "python": platform.python_version()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def balanced_conditions(backbone: Backbone, count: int, prompts: Sequence[str] | None) -> list[Any]:
    """``count`` conditions: the prompts cycled, or every class id in turn (class-balanced)."""
    if prompts:
        return [prompts[i % len(prompts)] for i in range(count)]
    if backbone.condition_kind != "class":
        raise FlashARError("this backend is text-conditional; pass --prompts FILE with one prompt per line")
    if not backbone.num_classes:
        raise FlashARError(
            f"backend '{backbone.backend_id}' is class-conditional but its backbone sets no num_classes, "
            f"so compare cannot draw class-balanced conditions; set Backbone.num_classes in the backend")
    return [i % backbone.num_classes for i in range(count)]


def run_compare(methods: dict[str, Method], sampling: dict[str, SamplingConfig], config: CompareConfig,
                extractor: Extractor | None, reference: torch.Tensor | None, prompts: Sequence[str] | None = None,
                progress: Callable[[str, int], None] | None = None, samples: bool = False,
                on_run: Callable[[str], None] | None = None) -> CompareReport:
    """Time and score every method; ``reference`` (uint8) and ``extractor`` are needed for quality metrics.
    ``progress(method, images)`` as samples for the metrics are generated, ``on_run(method)`` after each
    timed or warm-up run (:func:`timed_runs` of them in all).

    ``samples``: every method's report also holds decoded samples without metrics (those of its timed
    throughput batch), for the sample grids."""
    first = next(iter(methods.values())).backbone
    grid = first.grid(config.image_size)
    for method in methods.values():  # before minutes of timing the others
        method.check_grid(grid)
    conditions = balanced_conditions(first, config.num_samples, prompts)
    report = CompareReport(first.backend_id, grid, config.model_dump(), environment(first.device, first.dtype),
                           metric_label=extractor.label if extractor else "FID")
    latency = time_methods(methods, conditions[: config.latency_batch_size], grid, sampling, config.repeats,
                           config.warmup, config.seeds[0], on_run)
    throughput = (latency if config.latency_batch_size == config.batch_size
        else time_methods(methods, conditions[: config.batch_size], grid, sampling, config.repeats, config.warmup,
        config.seeds[0], on_run))
    for name, method in methods.items():
        peak, codes = throughput[name].peak_bytes, throughput[name].codes
        row = {"method": name, "forward_passes": latency[name].forward_passes,
               **speed_columns(latency, name, "latency"), **speed_columns(throughput, name, "throughput"),
               "latency_per_image_ms": 1000 * latency[name].median / config.latency_batch_size,
               "images_per_second": config.batch_size / throughput[name].median,
               "compile_seconds": latency[name].compile_seconds,
               "decode_state_mb": throughput[name].state_bytes / 2**20,
               "peak_memory_mb": None if peak is None else peak / 2**20,
               "sampling": sampling[name].model_dump(), "settings": method.settings()}
        if config.metrics and extractor is not None and reference is not None:
            row.update(
                score(name, method, conditions, grid, sampling[name], config, extractor, reference, report, progress))
        elif samples and codes is not None:
            report.samples[name] = to_uint8(decode_all(method.backbone, codes[:100], config.batch_size, conditions))
        report.rows.append(row)
    return report


def timed_runs(config: CompareConfig, methods: int) -> int:
    """Runs the timing makes: warm-up and repeats per method, for the latency and (if another size) the
    throughput batch."""
    return methods * (config.warmup + config.repeats) * (1 if config.latency_batch_size == config.batch_size else 2)


def speed_columns(timings: dict[str, Timing], name: str, kind: str) -> dict[str, Any]:
    """Batch size, median and all timed seconds of one method, and its speedup over raster (or the first method)."""
    baseline = timings["raster"] if "raster" in timings else next(iter(timings.values()))
    t = timings[name]
    return {f"{kind}_batch": t.batch, f"{kind}_seconds_median": t.median, f"{kind}_seconds": t.seconds,
            f"{kind}_speedup_vs_raster": baseline.median / t.median}


def score(name: str, method: Method, conditions: list[Any], grid: tuple[int, int], sampling: SamplingConfig,
          config: CompareConfig, extractor: Extractor, reference: torch.Tensor, report: CompareReport,
          progress) -> dict[str, Any]:
    """Quality metrics of ``num_samples`` images per seed of the row ``name``, averaged over the seeds (per-seed
    values kept)."""
    per_seed = []
    for seed in config.seeds:
        result = generate_batches(method, conditions, grid, sampling, config.batch_size, seed,
                                  progress=(lambda n: progress(name, n)) if progress else None)
        images = to_uint8(decode_all(method.backbone, result.codes, config.batch_size, conditions))
        report.samples.setdefault(name, images[:100])
        labels = conditions if method.backbone.condition_kind == "class" else None
        per_seed.append(quality(images, reference, extractor, labels))
    keys = per_seed[0].keys()
    averaged = {k: statistics.fmean(s[k] for s in per_seed) for k in keys}
    return {**averaged, "per_seed": per_seed}


def decode_all(backbone: Backbone, codes: torch.Tensor, batch_size: int, conditions: list[Any]) -> torch.Tensor:
    """Images of codes (N, H, W) drawn for ``conditions`` (at least N)."""
    return torch.cat([decode_images(backbone, codes[i : i + batch_size], conditions[i : i + batch_size])
                      for i in range(0, len(codes), batch_size)])
