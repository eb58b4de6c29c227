"""What `flashar compare` reports and writes: real decode-state memory for every method, sample grids and a
plot also without quality metrics, speeds that never print as 0.0, tick labels that do not collide, and the
`flashar backends` install hint with its extra."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import cli_args, random_gpt, write_llamagen

from flashar import api
from flashar.cli import cli
from flashar.compare import CompareReport
from flashar.compare.report import figure, table_rows
from flashar.config import SamplingConfig
from flashar.errors import FlashARError
from flashar.methods.flashar import FlashAR
from flashar.plugins import BackendSpec
from flashar.sampling import make_generator


@pytest.mark.parametrize("name", ["raster", "sjd", "zipar", "gsd", "flashar"])
def test_every_method_reports_the_memory_of_its_decode_state(name, registry, tmp_path):
    """At least the KV cache: (layers x 2 x rows x slots x width) floats."""
    backbone = random_gpt()
    if name == "flashar":
        from flashar.adapt.trainer import Run, adapt
        from flashar.config import AdaptConfig, StageConfig
        from helpers import stripes

        adapt(
            random_gpt(),
            Run(
                stripes(), AdaptConfig(stage1=StageConfig(steps=1, lr=1e-3), stage2_mode="none", batch_size=4), tmp_path
            ),
        )
        method = api.build_method(name, backbone, {"adapter": tmp_path}, registry=registry)
    else:
        method = api.build_method(name, backbone, registry=registry)
    result = method.generate([0, 1], (4, 4), SamplingConfig(cfg_scale=2.0, top_k=4), make_generator(0, "cpu"))
    cache = backbone.new_cache(4, 1 + 16)
    assert result.state_bytes >= cache.nbytes > 0


def report(rows: list[dict]) -> CompareReport:
    env = {"cpu": "test", "threads": 1, "dtype": "float32"}
    return CompareReport("llamagen", (4, 4), {}, env, rows=rows)


def row(method: str, images_per_second: float, fid: float | None = None, state: float = 0.0001) -> dict:
    return {"method": method, "forward_passes": 16, "latency_per_image_ms": 1000 / images_per_second,
            "latency_speedup_vs_raster": 1.0, "images_per_second": images_per_second,
            "throughput_speedup_vs_raster": 1.0, "compile_seconds": 0.0, "decode_state_mb": state, "fid": fid,
            "latency_batch": 1, "throughput_batch": 8}


def test_slow_speeds_and_small_states_keep_their_significant_digits():
    headers, rows = table_rows(report([row("raster", 0.0423), row("sjd", 1234.56)]))
    speed, state = headers.index("images / s (batch 8)"), headers.index("state MB")
    assert [r[speed] for r in rows] == ["0.0423", "1234.6"]
    assert rows[0][state] == "0.000100"


def test_kid_is_shown_with_its_spread_over_subsets():
    """KID on a few hundred images varies by ~10 % between subsets; the table shows that beside the mean."""
    headers, rows = table_rows(report([dict(row("raster", 1.0), kid=19971.35, kid_std=1936.0)]))
    assert rows[0][headers.index("KID")] == "19971 ± 1936"
    headers, rows = table_rows(
        report([dict(row("raster", 1.0), kid=0.012345, kid_std=0.00214), dict(row("sjd", 1.0), kid=0.5)]))
    assert [r[headers.index("KID")] for r in rows] == ["0.0123 ± 0.0021", "0.5000"]


def tick_label_overlaps(fig) -> list[tuple[str, str]]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in axis.get_ticklabels(which="both")
                     if t.get_visible() and t.get_text()]
            found += [(a, b) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1 :] if box.overlaps(other)]
    return found


@pytest.mark.parametrize("speeds", [(21, 24, 29), (3, 7, 60), (0.05, 0.2, 0.9), (120, 300, 9000)])
@pytest.mark.parametrize("with_metric", [True, False])
def test_plot_tick_labels_do_not_overlap(speeds, with_metric):
    import matplotlib.pyplot as plt

    rows = [row(name, s, fid=(30.0 - i) if with_metric else None)
            for i, (name, s) in enumerate(zip(["raster", "sjd", "flashar"], speeds))]
    fig = figure(report(rows))
    try:
        assert tick_label_overlaps(fig) == []
    finally:
        plt.close(fig)


def test_compare_out_without_metrics_writes_sample_grids_and_the_plot(registry, tmp_path):
    options = write_llamagen(tmp_path / "model")
    args = ["compare", "-b", "llamagen", *cli_args(options), "--methods", "raster,zipar", "--image-size", 8,
            "--no-metrics", "--num-samples", 4, "--batch-size", 4, "--latency-batch-size", 1, "--repeats", 1,
            "--warmup", 0, "--out", tmp_path / "cmp", "--json"]
    result = CliRunner().invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "cmp").iterdir())
    assert written == ["report.json", "samples_raster.png", "samples_zipar.png", "speed_vs_quality.png"]
    rows = json.loads((tmp_path / "cmp" / "report.json").read_text())["methods"]
    assert all(r["decode_state_mb"] > 0 for r in rows)


def test_backends_table_shows_the_install_hint_with_its_extra(registry):
    def never(options, runtime):
        raise AssertionError

    from flashar.config import Config

    registry.backends["needs_extra"] = BackendSpec("needs_extra", "a backend whose module is missing", Config, never,
                                                   extra="digits", requires=("no_such_module_xyz",))
    registry.owners[("backend", "needs_extra")] = "test"
    result = CliRunner().invoke(cli, ["backends"], obj=registry, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "pip install 'flashar[digits]'" in result.output


def test_a_class_backbone_without_num_classes_is_named_not_called_text_conditional():
    from flashar.compare import balanced_conditions
    from flashar.errors import FlashARError

    backbone = random_gpt()
    assert balanced_conditions(backbone, 3, None) == [0, 1, 2]
    backbone.num_classes = None
    with pytest.raises(FlashARError, match="num_classes") as refused:
        balanced_conditions(backbone, 3, None)
    assert "text-conditional" not in str(refused.value)


def test_the_report_names_each_methods_settings_and_flashars_diagonal_coupling(registry):
    """The digits default, tiny: the caption under the table names FlashAR's diagonal coupling (the adapter's
    fitted value, or --diagonal-coupling), and report.json carries every method's settings."""
    base = ["compare", "--methods", "raster,flashar", "--no-metrics", "--num-samples", 2, "--batch-size", 2,
            "--repeats", 1, "--warmup", 0]
    shown = CliRunner().invoke(cli, [str(a) for a in base], obj=registry)
    assert shown.exit_code == 0, shown.output
    fitted = FlashAR(api.load_backbone("digits", {})).coupling  # the shipped adapter's
    assert fitted > 0 and f"flashar: diagonal-coupling {fitted}" in shown.output.replace("\n", " ")
    typed = CliRunner().invoke(cli, [str(a) for a in base + ["--diagonal-coupling", 0, "--json"]], obj=registry)
    rows = {r["method"]: r for r in json.loads(typed.output)["methods"]}
    assert rows["flashar"]["settings"] == {"diagonal_coupling": 0.0} and rows["raster"]["settings"] == {}


