"""The ``flashar`` command line: a thin dispatcher over :mod:`flashar.api` and friends.

Commands that act are verbs (generate, adapt, compare); listings are nouns (backends, methods, plugins).
Backends and methods add their own options (``--checkpoint``, ``--adapter``, ...) through their pydantic
``Options`` models. Errors a user can fix print one line and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from flashar import __version__
from flashar.cliutils import (
    CONFIG_HELP,
    IMAGE_SIZE,
    PluginCommand,
    check_foreign,
    console,
    describe_sampling,
    echo_json,
    backend_and_method_options,
    backend_options,
    field_options,
    nested_config,
    parse_classes,
    parse_methods,
    pick,
    print_table,
    registry_of,
    user_errors,
    with_config_file,
)
from flashar.config import (IMAGE_SIZE_HELP, AdaptConfig, BranchConfig, CompareConfig, RuntimeConfig, SamplingConfig,
                            StageConfig)
from flashar.errors import FlashARError

if TYPE_CHECKING:  # rich loads only when a bar is shown
    from rich.progress import Progress, TaskID


class FlashARGroup(click.Group):
    """The command group; plugins add commands through ``flashar_register_commands``."""

    def _plugin_commands(self, ctx: click.Context) -> None:
        registry = registry_of(ctx)
        if getattr(self, "_loaded_for", None) is not registry:
            self._own = getattr(self, "_own", None) or dict(self.commands)  # the built-in commands
            self.commands = dict(self._own)  # a new registry: drop what the last one's plugins added
            self._loaded_for = registry
            registry.pm.hook.flashar_register_commands(cli=self)

    def get_command(self, ctx, name):
        self._plugin_commands(ctx)
        return super().get_command(ctx, name)

    def list_commands(self, ctx):
        self._plugin_commands(ctx)
        return super().list_commands(ctx)


@click.group(cls=FlashARGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flashar")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors a user can fix.")
def cli(debug: bool) -> None:
    """Make pretrained autoregressive image generators fast (FlashAR and its peers)."""


def runtime_from(values: dict) -> RuntimeConfig:
    from flashar.api import validated

    return validated(RuntimeConfig, pick(RuntimeConfig, values), "runtime")


def parse_conditions(classes: str | None, prompts: tuple[str, ...]) -> list:
    """Class ids from ``--classes`` or the ``--prompt`` texts (never both)."""
    if classes and prompts:
        raise FlashARError(
            "pass either --classes (class-conditional backends) or --prompt (text-conditional ones), not both")
    return parse_classes(classes) or list(prompts)


def config_stage_options(fn):
    """--stage1-* and --stage2-* options, one per StageConfig field, showing each stage's defaults."""
    defaults = AdaptConfig()
    # stage 1 freezes the backbone: no backbone learning rate
    options = [o for stage in ("stage1", "stage2")
               for o in field_options(StageConfig, prefix=stage, defaults=getattr(defaults, stage),
               skip=("backbone_lr_factor",) if stage == "stage1" else ())]
    fn.__click_params__ = getattr(fn, "__click_params__", []) + list(reversed(options))
    return fn


def config_options(*models, skip: tuple[str, ...] = ()):
    """Add one option per field of each pydantic model (first one wins when two share a flag)."""

    def decorator(fn):
        options, seen = [], set()
        for model in models:
            for option in field_options(model, skip=skip):
                if option.name not in seen:
                    seen.add(option.name)
                    options.append(option)
        fn.__click_params__ = getattr(fn, "__click_params__", []) + list(reversed(options))
        return fn

    return decorator


@cli.command(cls=PluginCommand, plugin_params=backend_and_method_options)
@click.option("--backend", "-b", help="Backend id (see `flashar backends`); required.")
@click.option("--method", "-m", default="raster", show_default=True,
    help="Decoding method id (see `flashar methods`), or ID:OPTION=VALUE;OPTION=VALUE with option values of its "
    "own, as compare's --methods takes it (e.g. zipar:window=4).")
@click.option("--classes", help="Comma-separated class ids, one image each (class-conditional backends).")
@click.option("--prompt", "prompts", multiple=True,
              help="A prompt, one image each; repeat for several (text-conditional backends).")
@click.option("--image-size", type=IMAGE_SIZE, help=IMAGE_SIZE_HELP)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images decoded together.")
@click.option("--out", type=click.Path(path_type=Path), help="Folder for one PNG per image.")
@click.option(
    "--save-tokens", type=click.Path(path_type=Path), help="Also save the token grids as int64 .npy, shape [N, H, W].")
