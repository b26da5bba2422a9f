"""Reader for torchvision's pickled CIFAR folders, ``cifar-10-batches-py/`` and ``cifar-100-python/``.

Each batch file is a pickled dict (written by Python 2, protocol 2) with ``b'data'``, a uint8 array of
N x 3072 pixels (red, green, blue planes of 32x32), and ``b'labels'`` (CIFAR-10) or ``b'fine_labels'``
(CIFAR-100), lists of ints. A pickle can name any importable callable and have it called while loading, so
these files are read with :class:`BatchUnpickler`, whose ``find_class`` admits only the few numpy and
builtin names such a dict needs; anything else stops the load before it is called. Even the admitted numpy
names resolve to stand-ins that record what the file asks for: the arrays are then built with
``np.frombuffer`` from checked pieces, because numpy's own unpickling code crashes on some damaged states.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robustkd.data.cifar import SplitArrays, missing_train_hint
from robustkd.data.sources import one_line_error
from robustkd.errors import DataError

_SHAPE = (3, 32, 32)
_PIXELS = 3 * 32 * 32


def _latin1_bytes(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 writes bytes into a protocol-2 pickle as codecs.encode(text, "latin1"); no other codec
    # (zlib, base64, ...) is ever needed, so none is reachable.
    if not isinstance(text, str) or encoding != "latin1" or errors != "strict":
        raise pickle.UnpicklingError(f"codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _empty_bytes(*args: Any) -> bytes:
    # Python 3 writes b"" into a protocol-2 pickle as bytes(); bytes(n) would allocate n bytes.
    if args:
        raise pickle.UnpicklingError("bytes(...) with arguments is not allowed")
    return b""


# numpy's own unpickling code trusts its input: a damaged dtype state (e.g. a 6-tuple) crashes the
# interpreter. So numpy's names resolve to stand-ins that only record what the file asks for, and the
# array is built afterwards by np.frombuffer from checked pieces; numpy never parses the file's states.
_INTEGER_CODES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"}
_NDARRAY = object()  # stands for numpy.ndarray: only ever the first argument of _reconstruct


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value  # Python 2 str read as bytes


class _DtypeStub:
    """``numpy.dtype(spec, align, copy)`` as the file asks for it, and the state its BUILD gives."""

    __slots__ = ("spec", "state")

    def __init__(self, spec: Any) -> None:
        self.spec, self.state = _text(spec), None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def build(self) -> np.dtype:
        if self.spec not in _INTEGER_CODES:
            raise pickle.UnpicklingError(f"dtype {self.spec!r} is not allowed (integer arrays only)")
        state = self.state if self.state is not None else (3, "|", None, None, None)
        # (version, byte order, subarray, names, fields, ...): a plain dtype has no subarray or fields
        if not isinstance(state, tuple) or len(state) < 5 or any(v is not None for v in state[2:5]):
            raise pickle.UnpicklingError(f"dtype state {state!r:.80} is not that of a plain integer dtype")
        order = _text(state[1])
        if order not in ("|", "<", ">", "="):
            raise pickle.UnpicklingError(f"dtype byte order {order!r} is not allowed")
        plain = np.dtype(self.spec)
        return plain.newbyteorder(order) if order in ("<", ">") else plain


class _ArrayStub:
    """An ndarray the file asks for: its state (version, shape, dtype, Fortran order, raw bytes) is kept."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def build(self) -> np.ndarray:
        state = self.state
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("an ndarray without the (version, shape, dtype, order, data) state")
        shape, dtype, fortran, raw = state[-4:]
        if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
            raise pickle.UnpicklingError(f"ndarray shape {shape!r:.80} is not a tuple of sizes")
        if not isinstance(dtype, _DtypeStub) or not isinstance(fortran, bool) or not isinstance(raw, bytes):
            raise pickle.UnpicklingError("an ndarray state that is not (shape, dtype, order flag, bytes)")
        dt = dtype.build()
        if len(raw) != math.prod(shape) * dt.itemsize:
            raise pickle.UnpicklingError(
                f"ndarray of shape {shape} {dt} needs {math.prod(shape) * dt.itemsize} bytes, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if fortran else "C")


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayStub:
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError("_reconstruct of anything but numpy.ndarray is not allowed")
    return _ArrayStub()


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> _DtypeStub:
    return _DtypeStub(spec)


# (module, name) -> what is handed out; numpy's array helper moved (numpy.core -> numpy._core), files name either.
ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class BatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names in :data:`ALLOWED`; every other global is refused.

    Arrays come out of :meth:`load` as stand-ins; :func:`load_batch` builds them.
    """

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing the global {module}.{name}")
        return found


# Everything a hostile or damaged pickle can make the (restricted) loader raise.
_LOAD_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    MemoryError,
    OverflowError,
    RecursionError,
    UnicodeError,
)


def load_batch(path: Path) -> Any:
    """The object pickled in ``path``, unpickled with :class:`BatchUnpickler` (bytes stay bytes)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from err
    try:
        loaded = BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
        if isinstance(loaded, dict):  # a batch: its arrays are built from the checked pieces
            loaded = {key: value.build() if isinstance(value, _ArrayStub) else value for key, value in loaded.items()}
        return loaded
    except _LOAD_ERRORS as err:
        raise DataError(
            f"{path}: not a readable CIFAR batch pickle ({one_line_error(err)}); nothing in it was run. "
            "Fetch the file again from the official release"
        ) from err


def _field(batch: dict, key: str, path: Path) -> Any:
    for spelling in (key.encode(), key):  # bytes keys from Python 2 files, str keys from re-saved ones
        if spelling in batch:
            return batch[spelling]
    raise DataError(f"{path}: the batch dict has no {key!r} entry; is it a CIFAR batch of the Python release?")


def read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one pickled batch."""
    batch = load_batch(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: holds a {type(batch).__name__}, not the dict of a CIFAR batch")
    pixels, labels = _field(batch, "data", path), _field(batch, label_key, path)
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != _PIXELS:
        shape = getattr(pixels, "shape", None)
        raise DataError(f"{path}: 'data' must be a uint8 array of N x {_PIXELS}, got {type(pixels).__name__} {shape}")
    if not isinstance(labels, (list, np.ndarray)) or not all(isinstance(v, (int, np.integer)) for v in labels):
        raise DataError(f"{path}: {label_key!r} must be a list of integers")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(pixels):
        raise DataError(f"{path}: {len(pixels)} images but {len(labels)} {label_key!r}; the file is damaged")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise DataError(f"{path}: label {bad} is out of range for {num_classes} classes")
    return pixels.reshape(-1, *_SHAPE).copy(), labels


@dataclass(frozen=True)
class PickledRelease:
    """One pickled release: its folder name, files per split, label key and class count."""

    title: str
    folder: str
    files: dict[str, tuple[str, ...]]
    label_key: str
    num_classes: int


CIFAR10_PY = PickledRelease(
    "CIFAR-10",
    "cifar-10-batches-py",
    {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    "labels",
    10,
)
CIFAR100_PY = PickledRelease(
    "CIFAR-100", "cifar-100-python", {"train": ("train",), "test": ("test",)}, "fine_labels", 100
)


def read_pickled(release: PickledRelease, folder: Path, splits: Sequence[str] = ("train", "test")) -> SplitArrays:
    """The asked ``splits`` of a pickled release folder."""
    missing = [name for split in splits for name in release.files[split] if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{folder}: missing {', '.join(missing)} of the {release.title} Python release{missing_train_hint(splits)}"
        )
    out: SplitArrays = {}
    for split in splits:
        parts = [read_batch(folder / name, release.label_key, release.num_classes) for name in release.files[split]]
        out[split] = (np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]))
    return out
