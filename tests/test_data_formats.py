"""The formats users already have: CIFAR-100 (binary release), SVHN (.mat), torchvision's pickled CIFAR folders
(read through a restricted unpickler) and test-only folders. Every file is written here, in its real format,
and what comes back is checked against what was written: pixels, labels, shapes and class counts."""

from __future__ import annotations

import codecs
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import robustkd.data as data
from robustkd.checkpoint import save_checkpoint
from robustkd.cli import main
from robustkd.data import catalog, pickled, sources
from robustkd.errors import ConfigError, DataError
from robustkd.jobs import chain, evaluate_checkpoint
from robustkd.models import create_model

IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No user data folder, a private cache, and no system or shared folders."""
    monkeypatch.delenv("ROBUSTKD_DATA", raising=False)
    monkeypatch.setenv("ROBUSTKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(catalog, "SYSTEM_DIRS", {})
    monkeypatch.setattr(sources, "shared_data_dirs", lambda: [tmp_path / "no-shared"])


def one_line(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


def run_apart(code: str, path: Path) -> str:
    """Run ``code`` (with ``path`` as sys.argv[1]) in a fresh interpreter; the last line of its stderr."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1, f"exit {done.returncode}: {done.stderr[-500:]}"
    return done.stderr.strip().splitlines()[-1]


def rng_images(rng: np.random.Generator, n: int, shape: tuple[int, ...] = (3, 32, 32)) -> np.ndarray:
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


# --- CIFAR-100, the binary release -------------------------------------------------------------------


def cifar100_records(images: np.ndarray, coarse: np.ndarray, fine: np.ndarray) -> bytes:
    """Each record: the coarse label byte, the fine label byte, then the 3072 pixel bytes (R, G, B planes)."""
    return b"".join(bytes([int(c), int(f)]) + x.tobytes() for x, c, f in zip(images, coarse, fine))


def cifar100_split(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"x": rng_images(rng, n), "coarse": rng.integers(0, 20, n), "fine": rng.integers(0, 100, n)}


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def make_cifar100_binary(root: Path, *, archive: bool = True, splits=("train", "test"), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    written = {split: cifar100_split(rng, 7 if split == "train" else 5) for split in splits}
    members = {
        f"cifar-100-binary/{s}.bin": cifar100_records(w["x"], w["coarse"], w["fine"]) for s, w in written.items()
    }
    members["cifar-100-binary/fine_label_names.txt"] = "\n".join(catalog.CIFAR100_CLASSES).encode()
    if archive:
        write_tar(root / "cifar-100-binary.tar.gz", members)
    else:
        for name, blob in members.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(blob)
    return written


@pytest.mark.parametrize("archive", [True, False])
def test_cifar100_binary_round_trip(tmp_path, archive):
    written = make_cifar100_binary(tmp_path, archive=archive)
    ds = data.load_dataset("cifar100", tmp_path)
    assert ds.info is data.CIFAR100 and ds.info.num_classes == 100 and len(ds.info.classes) == 100
    assert ds.info.mean == (0.5071, 0.4865, 0.4409) and ds.info.std == (0.2673, 0.2564, 0.2762)
    assert "CIFAR-100, official binary release" in ds.source
    assert tuple(ds.train.images.shape) == (7, 3, 32, 32) and tuple(ds.test.images.shape) == (5, 3, 32, 32)
    for split in ("train", "test"):
        got = getattr(ds, split)
        np.testing.assert_array_equal(got.images.numpy(), written[split]["x"])
        np.testing.assert_array_equal(got.labels.numpy(), written[split]["fine"])  # the fine labels, not coarse
        assert got.images.dtype == torch.uint8 and got.labels.dtype == torch.int64


def test_cifar100_archive_given_as_root(tmp_path):
    written = make_cifar100_binary(tmp_path)
    ds = data.load_dataset("cifar100", tmp_path / "cifar-100-binary.tar.gz")
    np.testing.assert_array_equal(ds.test.labels.numpy(), written["test"]["fine"])
    assert not (tmp_path / "cifar-100-binary").exists()  # nothing extracted


def test_cifar100_record_layout(tmp_path):
    # One record: coarse 3, fine 57, then the red, green and blue planes in that order.
    planes = [np.full((32, 32), v, np.uint8) for v in (10, 20, 30)]
    planes[0][4, 6] = 200  # row 4, column 6 of the red plane
    record = bytes([3, 57]) + b"".join(p.tobytes() for p in planes)
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    (folder / "train.bin").write_bytes(record * 2)
    (folder / "test.bin").write_bytes(record)
    ds = data.load_dataset("cifar100", tmp_path)
    assert ds.train.labels.tolist() == [57, 57] and ds.test.labels.tolist() == [57]
    assert ds.test.images[0, :, 5, 5].tolist() == [10, 20, 30]
    assert int(ds.test.images[0, 0, 4, 6]) == 200 and int(ds.test.images[0, 0, 6, 4]) == 10


def _damage_cifar100(folder: Path, how: str) -> Path:
    path = folder / "test.bin"
    blob = bytearray(path.read_bytes())
    if how == "truncated":
        del blob[-100:]
    elif how == "fine label":
        blob[3074 + 1] = 100
    else:
        blob[0] = 20
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "not a whole number of 3074-byte CIFAR-100 records"),
        ("fine label", "label 100 is out of range for 100 classes"),
        ("coarse label", "coarse label 20 is out of range for 20 classes"),
    ],
)
def test_cifar100_damaged_batch_names_the_file(tmp_path, how, message):
    make_cifar100_binary(tmp_path, archive=False)
    path = _damage_cifar100(tmp_path / "cifar-100-binary", how)
    with pytest.raises(DataError, match=message) as err:
        data.load_dataset("cifar100", tmp_path)
    one_line(err, path)