@click.option("--config", type=click.Path(path_type=Path), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of a table.")
@config_options(SamplingConfig, RuntimeConfig)
@click.pass_context
@user_errors
def generate(ctx: click.Context, **values) -> None:
    """Generate images with raster or accelerated decoding."""
    from flashar import api

    values = with_config_file(ctx, values, required=("backend",))
    registry = registry_of(ctx)
    chosen = parse_methods(values["method"], registry)
    if len(chosen) != 1:
        raise FlashARError(
            f"--method takes one method, got {values['method']!r}; `flashar compare --methods` runs several")
    [(label, (method_id, own))] = chosen.items()
    check_foreign(values, registry, values["backend"], [method_id])
    conditions = parse_conditions(values["classes"], values["prompts"])
    if values["out"]:
        api.check_writable_dir(values["out"])  # fail before any work is done, and create nothing yet
    if values["save_tokens"]:
        api.check_tokens_path(values["save_tokens"])
    options = pick(registry.backend(values["backend"]).options, values)
    if values["out"]:
        api.check_image_tokenizer(values["backend"], options, "--out (writing images)", registry)
    runtime = runtime_from(values)
    backbone = api.load_backbone(values["backend"], options, runtime, registry)
    method = api.build_method(method_id, backbone, {**pick(registry.method(method_id).Options, values), **own},
                              compile=runtime.compile_as, registry=registry,
                              own_backbone=True)  # the only method here: adapt the backbone in place
    sampling = api.resolve_sampling(backbone, pick(SamplingConfig, values))
    api.check_conditions(backbone, conditions)  # before the progress bar starts
    method.check_grid(method.backbone.grid(values["image_size"]))
    if values["out"]:
        api.check_image_paths(values["out"], conditions)
    with _progress(len(conditions), f"{label} decoding", values["as_json"]) as advance:
        result = api.generate(method, conditions, values["image_size"], sampling, values["batch_size"], runtime.seed,
                              progress=advance)  # per decode step, not per batch
    paths = api.write_outputs(method.backbone, result.codes, conditions, values["out"], values["save_tokens"])
    summary = {
        "backend": values["backend"], "method": label, "images": len(conditions),
        "grid": list(result.codes.shape[1:]), "forward_passes_per_batch": result.num_forward_passes,
        "wall_seconds": round(result.seconds, 4), "sampling": sampling.model_dump(), "outputs": [str(p) for p in paths],
        "tokens": str(values["save_tokens"]) if values["save_tokens"] else None,
    }
    if values["as_json"]:
        echo_json(summary)
    else:
        print_table("flashar generate",
            ["images", "grid", "forward passes / batch", "seconds", "sampling", "written to"],
            [[len(conditions), "x".join(map(str, summary["grid"])), result.num_forward_passes, f"{result.seconds:.2f}",
            describe_sampling(sampling.model_dump()), values["out"] or "-"]])


@cli.command(cls=PluginCommand, plugin_params=backend_options)
@click.option("--backend", "-b", help="Backend id (see `flashar backends`); required.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="Image folder: class subfolders, or images + metadata.jsonl for text backends.")
@click.option("--codes", "codes_dir", type=click.Path(path_type=Path),
              help="Pre-extracted LlamaGen codes (extract_codes_c2i.py output) instead of images.")
@click.option("--val-data", "val_dir", type=click.Path(path_type=Path),
              help="Held-out image folder (laid out like --data) for held-out NLL, "
              "best weights per stage and early stopping; or carve it out of --data with --val-fraction.")
@click.option("--image-size", type=IMAGE_SIZE, help=IMAGE_SIZE_HELP)
@click.option("--out", type=click.Path(path_type=Path),
    help="Adapter folder to write (also holds metrics.jsonl, and checkpoints/ until the run finishes); required.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@click.option("--force-resume", is_flag=True,
    help="With --resume: continue even though --data/--codes/--val-data or the training options differ from the "
    "checkpoint's.")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="Where tokenised data is cached [default: ~/.cache/flashar/tokens].")
@click.option("--config", type=click.Path(path_type=Path), help=CONFIG_HELP)
@config_options(AdaptConfig, BranchConfig, RuntimeConfig, skip=("compile", "compile_mode"))  # adapt compiles nothing
@config_stage_options
@click.pass_context
@user_errors
def adapt(ctx: click.Context, **values) -> None:
    """Two-stage FlashAR adaptation of a backbone on your images; writes an adapter folder.

    Under `torchrun --nproc-per-node N -m flashar adapt ...` it runs data-parallel (see docs/distributed.md).
    """
    from flashar import api
    from flashar.adapt.distributed import main_first, session
    from flashar.adapt.trainer import check_config

    values = with_config_file(ctx, values, required=("backend", "out"))
    registry = registry_of(ctx)
    check_foreign(values, registry, values["backend"], [])
    config = api.validated(AdaptConfig, nested_config(AdaptConfig, values), "adapt")
    check_config(config)  # before the model loads and the data is tokenised
    runtime = runtime_from(values)
    api.ensure_output(values["out"], resume=values["resume"])
    options = pick(registry.backend(values["backend"]).options, values)
    api.check_data_source(values["backend"], options, values["data_dir"], values["codes_dir"], values["cache_dir"],
                          values["val_dir"], registry)  # before the model loads
    with session(runtime.device) as (place, device):
        runtime = runtime.model_copy(update={"device": device})  # cuda:LOCAL_RANK under torchrun
        backbone = api.load_backbone(values["backend"], options, runtime, registry)
        config = api.resolve_branch(backbone, config, pick(BranchConfig, values))  # user > backend > library
        with main_first(place):  # the main process tokenises and fills the cache, the others read it
            with _Bars(quiet=not place.is_main) as bars:  # shown only when the images are not cached yet
                data = api.load_data(backbone, values["data_dir"], values["codes_dir"], values["image_size"],
                                     values["cache_dir"], progress=bars.task("tokenising --data images").update)
                held = (api.load_data(backbone, values["val_dir"], None, values["image_size"], values["cache_dir"],
                        progress=bars.task("tokenising --val-data images").update) if values["val_dir"] else None)
        total = sum(
            s.steps for s in (config.stage1, config.stage2) if s is config.stage1 or config.stage2_mode != "none")
        with _train_progress(total, quiet=not place.is_main) as on_step:
            api.adapt(backbone, data, config, values["out"], resume=values["resume"], on_step=on_step, place=place,
                      val_data=held, force_resume=values["force_resume"])
    if place.is_main:
        _print_held_out(api.held_out_curve(values["out"]))
        console().print(
            f"adapter written to {values['out']} (use: flashar generate --method flashar --adapter {values['out']})")


def _print_held_out(curve: list[dict]) -> None:
    """Both held-out curves, marking each stage's best evaluation (the weights the stage ended with)."""
    if not curve:
        return
    best = {r["stage"]: r["best_step"] for r in curve}
    rows = [
        [r["stage"], r["step"], f"{r['val_nll_flashar']:.4f}", f"{r['val_nll_raster']:.4f}", ", ".join(note for note,
        on in (("best", r["step"] == best[r["stage"]]), ("stopped early", r["stopped_early"])) if on)] for r in curve]
    print_table("held-out NLL (nats/token)", ["stage", "step", "flashar", "raster", ""], rows)


@cli.command(cls=PluginCommand, plugin_params=backend_and_method_options)
@click.option("--backend", "-b", default="digits", show_default=True, help="Backend id (see `flashar backends`).")
@click.option("--methods", default="raster,flashar", show_default=True,
    help="Comma-separated method ids (see `flashar methods`), each a row; ID:OPTION=VALUE;OPTION=VALUE adds a "
    "variant with option values of its own, e.g. raster,zipar:window=4,zipar:window=16 or "
    "flashar,flashar:adapter=other/ (quote a ';').")
@click.option(
    "--seeds", default="0", show_default=True, help="Comma-separated sampling seeds; quality is averaged over them.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="Text file, one prompt per line (text-conditional backends).")
@click.option("--fid-weights", type=click.Path(path_type=Path),
              help="Inception weights (pt_inception-2015-12-05) for FID on non-digits backends.")
@click.option(
    "--reference-images", type=click.Path(path_type=Path), help="Folder of real images to compare samples against.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Folder for report.json, a sample grid per method and the speed/quality plot.")
@click.option("--config", type=click.Path(path_type=Path), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@config_options(CompareConfig, SamplingConfig, RuntimeConfig, skip=("methods", "seeds"))
@click.pass_context
@user_errors
def compare(ctx: click.Context, **values) -> None:
    """Run several decoding methods on one backbone: speed, memory and sample quality side by side."""
    from flashar import api
    from flashar.compare.report import print_report, write_report

    values = with_config_file(ctx, values)
    registry = registry_of(ctx)
    variants = parse_methods(values["methods"], registry)
    names = list(variants)
    seeds = parse_classes(values["seeds"], "--seeds")
    if not names or not seeds:
        raise click.BadParameter(
            "expected at least one comma-separated value, e.g. --methods raster,flashar --seeds 0,1",
            param_hint="--methods" if not names else "--seeds")
    check_foreign(values, registry, values["backend"], sorted({method for method, _ in variants.values()}))
    config = api.validated(CompareConfig, {**pick(CompareConfig, values), "methods": names, "seeds": seeds}, "compare")
    if values["out"]:
        api.check_writable_dir(values["out"])
    options = pick(registry.backend(values["backend"]).options, values)
    if values["out"] or config.metrics:
        api.check_image_tokenizer(values["backend"], options, "--out (sample grids)" if values["out"] else
                                  "quality metrics (use --no-metrics for speed only)", registry)
    api.check_quality_files(values["fid_weights"], values["reference_images"])
    prompts = api.read_prompts(values["prompts_file"]) if values["prompts_file"] else None
    runtime = runtime_from(values)
    backbone = api.load_backbone(values["backend"], options, runtime, registry)
    methods = {label: api.build_method(method, backbone, {**pick(registry.method(method).Options, values), **own},
                                       compile=runtime.compile_as, registry=registry)
               for label, (method, own) in variants.items()}
    sampling = {n: api.resolve_sampling(m.backbone, pick(SamplingConfig, values)) for n, m in methods.items()}
    for method in methods.values():  # before any bar starts or any method is timed
        method.check_grid(method.backbone.grid(config.image_size))
    extractor, reference = api.quality_inputs(
        backbone, config, values["fid_weights"], values["reference_images"], registry)
    total = config.num_samples * len(config.seeds) * len(names) if extractor is not None and config.metrics else 0
    from flashar.compare import timed_runs

    with _Bars(quiet=values["as_json"]) as bars:
        timed = bars.task("timing (warm-up and repeats)", timed_runs(config, len(names)), show=True)
        scored = bars.task("generating samples for the metrics", total)
        report = api.compare(methods, sampling, config, extractor, reference, prompts, lambda method, n: scored(n),
                             samples=bool(values["out"]), on_run=lambda method: timed(1))
    paths = write_report(report, values["out"]) if values["out"] else []
    if values["as_json"]:
        return echo_json({**report.as_json(), "outputs": [str(p) for p in paths]})
    print_report(report)


class _train_progress:
    """A rich progress bar with the loss and gate statistics of the last step (none when ``quiet``)."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.quiet = total, quiet

    def __enter__(self):
        if self.quiet:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("stage {task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}  gate {task.fields[gate]:.3f}"),
                            TimeRemainingColumn(), console=console())
        self.bar.start()
        task = self.bar.add_task("adapt", total=self.total, stage=1, loss=float("nan"), gate=0.5)

        def on_step(r):
            if "val_nll_flashar" in r:  # a held-out evaluation
                self.bar.console.print(
                    f"stage {r['stage']} step {r['step']}: held-out NLL flashar {r['val_nll_flashar']:.4f}  "
                    f"raster {r['val_nll_raster']:.4f}" + ("  (stopped early)" if r["stopped_early"] else ""))
            elif "diagonal_coupling" in r:  # the copula fit after training
                self.bar.console.print(
                    f"diagonal coupling {r['diagonal_coupling']:.2f} fitted on {r['coupling_grids']} "
                    f"{'held-out' if r['held_out'] else 'training'} grids: their NLL under the FlashAR "
                    f"sampler {r['nll_coupled']:.4f} nats/token coupled, {r['nll_independent']:.4f} independent")
            else:
                self.bar.update(task, completed=r["step"], stage=r["stage"], loss=r["loss"], gate=r["gate_mean"])

        return on_step

    def __exit__(self, *exc):
        if not self.quiet:
            self.bar.stop()


class _Bars:
    """One rich progress display on stderr (nothing when ``quiet``), holding one bar per task; a task's
    bar, and the display, appear on its first report."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.display: Progress | None = None

    def __enter__(self):
        return self

    def open(self) -> Progress | None:
        """The display, started on first use (None when quiet)."""
        if self.quiet:
            return None
        if self.display is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.display = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), console=console())
            self.display.start()
        return self.display

    def task(self, label: str, total: int | None = None, show: bool = False) -> _Task:
        """A bar: ``task(n)`` advances it, ``task.update(done, total)`` sets both. ``show``: appear now, not on the
        first report."""
        task = _Task(self, label, total)
        if show:
            task.bar()
        return task

    def __exit__(self, *exc):
        if self.display is not None:
            self.display.stop()


class _Task:
    """One bar of a :class:`_Bars` display (see :meth:`_Bars.task`)."""

    def __init__(self, bars: _Bars, label: str, total: int | None):
        self.bars, self.label, self.total = bars, label, total
        self.id: TaskID | None = None

    def bar(self) -> tuple[Progress, TaskID] | None:
        """The display and this task's bar in it, both added on first use (None when quiet)."""
        display = self.bars.open()
        if display is None:
            return None
        if self.id is None:
            self.id = display.add_task(self.label, total=self.total or None)
        return display, self.id

    def __call__(self, n: float) -> None:
        if bar := self.bar():
            bar[0].advance(bar[1], n)

    def update(self, done: float, total: int) -> None:
        if bar := self.bar():
            bar[0].update(bar[1], completed=done, total=total)


class _progress(_Bars):
    """One bar of ``total`` steps, shown at once; the context value advances it (silent with --json)."""

    def __init__(self, total: int, label: str, quiet: bool):
        super().__init__(quiet)
        self.total, self.label = total, label

    def __enter__(self):
        return self.task(self.label, self.total, show=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def backends(ctx: click.Context, as_json: bool) -> None:
    """List the registered backends and whether they can be used here."""
    registry = registry_of(ctx)
    rows: list[dict[str, Any]] = []
    for spec in sorted(registry.backends.values(), key=lambda s: s.id):
        missing = spec.missing()
        rows.append({"id": spec.id, "available": not missing, "install": spec.install_hint() if missing else None,
                     "plugin": registry.owners[("backend", spec.id)], "description": spec.description,
                     "sampling_defaults": spec.sampling_defaults or None, "options": sorted(spec.options.model_fields)})
    if as_json:
        return echo_json(rows)
    print_table("flashar backends", ["id", "status", "plugin", "sampling defaults", "description"],
                [[r["id"], "available" if r["available"] else f"unavailable: {r['install']}", r["plugin"],
                describe_sampling(r["sampling_defaults"]) if r["sampling_defaults"]
                else "declared by the backbone once loaded", r["description"]] for r in rows], no_wrap=("id", "status"))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def methods(ctx: click.Context, as_json: bool) -> None:
    """List the registered decoding methods."""
    registry = registry_of(ctx)
    rows = [{"id": cls.id, "plugin": registry.owners[("method", cls.id)], "description": cls.description,
             "needs_adapter": cls.requires_adapter, "forward_passes_32x32": _passes(cls, 32, 32),
             "options": sorted(cls.Options.model_fields)}
            for cls in sorted(registry.methods.values(), key=lambda c: c.id)]
    if as_json:
        return echo_json(rows)
    print_table("flashar methods",
        ["id", "passes at 32x32", "options (also as ID:OPTION=VALUE)", "plugin", "description"],
        [[r["id"], r["forward_passes_32x32"], ", ".join(o.replace("_", "-") for o in r["options"]) or "-", r["plugin"],
        r["description"]] for r in rows])


def _passes(cls, height: int, width: int):
    try:
        return cls.num_forward_passes(height, width)
    except NotImplementedError:
        return None


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def plugins(ctx: click.Context, as_json: bool) -> None:
    """List the loaded plugins, their packages and versions, and any that failed to load."""
    registry = registry_of(ctx)
    rows: list[dict[str, Any]] = []
    for info in registry.plugins:
        owned = sorted(f"{kind}:{item}" for (kind, item), owner in registry.owners.items() if owner == info.name)
        rows.append({"name": info.name, "package": info.package, "version": info.version, "builtin": info.builtin,
                     "registers": owned, "error": info.error})
    if as_json:
        return echo_json(rows)
    print_table("flashar plugins", ["name", "package", "version", "registers", "status"],
                [[r["name"], r["package"], r["version"], ", ".join(r["registers"]),
                  f"failed: {r['error']}" if r["error"] else "loaded"] for r in rows])


def main() -> None:
    cli(prog_name="flashar")
