"""Reader for SVHN's cropped digits, ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB v5 files).

Each file holds ``X``, a 32x32x3xN uint8 array (height, width, channel, image), and ``y``, N x 1 labels
1..10 where 10 stands for the digit 0. ``scipy.io.loadmat`` parses the MATLAB format into plain arrays and
never runs code from the file; the two variables are still checked (numeric, the right shapes, labels in
range) before use.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from robustkd.data.sources import one_line_error
from robustkd.errors import DataError

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
_HW = (32, 32, 3)


def _load_mat(path: Path) -> dict[str, Any]:
    try:
        import scipy.io  # an optional dependency: only SVHN needs it
    except ImportError as err:
        raise DataError(f"{path}: reading SVHN's .mat files needs scipy; run `pip install scipy`") from err
    try:
        return scipy.io.loadmat(path, variable_names=("X", "y"))
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
