"""robustkd.data: readers on tiny synthetic files, error messages, cache, splits, batches, augmentation,
the download path against a local HTTP server, and (marked) the real datasets on this machine."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import math
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

import robustkd.data as data
from robustkd.data import cache, catalog, idx, imagefolder, sources
from robustkd.data.augment import crop_padding, random_crop
from robustkd.errors import ConfigError, DataError, RegistryError

# Taken before the autouse fixture below redirects the cache, so the slow CIFAR test can reuse the
# user's cache across runs instead of decoding 60 000 JPEGs every time.
USER_CACHE = sources.default_cache_dir()
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SHARED_CIFAR_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.zip"
CIFAR_CLASSES = data.CIFAR10.classes


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No user data folder, a private cache, and no system folders unless a test puts them back."""
    monkeypatch.delenv("ROBUSTKD_DATA", raising=False)
    monkeypatch.setenv("ROBUSTKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(catalog, "SYSTEM_DIRS", {"fashion-mnist": (tmp_path / "no-system",)})
    monkeypatch.setattr(sources, "shared_data_dirs", lambda: [tmp_path / "no-shared"])


# --- synthetic files ----------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = magic if magic is not None else 0x0800 + array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def make_idx(folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = True, seed: int = 0) -> dict:
    """Four IDX files with random 28x28 images and labels cycling through 0..9."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": ((np.arange(n_test) + 3) % 10).astype(np.uint8),
    }
    suffix = ".gz" if gz else ""
    for key, stem in catalog.IDX_FILES.items():
        write_idx(folder / f"{stem}{suffix}", arrays[key])
    return arrays


def cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    return b"".join(bytes([int(y)]) + x.tobytes() for x, y in zip(images, labels))


def make_cifar_tar(path: Path, per_batch: int = 4, extra: dict[str, bytes] | None = None, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out: dict = {"train_images": [], "train_labels": []}
    members = {}
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).astype(np.uint8)
        members[f"cifar-10-batches-bin/data_batch_{i}.bin"] = cifar_records(x, y)
        out["train_images"].append(x)
        out["train_labels"].append(y)
    out = {k: np.concatenate(v) for k, v in out.items()}
    out["test_images"] = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
    out["test_labels"] = rng.integers(0, 10, per_batch).astype(np.uint8)
    members["cifar-10-batches-bin/test_batch.bin"] = cifar_records(out["test_images"], out["test_labels"])
    members["cifar-10-batches-bin/batches.meta.txt"] = "\n".join(CIFAR_CLASSES).encode()
    members.update(extra or {})
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return out


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "ant", "bee"),
    counts: tuple[int, int] = (3, 2),
    size: tuple[int, int] = (8, 6),
    rgb: bool = True,
    seed: int = 0,
) -> dict[str, dict[str, list[np.ndarray]]]:
    """split/class/NNN.png with random pixels; returns the arrays written, per split and class."""
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, list[np.ndarray]]] = {}
    for split, count in zip(("train", "test"), counts):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shape = (size[1], size[0], 3) if rgb else (size[1], size[0])
                array = rng.integers(0, 256, shape, dtype=np.uint8)
                (folder / f"{i:03d}.png").write_bytes(png_bytes(array))
                written.setdefault(split, {}).setdefault(name, []).append(array)
    return written


def zip_folder(folder: Path, target: Path, prefix: str = "", reverse: bool = False) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(folder.rglob("*"), reverse=reverse):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(folder).as_posix())
    return target


def expected_split(written: dict, split: str, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Round-robin over the classes: the first image of every class (sorted names), then the second, ..."""
    images, labels = [], []
    longest = max(len(written[split].get(name, [])) for name in classes)
    for rank in range(longest):
        for label, name in enumerate(classes):
            arrays = written[split].get(name, [])
            if rank < len(arrays):
                images.append(arrays[rank].transpose(2, 0, 1) if arrays[rank].ndim == 3 else arrays[rank][None])
                labels.append(label)
    return np.stack(images), np.array(labels)


def test_image_folder_test_points_interleave_the_classes(tmp_path):
    # "The first N test points" of an evaluation must not be a single class.
    make_folder(tmp_path / "f", classes=("ant", "bee", "cat"), counts=(4, 4))
    ds = data.load_dataset("imagefolder", tmp_path / "f")
    assert ds.test.labels[:6].tolist() == [0, 1, 2, 0, 1, 2]


# --- IDX ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    arrays = make_idx(tmp_path / "d", gz=gz)
    ds = data.load_dataset("fashion-mnist", tmp_path / "d")
    assert ds.info is data.FASHION_MNIST
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert tuple(ds.train.images.shape) == (30, 1, 28, 28) and len(ds.test) == 10
    np.testing.assert_array_equal(ds.train.images[:, 0].numpy(), arrays["train_images"])
    np.testing.assert_array_equal(ds.test.labels.numpy(), arrays["test_labels"])
    assert str(tmp_path / "d") in ds.source


def test_named_subfolder_wins_over_shared_names(tmp_path, monkeypatch):
    # MNIST and Fashion-MNIST share file names: <root>/mnist must beat files lying in <root> itself.
    make_idx(tmp_path, seed=1)
    digits = make_idx(tmp_path / "mnist", seed=2)
    ds = data.load_dataset("mnist", tmp_path)
    np.testing.assert_array_equal(ds.train.images[:, 0].numpy(), digits["train_images"])
    # $ROBUSTKD_DATA is searched when no root is given.
    monkeypatch.setenv("ROBUSTKD_DATA", str(tmp_path))
    assert torch.equal(data.load_dataset("mnist").train.images, ds.train.images)


def test_missing_idx_lists_places_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTKD_DATA", str(tmp_path / "env"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        data.load_dataset("fashion-mnist", tmp_path / "empty")
    message = str(err.value)
    for place in (tmp_path / "empty", tmp_path / "empty" / "fashion-mnist", tmp_path / "env", tmp_path / "no-system"):
        assert f"- {place}\n" in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data.root" in message
    assert "train-images-idx3-ubyte" in message


def test_root_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_dataset("mnist", tmp_path / "typo")


def _corrupt(folder: Path, stem: str, how: str) -> Path:
    path = folder / f"{stem}.gz"
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":
        path.write_bytes(raw[:10] + bytes(b ^ 0xFF for b in raw[10:]))
    return path


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_broken_gzip_names_the_file(tmp_path, how):
    make_idx(tmp_path)
    bad = _corrupt(tmp_path, "train-images-idx3-ubyte", how)
    with pytest.raises(DataError, match="gzip") as err:
        data.load_dataset("fashion-mnist", tmp_path)
    assert str(bad) in str(err.value)


def test_not_gzip_despite_the_name(tmp_path):
    make_idx(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="not a gzip file") as err:
        data.load_dataset("fashion-mnist", tmp_path)
    assert str(bad) in str(err.value)


def test_wrong_idx_magic(tmp_path):
    make_idx(tmp_path)
    bad = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((30, 28, 28)), magic=2049)
    with pytest.raises(DataError, match="magic number 2049") as err:
        data.load_dataset("fashion-mnist", tmp_path)
    assert str(bad) in str(err.value) and "2051" in str(err.value)


