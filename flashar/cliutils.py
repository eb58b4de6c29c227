"""CLI plumbing: pydantic fields as click options, plugin-defined options, one-line errors, rendering.

Options map one-to-one to config fields (``--cfg-scale`` sets ``cfg_scale``); a field may name its flag
with ``json_schema_extra={"flag": "model-config"}``, and limit it to some commands with
``json_schema_extra={"commands": ["generate", "compare"]}`` (e.g. a pixel decoder's settings, which
``adapt`` never uses). Backends and methods contribute options from their
``Options`` models, resolved lazily from the registry in the click context so tests can pass their own.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import click
from pydantic import BaseModel, ValidationError

from flashar.config import ImageSize, SamplingConfig, describe_sampling  # noqa: F401 (describe_sampling: public here too)
from flashar.errors import FlashARError, FlashARWarning
from flashar.plugins import Registry, get_registry


def flag_name(name: str, field) -> str:
    extra = field.json_schema_extra or {}
    return extra.get("flag") or name.replace("_", "-")


class ImageSizeType(click.ParamType):
    """``256``, ``192x320`` or ``192 320`` (two words, joined by :func:`join_image_size`) -> int or (H, W)."""

    name = "image size"

    def get_metavar(self, *args, **kwargs) -> str:
        return "H W | HxW"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)) and len(value) == 2:  # [H, W] from a --config file
            value = f"{value[0]}x{value[1]}"
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        match = re.fullmatch(r"\s*(\d+)(?:\s*[xX\s]\s*(\d+))?\s*", str(value))
        if match and all(int(p) > 0 for p in match.groups() if p is not None):
            height, width = match.groups()
            return int(height) if width is None else (int(height), int(width))
        self.fail(f"expected a positive pixel size like 256, 192x320 or '192 320', got {value!r}", param, ctx)


IMAGE_SIZE = ImageSizeType()


def join_image_size(args: list[str]) -> list[str]:
    """``--image-size H W`` -> ``--image-size HxW``, so the option takes one or two numbers."""
    args, i = list(args), 0
    while i < len(args) - 2:
        if args[i] == "--image-size" and args[i + 1].isdigit() and args[i + 2].isdigit():
            args[i + 1 : i + 3] = [f"{args[i + 1]}x{args[i + 2]}"]
        i += 1
    return args


CONFIG_HELP = ("JSON file of option values: this command's option names (cfg_scale or cfg-scale), flat or nested as in "
               "config.py ({\"stage1\": {\"lr\": 0.001}}); options given on the command line override it.")


def with_config_file(ctx: click.Context, values: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Apply ``--config FILE`` to the parsed ``values``: the file beats built-in defaults, the command line
    beats the file. Then check the ``required`` options, which either may supply."""
    from click.core import ParameterSource

    path = values.pop("config", None)
    params = {p.name: p for p in ctx.command.get_params(ctx) if p.name in values}
    aliases = {opt.lstrip("-").replace("-", "_"): p.name for p in params.values() for opt in p.opts} | {
        n: n for n in params}
    given = _config_values(path, set(aliases)) if path is not None else {}
    typed_by_user = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    for alias, value in given.items():
        name = aliases[alias]  # e.g. data -> data_dir, json -> as_json
        if ctx.get_parameter_source(name) not in typed_by_user:
            values[name] = _convert(params[name], value, ctx)
    for name in required:
        if values.get(name) is None:
            raise click.UsageError(
                f"Missing option '--{name.replace('_', '-')}' (on the command line or in --config)", ctx)
    return values


