"""Everything a plugin imports from flashar, in one module: ``from flashar.sdk import Backbone, hookimpl, ...``.

Each name still lives in its own module (``flashar.backbone``, ``flashar.io``, ...), and a plugin that imports
it from there keeps working. Names are imported on first use, so a plugin's package root that takes only the
registration names (``hookimpl``, ``BackendSpec``, ``Config``, ``RuntimeConfig``) imports no torch.
The conformance suite stays in ``flashar.testing`` (it needs pytest).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

HOMES = {  # name -> the module that defines it
    # registering a backend, a method or a metric (docs/writing-a-backend-plugin.md, section 2)
    "hookimpl": "flashar.hookspecs",
    "BackendSpec": "flashar.plugins",
    "MetricSpec": "flashar.plugins",
    "Config": "flashar.config",
    "RuntimeConfig": "flashar.config",
    "SamplingConfig": "flashar.config",
    # errors a user can act on
    "FlashARError": "flashar.errors",
    "CheckpointError": "flashar.errors",
    # loading official files strictly (section 3)
    "load_weights": "flashar.io",
    "check_keys": "flashar.io",
    "strip_prefixes": "flashar.io",
    "file_in": "flashar.io",
    "load_json": "flashar.io",
    # the Backbone protocol (section 4)
    "Backbone": "flashar.backbone",
    "BackendCard": "flashar.card",
    "PublishedModules": "flashar.backbone",
    "Prefix": "flashar.backbone",
    "KVCache": "flashar.backbone",
    "write_kv": "flashar.backbone",
    "attention": "flashar.attention",
    # a decoding method's base and what its generate returns
    "Method": "flashar.decoding",
    "DecodeState": "flashar.decoding",
    "Generation": "flashar.decoding",
}
__all__ = sorted(HOMES)

if TYPE_CHECKING:  # what type checkers and editors see; tests/test_sdk.py keeps it equal to HOMES
    from flashar.attention import attention  # noqa: F401
    from flashar.backbone import Backbone, KVCache, Prefix, PublishedModules, write_kv  # noqa: F401
    from flashar.card import BackendCard  # noqa: F401
    from flashar.config import Config, RuntimeConfig, SamplingConfig  # noqa: F401
    from flashar.decoding import DecodeState, Generation, Method  # noqa: F401
    from flashar.errors import CheckpointError, FlashARError  # noqa: F401
    from flashar.hookspecs import hookimpl  # noqa: F401
    from flashar.io import check_keys, file_in, load_json, load_weights, strip_prefixes  # noqa: F401
    from flashar.plugins import BackendSpec, MetricSpec  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in HOMES:
        raise AttributeError(f"flashar.sdk has no {name!r}; it offers {', '.join(__all__)}")
    value = getattr(importlib.import_module(HOMES[name]), name)
    globals()[name] = value  # once imported, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