def test_cifar100_truncated_archive(tmp_path):
    make_cifar100_binary(tmp_path)
    path = tmp_path / "cifar-100-binary.tar.gz"
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        data.load_dataset("cifar100", tmp_path)
    one_line(err, path)


def test_cifar100_missing_lists_the_names(tmp_path):
    with pytest.raises(DataError) as err:
        data.load_dataset("cifar100", tmp_path)
    message = str(err.value)
    assert "cifar-100-binary.tar.gz" in message and "cifar-100-python/" in message and str(tmp_path) in message


# --- torchvision's pickled folders ----------------------------------------------------------------------


def py2_string(blob: bytes) -> bytes:
    """A Python 2 ``str`` as cPickle writes it: SHORT_BINSTRING or BINSTRING (read back as bytes)."""
    if len(blob) < 256:
        return b"U" + bytes([len(blob)]) + blob
    return b"T" + struct.pack("<I", len(blob)) + blob


DTYPE_STATE = (
    b"(K\x03" + py2_string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
)  # (3, '|', None x3, -1, -1, 0)


def py2_uint8_array(array: np.ndarray, dtype_state: bytes = DTYPE_STATE) -> bytes:
    """A C-ordered uint8 ndarray as numpy under Python 2 pickled it (protocol 2)."""
    shape = b"".join(b"J" + struct.pack("<i", d) for d in array.shape) + b"\x86"  # TUPLE2
    dtype = b"cnumpy\ndtype\n" + py2_string(b"u1") + b"K\x00K\x01\x87R" + dtype_state  # dtype('u1', 0, 1), BUILD
    return (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\n"
        + b"K\x00\x85"
        + py2_string(b"b")
        + b"\x87R"  # _reconstruct(ndarray, (0,), 'b')
        + b"(K\x01"
        + shape
        + dtype
        + b"\x89"  # NEWFALSE: not Fortran-ordered
        + py2_string(array.tobytes())
        + b"tb"  # state tuple, BUILD
    )


def py2_batch_pickle(
    images: np.ndarray, label_key: bytes, labels: list[int], dtype_state: bytes = DTYPE_STATE
) -> bytes:
    """A batch dict as the CIFAR release's Python 2 cPickle wrote it: str keys, an ndarray, a list of ints."""
    items = b"".join(b"K" + bytes([v]) for v in labels)
    return (
        b"\x80\x02}("  # PROTO 2, EMPTY_DICT, MARK
        + py2_string(b"batch_label")
        + py2_string(b"testing batch 1 of 1")
        + py2_string(b"data")
        + py2_uint8_array(images.reshape(len(images), -1), dtype_state)
        + py2_string(label_key)
        + b"]("
        + items
        + b"e"  # EMPTY_LIST, MARK, ints, APPENDS
        + b"u."  # SETITEMS, STOP
    )


