"""Readers for the official CIFAR-10 and CIFAR-100 *binary* releases (the pickled ones are in ``pickled.py``).

A CIFAR-10 ``.bin`` file is a run of 3073-byte records: one label byte, then 32x32 red, green and blue
planes. CIFAR-100's records carry two label bytes (coarse, then fine) before the same 3072 pixel bytes;
robustkd uses the fine labels (100 classes). Members are read straight out of the tar stream; nothing is
extracted to disk. Only the files of the splits asked for are read, so a folder holding just the test file
serves an evaluation.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from robustkd.errors import DataError

_SHAPE = (3, 32, 32)
_PIXELS = 3 * 32 * 32

SplitArrays = dict[str, tuple[np.ndarray, np.ndarray]]  # split name -> (images (N, C, H, W) uint8, labels (N,))


@dataclass(frozen=True)
class BinaryRelease:
    """One binary release: its archive and folder names, files per split and record layout."""

    title: str
    archive: str
    folder: str
    files: dict[str, tuple[str, ...]]  # split -> member names, in order
    label_limits: tuple[int, ...]  # one per label byte: each byte must be below its limit
    label_index: int  # which label byte is the class

    @property
    def record_size(self) -> int:
        return len(self.label_limits) + _PIXELS


CIFAR10_BINARY = BinaryRelease(
    "CIFAR-10",
    "cifar-10-binary.tar.gz",
    "cifar-10-batches-bin",
    {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
    (10,),
    0,
)
CIFAR100_BINARY = BinaryRelease(
    "CIFAR-100",
    "cifar-100-binary.tar.gz",
    "cifar-100-binary",
    {"train": ("train.bin",), "test": ("test.bin",)},
    (20, 100),
    1,
)
# The names the CIFAR-10 loader has always used.
ARCHIVE_NAME = CIFAR10_BINARY.archive
FOLDER_NAME = CIFAR10_BINARY.folder
TRAIN_FILES = CIFAR10_BINARY.files["train"]
TEST_FILES = CIFAR10_BINARY.files["test"]


def is_unsafe_member(name: str) -> bool:
    """True for archive names that would escape an extraction folder (absolute, drive letters, ``..``)."""
    posix = name.replace("\\", "/")
    return posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or ".." in PurePosixPath(posix).parts


def parse_records(
    data: bytes, where: str, num_classes: int = 10, release: BinaryRelease = CIFAR10_BINARY
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from the bytes of one ``.bin`` file."""
    size = release.record_size
    if not data or len(data) % size:
        raise DataError(
            f"{where}: {len(data)} bytes is not a whole number of {size}-byte {release.title} records; "
            f"the file is truncated or not a {release.title} binary batch"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, size)
    limits = list(release.label_limits)
    limits[release.label_index] = num_classes
    for column, limit in enumerate(limits):
        top = int(records[:, column].max())
        if top >= limit:
            what = "label" if column == release.label_index else "coarse label"
            raise DataError(f"{where}: {what} {top} is out of range for {limit} classes")
    labels = records[:, release.label_index].astype(np.int64)
    return records[:, len(limits) :].reshape(-1, *_SHAPE).copy(), labels


def _read_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path, wanted: set[str], found: dict[str, bytes]
) -> None:
    """Add ``member``'s bytes to ``found`` when it is one of the ``wanted`` files; refuse unsafe names."""
    if is_unsafe_member(member.name):
        raise DataError(f"{path}: refusing the archive, member {member.name!r} has an absolute path or '..'")
    base = PurePosixPath(member.name).name
    if base not in wanted or not member.isfile():
        return
    if base in found:
        raise DataError(f"{path}: holds {base} twice; cannot tell which one to use")
    handle = tar.extractfile(member)
    if handle is None:
        raise DataError(f"{path}: cannot read member {member.name!r}")
    found[base] = handle.read()


def _read_members(path: Path, wanted: set[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            # Walk in archive order: random access into a gzip stream would rewind and re-inflate.
            for member in tar:
                _read_member(tar, member, path, wanted, found)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DataError(f"{path}: corrupt or truncated tar.gz archive ({err}); delete it and fetch it again") from err
    return found


def missing_train_hint(splits: Sequence[str]) -> str:
    """What a 'files missing' message adds when the train files are among them."""
    if "train" in splits:
        return "; training needs the train files (an evaluation reads only the test files)"
    return ""


def _member_bytes(release: BinaryRelease, path: Path, splits: Sequence[str]) -> dict[str, bytes]:
    wanted = {name for split in splits for name in release.files[split]}
    if path.is_dir():
        missing = sorted(name for name in wanted if not (path / name).is_file())
        if missing:
            hint = missing_train_hint(splits)
            raise DataError(f"{path}: missing {', '.join(missing)} of the {release.title} binary release{hint}")
        return {name: (path / name).read_bytes() for name in wanted}
    members = _read_members(path, wanted)
    missing = sorted(wanted - set(members))
    if missing:
        raise DataError(
            f"{path}: archive lacks {', '.join(missing)}; is it the {release.title} *binary* release?"
            + missing_train_hint(splits)
        )
    return members


def _where(path: Path, name: str) -> str:
    """How messages name a batch: its path in a folder, ``archive:member`` in an archive."""
    return str(path / name) if path.is_dir() else f"{path}:{name}"


def read_binary(
    release: BinaryRelease, path: Path, splits: Sequence[str] = ("train", "test"), num_classes: int | None = None
) -> SplitArrays:
    """The asked ``splits`` of a binary release, from its tar.gz or its extracted folder."""
    members = _member_bytes(release, path, splits)
    limit = num_classes if num_classes is not None else release.label_limits[release.label_index]
    out: SplitArrays = {}
    for split in splits:
        parts = [parse_records(members[name], _where(path, name), limit, release) for name in release.files[split]]
        out[split] = (np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]))
    return out


def read_cifar10_binary(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images, train labels, test images, test labels from the CIFAR-10 release tar.gz or its folder."""
    splits = read_binary(CIFAR10_BINARY, path)
    return (*splits["train"], *splits["test"])
