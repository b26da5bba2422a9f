"""Reader for the official CIFAR-10 *binary* release (never the pickled Python one).

Each ``.bin`` file is a run of 3073-byte records: one label byte, then 32x32 red, green and blue planes.
Members are read straight out of the tar stream; nothing is extracted to disk.
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from robustkd.errors import DataError

ARCHIVE_NAME = "cifar-10-binary.tar.gz"
FOLDER_NAME = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
_SHAPE = (3, 32, 32)
_RECORD = 1 + 3 * 32 * 32


def is_unsafe_member(name: str) -> bool:
    """True for archive names that would escape an extraction folder (absolute, drive letters, ``..``)."""
    posix = name.replace("\\", "/")
    return posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or ".." in PurePosixPath(posix).parts


def parse_records(data: bytes, where: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from the bytes of one ``.bin`` file."""
    if not data or len(data) % _RECORD:
        raise DataError(
            f"{where}: {len(data)} bytes is not a whole number of {_RECORD}-byte CIFAR records; "
            "the file is truncated or not a CIFAR-10 binary batch"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD)
    labels = records[:, 0].astype(np.int64)
    if int(labels.max()) >= num_classes:
        raise DataError(f"{where}: label {int(labels.max())} is out of range for {num_classes} classes")
    return records[:, 1:].reshape(-1, *_SHAPE).copy(), labels


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


def read_cifar10_binary(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images, train labels, test images, test labels from the release tar.gz or its folder."""
    wanted = set(TRAIN_FILES + TEST_FILES)
    if path.is_dir():
        files = {name: path / name for name in wanted if (path / name).is_file()}
        missing = sorted(wanted - set(files))
        if missing:
            raise DataError(f"{path}: missing {', '.join(missing)} of the CIFAR-10 binary release")
        members = {name: p.read_bytes() for name, p in files.items()}
    else:
        members = _read_members(path, wanted)
        missing = sorted(wanted - set(members))
        if missing:
            raise DataError(f"{path}: archive lacks {', '.join(missing)}; is it the CIFAR-10 *binary* release?")
    train = [parse_records(members[name], f"{path}:{name}") for name in TRAIN_FILES]
    test = [parse_records(members[name], f"{path}:{name}") for name in TEST_FILES]
    return (
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        np.concatenate([x for x, _ in test]),
        np.concatenate([y for _, y in test]),
    )