def test_truncated_idx_payload(tmp_path):
    make_idx(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        data.load_dataset("fashion-mnist", tmp_path)
    assert str(path) in str(err.value)


def test_image_label_count_mismatch(tmp_path):
    make_idx(tmp_path)
    labels = write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29))
    with pytest.raises(DataError, match="30 images but") as err:
        data.load_dataset("fashion-mnist", tmp_path)
    assert str(labels) in str(err.value) and "29 labels" in str(err.value)


def test_label_out_of_range(tmp_path):
    make_idx(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(10, 10))
    with pytest.raises(DataError, match="label 10 is out of range"):
        data.load_dataset("fashion-mnist", tmp_path)


def test_wrong_image_size_for_the_dataset(tmp_path):
    make_idx(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((30, 32, 32)))
    with pytest.raises(DataError, match=r"needs \(1, 28, 28\)"):
        data.load_dataset("fashion-mnist", tmp_path)


# --- cache --------------------------------------------------------------------------------------------


def _fail(*args, **kwargs):
    raise AssertionError("the decoder ran although a cache entry exists")


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    make_idx(tmp_path / "d")
    cache_dir = tmp_path / "my-cache"
    first = data.load_dataset("fashion-mnist", tmp_path / "d", cache_dir=cache_dir)
    entries = [p for p in cache_dir.iterdir() if p.is_dir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    assert sorted(p.name for p in entries[0].iterdir()) == [
        "meta.json",
        "test_images.npy",
        "test_labels.npy",
        "train_images.npy",
        "train_labels.npy",
    ]
    monkeypatch.setattr(idx, "read_idx_pair", _fail)
    second = data.load_dataset("fashion-mnist", tmp_path / "d", cache_dir=cache_dir)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    # New contents mean a new key: the stale entry must not be served.
    make_idx(tmp_path / "d", seed=5)
    with pytest.raises(AssertionError, match="decoder ran"):
        data.load_dataset("fashion-mnist", tmp_path / "d", cache_dir=cache_dir)


def test_cache_key_ignores_location_and_mtime(tmp_path):
    make_idx(tmp_path / "a")
    make_idx(tmp_path / "b")
    files = lambda d: [d / f"{stem}.gz" for stem in catalog.IDX_FILES.values()]  # noqa: E731
    assert cache.fingerprint("x", files(tmp_path / "a")) == cache.fingerprint("x", files(tmp_path / "b"))
    assert cache.fingerprint("x", files(tmp_path / "a")) != cache.fingerprint("y", files(tmp_path / "a"))


def test_damaged_cache_entry_is_decoded_again(tmp_path):
    make_idx(tmp_path / "d")
    cache_dir = tmp_path / "c"
    first = data.load_dataset("mnist", tmp_path / "d", cache_dir=cache_dir)
    (entry,) = cache_dir.iterdir()
    (entry / "train_images.npy").write_bytes(b"\x93NUMPY broken")
    with pytest.warns(UserWarning, match="damaged data cache"):
        again = data.load_dataset("mnist", tmp_path / "d", cache_dir=cache_dir)
    assert torch.equal(first.train.images, again.train.images)
    assert (entry / "train_images.npy").stat().st_size > 1000  # rewritten


def test_empty_class_folder_added_after_caching_is_seen(tmp_path):
    make_folder(tmp_path / "d")
    cache_dir = tmp_path / "c"
    data.load_dataset("imagefolder", tmp_path / "d", cache_dir=cache_dir)
    # Added later: the cached entry must not be served for a folder the reader refuses when fresh.
    (tmp_path / "d" / "train" / "dog").mkdir()
    with pytest.raises(DataError, match=r"train/dog/ is empty"):
        data.load_dataset("imagefolder", tmp_path / "d", cache_dir=cache_dir)


def test_cache_key_covers_empty_folders(tmp_path):
    make_folder(tmp_path / "d")
    before = cache.fingerprint("imagefolder", [tmp_path / "d"])
    (tmp_path / "d" / "test" / "extra").mkdir()
    assert cache.fingerprint("imagefolder", [tmp_path / "d"]) != before


def test_edited_cached_array_is_rebuilt(tmp_path):
    make_idx(tmp_path / "d")
    cache_dir = tmp_path / "c"
    first = data.load_dataset("mnist", tmp_path / "d", cache_dir=cache_dir)
    (entry,) = cache_dir.iterdir()
    labels = np.load(entry / "test_labels.npy")
    np.save(entry / "test_labels.npy", np.zeros_like(labels))  # same shape and dtype, wrong values
    with pytest.warns(UserWarning, match="test_labels differ from the checksums"):
        again = data.load_dataset("mnist", tmp_path / "d", cache_dir=cache_dir)
    assert torch.equal(first.test.labels, again.test.labels)
    assert np.array_equal(np.load(entry / "test_labels.npy"), labels)  # rewritten


# --- CIFAR-10 -----------------------------------------------------------------------------------------


def test_cifar_binary_round_trip(tmp_path):
    expected = make_cifar_tar(tmp_path / "cifar-10-binary.tar.gz")
    ds = data.load_dataset("cifar10", tmp_path)
    assert ds.info is data.CIFAR10 and "official binary" in ds.source
    assert tuple(ds.train.images.shape) == (20, 3, 32, 32) and len(ds.test) == 4
    np.testing.assert_array_equal(ds.train.images.numpy(), expected["train_images"])
    np.testing.assert_array_equal(ds.train.labels.numpy(), expected["train_labels"])
    np.testing.assert_array_equal(ds.test.images.numpy(), expected["test_images"])
    # The archive path itself works as root, and nothing was extracted beside it.
    same = data.load_dataset("cifar10", tmp_path / "cifar-10-binary.tar.gz")
    assert torch.equal(same.test.images, ds.test.images)
    assert not (tmp_path / "cifar-10-batches-bin").exists()


def test_cifar_binary_pixel_layout(tmp_path):
    # One record: label 7, then the red, green and blue planes in that order.
    red, green, blue = (np.full((32, 32), v, np.uint8) for v in (10, 20, 30))
    record = bytes([7]) + red.tobytes() + green.tobytes() + blue.tobytes()
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name in (*[f"data_batch_{i}.bin" for i in range(1, 6)], "test_batch.bin"):
        (folder / name).write_bytes(record)
    ds = data.load_dataset("cifar10", tmp_path)
    assert ds.train.labels.tolist() == [7] * 5
    assert ds.train.images[0, :, 5, 5].tolist() == [10, 20, 30]


def test_cifar_binary_beats_the_jpeg_zip(tmp_path):
    make_cifar_tar(tmp_path / "cifar-10-binary.tar.gz")
    make_folder(tmp_path / "jpeg", classes=CIFAR_CLASSES, counts=(1, 1), size=(32, 32))
    zip_folder(tmp_path / "jpeg", tmp_path / "cifar10-jpeg.zip")
    assert "official binary" in data.load_dataset("cifar10", tmp_path).source


def test_cifar_jpeg_zip_fallback(tmp_path):
    written = make_folder(tmp_path / "jpeg", classes=CIFAR_CLASSES, counts=(2, 1), size=(32, 32))
    zip_folder(tmp_path / "jpeg", tmp_path / "cifar10-jpeg.zip")
    ds = data.load_dataset("cifar10", tmp_path)
    assert "CIFAR-10 (JPEG)" in ds.source and "not identical" in ds.source
    images, labels = expected_split(written, "train", CIFAR_CLASSES)
    np.testing.assert_array_equal(ds.train.images.numpy(), images)
    np.testing.assert_array_equal(ds.train.labels.numpy(), labels)
    assert ds.info.mean == (0.4914, 0.4822, 0.4465)


def test_cifar_jpeg_zip_with_other_classes_is_refused(tmp_path):
    make_folder(tmp_path / "jpeg", classes=("cat", "dog"), counts=(1, 1), size=(32, 32))
    zip_folder(tmp_path / "jpeg", tmp_path / "cifar10-jpeg.zip")
    with pytest.raises(DataError, match="differ from the expected"):
        data.load_dataset("cifar10", tmp_path)


def test_cifar_missing_lists_places(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTKD_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as err:
        data.load_dataset("cifar10")
    message = str(err.value)
    assert "cifar-10-binary.tar.gz" in message and "cifar10-jpeg.zip" in message
    assert f"- {tmp_path / 'env'}\n" in message
    # The project's shared data folder is named only where it exists: elsewhere it is a path of another machine.
    assert str(tmp_path / "no-shared") not in message
    (tmp_path / "no-shared").mkdir()
    with pytest.raises(DataError) as err:
        data.load_dataset("cifar10")
    assert f"- {tmp_path / 'no-shared'}" in str(err.value)


def test_cifar_truncated_tar(tmp_path):
    path = tmp_path / "cifar-10-binary.tar.gz"
    make_cifar_tar(path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        data.load_dataset("cifar10", tmp_path)
    assert str(path) in str(err.value)


def test_cifar_tar_missing_a_batch(tmp_path):
    path = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
        info.size = 3073
        tar.addfile(info, io.BytesIO(bytes(3073)))
    with pytest.raises(DataError, match="lacks data_batch_2.bin") as err:
        data.load_dataset("cifar10", tmp_path)
    assert str(path) in str(err.value)


def test_cifar_record_size(tmp_path):
    path = tmp_path / "cifar-10-binary.tar.gz"
    make_cifar_tar(path, extra={"cifar-10-batches-bin/test_batch.bin": bytes(3073 * 2 + 5)})
    with pytest.raises(DataError, match="whole number of 3073-byte") as err:
        data.load_dataset("cifar10", tmp_path)
    assert "test_batch.bin" in str(err.value)


def test_cifar_tar_with_escaping_member_is_refused(tmp_path):
    path = tmp_path / "cifar-10-binary.tar.gz"
    make_cifar_tar(path, extra={"../escape.bin": b"x"})
    with pytest.raises(DataError, match="refusing the archive"):
        data.load_dataset("cifar10", tmp_path)
    assert not (tmp_path.parent / "escape.bin").exists()


# --- image folders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_zip", [False, True])
@pytest.mark.parametrize("rgb", [True, False])
def test_imagefolder_round_trip(tmp_path, as_zip, rgb):
    written = make_folder(tmp_path / "f", rgb=rgb)
    # Members stored in reverse order: the order inside a class must still be the sorted file names.
    root = zip_folder(tmp_path / "f", tmp_path / "f.zip", reverse=True) if as_zip else tmp_path / "f"
    ds = data.load_dataset("imagefolder", root)
    classes = ("ant", "bee", "cat")  # sorted, not in creation order
    assert ds.info.classes == classes and ds.info.num_classes == 3
    assert ds.info.input_shape == ((3 if rgb else 1), 6, 8)
    assert ds.info.default_augment == ("crop_flip" if rgb else "none")
    for split, got in (("train", ds.train), ("test", ds.test)):
        images, labels = expected_split(written, split, classes)
        np.testing.assert_array_equal(got.images.numpy(), images)
        np.testing.assert_array_equal(got.labels.numpy(), labels)
    train = expected_split(written, "train", classes)[0].astype(np.float64) / 255
    np.testing.assert_allclose(ds.info.mean, train.mean(axis=(0, 2, 3)), atol=1e-9)
    np.testing.assert_allclose(ds.info.std, train.std(axis=(0, 2, 3)), atol=1e-9)


def test_imagefolder_zip_wrapped_in_a_folder_with_litter(tmp_path):
    make_folder(tmp_path / "f")
    (tmp_path / "f" / "README.txt").write_text("beside the splits: ignored")
    (tmp_path / "f" / "train" / "ant" / ".DS_Store").write_bytes(b"\0")
    archive = zip_folder(tmp_path / "f", tmp_path / "f.zip", prefix="mydata/")
    ds = data.load_dataset("imagefolder", archive)
    assert len(ds.train) == 9 and len(ds.test) == 6


def test_imagefolder_mixed_colour_becomes_rgb(tmp_path):
    make_folder(tmp_path, classes=("a",), counts=(1, 1), rgb=True)
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    (tmp_path / "train" / "a" / "zz.png").write_bytes(png_bytes(grey))
    ds = data.load_dataset("imagefolder", tmp_path)
    assert ds.train.images.shape[1] == 3
    assert torch.equal(ds.train.images[1], torch.from_numpy(grey).expand(3, 6, 8))


def test_imagefolder_mixed_sizes(tmp_path):
    make_folder(tmp_path)
    odd = tmp_path / "train" / "bee" / "odd.png"
    odd.write_bytes(png_bytes(np.zeros((5, 5, 3), np.uint8)))
    with pytest.raises(DataError, match="mixed sizes") as err:
        data.load_dataset("imagefolder", tmp_path)
    assert str(odd) in str(err.value) and "5x5" in str(err.value)


def test_imagefolder_empty_class(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(DataError, match=r"train/dog/ is empty"):
        data.load_dataset("imagefolder", tmp_path)


def test_imagefolder_non_image_file(tmp_path):
    make_folder(tmp_path)
    notes = tmp_path / "train" / "ant" / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(DataError, match="not an image file") as err:
        data.load_dataset("imagefolder", tmp_path)
    assert str(notes) in str(err.value)


def test_imagefolder_undecodable_image_in_zip(tmp_path):
    make_folder(tmp_path / "f")
    (tmp_path / "f" / "test" / "cat" / "bad.png").write_bytes(b"\x89PNG not really")
    archive = zip_folder(tmp_path / "f", tmp_path / "f.zip")
    with pytest.raises(DataError, match="cannot decode") as err:
        data.load_dataset("imagefolder", archive)
    assert f"{archive}:test/cat/bad.png" in str(err.value)


def test_imagefolder_test_class_unknown_to_train(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "test" / "dog").mkdir()
    (tmp_path / "test" / "dog" / "0.png").write_bytes(png_bytes(np.zeros((6, 8, 3), np.uint8)))
    with pytest.raises(DataError, match="missing from train/: dog"):
        data.load_dataset("imagefolder", tmp_path)


def test_imagefolder_needs_both_splits(tmp_path):
    make_folder(tmp_path)
    archive = tmp_path / "only-train.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(tmp_path / "train" / "ant" / "000.png", "train/ant/000.png")
    with pytest.raises(DataError, match="no class folders under test/"):
        data.load_dataset("imagefolder", archive)


@pytest.mark.parametrize("evil", ["../evil.png", "/abs/evil.png", "train/ant/../../../evil.png"])
def test_zip_slip_is_refused(tmp_path, evil):
    make_folder(tmp_path / "f")
    archive = zip_folder(tmp_path / "f", tmp_path / "f.zip")
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr(zipfile.ZipInfo(evil), png_bytes(np.zeros((6, 8, 3), np.uint8)))
    with zipfile.ZipFile(archive) as z:
        assert evil in z.namelist()  # the archive really holds the hostile name
    with pytest.raises(DataError, match="refusing the archive") as err:
        data.load_dataset("imagefolder", archive)
    assert str(archive) in str(err.value) and repr(evil) in str(err.value)
    assert not (tmp_path / "evil.png").exists() and not Path("/abs/evil.png").exists()


def test_truncated_zip(tmp_path):
    make_folder(tmp_path / "f")
    archive = zip_folder(tmp_path / "f", tmp_path / "f.zip")
    archive.write_bytes(archive.read_bytes()[:-300])
    with pytest.raises(DataError, match="not a readable zip") as err:
        data.load_dataset("imagefolder", archive)
    assert str(archive) in str(err.value)


def test_imagefolder_arguments(tmp_path):
    with pytest.raises(ConfigError, match="needs a root"):
        data.load_dataset("imagefolder")
    with pytest.raises(DataError, match="does not exist"):
        data.load_dataset("imagefolder", tmp_path / "nope")


# --- registry and containers ---------------------------------------------------------------------------


def test_registered_datasets_and_unknown_names():
    assert {"fashion-mnist", "mnist", "cifar10", "imagefolder"} <= set(data.DATASETS.names())
    with pytest.raises(RegistryError, match="did you mean 'cifar10'"):
        data.load_dataset("cifar1O")


def test_split_validation_and_subset():
    split = data.Split(torch.arange(40, dtype=torch.uint8).view(10, 1, 2, 2), torch.arange(10))
    sub = split.subset(torch.tensor([7, 2]))
    assert sub.labels.tolist() == [7, 2] and sub.images[0].flatten().tolist() == [28, 29, 30, 31]
    assert len(split.subset(split.labels % 2 == 0)) == 5
    with pytest.raises(DataError, match="uint8"):
        data.Split(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(DataError, match="3 images but 2 labels"):
        data.Split(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))


# --- stratified split ----------------------------------------------------------------------------------


def test_stratified_split_sizes_and_properties():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((50, 30, 20, 7))])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]
    train, val = data.stratified_split(labels, 0.2, seed=1)
    # shares 10, 6, 4, 1.4 -> floors sum to 21 = round(107 * 0.2), so no leftovers
    assert torch.bincount(labels[val]).tolist() == [10, 6, 4, 1]
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(len(labels)))
    assert torch.all(train[1:] > train[:-1]) and torch.all(val[1:] > val[:-1])
    assert train.dtype == val.dtype == torch.int64
    again = data.stratified_split(labels, 0.2, seed=1)
    assert torch.equal(again[1], val) and torch.equal(again[0], train)
    assert not torch.equal(data.stratified_split(labels, 0.2, seed=2)[1], val)