def py3_batch_pickle(images: np.ndarray, label_key: bytes, labels: list[int]) -> bytes:
    """The same dict written by Python 3 with protocol 2 (bytes keys become codecs.encode calls)."""
    batch = {b"batch_label": b"testing batch 1 of 1", b"data": images.reshape(len(images), -1), label_key: labels}
    return pickle.dumps(batch, protocol=2)


WRITERS = {"python2": py2_batch_pickle, "python3": py3_batch_pickle}
PY_RELEASES = {
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}),
}


def make_py_folder(root: Path, dataset: str, writer: str = "python2", splits=("train", "test"), seed: int = 0) -> dict:
    """torchvision's folder for ``dataset`` with random batches; returns the images and labels per split."""
    folder_name, files = PY_RELEASES[dataset]
    label_key, classes = (b"labels", 10) if dataset == "cifar10" else (b"fine_labels", 100)
    folder = root / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split in splits:
        xs, ys = [], []
        for name in files[split]:
            x, y = rng_images(rng, 3), [int(v) for v in rng.integers(0, classes, 3)]
            (folder / name).write_bytes(WRITERS[writer](x, label_key, y))
            xs.append(x)
            ys.extend(y)
        written[split] = (np.concatenate(xs), np.array(ys))
    return written


def test_the_python2_writer_writes_what_the_release_holds():
    # The hand-assembled bytes unpickle (with the standard loader, on bytes this test made) to the batch dict.
    x = rng_images(np.random.default_rng(1), 2)
    batch = pickle.loads(py2_batch_pickle(x, b"labels", [3, 9]), encoding="bytes")
    assert set(batch) == {b"batch_label", b"data", b"labels"} and batch[b"labels"] == [3, 9]
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (2, 3072)
    np.testing.assert_array_equal(batch[b"data"], x.reshape(2, -1))


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("dataset", sorted(PY_RELEASES))
def test_pickled_folder_round_trip(tmp_path, dataset, writer):
    written = make_py_folder(tmp_path, dataset, writer)
    ds = data.load_dataset(dataset, tmp_path)
    assert "official Python (pickled) release" in ds.source and PY_RELEASES[dataset][0] in ds.source
    assert ds.info.num_classes == (10 if dataset == "cifar10" else 100) == len(ds.info.classes)
    n_train = 15 if dataset == "cifar10" else 3
    assert tuple(ds.train.images.shape) == (n_train, 3, 32, 32) and tuple(ds.test.images.shape) == (3, 3, 32, 32)
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(ds, split).images.numpy(), written[split][0])
        np.testing.assert_array_equal(getattr(ds, split).labels.numpy(), written[split][1])


def test_pickled_pixels_are_red_green_blue_planes(tmp_path):
    x = np.zeros((1, 3, 32, 32), np.uint8)
    x[0, 0, 1, 2], x[0, 1, 1, 2], x[0, 2, 1, 2] = 11, 22, 33
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    flat = x.reshape(1, -1)  # pixel (row 1, col 2) of plane c sits at c * 1024 + 1 * 32 + 2
    assert [int(flat[0, c * 1024 + 34]) for c in range(3)] == [11, 22, 33]
    for name in ("test_batch", *[f"data_batch_{i}" for i in range(1, 6)]):
        (folder / name).write_bytes(py2_batch_pickle(x, b"labels", [4]))
    ds = data.load_dataset("cifar10", tmp_path, splits=("test",))
    assert ds.test.images[0, :, 1, 2].tolist() == [11, 22, 33] and ds.test.labels.tolist() == [4]


# --- hostile pickles: refused, and nothing runs ---------------------------------------------------------


