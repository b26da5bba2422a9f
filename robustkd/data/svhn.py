"""Reader for SVHN's cropped digits, ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB v5 files).

Each file holds ``X``, a 32x32x3xN uint8 array (height, width, channel, image), and ``y``, N x 1 labels
1..10 where 10 stands for the digit 0. ``scipy.io.loadmat`` parses the MATLAB format into plain arrays and
never runs code from the file, but its compiled reader trusts the sizes written in the file and crashes the
interpreter on some damaged ones. So the file's element structure is checked first, in plain Python: a
version-5 header, then only numeric, real, dense matrices whose every size agrees with the bytes present
(compressed elements are inflated to check them). The two variables are then checked again (numeric, the
right shapes, labels in range) before use.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from robustkd.data.sources import one_line_error
from robustkd.errors import DataError

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
_HW = (32, 32, 3)

# MATLAB v5 data types: the numeric ones with their sizes in bytes, and the containers.
_NUMERIC_SIZES = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8}
_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 5, 6, 14, 15
_NUMERIC_CLASSES = range(6, 16)  # mxDOUBLE_CLASS .. mxUINT64_CLASS
_COMPLEX_FLAG = 0x800


class _Layout(ValueError):
    """The file's element structure is not that of plain numeric MATLAB matrices."""


def _element(buf: bytes, pos: int, order: str) -> tuple[int, bytes, int]:
    """(type, data, position after the element and its padding) of the data element at ``pos``."""
    if len(buf) - pos < 8:
        raise _Layout("an element tag runs past the end")
    first, second = struct.unpack_from(f"{order}II", buf, pos)
    if first >> 16:  # the small format: 2-byte size, 2-byte type and up to 4 data bytes in 8 bytes
        size = first >> 16
        if size > 4:
            raise _Layout(f"a small element claims {size} bytes")
        return first & 0xFFFF, buf[pos + 4 : pos + 4 + size], pos + 8
    end = pos + 8 + second
    if end > len(buf):
        raise _Layout(f"an element claims {second} bytes, {len(buf) - pos - 8} are left")
    return first, buf[pos + 8 : end], end + (-second % 8)


def _check_matrix(body: bytes, order: str) -> None:
    """A matrix element must be flags, dimensions, name and one real numeric part, sizes agreeing."""
    parts, pos = [], 0
    for _ in range(4):
        kind, data, pos = _element(body, pos, order)
        parts.append((kind, data))
    (flags_type, flags), (dims_type, dims), (name_type, _), (data_type, values) = parts
    if flags_type != _MI_UINT32 or len(flags) != 8 or dims_type != _MI_INT32 or name_type != _MI_INT8:
        raise _Layout("a matrix without the flags, dimensions and name elements")
    word = struct.unpack_from(f"{order}I", flags)[0]
    if word & 0xFF not in _NUMERIC_CLASSES or word & _COMPLEX_FLAG:
        raise _Layout(f"a variable of MATLAB class {word & 0xFF} (only real numeric matrices are read)")
    if len(dims) < 8 or len(dims) % 4:
        raise _Layout("a matrix with a malformed dimensions element")
    shape = struct.unpack(f"{order}{len(dims) // 4}i", dims)
    if min(shape) < 0 or data_type not in _NUMERIC_SIZES:
        raise _Layout(f"a matrix of shape {shape} with data type {data_type}")
    if len(values) != math.prod(shape) * _NUMERIC_SIZES[data_type]:
        raise _Layout(f"a matrix of shape {shape} with {len(values)} data bytes")
    if len(body) - pos > 0:
        raise _Layout("a matrix with more elements than one real part")


def _inflate(body: bytes, order: str) -> bytes:
    """The matrix element inside a compressed element; inflated no further than its tag says."""
    stream = zlib.decompressobj()
    head = stream.decompress(body, 8)
    if len(head) < 8:
        raise _Layout("a compressed element too short for a tag")
    kind, size = struct.unpack(f"{order}II", head)
    if kind != _MI_MATRIX:
        raise _Layout(f"a compressed element holding data type {kind}, not a matrix")
    inner = stream.decompress(stream.unconsumed_tail, size) if size else b""
    if len(inner) < size:
        raise _Layout(f"a compressed matrix of {size} bytes inflates to {len(inner)}")
    return inner


