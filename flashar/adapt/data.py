"""Adaptation data: images (or pre-extracted codes) to token grids, tokenised once and cached.

Sources:

* a folder of class subfolders (class-conditional backends). Subfolder names that are all integers are
  the class ids; otherwise the sorted subfolder index is the class id (ImageNet's ``n01440764`` order);
* a folder of images with ``metadata.jsonl`` lines ``{"file_name": ..., "text": ...}`` (text-conditional
  backends; ``image``/``caption`` keys are accepted too);
* pre-extracted LlamaGen codes (``extract_codes_c2i.py`` output: ``*_codes/{i}.npy`` of shape
  (1, num_aug, N) and ``*_labels/{i}.npy`` of shape (1,)); every augmentation is one sample.

Images are centre-cropped and resized as ADM / LlamaGen do, tokenised by the backbone's tokenizer in
batches with a progress bar, and cached as ``codes.safetensors`` + ``conditions.json`` under a key that
covers the file list, the image size and the tokenizer, so a second run reads the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from flashar.backbone import Backbone
from flashar.errors import DataError
from flashar.io import file_in, load_weights, save_json, save_safetensors

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class TokenData:
    codes: Tensor  # (N, H, W) int64
    conditions: list[Any]  # class ids or captions, one per grid

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.codes.shape[1:])

    def __len__(self) -> int:
        return len(self.conditions)

    def split(self, fraction: float, seed: int = 0) -> tuple[TokenData, TokenData]:
        """A seeded random split into (rest, held-out fraction)."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        cut = len(self) - max(1, int(round(fraction * len(self))))
        pick = lambda idx: TokenData(self.codes[idx], [self.conditions[i] for i in idx.tolist()])
        return pick(order[:cut]), pick(order[cut:])


def center_crop(image, size: int | tuple[int, int]):
    """ADM's center_crop_arr, for a side or (height, width): halve with BOX while the image is at least twice
    the target on both sides, BICUBIC to cover the target, centre crop. (h, w, 3) uint8."""
    from PIL import Image

    height, width = (size, size) if isinstance(size, int) else size
    while image.size[0] >= 2 * width and image.size[1] >= 2 * height:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = max(width / image.size[0], height / image.size[1])
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"))
    top, left = (arr.shape[0] - height) // 2, (arr.shape[1] - width) // 2
    return arr[top : top + height, left : left + width]


