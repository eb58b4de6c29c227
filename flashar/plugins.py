"""The plugin manager and the registries it fills.

``build_manager`` makes a fresh :class:`pluggy.PluginManager` holding the built-in plugins plus every
package in the ``flashar`` entry-point group (``FLASHAR_LOAD_PLUGINS=a,b`` limits which entry points load;
an empty value loads none). A plugin that fails to import is recorded and reported, never fatal.
``Registry`` collects what the plugins register and rejects a duplicate id, naming both registrants.
The CLI caches one manager (``get_registry``); tests build their own.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import pluggy

from flashar import hookspecs
from flashar.errors import MissingExtraError, PluginError, UnknownNameError

if TYPE_CHECKING:  # for annotations only: the registry loads before torch and the engine
    from flashar.config import Config
    from flashar.decoding import Method

ENTRY_POINT_GROUP = "flashar"
BUILTIN_PLUGINS = (
    "flashar.backends.llamagen",
    "flashar.backends.digits",
    "flashar.backends.emu35",
    "flashar.backends.glm_image",
    "flashar.methods.raster",
    "flashar.methods.flashar",
    "flashar.methods.sjd",
    "flashar.methods.zipar",
    "flashar.methods.gsd",
)


@dataclass(frozen=True)
class BackendSpec:
    """How to build one backbone backend.

    ``options`` is a pydantic model of the backend's load options (each field becomes a CLI flag);
    ``load(options, device, dtype)`` returns a :class:`flashar.backbone.Backbone`. ``requires`` names the
    modules the backend imports, and ``extra`` the pip extra that installs them.

    Two optional fields let the commands refuse bad input before the (possibly huge) model loads:
    ``image_tokenizer`` names the load option that brings the image tokenizer when it is optional (writing
    images and tokenising data need it), and ``condition_kind`` is ``"class"`` or ``"text"``, or a function
    of the validated options returning one (or None when only the checkpoint knows), so a data folder's
    layout is checked first. ``sampling_defaults`` shows in ``--help`` and ``flashar backends`` what the
    backbone's ``sampling_defaults`` will be: the values (SamplingConfig fields), or, when they are read
    from the model's files, a short phrase saying from where.
    """

    id: str
    description: str
    options: type[Config]
    load: Callable[..., Any]
    extra: str | None = None
    requires: tuple[str, ...] = ()
    image_tokenizer: str | None = None
    condition_kind: str | Callable[[Any], str | None] | None = None
    sampling_defaults: dict[str, Any] | str = field(default_factory=dict)

    def kind_of(self, options: Any) -> str | None:
        """The condition kind the backbone loaded with ``options`` will have, if known before loading."""
        return self.condition_kind(options) if callable(self.condition_kind) else self.condition_kind

    def missing(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def install_hint(self) -> str:
        return f"pip install 'flashar[{self.extra}]'" if self.extra else "pip install flashar"

    def check_available(self) -> None:
        if missing := self.missing():
            raise MissingExtraError(
                f"backend '{self.id}' needs {', '.join(missing)}, which is not installed; run: {self.install_hint()}"
            )


@dataclass(frozen=True)
class MetricSpec:
    """A torch-fidelity feature extractor a plugin provides (see ``flashar.compare.metrics``)."""

    id: str
    description: str
    register: Callable[[], str]  # registers the extractor with torch-fidelity, returns its name
    label: str = "FID"  # how reports name the FID computed on these features
    classify: Callable[[Any], Any] | None = None  # uint8 images (N, 3, H, W) -> predicted class ids (N,)


@dataclass
class PluginInfo:
    name: str
    package: str | None = None
    version: str | None = None
    error: str | None = None
    builtin: bool = False


def build_manager(load_entry_points: bool = True) -> tuple[pluggy.PluginManager, list[PluginInfo]]:
    """A fresh manager with the built-ins and (optionally) the entry-point plugins."""
    pm = pluggy.PluginManager("flashar")
    pm.add_hookspecs(hookspecs)
    infos = []
    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
        infos.append(PluginInfo(name=name, package="flashar", version=_version("flashar"), builtin=True))
    if load_entry_points:
        infos += _load_entry_points(pm)
    return pm, infos


def _load_entry_points(pm: pluggy.PluginManager) -> list[PluginInfo]:
    wanted = os.environ.get("FLASHAR_LOAD_PLUGINS")
    allowed = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
    infos = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        dist = getattr(ep, "dist", None)
        info = PluginInfo(name=ep.name, package=dist.name if dist else None, version=dist.version if dist else None)
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # a broken plugin must not take the CLI down
            info.error = f"{type(exc).__name__}: {exc}"
        infos.append(info)
    return infos


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Registry:
    """Backends, methods and metrics registered by the plugins of one manager."""

    pm: pluggy.PluginManager
    plugins: list[PluginInfo] = field(default_factory=list)
    backends: dict[str, BackendSpec] = field(default_factory=dict)
    methods: dict[str, type[Method]] = field(default_factory=dict)
    metrics: dict[str, MetricSpec] = field(default_factory=dict)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def from_manager(cls, pm: pluggy.PluginManager, plugins: list[PluginInfo] | None = None) -> Registry:
        reg = cls(pm, plugins or [])
        reg._collect("backend", pm.hook.flashar_register_backends, reg.backends)
        reg._collect("method", pm.hook.flashar_register_methods, reg.methods)
        reg._collect("metric", pm.hook.flashar_register_metrics, reg.metrics)
        reg._check_flags()
        return reg

    def _check_flags(self) -> None:
        """A method's option shares its CLI flag with every other method's and with the backend's (several
        methods run in one command), so an option name a method and another method or a backend declare
        must parse the same way; otherwise one would silently read the other's value. Backends may differ
        among themselves: only one is selected, and its own declaration of a shared flag is parsed."""
        methods = [(f"method '{cls.id}'", ("method", cls.id), cls.Options) for cls in self.methods.values()]
        backends = [(f"backend '{spec.id}'", ("backend", spec.id), spec.options) for spec in self.backends.values()]
        declared: dict[str, tuple[str, tuple, Any]] = {}  # option name -> its first method's declaration
        for owner, key, model in methods + backends:
            for name, info in model.model_fields.items():
                kind = _flag_kind(info.annotation)
                first = declared.get(name) if key[0] == "backend" else declared.setdefault(name, (owner, key, kind))
                if first is not None and first[2] != kind:
                    raise PluginError(
                        f"option --{name.replace('_', '-')} is declared as {_describe(first[2])} by {first[0]} "
                        f"(plugin '{self.owners[first[1]]}') and as {_describe(kind)} by {owner} (plugin "
                        f"'{self.owners[key]}'); one flag cannot mean both: rename one of them")

    def _collect(self, kind: str, hook, table: dict) -> None:
        for impl in hook.get_hookimpls():
            def register(item, _plugin=impl.plugin_name):
                item_id = getattr(item, "id", None)
                if not isinstance(item_id, str) or not item_id:
                    raise PluginError(f"plugin '{_plugin}' registered a {kind} without a string 'id': {item!r}")
                if item_id in table:
                    first = self.owners[(kind, item_id)]
                    raise PluginError(
                        f"{kind} '{item_id}' is registered twice, by plugin '{first}' and by plugin '{_plugin}'; "
                        f"uninstall one of them or limit plugins with FLASHAR_LOAD_PLUGINS"
                    )
                table[item_id] = item
                self.owners[(kind, item_id)] = _plugin

            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:  # a plugin whose hook breaks is reported, not fatal
                self._failed(impl.plugin_name, f"{type(exc).__name__} while registering {kind}s: {exc}")

    def _failed(self, plugin: str, error: str) -> None:
        for info in self.plugins:
            if info.name == plugin:
                info.error = error
                return
        self.plugins.append(PluginInfo(name=plugin, error=error))

    def backend(self, name: str) -> BackendSpec:
        return _lookup("backend", name, self.backends, "flashar backends")

    def method(self, name: str) -> type[Method]:
        return _lookup("method", name, self.methods, "flashar methods")


def _flag_kind(annotation: Any) -> Any:
    """How the CLI parses an option of this type: the type without ``None``, a Literal as its choices."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else tuple(rest)
    if typing.get_origin(annotation) is typing.Literal:
        return ("one of", tuple(sorted(map(str, typing.get_args(annotation)))))
    return annotation


def _describe(kind: Any) -> str:
    if isinstance(kind, tuple) and kind and kind[0] == "one of":
        return "one of " + "|".join(kind[1])
    return getattr(kind, "__name__", str(kind))


def _lookup(kind: str, name: str, table: dict, command: str):
    if name not in table:
        raise UnknownNameError(
            f"unknown {kind} '{name}'; installed: {', '.join(sorted(table)) or 'none'} (run `{command}`)"
        )
    return table[name]


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry the CLI uses (built once)."""
    pm, infos = build_manager()
    return Registry.from_manager(pm, infos)