class Payload:
    """Pickles as a call of ``func(*args)``: what a hostile file makes the loader do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile(kind: str, marker: Path) -> tuple[object, str]:
    """An object whose unpickling would create ``marker``, and the global the loader must refuse."""
    command = f"touch {marker}"
    return {
        "os.system": (Payload(os.system, command), "os.system"),
        "builtins.eval": (Payload(eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
        "builtins.exec": (Payload(exec, f"open({str(marker)!r}, 'w')"), "builtins.exec"),
        "subprocess.call": (Payload(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
        "subprocess.Popen": (Payload(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
    }[kind]


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("where", ["top", "inside the dict"])
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec", "subprocess.call", "subprocess.Popen"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, kind, where, protocol):
    marker = tmp_path / "ran"
    payload, name = hostile(kind, marker)
    x = rng_images(np.random.default_rng(0), 2).reshape(2, -1)
    obj = payload if where == "top" else {b"data": x, b"labels": payload}
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    bad = folder / "test_batch"
    bad.write_bytes(pickle.dumps(obj, protocol=protocol))
    with pytest.raises(DataError) as err:
        data.load_dataset("cifar10", tmp_path, splits=("test",))
    message = one_line(err, bad)
    # os.system pickles as posix.system (nt.system on Windows), builtins as __builtin__ below protocol 3
    attr = name.partition(".")[2]
    assert "refusing the global" in message and attr in message and "nothing in it was run" in message
    assert not marker.exists()


def test_the_hostile_payload_is_live(tmp_path):
    # The same bytes under the standard loader do create the marker: the refusal above is what stopped it.
    marker = tmp_path / "ran"
    blob = pickle.dumps(hostile("os.system", marker)[0], protocol=2)
    with pytest.raises(DataError):
        _restricted(tmp_path, blob)
    assert not marker.exists()
    pickle.loads(blob)
    assert marker.exists()


def _restricted(tmp_path: Path, blob: bytes) -> object:
    path = tmp_path / "blob.pickle"
    path.write_bytes(blob)
    return pickled.load_batch(path)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (Payload(codecs.encode, "eval('1')", "rot13"), "codecs.encode with encoding 'rot13' is not allowed"),
        (Payload(codecs.encode, "abc", "zlib"), "codecs.encode with encoding 'zlib' is not allowed"),
        (Payload(bytes, 10**6), r"bytes\(...\) with arguments is not allowed"),
        (Payload(np.load, "x.npy"), "refusing the global numpy.load"),
        (Payload(getattr, "text", "upper"), r"refusing the global (__builtin__|builtins)\.getattr"),
    ],
)
def test_allowed_names_are_narrow(tmp_path, payload, message):
    with pytest.raises(DataError, match=message) as err:
        _restricted(tmp_path, pickle.dumps(payload, protocol=2))
    one_line(err, tmp_path / "blob.pickle")


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([1, 2, 3], "holds a list, not the dict of a CIFAR batch"),
        ({b"labels": [1]}, "has no 'data' entry"),
        ({b"data": np.zeros((1, 3072), np.uint8)}, "has no 'labels' entry"),
        ({b"data": np.zeros((1, 1000), np.uint8), b"labels": [1]}, "'data' must be a uint8 array of N x 3072"),
        ({b"data": np.zeros((1, 3072), np.int64), b"labels": [1]}, "'data' must be a uint8 array"),
        ({b"data": np.zeros((1, 3072), np.float32), b"labels": [1]}, "dtype 'f4' is not allowed"),
        ({b"data": np.array([[1] * 3072], dtype=object), b"labels": [1]}, "an ndarray state that is not"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "2 images but 1 'labels'"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, "label 10 is out of range for 10 classes"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [-1]}, "label -1 is out of range for 10 classes"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": ["cat"]}, "must be a list of integers"),
    ],
)
def test_damaged_pickled_batch_names_the_file(tmp_path, batch, message):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=message) as err:
        data.load_dataset("cifar10", tmp_path, splits=("test",))
    one_line(err, folder / "test_batch")


def test_a_state_that_crashes_numpy_is_refused(tmp_path):
    # numpy.dtype.__setstate__((3, '|', None, -1, -1, 0)) kills the interpreter (numpy 2.4); the loader never
    # hands numpy a state from the file. Run apart, so a regression fails this test instead of the session.
    bad_state = b"(K\x03" + py2_string(b"|") + b"NJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    path = tmp_path / "test_batch"
    path.write_bytes(py2_batch_pickle(rng_images(np.random.default_rng(0), 1), b"labels", [1], bad_state))
    code = "import sys, pathlib; from robustkd.data import pickled\n"
    code += "pickled.read_batch(pathlib.Path(sys.argv[1]), 'labels', 10)"
    last = run_apart(code, path)
    assert last.startswith("robustkd.errors.DataError: ") and "is not that of a plain integer dtype" in last


def test_truncated_pickle_names_the_file(tmp_path):
    make_py_folder(tmp_path, "cifar100", splits=("test",))
    path = tmp_path / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(DataError, match="not a readable CIFAR batch pickle") as err:
        data.load_dataset("cifar100", tmp_path, splits=("test",))
    one_line(err, path)


# --- SVHN ---------------------------------------------------------------------------------------------


def make_svhn(root: Path, splits=("train", "test"), seed: int = 0) -> dict:
    """``*_32x32.mat`` files: X is 32 x 32 x 3 x N uint8, y is N x 1 with 10 for the digit 0."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split in splits:
        n = 6 if split == "train" else 4
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10  # at least one zero digit
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    return written


