"""Safe reading and atomic writing of weights, JSON and images.

Pickled checkpoints are read with ``torch.load(weights_only=True)`` only; flashar itself writes
safetensors plus JSON. Every write goes to a temporary file in the target folder, is flushed to disk and
renamed into place, so an interrupted run (even a SIGKILL) never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from flashar.errors import CheckpointError, FlashARError

STATE_DICT_KEYS = ("model", "module", "state_dict", "ema")


def load_weights(path: str | Path) -> dict[str, Any]:
    """Read a ``.pt``/``.pth``/``.bin`` pickle (weights only) or a ``.safetensors`` file to a dict on CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}; check the path")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects that need code execution to unpickle "
            f"({_unpickling_reason(str(exc))}); flashar only loads plain tensor checkpoints, re-export it as a state "
            "dict"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"could not read {path} as a PyTorch checkpoint ({type(exc).__name__}: {_first_sentence(str(exc))}); "
            f"the file may be truncated or corrupt, re-download it"
        ) from None


def _first_sentence(text: str, limit: int = 100) -> str:
    """The first sentence of a library's message, at most ``limit`` characters (cut at a word)."""
    line = (text.strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."


def _unpickling_reason(text: str) -> str:
    """torch's weights-only refusal names the offending global deep inside a long message."""
    for line in text.splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return _first_sentence(line.split("error:", 1)[-1])
    return _first_sentence(text)


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"could not read {path} as safetensors ({exc}); the file may be truncated or corrupt") from None


def select_state_dict(obj: Any, path: str | Path, marker: str) -> dict[str, Tensor]:
    """The parameter dict inside a training checkpoint: under 'model'/'module'/'state_dict', or the object itself.

    ``marker`` is a key that only a real state dict has (e.g. ``tok_embeddings.weight``).
    """
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
        if any(isinstance(k, str) and k.endswith(marker) for k in obj):
            return obj
    raise CheckpointError(f"{path} does not look like the expected checkpoint: no '{marker}' and no 'model' entry")


def strip_prefixes(
    state: dict[str, Tensor], prefixes=("module.", "_orig_mod.", "_fsdp_wrapped_module.")) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            key = key.replace(prefix, "")
        out[key] = value
    return out


def check_keys(expected: dict[str, tuple[int, ...]], state: dict[str, Tensor], path: str | Path,
               optional: tuple[str, ...] = ()) -> None:
    """Fail with one line naming missing, unexpected and mis-shaped keys."""
    missing = [k for k in expected if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in expected
              if k in state and tuple(state[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys ({_few(missing)})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys ({_few(unexpected)})")
    if shapes:
        problems.append(f"wrong shapes ({_few(shapes)})")
    if problems:
        raise CheckpointError(
            f"{path} does not match the model: {'; '.join(problems)}; check the model size/config options")


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f", ... {len(items) - n} more" if len(items) > n else "")


def file_in(folder: str | Path, name: Any, source: str | Path, error: type[FlashARError] = CheckpointError) -> Path:
    """``folder / name`` for a file name read from ``source`` (an index, a metadata file); refuses absolute
    names and ``..``, so a file cannot make flashar read outside its folder."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise error(f"{source} names the file {name!r}, which is not inside {folder}; "
                    f"file names there must be relative paths within the folder")
    return Path(folder) / name


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check it is writable, before any work is done."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise FlashARError(
            f"cannot write to output folder {path}: {exc.strerror or exc}; choose a writable --out") from None
    return path


def check_writable_dir(path: str | Path, option: str = "--out") -> Path:
    """Check that ``path`` is, or can be made, a writable folder, without creating it (so a command that
    fails later leaves nothing behind)."""
    path = Path(path)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FlashARError(f"cannot write to {path}: {existing} is a file, not a folder; choose another {option}")
    try:
        with tempfile.NamedTemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise FlashARError(f"cannot write to {path}: {exc.strerror or exc}; choose a writable {option}") from None
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)  # the data reaches the disk before the rename makes it visible
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOCK = ".flashar.lock"


@contextmanager
def folder_lock(folder: str | Path, command: str = "flashar adapt") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``.flashar.lock``) for the block; refuse at once if another
    process holds it. The kernel drops the lock when the holder exits, even on SIGKILL."""
    import fcntl

    path = Path(folder) / LOCK
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FlashARError(
                f"another {command} is writing to {folder}; wait for it to finish or choose another --out") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_temporary_files(folder: str | Path) -> None:
    """Delete the temporary files of :func:`atomic_path` that a killed run left in ``folder``."""
    for stale in Path(folder).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FlashARError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise FlashARError(f"{path} is a folder, not a JSON file; pass the file") from None
    except OSError as exc:
        raise FlashARError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FlashARError(f"{path} is not valid JSON ({exc}); fix or regenerate it") from None


def save_png(image: Tensor, path: str | Path) -> None:
    """Write an image (3, h, w) or (1, h, w) in [0, 1] as PNG, atomically."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    mode = "L" if array.shape[2] == 1 else "RGB"
    with atomic_path(path) as tmp:
        Image.fromarray(array[..., 0] if mode == "L" else array, mode=mode).save(tmp, format="PNG")