def test_stratified_split_hands_leftovers_to_largest_remainders():
    labels = torch.arange(3).repeat_interleave(5)  # 5 per class at 10%: 0.5 each, round(1.5) = 2 in total
    _, val = data.stratified_split(labels, 0.1)
    assert torch.bincount(labels[val], minlength=3).tolist() == [1, 1, 0]


def test_stratified_split_zero_and_bad_fractions():
    labels = torch.arange(10) % 2
    train, val = data.stratified_split(labels, 0.0)
    assert torch.equal(train, torch.arange(10)) and val.numel() == 0
    for bad in (-0.1, 1.0, 1.5, math.nan, True, "0.1"):
        with pytest.raises(ConfigError, match="val_fraction"):
            data.stratified_split(labels, bad)


# --- batches -------------------------------------------------------------------------------------------


def _split(n: int = 23) -> data.Split:
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8)
    return data.Split(images, torch.arange(n) % 3)


def test_iterate_batches_covers_every_index_once():
    split = _split()
    batches = list(
        data.iterate_batches(split, 5, shuffle=True, generator=torch.Generator().manual_seed(0), device="cpu")
    )
    assert [len(b[0]) for b in batches] == [5, 5, 5, 5, 3]
    index = torch.cat([b[2] for b in batches])
    assert sorted(index.tolist()) == list(range(23)) and not torch.equal(index, torch.arange(23))
    for x, y, i in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and i.dtype == torch.int64
        assert torch.equal(x, split.images[i].float() / 255) and torch.equal(y, split.labels[i])
        assert x.min() >= 0 and x.max() <= 1
    dropped = list(data.iterate_batches(split, 5, shuffle=False, drop_last=True))
    assert [len(b[0]) for b in dropped] == [5, 5, 5, 5]
    assert torch.equal(torch.cat([b[2] for b in dropped]), torch.arange(20))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("n", "world_size"), [(10, 3), (2, 4), (12, 4)])
