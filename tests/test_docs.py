"""The CLI reference in docs/cli.md is generated from the CLI and must be current; the plugin guide documents
everything the methods and compare call on a backend."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_cli_reference_is_regenerated():
    spec = importlib.util.spec_from_file_location("generate_cli_docs", DOCS / "generate_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DOCS / "cli.md").read_text() == module.render(), "run: python docs/generate_cli_docs.py"


def test_the_plugin_guide_documents_every_backbone_member_and_the_metric_hooks():
    """Every public member of Backbone, every BackendSpec and MetricSpec field, the keywords methods pass to
    prefix and cell_positions, and the metrics hook appear in docs/writing-a-backend-plugin.md (in code)."""
    import dataclasses
    import re

    from flashar.backbone import Backbone
    from flashar.plugins import BackendSpec, MetricSpec

    text = (DOCS / "writing-a-backend-plugin.md").read_text()
    fenced = re.sub(r"```[^\n]*\n(.*?)```", lambda m: "`" + m.group(1).replace("`", "") + "`", text, flags=re.S)
    code = " ".join(re.findall(r"`([^`]+)`", fenced))  # inline code and code blocks
    members = {n for n in [*vars(Backbone), *Backbone.__annotations__] if not n.startswith("_")}
    fields = {f.name for spec in (BackendSpec, MetricSpec) for f in dataclasses.fields(spec)}
    wanted = members | fields | {"grid=", "unconditional=", "native=", "flashar_register_metrics", "MetricSpec"}
    missing = sorted(
        n for n in wanted if not re.search(r"(?<!\w)" + re.escape(n) + (r"(?!\w)" if n[-1].isalnum() else ""), code))
    assert missing == [], f"docs/writing-a-backend-plugin.md does not mention {missing}"


def readme_commands(section: str) -> list[list[str]]:
    """The `flashar ...` commands of the first bash block under ``section`` of the README, in order."""
    import shlex

    text = (DOCS.parent / "README.md").read_text()
    block = text[text.index(section):].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line)[1:] for line in commands if line.startswith("flashar ")]


def test_the_readme_sequence_runs_in_order_on_tiny_weights(tmp_path, monkeypatch, registry):
    """'Using it on your model' as written (generate, adapt with --gpt-model, generate with the adapter, compare
    without --gpt-model), on a tiny GPT that stands in for GPT-B; only file names, the image size, the step
    counts and the metrics (no Inception weights here) are changed."""
    from click.testing import CliRunner
    from helpers import write_class_folder, write_llamagen

    from flashar.backends.llamagen import loader, model
    from flashar.cli import cli

    monkeypatch.setitem(model.PRESETS, "GPT-B", dict(n_layer=3, n_head=4, dim=64))
    monkeypatch.setitem(loader.HEADS_BY_WIDTH, 64, 4)
    files = write_llamagen(tmp_path, multiple_of=256, num_classes=1000)
    write_class_folder(tmp_path / "my_images", per_class=2)
    monkeypatch.chdir(tmp_path)
    renames = {"c2i_B_256.pt": [str(files["checkpoint"])], "256": ["8"],
               "vq_ds16_c2i.pt": [str(files["vq_checkpoint"]), "--vq-config", str(files["vq_config"])]}
    commands = readme_commands("## Using it on your model")
    assert [c[0] for c in commands] == ["generate", "adapt", "generate", "compare"]
    for args in commands:
        args = [new for arg in args for new in renames.get(arg, [arg])]
        if args[0] == "adapt":
            args += ["--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "2", "--cache-dir", "cache"]
        if args[0] == "compare":
            for flag in ("--fid-weights", "--reference-images"):
                del args[args.index(flag) : args.index(flag) + 2]
            # the tiny VQ's native size is not 256
            args += ["--no-metrics", "--repeats", "1", "--warmup", "0", "--image-size", "8"]
        result = CliRunner().invoke(cli, args, obj=registry)
        assert result.exit_code == 0, f"flashar {' '.join(args)}\n{result.output}"
