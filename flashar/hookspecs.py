"""The flashar plugin contract: four hooks, each handed a ``register`` callback.

A plugin is any module or object with ``@hookimpl`` functions; an installed package exposes one through
the ``flashar`` entry-point group. The built-in backends and methods register through these same hooks.
"""

import pluggy

hookspec = pluggy.HookspecMarker("flashar")
hookimpl = pluggy.HookimplMarker("flashar")


@hookspec
def flashar_register_backends(register):
    """Register backbone backends: ``register(BackendSpec(...))``."""


@hookspec
def flashar_register_methods(register):
    """Register decoding methods: ``register(MethodClass)``."""


@hookspec
def flashar_register_metrics(register):
    """Register feature extractors for quality metrics: ``register(MetricSpec(...))``."""


@hookspec
def flashar_register_commands(cli):
    """Add click commands to the ``flashar`` command group."""