def test_iterate_batches_shards_like_distributed_sampler(n, world_size, shuffle):
    split = _split(n)
    per_rank = []
    for rank in range(world_size):
        batches = data.iterate_batches(
            split,
            2,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(7),
            rank=rank,
            world_size=world_size,
        )
        got = torch.cat([b[2] for b in batches]).tolist()
        sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=7)
        assert got == list(sampler)
        per_rank.append(got)
    assert len({len(r) for r in per_rank}) == 1  # same number of batches everywhere
    assert set().union(*per_rank) == set(range(n))


def test_iterate_batches_arguments():
    split = _split()
    with pytest.raises(ConfigError, match="generator seeded identically"):
        next(data.iterate_batches(split, 4, shuffle=True, world_size=2))
    with pytest.raises(ConfigError, match="rank"):
        next(data.iterate_batches(split, 4, shuffle=False, rank=2, world_size=2))
    with pytest.raises(ConfigError, match="batch_size"):
        next(data.iterate_batches(split, 0, shuffle=False))
    assert list(data.iterate_batches(_split(0), 4, shuffle=True)) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_iterate_batches_on_cuda():
    split = _split()
    on_device = split.to("cuda")
    for source in (split, on_device):
        for x, y, i in data.iterate_batches(source, 8, shuffle=True, device="cuda"):
            assert x.is_cuda and y.is_cuda and i.is_cuda
            # CUDA divides by multiplying with the reciprocal: equal to the CPU result within an ulp.
            torch.testing.assert_close(x.cpu(), split.images[i.cpu()].float() / 255, rtol=0, atol=1e-6)
            assert torch.equal(y.cpu(), split.labels[i.cpu()]) and x.max() <= 1