def _config_values(path: Path, names: set[str]) -> dict[str, Any]:
    from flashar.io import load_json

    data = load_json(path)
    if not isinstance(data, dict):
        raise FlashARError(f"--config {path} must hold a JSON object of option names, got {type(data).__name__}")
    given = {}
    for key, value in data.items():
        key = key.replace("-", "_")
        section = (key not in names and any(n.startswith(key + "_") for n in names)) or key in ("sampling", "runtime",
                                                                                                "branch")
        if section and not isinstance(value, dict):
            raise FlashARError(f"'{key}' in --config {path} must be a JSON object of its fields, got {value!r}")
        for sub, item in (value.items() if section else [(None, value)]):
            name = key if sub is None else sub.replace("-", "_")
            given[f"{key}_{name}" if sub is not None and f"{key}_{name}" in names else name] = item
    if unknown := sorted(set(given) - names):
        raise FlashARError(
            f"--config {path} has unknown option '{unknown[0]}'; use the names of this command's options "
            f"(see --help), e.g. cfg_scale for --cfg-scale")
    return given


def _convert(param: click.Parameter, value: Any, ctx: click.Context) -> Any:
    """A JSON value as the option's type; lists are comma-joined for text options (--classes, --methods)."""
    if isinstance(value, list) and param.multiple:
        return tuple(param.type.convert(v, param, ctx) for v in value)
    if isinstance(value, list) and param.type is not IMAGE_SIZE:
        value = ",".join(map(str, value))
    return param.type.convert(value, param, ctx) if value is not None else None


def _click_type(annotation) -> Any:
    if annotation == ImageSize | None or annotation == ImageSize:
        return IMAGE_SIZE
    base = annotation
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType")):
        base = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(base) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(base)])
    if base is Path:
        return click.Path(path_type=Path)
    return {int: int, float: float, bool: bool}.get(base, str)


class ScopedOption(click.Option):
    """A config field's option; the field may scope it to some commands (``json_schema_extra={"commands": [...]}``)."""

    commands: list[str] | None = None  # None: every command


def field_options(model: type[BaseModel], skip: Iterable[str] = (), prefix: str = "",
                  defaults: BaseModel | None = None) -> list[ScopedOption]:
    """One click option per field of ``model``; defaults stay None so only what the user typed is set.

    ``prefix`` (e.g. "stage1") names options ``--stage1-lr`` with destination ``stage1_lr``; ``defaults``
    (an instance) supplies the defaults shown in the help when they differ from the field defaults.
    """
    options = []
    for name, field in model.model_fields.items():
        if name in skip or isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            continue
        flag, ctype = flag_name(name, field), _click_type(field.annotation)
        if prefix:
            flag, dest = f"{prefix}-{flag}", f"{prefix}_{name}"
        else:
            dest = name
        default = getattr(defaults, name) if defaults is not None else field.default
        shown = (defaults is not None or not field.is_required()) and default is not None
        help_text = (field.description or "") + (f"  [default: {default}]" if shown else "")
        if ctype is bool:
            option = ScopedOption([f"--{flag}/--no-{flag}", dest], default=None, help=help_text)
        else:
            option = ScopedOption([f"--{flag}", dest], type=ctype, default=None, help=help_text)
        commands = field.json_schema_extra.get("commands") if isinstance(field.json_schema_extra, dict) else None
        option.commands = [str(c) for c in commands] if isinstance(commands, (list, tuple)) else None
        options.append(option)
    return options


