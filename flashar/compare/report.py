"""Rendering a compare report: a rich table, JSON, a PNG sample grid per method, a speed/quality plot."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import torch

from flashar.io import atomic_path, save_json, save_png


def significant(value: float) -> str:
    """A speed or size with at least 3 significant digits for small values: a slow run's 0.04 images/s
    is not printed as 0.0."""
    if value == 0 or abs(value) >= 10:
        return f"{value:.1f}"
    digits = max(1, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{digits}f}"


def plus_minus(mean: float, spread: float) -> str:
    """``mean ± spread``, both to the spread's second significant digit (KID and its spread over
    torch-fidelity's subsets: 19971 ± 1936, 0.0123 ± 0.0021); the mean alone for a zero spread."""
    if not spread:
        return significant(mean)
    decimals = max(0, 1 - math.floor(math.log10(abs(spread))))
    return f"{mean:.{decimals}f} ± {spread:.{decimals}f}"


COLUMNS = [  # (key, header, format: a format string or a function)
    ("method", "method", "{}"),
    ("forward_passes", "passes", "{}"),
    ("latency_per_image_ms", "ms / image (batch {latency_batch})", significant),
    ("latency_speedup_vs_raster", "speedup", "{:.2f}x"),
    ("images_per_second", "images / s (batch {throughput_batch})", significant),
    ("throughput_speedup_vs_raster", "speedup", "{:.2f}x"),
    ("compile_seconds", "compile s", "{:.1f}"),
    ("peak_memory_mb", "peak MB", "{:.1f}"),
    ("decode_state_mb", "state MB", significant),
    ("fid", "{fid}", "{:.2f}"),
    ("kid", "KID", "{:.4f}"),  # with its spread over torch-fidelity's subsets, "kid_std" (see table_rows)
    ("inception_score", "IS", "{:.2f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("class_accuracy", "class acc", "{:.3f}"),
    ("two_sample_accuracy", "2-sample acc", "{:.3f}"),
]


def table_rows(report) -> tuple[list[str], list[list[str]]]:
    present = [c for c in COLUMNS if any(row.get(c[0]) is not None for row in report.rows)]
    first = report.rows[0] if report.rows else {}
    labels = {"fid": report.metric_label, "latency_batch": first.get("latency_batch"),
              "throughput_batch": first.get("throughput_batch")}
    headers = [h.format(**labels) for _, h, _ in present]
    rows = [[_cell(fmt, row, key) for key, _, fmt in present] for row in report.rows]
    return headers, rows


def _cell(fmt, row: dict, key: str) -> str:
    """A field as its column formats it; ``mean ± std`` where the row also has a nonzero ``<key>_std``; "-" if
    missing."""
    if row.get(key) is None:
        return "-"
    if row.get(f"{key}_std"):
        return plus_minus(row[key], row[f"{key}_std"])
    return fmt(row[key]) if callable(fmt) else fmt.format(row[key])


def print_report(report) -> None:
    from rich.console import Console
    from rich.table import Table

    headers, rows = table_rows(report)
    env = report.environment
    where = env.get("gpu") or f"{env['cpu']}, {env['threads']} threads"
    table = Table(
        title=f"flashar compare: {report.backend}, {report.grid[0]}x{report.grid[1]} tokens, {where}, {env['dtype']}")
    for header in headers:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*row)
    table.caption = sampling_caption(report)
    Console(file=sys.stdout, width=200).print(table)


def sampling_caption(report) -> str | None:
    """The sampling every method ran with (the backend's defaults unless flags were given), once if shared."""
    from flashar.config import describe_sampling

    used = {r["method"]: describe_sampling(r["sampling"]) for r in report.rows if r.get("sampling")}
    if len(set(used.values())) == 1:
        caption: str | None = f"sampling: {next(iter(used.values()))}"
    else:
        caption = "sampling: " + "; ".join(f"{m} {s}" for m, s in used.items()) if used else None
    own = [f"{r['method']}: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in r["settings"].items())
           for r in report.rows if r.get("settings")]
    return "\n".join(filter(None, [caption, "; ".join(own)])) or None


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def sample_grid(images: torch.Tensor, columns: int = 10, scale: int = 4) -> torch.Tensor:
    """uint8 images (N, 3, h, w) -> one float image (3, H, W) in [0, 1], nearest-upscaled for small images."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    canvas = torch.ones(c, rows * (h + 1) + 1, columns * (w + 1) + 1) * 0.5
    for i, image in enumerate(images.float() / 255):
        r, col = divmod(i, columns)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = image
    if max(h, w) < 64:
        canvas = torch.nn.functional.interpolate(canvas[None], scale_factor=scale, mode="nearest")[0]
    return canvas


def figure(report):
    """Speed against quality (the metric over images/s, log scale) when the rows have a metric, else the
    speed of each method alone (images/s bars); tick labels are plain numbers that do not overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    rows = [r for r in report.rows if r.get("fid") is not None]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    plain = FuncFormatter(lambda x, _: f"{x:g}")
    if rows:
        for row in rows:
            ax.scatter(row["images_per_second"], row["fid"], s=40)
            ax.annotate(f"{row['method']} ({row['forward_passes']} passes)", (row["images_per_second"], row["fid"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=6))
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels (2x10^1, 3x10^1, ...) collide
        ax.yaxis.set_major_locator(MaxNLocator(6))
        ax.set_xlabel("images / second (log)")
        ax.set_ylabel(f"{report.metric_label} (lower is better)")
        ax.set_title(f"speed vs quality: {report.backend}")
    else:
        names = [f"{r['method']} ({r['forward_passes']} passes)" for r in report.rows]
        ax.barh(range(len(names)), [r["images_per_second"] for r in report.rows])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel("images / second (higher is better)")
        ax.set_title(f"speed: {report.backend} (no quality metrics)")
    ax.xaxis.set_major_formatter(plain)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot(report, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(report)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def file_label(method: str, taken: list[Path]) -> str:
    """A row label as a file-name part: a variant's ':', ';', '/' and the like become '_' (``zipar:window=4`` ->
    ``zipar_window=4``), numbered where two labels would meet in one name."""
    label = re.sub(r"[^\w.=+-]+", "_", method).strip("_") or "method"
    names, unique, n = {p.name for p in taken}, label, 1
    while f"samples_{unique}.png" in names:
        n += 1
        unique = f"{label}_{n}"
    return unique


def write_report(report, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json"]
    save_json(report.as_json(), written[0])
    for method, images in report.samples.items():
        written.append(out_dir / f"samples_{file_label(method, written)}.png")
        save_png(sample_grid(images), written[-1])
    if report.rows:
        plot(report, out_dir / "speed_vs_quality.png")
        written.append(out_dir / "speed_vs_quality.png")
    return written