# --- augmentation --------------------------------------------------------------------------------------

FAST_AUGMENTS = ["none", "crop", "flip", "crop_flip"]
KORNIA_AUGMENTS = [name for name in data.AUGMENTS.names() if name not in FAST_AUGMENTS]


def _check_augment(name: str, info: data.DatasetInfo) -> None:
    augment = data.build_augment(name, info)
    if name == "none":
        assert augment is None
        return
    x = torch.rand(16, *info.input_shape)
    out = augment(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)  # 16 images: some must have moved


@pytest.mark.parametrize("info", [data.FASHION_MNIST, data.CIFAR10], ids=lambda i: i.name)
@pytest.mark.parametrize("name", FAST_AUGMENTS)
def test_augment_shape_and_range(name, info):
    _check_augment(name, info)


@pytest.mark.slow  # importing kornia alone takes about two seconds
@pytest.mark.parametrize("info", [data.FASHION_MNIST, data.CIFAR10], ids=lambda i: i.name)
@pytest.mark.parametrize("name", KORNIA_AUGMENTS)
def test_kornia_augment_shape_and_range(name, info):
    for _ in range(5):  # policies pick random operations; greyscale must survive the colour ones
        _check_augment(name, info)


def test_random_crop_is_a_zero_padded_shift():
    x = torch.rand(32, 2, 6, 5)
    out = random_crop(x, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = set()
    for k in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[k], padded[k, :, dy : dy + 6, dx : dx + 5])
        ]
        assert matches, f"image {k} is not a shifted copy"
        shifts.update(matches)
    assert len(shifts) > 5  # offsets vary per image