def test_svhn_round_trip(tmp_path):
    written = make_svhn(tmp_path / "svhn")
    ds = data.load_dataset("svhn", tmp_path)
    assert ds.info is data.SVHN and ds.info.num_classes == 10 == len(ds.info.classes)
    assert ds.info.default_augment == "crop"  # no flips for digits
    assert tuple(ds.train.images.shape) == (6, 3, 32, 32) and tuple(ds.test.images.shape) == (4, 3, 32, 32)
    for split in ("train", "test"):
        x, y = written[split]
        got = getattr(ds, split)
        for n in range(x.shape[3]):  # image n, channel c, row h, column w is X[h, w, c, n]
            for c in range(3):
                np.testing.assert_array_equal(got.images[n, c].numpy(), x[:, :, c, n])
        expected = [0 if int(v) == 10 else int(v) for v in y[:, 0]]
        assert got.labels.tolist() == expected and got.labels[0] == 0


def _svhn_variables(how: str) -> dict:
    x = np.zeros((32, 32, 3, 2), np.uint8)
    y = np.array([[1], [2]], np.uint8)
    return {
        "X float": {"X": x.astype(np.float64), "y": y},
        "X shape": {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": y},
        "X cell": {"X": np.array([x, x], dtype=object), "y": y},
        "y text": {"X": x, "y": np.array(["ab"])},
        "y count": {"X": x, "y": np.array([[1], [2], [3]], np.uint8)},
        "y zero": {"X": x, "y": np.array([[1], [0]], np.uint8)},
        "y eleven": {"X": x, "y": np.array([[11], [2]], np.uint8)},
        "no y": {"X": x},
    }[how]


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("X float", "'X' must be uint8 of shape 32 x 32 x 3 x N"),
        ("X shape", "'X' must be uint8 of shape 32 x 32 x 3 x N"),
        ("X cell", "a variable of MATLAB class 1 \\(only real numeric matrices are read\\)"),
        ("y text", "a variable of MATLAB class 4"),
        ("y count", "'y' must hold 2 labels"),
        ("y zero", "label 0 is out of range; SVHN labels are 1..10"),
        ("y eleven", "label 11 is out of range"),
        ("no y", "no variable y"),
    ],
)
def test_svhn_damaged_file_names_the_file(tmp_path, how, message):
    path = tmp_path / "test_32x32.mat"
    scipy.io.savemat(path, _svhn_variables(how))
    with pytest.raises(DataError, match=message) as err:
        data.load_dataset("svhn", tmp_path, splits=("test",))
    one_line(err, path)


@pytest.mark.parametrize("compressed", [False, True])
def test_a_mat_file_that_crashes_scipy_is_refused(tmp_path, compressed):
    # scipy 1.17's compiled reader dies on a data element of unknown type; the structure check refuses the
    # file before scipy sees it. Run apart, so a regression fails this test instead of the session.
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [2]], np.uint8)})
    raw = bytearray(buffer.getvalue())
    at = 128 + 8 + 16 + (8 + 16) + 8  # X's tag, flags, dimensions (4 int32s), its small name element
    assert struct.unpack_from("<II", raw, at) == (2, 32 * 32 * 3 * 2)  # uint8 data, 6144 bytes
    struct.pack_into("<I", raw, at, 20)  # no MATLAB data type has number 20
    if compressed:  # the same matrix inside a compressed element
        matrix = bytes(raw[128:])[: 8 + struct.unpack_from("<I", raw, 132)[0]]
        packed = zlib.compress(matrix)
        raw = raw[:128] + struct.pack("<II", 15, len(packed)) + packed
    path = tmp_path / "test_32x32.mat"
    path.write_bytes(bytes(raw))
    last = run_apart(
        "import sys, pathlib; from robustkd.data import svhn; svhn.read_svhn_mat(pathlib.Path(sys.argv[1]))", path
    )
    assert last.startswith("robustkd.errors.DataError: ") and "with data type 20" in last and str(path) in last