def check_structure(raw: bytes) -> None:
    """Raise _Layout unless ``raw`` is a MATLAB v5 file of real numeric matrices only."""
    if len(raw) < 128:
        raise _Layout(f"{len(raw)} bytes is too short for the 128-byte MATLAB header")
    order = {b"IM": "<", b"MI": ">"}.get(raw[126:128])
    if order is None:
        raise _Layout("no MATLAB v5 header (a v4 file, or not a MATLAB file)")
    version = struct.unpack_from(f"{order}H", raw, 124)[0]
    if version != 0x0100:
        raise _Layout(f"MATLAB file version 0x{version:04x}" + (" (v7.3, HDF5)" if version == 0x0200 else ""))
    pos = 128
    while pos < len(raw):
        kind, body, _ = _element(raw, pos, order)
        pos += 8 + len(body)  # top-level elements are not padded
        if kind == _MI_COMPRESSED:
            body = _inflate(body, order)
        elif kind != _MI_MATRIX:
            raise _Layout(f"a top-level element of data type {kind}")
        _check_matrix(body, order)


def _load_mat(path: Path) -> dict[str, Any]:
    try:
        import scipy.io  # an optional dependency: only SVHN needs it
    except ImportError as err:
        raise DataError(f"{path}: reading SVHN's .mat files needs scipy; run `pip install scipy`") from err
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from err
    try:
        check_structure(raw)
    except (_Layout, zlib.error, struct.error) as err:
        raise DataError(f"{path}: not a readable .mat file of numeric matrices ({err}); fetch it again") from err
    try:
        return scipy.io.loadmat(io.BytesIO(raw), variable_names=("X", "y"))
    except NotImplementedError as err:  # MATLAB v7.3 files are HDF5, which loadmat does not read
        raise DataError(f"{path}: a MATLAB v7.3 (HDF5) file; SVHN's release files are v5, fetch them again") from err
    except (ValueError, TypeError, OSError, EOFError, struct.error, zlib.error, MemoryError) as err:
        raise DataError(f"{path}: not a readable .mat file ({one_line_error(err)}); fetch it again") from err


def _numeric(value: Any, name: str, path: Path) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "uif":
        kind = getattr(value, "dtype", type(value).__name__)
        raise DataError(f"{path}: {name!r} must be a numeric array, got {kind}; is it SVHN's cropped-digits file?")
    return value


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 in 0..9 from one SVHN ``*_32x32.mat`` file."""
    mat = _load_mat(path)
    missing = [name for name in ("X", "y") if name not in mat]
    if missing:
        raise DataError(f"{path}: no variable {' or '.join(missing)}; is it SVHN's cropped-digits (32x32) file?")
    x, y = _numeric(mat["X"], "X", path), _numeric(mat["y"], "y", path)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != _HW:
        raise DataError(f"{path}: 'X' must be uint8 of shape 32 x 32 x 3 x N, got {x.dtype} {x.shape}")
    if y.ndim not in (1, 2) or y.size != x.shape[3] or (y.ndim == 2 and 1 not in y.shape):
        raise DataError(f"{path}: 'y' must hold {x.shape[3]} labels (N x 1), got shape {y.shape}")
    labels = y.reshape(-1)
    if labels.size and (not np.all(labels == np.round(labels)) or labels.min() < 1 or labels.max() > 10):
        bad = labels[(labels != np.round(labels)) | (labels < 1) | (labels > 10)][0]
        raise DataError(f"{path}: label {bad} is out of range; SVHN labels are 1..10 (10 is the digit 0)")
    labels = labels.astype(np.int64) % 10  # the file's 10 is the digit 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels
