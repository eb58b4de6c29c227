"""Errors meant for users.

Everything flashar raises on bad input is a :class:`FlashARError`: one sentence that says what was
wrong, the value received, and what to do. The CLI prints it on one line and exits non-zero; real
bugs keep their tracebacks.
"""


class FlashARError(Exception):
    """A problem the user can fix: bad input, a missing file or extra, an incompatible checkpoint."""


class FlashARWarning(UserWarning):
    """Advice a user may act on, such as a setting that runs slowly on this machine; the CLI prints it on one
    line. Nothing stops."""


class UnknownNameError(FlashARError):
    """An unknown backend, method or preset name."""


class CheckpointError(FlashARError):
    """A checkpoint that is missing, unreadable, unsafe, or does not fit the model."""


class MissingExtraError(FlashARError):
    """An optional dependency is not installed; the message names the pip extra."""


class PluginError(FlashARError):
    """A plugin registered something invalid or something already registered."""


class DataError(FlashARError):
    """Training or reference data that is missing, empty or unreadable."""


def require(module: str, extra: str) -> None:
    """Raise :class:`MissingExtraError` unless ``module`` can be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"this needs the Python package '{module}', which is not installed; "
            f"run: pip install 'flashar[{extra}]'"
        )