@pytest.mark.parametrize("how", ["truncated", "not a mat file"])
def test_svhn_unreadable_file_names_the_file(tmp_path, how):
    make_svhn(tmp_path, splits=("test",))
    path = tmp_path / "test_32x32.mat"
    path.write_bytes(path.read_bytes()[:3000] if how == "truncated" else b"<html>404 not found</html>" * 10)
    with pytest.raises(DataError, match="not a readable .mat file") as err:
        data.load_dataset("svhn", tmp_path, splits=("test",))
    one_line(err, path)


# --- test-only folders ----------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def make_idx_test_only(folder: Path, n: int = 9) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) * 7 % 10).astype(np.uint8)
    write_idx(folder / IDX_STEMS["test_images"], x)
    write_idx(folder / IDX_STEMS["test_labels"], y)
    return x, y


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_test_only_folder_serves_the_test_split(tmp_path, name):
    x, y = make_idx_test_only(tmp_path / name)
    ds = data.load_dataset(name, tmp_path, splits=("test",))
    np.testing.assert_array_equal(ds.test.images[:, 0].numpy(), x)
    np.testing.assert_array_equal(ds.test.labels.numpy(), y)
    assert tuple(ds.train.images.shape) == (0, 1, 28, 28) and len(ds.train) == 0
    with pytest.raises(DataError, match="holds the test files but not train-images-idx3-ubyte") as err:
        data.load_dataset(name, tmp_path)  # training asks for both splits
    message = one_line(err, tmp_path / name)
    assert "training needs them" in message and "train-labels-idx1-ubyte" in message


def test_idx_test_only_is_cached_apart_from_the_full_set(tmp_path):
    make_idx_test_only(tmp_path / "mnist")
    first = data.load_dataset("mnist", tmp_path, splits="test")
    again = data.load_dataset("mnist", tmp_path, splits=["test"])
    assert torch.equal(first.test.images, again.test.images)
    entries = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir())
    assert entries == ["mnist-test"]


def _make_test_only(tmp_path: Path, layout: str) -> tuple[str, Path, np.ndarray, np.ndarray]:
    """(dataset, the folder written, test images, test labels) for a folder holding only the test files."""
    rng = np.random.default_rng(5)
    if layout == "cifar10 binary":
        x, y = rng_images(rng, 4), rng.integers(0, 10, 4)
        folder = tmp_path / "cifar-10-batches-bin"
        folder.mkdir(parents=True)
        (folder / "test_batch.bin").write_bytes(b"".join(bytes([int(v)]) + i.tobytes() for i, v in zip(x, y)))
        return "cifar10", folder, x, y
    if layout == "cifar100 binary":
        w = make_cifar100_binary(tmp_path, archive=False, splits=("test",))["test"]
        return "cifar100", tmp_path / "cifar-100-binary", w["x"], w["fine"]
    if layout == "svhn":
        x, y = make_svhn(tmp_path, splits=("test",))["test"]
        return "svhn", tmp_path, x.transpose(3, 2, 0, 1), y[:, 0] % 10
    dataset = layout.split()[0]
    x, y = make_py_folder(tmp_path, dataset, splits=("test",))["test"]
    return dataset, tmp_path / PY_RELEASES[dataset][0], x, y


@pytest.mark.parametrize("layout", ["cifar10 binary", "cifar10 python", "cifar100 binary", "cifar100 python", "svhn"])
def test_test_only_release_folders(tmp_path, layout):
    dataset, folder, x, y = _make_test_only(tmp_path, layout)
    ds = data.load_dataset(dataset, tmp_path, splits=("test",))
    np.testing.assert_array_equal(ds.test.images.numpy(), x)
    np.testing.assert_array_equal(ds.test.labels.numpy(), y)
    assert tuple(ds.train.images.shape) == (0, 3, 32, 32)
    with pytest.raises(DataError, match="training needs the train files|training needs them") as err:
        data.load_dataset(dataset, tmp_path)
    one_line(err, folder)


def test_training_passes_over_a_test_only_folder_to_a_full_one(tmp_path):
    # A test-only binary folder comes first in the search, but training needs both splits: the complete
    # pickled folder further on serves it; an evaluation takes the first one.
    _make_test_only(tmp_path / "a", "cifar10 binary")
    written = make_py_folder(tmp_path / "a", "cifar10")
    full = data.load_dataset("cifar10", tmp_path / "a")
    assert "Python (pickled)" in full.source
    np.testing.assert_array_equal(full.train.labels.numpy(), written["train"][1])
    assert "binary" in data.load_dataset("cifar10", tmp_path / "a", splits=("test",)).source


