"""Named datasets: their metadata, where their files are searched for, and how they are decoded.

Search order for every dataset: the explicit ``root`` (and ``root/<name>``), then ``$ROBUSTKD_DATA``
(and ``$ROBUSTKD_DATA/<name>``), then the dataset's system or project folders, then earlier downloads
under the cache folder. A named subfolder is tried before its parent because MNIST and Fashion-MNIST use
the same file names. The file actually used is recorded in ``Dataset.source`` and logged.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The sibling modules themselves, not the package: its __init__ imports this module.
import robustkd.data.cache as cache
import robustkd.data.cifar as cifar
import robustkd.data.idx as idx
import robustkd.data.imagefolder as imagefolder
import robustkd.data.sources as sources
from robustkd.data.base import Dataset, DatasetInfo, Split
from robustkd.data.sources import (
    RESOURCES,
    check_root,
    default_cache_dir,
    env_data_dir,
    fetch,
    missing_message,
    unique_paths,
)
from robustkd.errors import ConfigError, DataError
from robustkd.registry import Registry

log = logging.getLogger("robustkd.data")

Loader = Callable[..., Dataset]
DATASETS: Registry[Loader] = Registry("dataset")

FASHION_MNIST = DatasetInfo(
    name="fashion-mnist",
    num_classes=10,
    input_shape=(1, 28, 28),
    mean=(0.2860,),
    std=(0.3530,),
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    default_augment="none",
)
MNIST = DatasetInfo(
    name="mnist",
    num_classes=10,
    input_shape=(1, 28, 28),
    mean=(0.1307,),
    std=(0.3081,),
    classes=tuple(str(d) for d in range(10)),
    default_augment="none",
)
CIFAR10 = DatasetInfo(
    name="cifar10",
    num_classes=10,
    input_shape=(3, 32, 32),
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    default_augment="crop_flip",
)

# Folders a system package installs into; a module attribute so tests can point it elsewhere.
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
    "mnist": (Path("/usr/share/datasets/mnist"),),
}
_TORCHVISION_DIRS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_INSTALL_HINTS = {
    "fashion-mnist": "run `sudo apt-get install dataset-fashion-mnist`, or ",
    "mnist": "",
}
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_JPEG_ZIP = "cifar10-jpeg.zip"


def _cache_base(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _search_bases(name: str, root: Path | None, cache_dir: str | os.PathLike | None, extra: list[Path]) -> list[Path]:
    env = env_data_dir()
    bases: list[Path | None] = [
        root / name if root else None,
        root,
        env / name if env else None,
        env,
        *extra,
        _cache_base(cache_dir) / "downloads" / name,
    ]
    return unique_paths(bases)


def _download_dir(name: str, root: Path | None, cache_dir: str | os.PathLike | None) -> Path:
    env = env_data_dir()
    if root is not None:
        return root / name
    if env is not None:
        return env / name
    return _cache_base(cache_dir) / "downloads" / name


def _splits(arrays: dict[str, np.ndarray]) -> tuple[Split, Split]:
    return (
        Split(_standard(arrays["train_images"]), _standard(arrays["train_labels"])),
        Split(_standard(arrays["test_images"]), _standard(arrays["test_labels"])),
    )


def _standard(array: np.ndarray) -> torch.Tensor:
    """A tensor with plain row-major strides.

    A size-1 axis may carry any stride (``images[:, None]`` gives the channel axis of grey images stride
    0). torch then also sees the batch as channels_last and may pick other kernels, so freshly decoded
    data and the same data read back from the cache would train to different weights.
    """
    tensor = torch.from_numpy(array)
    expected, step = [], 1
    for size in reversed(tensor.shape):
        expected.insert(0, step)
        step *= size
    if tensor.stride() != tuple(expected):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def _check_shape(info: DatasetInfo, arrays: dict[str, np.ndarray], source: Path) -> None:
    for key in ("train_images", "test_images"):
        if tuple(arrays[key].shape[1:]) != info.input_shape:
            raise DataError(
                f"{source}: {key.replace('_', ' ')} have shape {tuple(arrays[key].shape[1:])}, "
                f"{info.name} needs {info.input_shape}"
            )


# --- MNIST-like (IDX) ---------------------------------------------------------------------------------


def _idx_files(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in IDX_FILES.items():
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _load_idx_dataset(
    info: DatasetInfo,
    root: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Dataset:
    name = info.name
    root_path = check_root(root, create=download)
    bases = _search_bases(name, root_path, cache_dir, [*SYSTEM_DIRS.get(name, ())])
    if root_path is not None and name in _TORCHVISION_DIRS:  # torchvision's layout, for users who have one
        bases.insert(1, root_path / _TORCHVISION_DIRS[name] / "raw")
    files = next((f for f in map(_idx_files, bases) if f is not None), None)
    if files is None and download:
        dest = _download_dir(name, root_path, cache_dir)
        for resource in RESOURCES[name]:
            if not (dest / resource.filename).is_file():
                fetch(resource, dest)
        files = _idx_files(dest)
    if files is None:
        raise DataError(
            missing_message(
                f"{name} (IDX files)",
                [f"{stem}[.gz]" for stem in IDX_FILES.values()],
                bases,
                f"{_INSTALL_HINTS.get(name, '')}pass --data.root (or set $ROBUSTKD_DATA) to a folder "
                "holding the four files, or download them from Python: "
                f"robustkd.data.load_dataset({name!r}, download=True).",
            )
        )
    folder = files["train_images"].parent

    def decode() -> cache.Decoded:
        train_x, train_y = idx.read_idx_pair(files["train_images"], files["train_labels"], info.num_classes)
        test_x, test_y = idx.read_idx_pair(files["test_images"], files["test_labels"], info.num_classes)
        arrays = {
            "train_images": train_x,
            "train_labels": train_y,
            "test_images": test_x,
            "test_labels": test_y,
        }
        return arrays, {}

    arrays, _ = cache.cached(name, [files[k] for k in IDX_FILES], decode, cache_dir)
    _check_shape(info, arrays, folder)
    train, test = _splits(arrays)
    source = f"{name}: IDX files in {folder}"
    log.info("loaded %s", source)
    return Dataset(info, train, test, source)


DATASETS.add("fashion-mnist", functools.partial(_load_idx_dataset, FASHION_MNIST))
DATASETS.add("mnist", functools.partial(_load_idx_dataset, MNIST))


# --- CIFAR-10 -----------------------------------------------------------------------------------------


def _find_cifar10(bases: list[Path], root: Path | None) -> tuple[str, Path] | None:
    if root is not None and root.is_file():  # the archive itself was given
        if root.name.endswith((".tar.gz", ".tgz", ".tar")):
            return "binary", root
        return "jpeg", root
    # The official binary release anywhere beats the JPEG re-encoding: its pixels are the reference ones.
    for base in bases:
        for candidate in (base / cifar.ARCHIVE_NAME, base / cifar.FOLDER_NAME):
            if candidate.exists():
                return "binary", candidate
    for base in bases:
        if (base / CIFAR_JPEG_ZIP).is_file():
            return "jpeg", base / CIFAR_JPEG_ZIP
    return None


@DATASETS.register("cifar10")
def _load_cifar10(
    root: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Dataset:
    """CIFAR-10 from the official binary release, else from the JPEG image-folder zip (close, not exact)."""
    info = CIFAR10
    root_path = check_root(root, create=download)
    bases = _search_bases(info.name, root_path, cache_dir, sources.shared_data_dirs())
    found = _find_cifar10(bases, root_path)
    if found is None and download:
        dest = _download_dir(info.name, root_path, cache_dir)
        found = ("binary", fetch(RESOURCES[info.name][0], dest))
    if found is None:
        raise DataError(
            missing_message(
                "CIFAR-10",
                [cifar.ARCHIVE_NAME, f"{cifar.FOLDER_NAME}/", CIFAR_JPEG_ZIP],
                # the project's shared folder is worth naming only where it exists
                [b for b in bases if b.exists() or b not in sources.shared_data_dirs()],
                "pass --data.root (or set $ROBUSTKD_DATA) to a folder holding cifar-10-binary.tar.gz from "
                "https://www.cs.toronto.edu/~kriz/cifar.html, or download it from Python: "
                "robustkd.data.load_dataset('cifar10', download=True).",
            )
        )
    kind, path = found

    def decode() -> cache.Decoded:
        if kind == "binary":
            train_x, train_y, test_x, test_y = cifar.read_cifar10_binary(path)
        else:
            _, splits = imagefolder.read_image_folder(path, expected_classes=info.classes)
            (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
        return {
            "train_images": train_x,
            "train_labels": train_y,
            "test_images": test_x,
            "test_labels": test_y,
        }, {}

    arrays, _ = cache.cached(f"cifar10-{kind}", [path], decode, cache_dir)
    _check_shape(info, arrays, path)
    train, test = _splits(arrays)
    if kind == "binary":
        source = f"CIFAR-10, official binary release, {path}"
    else:
        source = (
            f"CIFAR-10 (JPEG), {path}: a JPEG re-encoding whose pixels are close to, not identical with, "
            "the official release; report numbers as CIFAR-10 (JPEG)"
        )
    log.info("loaded %s", source)
    return Dataset(info, train, test, source)


# --- generic image folders ----------------------------------------------------------------------------


@DATASETS.register("imagefolder")
def _load_imagefolder(
    root: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Dataset:
    """``root`` is a folder or zip of ``train/<class>/*`` and ``test/<class>/*`` images (png, jpg, bmp).

    Classes are the sorted train folder names; mean/std are measured on the train split. Greyscale
    folders default to no augmentation (flips can change a class, e.g. digits), colour ones to crop+flip.
    """
    if root is None:
        raise ConfigError("dataset 'imagefolder' needs a root: the folder or .zip holding train/ and test/")
    if download:
        raise ConfigError("dataset 'imagefolder' has nothing to download; drop download=True")
    check_root(root)
    path = Path(root).expanduser()

    def decode() -> cache.Decoded:
        classes, splits = imagefolder.read_image_folder(path)
        mean, std = imagefolder.channel_stats(splits["train"][0])
        arrays = {
            "train_images": splits["train"][0],
            "train_labels": splits["train"][1],
            "test_images": splits["test"][0],
            "test_labels": splits["test"][1],
        }
        meta: dict[str, Any] = {"classes": list(classes), "mean": list(mean), "std": list(std)}
        return arrays, meta

    arrays, meta = cache.cached("imagefolder", [path], decode, cache_dir)
    shape = tuple(int(s) for s in arrays["train_images"].shape[1:])
    info = DatasetInfo(
        name="imagefolder",
        num_classes=len(meta["classes"]),
        input_shape=(shape[0], shape[1], shape[2]),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        classes=tuple(meta["classes"]),
        default_augment="crop_flip" if shape[0] == 3 else "none",
    )
    _check_shape(info, arrays, path)
    train, test = _splits(arrays)
    source = f"image folder {path}"
    log.info("loaded %s", source)
    return Dataset(info, train, test, source)


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Dataset:
    """Loads a registered dataset as uint8 tensors on the CPU.

    ``root``: a folder to search first (for ``imagefolder``: the folder or zip itself). ``cache_dir``:
    where decoded arrays are kept (default ``$ROBUSTKD_CACHE`` or ``~/.cache/robustkd``). ``download``:
    fetch the official files (SHA-256 verified) when they are found nowhere.
    """
    return DATASETS.get(name)(root, cache_dir=cache_dir, download=download)