def test_compare_rows_variants_of_one_method_each_with_its_own_options(registry, tmp_path):
    """--methods id:OPTION=VALUE;OPTION=VALUE: each variant is a row with its own settings and sample grid; a
    variant's value beats the method's flag, which still sets the others."""
    options = write_llamagen(tmp_path / "model")
    args = ["compare", "-b", "llamagen", *cli_args(options), "--methods",
            "raster,zipar:window=2,zipar:window=3;mask-unwritten=false", "--window", 1, "--image-size", 8,
            "--no-metrics", "--num-samples", 2, "--batch-size", 2, "--latency-batch-size", 1, "--repeats", 1,
            "--warmup", 0, "--out", tmp_path / "cmp", "--json"]
    result = CliRunner().invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads((tmp_path / "cmp" / "report.json").read_text())["methods"]}
    assert list(rows) == ["raster", "zipar:window=2", "zipar:window=3;mask-unwritten=false"]
    assert rows["zipar:window=2"]["settings"] == {"window": 2, "mask_unwritten": True}
    assert rows["zipar:window=3;mask-unwritten=false"]["settings"] == {"window": 3, "mask_unwritten": False}
    assert [rows[m]["forward_passes"] for m in rows] == [16, 12, 14]  # 4x4 grid: 2W + (H-2)w
    written = sorted(p.name for p in (tmp_path / "cmp").iterdir())
    assert written == ["report.json", "samples_raster.png", "samples_zipar_window=2.png",
                       "samples_zipar_window=3_mask-unwritten=false.png", "speed_vs_quality.png"]


def test_method_specs_parse_to_ids_and_their_own_option_values(registry):
    from flashar.cliutils import parse_methods

    assert parse_methods(" raster , flashar:adapter=a/b;buckets=4,zipar:mask-unwritten=false,", registry) == {
        "raster": ("raster", {}), "flashar:adapter=a/b;buckets=4": ("flashar", {"adapter": "a/b", "buckets": "4"}),
        "zipar:mask-unwritten=false": ("zipar", {"mask_unwritten": "false"})}
    with pytest.raises(
        FlashARError, match=r"'windw=4' is not OPTION=VALUE for an option of method 'zipar' \(its options: window, "):
        parse_methods("zipar:windw=4", registry)
    with pytest.raises(FlashARError, match="'window' is not OPTION=VALUE"):
        parse_methods("zipar:window", registry)
    with pytest.raises(FlashARError, match="lists 'zipar:window=4' twice"):
        parse_methods("zipar:window=4,raster,zipar:window=4", registry)
    with pytest.raises(FlashARError, match="unknown method 'nope'"):
        parse_methods("raster,nope:x=1", registry)


def test_sample_file_names_of_labels_are_safe_and_distinct():
    from flashar.compare.report import file_label

    assert file_label("flashar:adapter=../runs/lag 1;buckets=4", []) == "flashar_adapter=.._runs_lag_1_buckets=4"
    taken = [Path("samples_zipar_window=4.png")]
    assert file_label("zipar;window=4", taken) == "zipar_window=4_2"
