"""Reader for image folders, on disk or in a zip: ``<split>/<class>/<image>.{png,jpg,jpeg,bmp}``.

Zip members are read into memory and decoded from there; nothing is ever extracted to disk, and an
archive with absolute or ``..`` member names is refused outright.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from robustkd.data.cifar import is_unsafe_member
from robustkd.errors import DataError

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png")
SPLITS = ("train", "test")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
_PIL_FORMATS = ("BMP", "JPEG", "PNG")  # only the decoders for the accepted extensions get to see the bytes
_IN_MEMORY_ZIP = 1 << 30
_LAYOUT = "expected train/<class>/<image> and test/<class>/<image> with .png, .jpg, .jpeg or .bmp images"

Tree = dict[str, dict[str, list["_Item"]]]  # split -> class -> images


@dataclass
class _Item:
    where: str  # what error messages show: a path, or archive.zip:member
    path: Path | None = None
    data: bytes | None = None
    member: zipfile.ZipInfo | None = None


def _ignored(name: str) -> bool:
    # Operating-system litter (.DS_Store, __MACOSX/, Thumbs.db) is not the user's data.
    return name.startswith(".") or name in {"__MACOSX", "Thumbs.db", "desktop.ini"}


def _check_image_name(parts: list[str], where: str) -> None:
    if len(parts) != 3:
        raise DataError(f"{where}: not at <split>/<class>/<image> depth; {_LAYOUT}")
    if not parts[2].lower().endswith(IMAGE_EXTENSIONS):
        raise DataError(f"{where}: not an image file ({_LAYOUT}); move it out of the dataset folder")


def _zip_prefix(names: list[str]) -> str:
    """'' when splits sit at the top of the archive, 'top/' when everything is wrapped in one folder."""
    tops = {n.split("/", 1)[0] for n in names if n}
    if tops & set(SPLITS):
        return ""
    tops = {t for t in tops if not _ignored(t)}
    if len(tops) == 1:
        (top,) = tops
        if any(n.startswith(f"{top}/{s}/") for n in names for s in SPLITS):
            return f"{top}/"
    return ""


def _add_zip_entry(tree: Tree, info: zipfile.ZipInfo, prefix: str, path: Path) -> None:
    """File one archive member under its split and class, or skip it (litter, files beside the splits)."""
    if not info.filename.startswith(prefix):
        return
    parts = info.filename[len(prefix) :].rstrip("/").split("/")
    if any(_ignored(p) for p in parts) or parts[0] not in SPLITS:
        return  # READMEs, licences and other files beside the splits
    where = f"{path}:{info.filename}"
    classes = tree.setdefault(parts[0], {})
    if info.is_dir():
        if len(parts) == 2:
            classes.setdefault(parts[1], [])
        elif len(parts) > 2:
            raise DataError(f"{where}: nested folder inside a class folder; {_LAYOUT}")
        return
    _check_image_name(parts, where)
    classes.setdefault(parts[1], []).append(_Item(where, member=info))


def _sorted_items(tree: Tree) -> list[_Item]:
    for classes in tree.values():
        for items in classes.values():  # archive order is arbitrary; match the sorted folder listing
            items.sort(key=lambda item: item.where)
    return [item for classes in tree.values() for items in classes.values() for item in items]


def _scan_zip(path: Path) -> Tree:
    try:
        # Reading a modest archive whole saves a seek and a read call per member (60 000 for CIFAR-10).
        size = path.stat().st_size
        archive = zipfile.ZipFile(io.BytesIO(path.read_bytes()) if size < _IN_MEMORY_ZIP else path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable zip archive ({err}); it may be truncated") from err
    tree: Tree = {}
    with archive:
        infos = archive.infolist()
        unsafe = [i.filename for i in infos if is_unsafe_member(i.filename)]
        if unsafe:
            raise DataError(
                f"{path}: refusing the archive, member {unsafe[0]!r} has an absolute path or '..' "
                f"({len(unsafe)} such members); nothing was read or extracted"
            )
        prefix = _zip_prefix([i.filename for i in infos])
        for info in infos:
            _add_zip_entry(tree, info, prefix, path)
        # Reads stay in the function that opened the archive and checked its members (tests/test_unsafe_calls.py).
        for item in _sorted_items(tree):
            try:
                item.data = archive.read(item.member)  # type: ignore[arg-type]
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as err:
                raise DataError(f"{item.where}: corrupt zip member ({err}); the archive is damaged") from err
    return tree


def _scan_dir(path: Path) -> Tree:
    if not any((path / s).is_dir() for s in SPLITS):
        subdirs = [p for p in path.iterdir() if p.is_dir() and not _ignored(p.name)]
        if len(subdirs) == 1 and any((subdirs[0] / s).is_dir() for s in SPLITS):
            path = subdirs[0]
    tree: Tree = {}
    for split in SPLITS:
        split_dir = path / split
        if not split_dir.is_dir():
            continue
        classes = tree.setdefault(split, {})
        for class_dir in sorted(split_dir.iterdir()):
            if _ignored(class_dir.name):
                continue
            if not class_dir.is_dir():
                raise DataError(f"{class_dir}: a file directly under {split}/; {_LAYOUT}")
            items = classes.setdefault(class_dir.name, [])
            for image in sorted(class_dir.iterdir()):
                if _ignored(image.name):
                    continue
                if image.is_dir():
                    raise DataError(f"{image}: nested folder inside a class folder; {_LAYOUT}")
                _check_image_name([split, class_dir.name, image.name], str(image))
                items.append(_Item(str(image), path=image))
    return tree


def _decode(item: _Item) -> np.ndarray:
    try:
        data = item.data if item.data is not None else item.path.read_bytes()  # type: ignore[union-attr]
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as image:
            mode = "L" if image.mode in _GRAY_MODES else "RGB"
            return np.asarray(image if image.mode == mode else image.convert(mode))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{item.where}: cannot decode the image ({err})") from err


def _decode_chunk(items: list[_Item]) -> list[np.ndarray]:
    return [_decode(item) for item in items]


def _stack(items: list[_Item], arrays: list[np.ndarray], source: Path) -> np.ndarray:
    height, width = arrays[0].shape[:2]
    for item, array in zip(items, arrays):
        if array.shape[:2] != (height, width):
            raise DataError(
                f"{source}: images of mixed sizes: {item.where} is {array.shape[1]}x{array.shape[0]} but "
                f"{items[0].where} is {width}x{height}; resize them to one size first"
            )
    if any(a.ndim == 3 for a in arrays):  # some colour: grey images become three equal channels
        arrays = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
        return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))
    return np.stack(arrays)[:, None]


def read_image_folder(
    path: Path, expected_classes: tuple[str, ...] | None = None, workers: int | None = None
) -> tuple[tuple[str, ...], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Class names (sorted) and, per split, images (N, C, H, W) uint8 and labels (N,) int64.

    Greyscale-only folders give one channel; anything with colour gives three.
    """
    if path.is_dir():
        tree = _scan_dir(path)
    elif path.is_file():
        tree = _scan_zip(path)
    else:
        raise DataError(f"{path}: no such folder or zip archive")
    for split in SPLITS:
        if not tree.get(split):
            raise DataError(f"{path}: no class folders under {split}/; {_LAYOUT}")
    classes = tuple(sorted(tree["train"]))
    for split in SPLITS:
        for name, items in tree[split].items():
            if not items:
                raise DataError(f"{path}: class folder {split}/{name}/ is empty; remove it or add its images")
    unknown = sorted(set(tree["test"]) - set(classes))
    if unknown:
        raise DataError(f"{path}: test/ has classes missing from train/: {', '.join(unknown)}")
    if expected_classes is not None and classes != tuple(expected_classes):
        raise DataError(f"{path}: classes {list(classes)} differ from the expected {list(expected_classes)}")

    # Round-robin over the classes (the first image of each class, then the second, ...): folder order would put
    # all of one class first, and "the first N test points" of an evaluation would then be a single class.
    ordered = [
        (split, label, item)
        for split in SPLITS
        for _, label, item in sorted(
            (rank, label, item)
            for label, name in enumerate(classes)
            for rank, item in enumerate(tree[split].get(name, []))
        )
    ]
    items = [item for _, _, item in ordered]
    chunk = 512
    # Pillow releases the GIL while decoding, so threads give most of a process pool's speed for free.
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = pool.map(_decode_chunk, [items[i : i + chunk] for i in range(0, len(items), chunk)])
        arrays = [array for part in parts for array in part]
    images = _stack(items, arrays, path)
    labels = np.array([label for _, label, _ in ordered], dtype=np.int64)
    is_train = np.array([split == "train" for split, _, _ in ordered])
    return classes, {
        "train": (images[is_train], labels[is_train]),
        "test": (images[~is_train], labels[~is_train]),
    }


def channel_stats(images: np.ndarray, chunk: int = 512) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images (N, C, H, W), as fractions of 255."""
    channels = images.shape[1]
    total = np.zeros(channels, dtype=np.int64)
    squares = np.zeros(channels, dtype=np.int64)
    # Integer sums are exact and chunking keeps memory flat (50 000 CIFAR images as float64 would be 1.2 GB).
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].astype(np.int64)
        total += block.sum(axis=(0, 2, 3))
        squares += (block * block).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    if count == 0:
        raise DataError("cannot compute mean/std of an empty split")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return tuple(float(m) / 255 for m in mean), tuple(max(float(s) / 255, 1e-6) for s in std)