def test_unknown_split_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="^splits: \\['validation'\\] is not a non-empty choice"):
        data.load_dataset("mnist", tmp_path, splits=("validation",))
    with pytest.raises(ConfigError, match="^splits: \\[\\]"):
        data.load_dataset("svhn", tmp_path, splits=())


# --- the evaluation data path ---------------------------------------------------------------------------


def test_load_test_points_reads_a_test_only_folder(tmp_path):
    x, y = make_idx_test_only(tmp_path / "mnist", n=9)
    images, labels, n_total, source = chain.load_test_points({"dataset": "mnist"}, 5, str(tmp_path))
    assert n_total == 9 and str(tmp_path / "mnist") in source
    assert images.dtype == torch.float32 and tuple(images.shape) == (5, 1, 28, 28)
    torch.testing.assert_close(images, torch.from_numpy(x[:5, None].astype(np.float32)) / 255, rtol=0, atol=0)
    assert labels.tolist() == y[:5].tolist()


def _mnist_checkpoint(path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("dm_small", num_classes=10, in_channels=1, input_size=28, mean=[0.13], std=[0.31])
    meta = {"arch": "dm_small", "arch_args": {}, "num_classes": 10, "input_shape": [1, 28, 28]}
    save_checkpoint(path, model, {**meta, "mean": [0.13], "std": [0.31], "dataset": "mnist"})
    return model.eval()


def test_evaluate_runs_on_a_test_only_folder(tmp_path):
    x, y = make_idx_test_only(tmp_path / "data" / "mnist", n=8)
    model = _mnist_checkpoint(tmp_path / "run" / "best")
    with torch.no_grad():
        right = (model(torch.from_numpy(x[:, None]).float() / 255).argmax(1) == torch.from_numpy(y)).tolist()
    result = evaluate_checkpoint(
        tmp_path / "run" / "best", attacks=("clean",), data_root=str(tmp_path / "data"), device="cpu", progress=False
    )
    assert result["settings"]["n"] == 8 and result["attacks"]["clean"]["total"] == 8
    assert result["per_example"]["correct"]["clean"] == right
    assert result["data"] == {
        "dataset": "mnist",
        "source": f"mnist: IDX files in {tmp_path / 'data' / 'mnist'}",
        "split": "test",
    }
    # The command line takes the same path.
    out = tmp_path / "cli.json"
    args = ["--model", str(tmp_path / "run" / "best"), "--attacks", "clean", "--data.root", str(tmp_path / "data")]
    assert main(["evaluate", *args, "--device", "cpu", "--progress", "false", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["per_example"]["correct"]["clean"] == right


def test_list_datasets_shows_the_new_names(capsys):
    assert main(["list", "datasets"]) == 0
    names = capsys.readouterr().out.split()
    assert {"cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", "imagefolder"} <= set(names)


def test_jpeg_zip_evaluation_reuses_the_full_cache_entry(tmp_path, monkeypatch):
    # The JPEG zip is one file decoded whole: an evaluation after training must not decode it again.
    archive = tmp_path / "cifar10-jpeg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split in ("train", "test"):
            for name in data.CIFAR10.classes:
                buffer = io.BytesIO()
                Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, format="PNG")
                zf.writestr(f"{split}/{name}/0.png", buffer.getvalue())
    full = data.load_dataset("cifar10", tmp_path)
    assert len(full.train) == 10 and len(full.test) == 10

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(catalog.imagefolder, "read_image_folder", no_decoding)
    test_only = data.load_dataset("cifar10", tmp_path, splits=("test",))
    assert torch.equal(test_only.test.images, full.test.images) and len(test_only.train) == 0


@pytest.mark.parametrize("dataset", sorted(PY_RELEASES))
def test_root_may_be_the_release_folder_itself(tmp_path, dataset):
    written = make_py_folder(tmp_path, dataset, splits=("test",))
    ds = data.load_dataset(dataset, tmp_path / PY_RELEASES[dataset][0], splits=("test",))
    np.testing.assert_array_equal(ds.test.labels.numpy(), written["test"][1])