def list_class_folder(folder: Path) -> list[tuple[Path, int]]:
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        return []
    numeric = all(p.name.isdigit() for p in classes)
    items = []
    for index, sub in enumerate(classes):
        label = int(sub.name) if numeric else index
        items += [(f, label) for f in sorted(sub.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    return items


def list_caption_folder(folder: Path) -> list[tuple[Path, str]]:
    items = []
    for n, line in enumerate((folder / "metadata.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row.get("file_name") or row["image"], str(row.get("text") or row["caption"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise DataError(
                f"{folder / 'metadata.jsonl'} line {n} needs a JSON object with 'file_name' and 'text'") from None
        path = file_in(folder, name, f"{folder / 'metadata.jsonl'} line {n}", DataError)
        if not path.is_file():
            raise DataError(f"{folder / 'metadata.jsonl'} line {n} names {name!r}, which is not a file in {folder}")
        items.append((path, text))
    return items


def list_images(folder: str | Path, condition_kind: str | None) -> list[tuple[Path, Any]]:
    """(image, condition) pairs of a data folder: class subfolders, or images + metadata.jsonl for text.

    ``condition_kind=None`` (not known before the model loads) accepts either layout."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(
            f"--data {folder} is a file, not a folder; pass a folder of class subfolders (or images + metadata.jsonl)")
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}; check the --data path")
    text = condition_kind == "text" or (condition_kind is None and (folder / "metadata.jsonl").exists())
    try:
        if text and not (folder / "metadata.jsonl").is_file():
            raise DataError(
                f'{folder} needs a metadata.jsonl with one {{"file_name": ..., "text": ...}} line per image for a '
                'text-conditional backend')
        items = list_caption_folder(folder) if text else list_class_folder(folder)
    except OSError as exc:
        raise DataError(f"cannot read the data folder {folder} ({exc.strerror or exc}: {exc.filename or folder}); "
                        f"check its permissions") from None
    if not items:
        layout = {"text": "metadata.jsonl + images", "class": "one subfolder of images per class"}.get(
            condition_kind, "one subfolder of images per class, or images + metadata.jsonl")
        raise DataError(f"no images found in {folder}; expected {layout}")
    return items


def cache_key(items: list[tuple[Path, Any]], image_size: int | tuple[int, int], backbone: Backbone) -> str:
    digest = hashlib.sha256(
        f"{image_size}|{backbone.backend_id}|{backbone.fingerprint()}|{backbone.downsample}".encode())
    tokenizer = getattr(backbone, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "model"):
        first = next(iter(tokenizer.model.state_dict().values()))
        digest.update(first.flatten()[:256].float().cpu().numpy().tobytes())
    for path, cond in items:
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{cond}".encode())
    return digest.hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLASHAR_CACHE", Path.home() / ".cache" / "flashar")) / "tokens"


def tokenize_folder(backbone: Backbone, folder: str | Path, image_size: int | tuple[int, int] | None = None,
                    cache_dir: Path | None = None,
                    batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> TokenData:
    """Encode every image of the folder into a token grid (cached); ``progress(done, total)`` after every
    batch of ``batch_size`` images (and once at the start)."""
    size = backbone.default_image_size if image_size is None else image_size
    size = size if isinstance(size, int) else tuple(size)
    backbone.grid(size)  # validates the size against the tokenizer's downsampling factor
    items = list_images(folder, backbone.condition_kind)
    cache = (cache_dir or default_cache_dir()) / cache_key(items, size, backbone)
    if (cache / "codes.safetensors").is_file() and (cache / "conditions.json").is_file():
        return TokenData(load_weights(cache / "codes.safetensors")["codes"].long(),
                         json.loads((cache / "conditions.json").read_text()))
    codes = []
    if progress:
        progress(0, len(items))
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        pixels = torch.stack([_read(path, size) for path, _ in batch])
        codes.append(backbone.encode(pixels).long().cpu())
        if progress:
            progress(min(start + batch_size, len(items)), len(items))
    data = TokenData(torch.cat(codes), [cond for _, cond in items])
    save_safetensors({"codes": data.codes.to(torch.int32)}, cache / "codes.safetensors")
    save_json(data.conditions, cache / "conditions.json")
    return data


def _read(path: Path, size: int | tuple[int, int]) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            arr = center_crop(image, size)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path} ({exc}); remove or replace it") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def list_llamagen_codes(folder: str | Path) -> tuple[Path, Path, list[Path]]:
    """The codes folder, the labels folder and the .npy code files of an ``extract_codes_c2i.py`` output."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--codes {folder} is not a folder; point --codes at LlamaGen's --code-path")
    try:
        code_dirs = sorted(folder.glob("*_codes"))
        if not code_dirs:
            raise DataError(f"no '*_codes' folder in {folder}; point --codes at LlamaGen's --code-path")
        code_dir = code_dirs[0]
        label_dir = code_dir.with_name(code_dir.name[: -len("_codes")] + "_labels")
        files = sorted(code_dir.glob("*.npy"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
    except OSError as exc:
        raise DataError(
            f"cannot read the codes folder {folder} ({exc.strerror or exc}); check its permissions") from None
    if not files or not label_dir.is_dir():
        raise DataError(f"{code_dir} has no .npy codes or {label_dir} is missing")
    return code_dir, label_dir, files


def load_llamagen_codes(folder: str | Path, grid: tuple[int, int] | None = None) -> TokenData:
    """Codes written by LlamaGen's ``extract_codes_c2i.py`` (every augmentation a sample).

    A file holds (1, num_aug, N) flat codes, or (..., H, W) grids. Flat codes form ``grid`` (H, W) when
    H * W = N, else a square grid.
    """
    code_dir, label_dir, files = list_llamagen_codes(folder)
    codes, labels = [], []
    for path in files:
        array = _read_npy(path, "codes")
        grids = _as_grids(array, grid, path)  # (num_aug, H, W)
        label = int(_read_npy(label_dir / path.name, "label").reshape(-1)[0])
        codes.append(torch.from_numpy(grids.astype(np.int64)))
        labels += [label] * grids.shape[0]
    shapes = sorted({tuple(c.shape[1:]) for c in codes})
    if len(shapes) > 1:
        raise DataError(
            f"the codes in {code_dir} form grids of several shapes {shapes}; extract them at one image size")
    return TokenData(torch.cat(codes), labels)


def _as_grids(array: np.ndarray, grid: tuple[int, int] | None, path: Path) -> np.ndarray:
    if array.ndim >= 4:  # (..., H, W) grids as stored
        return array.reshape(-1, *array.shape[-2:])
    flat = array.reshape(-1, array.shape[-1])  # (num_aug, N)
    count = flat.shape[1]
    if grid is not None and grid[0] * grid[1] == count:
        return flat.reshape(-1, *grid)
    side = int(round(count**0.5))
    if side * side != count:
        wanted = f"the {grid[0]}x{grid[1]} grid of this image size" if grid else "a square grid"
        raise DataError(
            f"codes in {path} have {count} tokens, not {wanted}; pass the --image-size they were extracted at")
    return flat.reshape(-1, side, side)


def _read_npy(path: Path, what: str) -> np.ndarray:
    """A numeric, non-empty .npy array (no pickled objects)."""
    if not path.is_file():
        raise DataError(f"{what} file {path} is missing; every code file needs a label file of the same name")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(
            f"cannot read {what} file {path} ({str(exc).splitlines()[0][:100]}); it must be a numeric .npy array"
        ) from None
    if not np.issubdtype(array.dtype, np.integer) or array.ndim == 0 or array.size == 0:
        raise DataError(
            f"{what} file {path} holds a {array.dtype} array of shape {array.shape}; expected integer codes/labels")
    return array