def test_flip_and_padding_rules():
    assert crop_padding(data.FASHION_MNIST) == 2 and crop_padding(data.CIFAR10) == 4
    x = torch.rand(64, 3, 4, 4)
    out = data.build_augment("flip", data.CIFAR10)(x)
    flipped = [torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54
    with pytest.raises(RegistryError):
        data.build_augment("mixup", data.CIFAR10)
    with pytest.raises(ConfigError, match="float batches"):
        data.build_augment("crop", data.CIFAR10)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


# --- downloads, against a local server ------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """(folder served, base URL) on 127.0.0.1; proxies are bypassed so nothing leaves the machine."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    folder = tmp_path / "www"
    folder.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=folder))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_verifies_the_checksum(tmp_path, server):
    folder, base = server
    (folder / "blob.bin").write_bytes(b"robustkd" * 100)
    good = sources.Resource("blob.bin", (base + "blob.bin",), hashlib.sha256(b"robustkd" * 100).hexdigest())
    path = sources.fetch(good, tmp_path / "dl")
    assert path == tmp_path / "dl" / "blob.bin" and path.read_bytes() == b"robustkd" * 100
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["blob.bin"]

    bad = sources.Resource("blob.bin", (base + "blob.bin",), "0" * 64)
    with pytest.raises(DataError, match="does not match") as err:
        sources.fetch(bad, tmp_path / "dl2")
    assert "blob.bin" in str(err.value) and base in str(err.value)
    assert list((tmp_path / "dl2").iterdir()) == []


