"""Decode once, then load uint8 arrays from ``.npy`` files keyed by the source files' checksum.

The key is the SHA-256 of every byte of the source files (or of the full listing of a source folder: every
folder, empty ones included, and every file with its relative path and bytes), plus the decoder's name and
a format version. Hashing is fast (the 62 MB CIFAR-10 zip takes under 0.1 s) and, unlike size+mtime,
survives copies and catches edits. Each cached array's SHA-256 is kept in the entry's ``meta.json`` and
checked on load, so an array damaged or edited in the cache is decoded again instead of trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustkd.data.sources import default_cache_dir

log = logging.getLogger("robustkd.data")

# Bump when the decoded layout or the meta fields change, so old entries are ignored, not misread.
# 2: folders in the key, checksums of the arrays in meta.json. 3: image folders in round-robin class order.
CACHE_VERSION = 3
ARRAY_NAMES = ("train_images", "train_labels", "test_images", "test_labels")

Arrays = dict[str, np.ndarray]
Decoded = tuple[Arrays, dict[str, Any]]


def fingerprint(kind: str, sources: Sequence[Path]) -> str:
    """A hex key over the decoder ``kind`` and the full contents of ``sources`` (files or folders)."""
    digest = hashlib.sha256(f"robustkd-data-v{CACHE_VERSION}\0{kind}\0".encode())
    for source in sources:
        if source.is_dir():
            _hash_folder(digest, source)
        else:
            _hash_into(digest, source)
    return digest.hexdigest()[:32]


def _hash_folder(digest: Any, folder: Path) -> None:
    # Folders count too: an empty class folder changes what the reader accepts.
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_dir():
            digest.update(name.encode() + b"/\0")
        elif path.is_file():
            digest.update(name.encode() + b"\0")
            _hash_into(digest, path)


def _hash_into(digest: Any, path: Path) -> None:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(size.to_bytes(8, "little"))
        while chunk := f.read(1 << 20):
            digest.update(chunk)


def cached(
    kind: str, sources: Sequence[Path], decode: Callable[[], Decoded], cache_dir: str | os.PathLike | None
) -> Decoded:
    """``decode()``'s arrays and meta, from the cache when an entry for these sources exists."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = base / f"{kind}-{fingerprint(kind, sources)}"
    hit = _read_entry(entry)
    if hit is not None:
        log.info("loaded %s from cache %s", kind, entry)
        return hit
    arrays, meta = decode()
    try:
        _write_entry(entry, arrays, meta)
    except OSError as err:
        # A read-only home or a full disk must not stop training; it only costs the decode next time.
        warnings.warn(f"could not write the data cache {entry}: {err}", stacklevel=2)
    return arrays, meta


def _read_entry(entry: Path) -> Decoded | None:
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        arrays = {name: np.load(entry / f"{name}.npy", allow_pickle=False) for name in ARRAY_NAMES}
        shapes, sums = meta.get("_shapes", {}), meta.get("_sha256", {})
        if any(list(arrays[name].shape) != shapes.get(name) for name in ARRAY_NAMES):
            raise ValueError("array shapes differ from meta.json")
        changed = [name for name in ARRAY_NAMES if _array_sha256(arrays[name]) != sums.get(name)]
        if changed:
            raise ValueError(f"{', '.join(changed)} differ from the checksums in meta.json")
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring a damaged data cache entry {entry} ({err}); decoding again", stacklevel=3)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    meta.pop("_shapes", None)
    meta.pop("_sha256", None)
    return arrays, meta


def _array_sha256(array: np.ndarray) -> str:
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    if array.size:  # an empty array (a split not read) has no bytes, and memoryview cannot cast it
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def _write_entry(entry: Path, arrays: Arrays, meta: dict[str, Any]) -> None:
    # Everything goes into a private folder that is renamed into place at the end, so readers (other
    # ranks, a concurrent run) never see half an entry; if another writer got there first, ours is dropped.
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        for name in ARRAY_NAMES:
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, np.ascontiguousarray(arrays[name]), allow_pickle=False)
        full_meta = {
            **meta,
            "_shapes": {name: list(arrays[name].shape) for name in ARRAY_NAMES},
            "_sha256": {name: _array_sha256(arrays[name]) for name in ARRAY_NAMES},
        }
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1))
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