def pick(model: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """The subset of parsed CLI values that belong to ``model`` and were actually given."""
    return {k: v for k, v in values.items() if k in model.model_fields and v is not None}


def registry_of(ctx: click.Context) -> Registry:
    root = ctx.find_root()
    if not isinstance(root.obj, Registry):
        root.obj = get_registry()
    return root.obj


class PluginCommand(click.Command):
    """A command whose options include those contributed by the registered backends and methods.

    Each option belongs to its owner. A flag that several plugins declare is resolved per selection: the
    backend and methods named on the command line win with their own field, help text and type, and a
    foreign owner's version of the flag is never shown or parsed in its place (unnamed, the first
    registered owner's is shown, as the documented help is)."""

    def __init__(self, *args, plugin_params: Callable[[Registry, dict[str, list[str]]], list[click.Option]], **kwargs):
        super().__init__(*args, **kwargs)
        self.plugin_params = plugin_params

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = join_image_size(args)
        ctx.meta["flashar.selected"] = self._selected(ctx, args)
        return super().parse_args(ctx, args)

    def _selected(self, ctx: click.Context, args: list[str]) -> dict[str, list[str]]:
        """The backend and method ids named on the command line, read before parsing."""
        selected: dict[str, list[str]] = {}
        for param in super().get_params(ctx):
            if param.name not in ("backend", "method", "methods"):
                continue
            value = None
            for i, arg in enumerate(args):
                for opt in param.opts:
                    if arg == opt and i + 1 < len(args):
                        value = args[i + 1]
                    elif opt.startswith("--") and arg.startswith(opt + "="):
                        value = arg.split("=", 1)[1]
            key = "backend" if param.name == "backend" else "methods"
            selected.setdefault(key, []).extend(str(value).split(",") if value else [])
        return selected

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        registry = registry_of(ctx)
        params = [with_backend_defaults(p, registry) for p in super().get_params(ctx)]
        seen = {opt for p in params for opt in p.opts}
        for param in self.plugin_params(registry, ctx.meta.get("flashar.selected", {})):
            if isinstance(param, ScopedOption) and param.commands is not None and self.name not in param.commands:
                continue  # the owner scoped this option to other commands
            if not seen.intersection(param.opts):
                params.append(param)
                seen.update(param.opts)
        return params


def with_backend_defaults(param: click.Parameter, registry: Registry) -> click.Parameter:
    """A sampling option whose help names what each backend runs with unless the flag is given (a
    backend's ``sampling_defaults`` beat the library default shown by the field)."""
    field = SamplingConfig.model_fields.get(param.name or "")
    if field is None or not isinstance(param, click.Option):
        return param
    specs = sorted(registry.backends.values(), key=lambda s: s.id)
    own = [
        f"{s.id} {s.sampling_defaults[param.name]}"
        for s in specs
        if isinstance(s.sampling_defaults, dict) and s.sampling_defaults.get(param.name, field.default) != field.default
    ]
    read = [s.id for s in specs if isinstance(s.sampling_defaults, str)]
    if not own and not read:
        return param
    notes = own + ([f"{', '.join(read)}: the model's (see `flashar backends`)"] if read else [])
    param = copy.copy(param)
    param.help = f"{field.description}  [default: {field.default}; backends: {'; '.join(notes)}]"
    return param


def backend_options(registry: Registry, selected: dict[str, list[str]] | None = None) -> list[click.Option]:
    """Every backend's options, the selected backend's first (so its version of a shared flag wins)."""
    chosen = set((selected or {}).get("backend", []))
    specs = sorted(registry.backends.values(), key=lambda spec: spec.id not in chosen)
    return [option for spec in specs for option in field_options(spec.options)]


def backend_and_method_options(registry: Registry, selected: dict[str, list[str]] | None = None) -> list[click.Option]:
    """Backend options, then every method's, the selected methods' first."""
    chosen = set((selected or {}).get("methods", []))
    methods = sorted(registry.methods.values(), key=lambda cls: cls.id not in chosen)
    return backend_options(registry, selected) + [o for cls in methods for o in field_options(cls.Options)]


def check_foreign(values: dict[str, Any], registry: Registry, backend: str, methods: list[str]) -> None:
    """Reject options that belong only to backends or methods not in use."""
    own = set(registry.backend(backend).options.model_fields)
    for name in methods:
        own |= set(registry.method(name).Options.model_fields)
    for spec in registry.backends.values():
        for name in set(spec.options.model_fields) - own:
            if values.get(name) is not None:
                raise FlashARError(
                    f"--{name.replace('_', '-')} is an option of backend '{spec.id}', not of '{backend}'; "
                    f"drop it or use --backend {spec.id}")
    for cls in registry.methods.values():
        for name in set(cls.Options.model_fields) - own:
            if values.get(name) is not None:
                raise FlashARError(
                    f"--{name.replace('_', '-')} is an option of method '{cls.id}', which is not selected; "
                    f"add --method {cls.id} or drop --{name.replace('_', '-')}")


def user_errors(fn: Callable) -> Callable:
    """Turn FlashARError / pydantic errors into one-line click errors (tracebacks only with --debug), and print
    a FlashARWarning as one line ("warning: ...") on stderr."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug")
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warnings(warnings.showwarning)
                return fn(*args, **kwargs)
        except (FlashARError, ValidationError) as exc:
            if debug:
                raise
            message = str(exc) if isinstance(exc, FlashARError) else _pydantic_line(exc)
            raise click.ClickException(message) from None

    return wrapper


def _one_line_warnings(show: Callable) -> Callable:
    def show_warning(message, category, *where):
        if issubclass(category, FlashARWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            show(message, category, *where)

    return show_warning


def _pydantic_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    return f"invalid value for {'.'.join(map(str, first['loc']))}: {first['msg']}"


def parse_classes(text: str | None, hint: str = "--classes") -> list[int]:
    """``"207,360"`` -> [207, 360]; nothing (or only commas) -> []. An empty entry beside others is refused (a typo)."""
    parts = [part.strip() for part in (text or "").split(",")]
    if not any(parts):
        return []
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers like 207,360, got {text!r}", param_hint=hint) from None


def parse_methods(text: str, registry: Registry) -> dict[str, tuple[str, dict[str, str]]]:
    """``--methods``: comma-separated method ids, or variants ``ID:OPTION=VALUE;OPTION=VALUE`` with option values
    of their own (``zipar:window=4``, ``flashar:adapter=runs/lag1``) -> {label: (method id, {option: value})}.

    The label is the entry as written, in order. Values stay strings for the method's ``Options`` to validate
    (they override that option's flag for this entry only); option names take - or _."""
    variants: dict[str, tuple[str, dict[str, str]]] = {}
    for spec in filter(None, (part.strip() for part in text.split(","))):
        method, _, rest = spec.partition(":")
        fields = registry.method(method.strip()).Options.model_fields  # an unknown id: one line naming the installed
        options = {}
        for item in filter(None, rest.split(";")):
            key, equals, value = (part.strip() for part in item.partition("="))
            key = key.replace("-", "_")
            if not equals or key not in fields:
                known = ", ".join(name.replace("_", "-") for name in fields) or "none"
                raise FlashARError(f"--methods entry {spec!r}: {item.strip()!r} is not OPTION=VALUE for an option of "
                                   f"method '{method.strip()}' (its options: {known})")
            options[key] = value
        if spec in variants:
            raise FlashARError(f"--methods lists {spec!r} twice; list each method or variant once")
        variants[spec] = (method.strip(), options)
    return variants


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def console():
    from rich.console import Console

    return Console(stderr=True)


def print_table(title: str, columns: list[str], rows: list[list[Any]], no_wrap: Iterable[str] = ()) -> None:
    from rich.console import Console
    from rich.table import Table

    from rich.text import Text

    table = Table(title=title)
    for col in columns:
        table.add_column(col, no_wrap=col in no_wrap)
    for row in rows:  # plain Text: rich markup would swallow "[digits]" in pip install 'flashar[digits]'
        table.add_row(*(Text("" if v is None else str(v)) for v in row))
    Console(file=sys.stdout, width=160).print(table)


def nested_config(model: type[BaseModel], values: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge flat CLI values into a nested config dict: ``stage1_lr`` -> {"stage1": {"lr": ...}}.

    Sub-models are filled from ``base`` (a config file) and the model's defaults, then overridden.
    """
    merged = dict(base or {})
    defaults = model()
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            given = {k[len(name) + 1 :]: v for k, v in values.items() if k.startswith(name + "_") and v is not None
                     and k[len(name) + 1 :] in sub.model_fields}
            if name == "branch":
                given = pick(sub, values)
            from_file = merged.get(name, {})
            if not isinstance(from_file, dict):
                raise FlashARError(
                    f"'{name}' in the --config file must be a JSON object of {sub.__name__} fields, got {from_file!r}")
            start = {**getattr(defaults, name).model_dump(), **from_file}
            merged[name] = {**start, **given}
        elif values.get(name) is not None:
            merged[name] = values[name]
    return merged