def test_fetch_tries_the_next_mirror(tmp_path, server):
    folder, base = server
    (folder / "blob.bin").write_bytes(b"payload")
    resource = sources.Resource(
        "blob.bin", (base + "missing.bin", base + "blob.bin"), hashlib.sha256(b"payload").hexdigest()
    )
    assert sources.fetch(resource, tmp_path / "dl").read_bytes() == b"payload"
    with pytest.raises(DataError, match="404"):
        sources.fetch(sources.Resource("x", (base + "missing.bin",), "0" * 64), tmp_path / "dl")


def test_load_dataset_downloads_when_absent(tmp_path, server, monkeypatch):
    folder, base = server
    arrays = make_idx(folder)
    table = tuple(
        sources.Resource(f"{stem}.gz", (base + f"{stem}.gz",), sources.sha256_file(folder / f"{stem}.gz"))
        for stem in catalog.IDX_FILES.values()
    )
    monkeypatch.setitem(sources.RESOURCES, "mnist", table)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="not found"):
        data.load_dataset("mnist", tmp_path / "data")
    ds = data.load_dataset("mnist", tmp_path / "data", download=True)
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(r.filename for r in table)
    from robustkd.io import FILE_MODE

    assert all(p.stat().st_mode & 0o777 == FILE_MODE for p in (tmp_path / "data" / "mnist").iterdir())
    np.testing.assert_array_equal(ds.train.images[:, 0].numpy(), arrays["train_images"])
    # A tampered mirror: nothing is saved and the dataset stays missing.
    monkeypatch.setitem(sources.RESOURCES, "mnist", (sources.Resource(table[0].filename, table[0].urls, "f" * 64),))
    with pytest.raises(DataError, match="does not match"):
        data.load_dataset("mnist", tmp_path / "other", download=True)
    assert list((tmp_path / "other" / "mnist").iterdir()) == []


def test_official_download_table():
    for name in ("fashion-mnist", "mnist", "cifar10"):
        for resource in sources.RESOURCES[name]:
            assert len(resource.sha256) == 64 and int(resource.sha256, 16) >= 0
            assert all(url.endswith("/" + resource.filename) for url in resource.urls)


# --- the real datasets on this machine ----------------------------------------------------------------


def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(catalog, "SYSTEM_DIRS", {"fashion-mnist": (FMNIST_DIR,)})
    ds = data.load_dataset("fashion-mnist")
    assert str(FMNIST_DIR) in ds.source
    assert tuple(ds.train.images.shape) == (60000, 1, 28, 28) and ds.train.images.dtype == torch.uint8
    assert tuple(ds.test.images.shape) == (10000, 1, 28, 28)
    assert torch.bincount(ds.train.labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
    mean, std = imagefolder.channel_stats(ds.train.images.numpy())
    assert mean[0] == pytest.approx(ds.info.mean[0], abs=5e-4) and std[0] == pytest.approx(ds.info.std[0], abs=5e-4)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR_ZIP.is_file(), reason=f"CIFAR-10 JPEG zip not found at {SHARED_CIFAR_ZIP}")
def test_real_cifar10_jpeg(monkeypatch):
    monkeypatch.setattr(sources, "shared_data_dirs", lambda: [SHARED_CIFAR_ZIP.parent])
    ds = data.load_dataset("cifar10", cache_dir=USER_CACHE)
    assert "CIFAR-10 (JPEG)" in ds.source and str(SHARED_CIFAR_ZIP) in ds.source
    assert tuple(ds.train.images.shape) == (50000, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert tuple(ds.test.images.shape) == (10000, 3, 32, 32)
    assert torch.bincount(ds.train.labels).tolist() == [5000] * 10
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
    # The folders are read round-robin over the classes: any head of a split is balanced.
    assert torch.bincount(ds.test.labels[:100]).tolist() == [10] * 10
    assert torch.bincount(ds.train.labels[:1000]).tolist() == [100] * 10
    sample = ds.train.images[torch.randperm(50000)[:10000]].float() / 255
    assert torch.allclose(sample.mean(dim=(0, 2, 3)), torch.tensor(ds.info.mean), atol=0.005)
    assert torch.allclose(sample.std(dim=(0, 2, 3)), torch.tensor(ds.info.std), atol=0.005)


def test_randaugment_draws_one_sub_policy_per_image():
    # kornia alone draws one sub-policy per batch: 32 copies of one image come out in at most four forms
    # (each of its two operations applied or not).
    # The papers' loaders draw per image, so the copies must come out (nearly) all different.
    from robustkd.data.augment import AUGMENTS

    torch.manual_seed(0)
    policy = AUGMENTS.get("randaugment")(data.FASHION_MNIST)
    x = torch.rand(1, 1, 28, 28).repeat(32, 1, 1, 1)
    out = policy(x)
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    distinct = {tuple((row * 1000).round().tolist()) for row in out.flatten(1)}
    assert len(distinct) >= 10


@pytest.mark.parametrize("name", ["randaugment", "autoaugment"])
def test_policy_augmentation_sees_one_image_at_a_time(name, monkeypatch):
    from robustkd.data.augment import AUGMENTS

    policy = AUGMENTS.get(name)(data.CIFAR10)
    sizes: list[int] = []
    inner = policy.module.forward
    monkeypatch.setattr(policy.module, "forward", lambda x, *a, **k: sizes.append(len(x)) or inner(x, *a, **k))
    out = policy(torch.rand(5, 3, 32, 32))
    assert out.shape == (5, 3, 32, 32) and sizes == [1] * 5
