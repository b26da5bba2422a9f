"""Named datasets: their metadata, where their files are searched for, and how they are decoded.

Search order for every dataset: the explicit ``root`` (and ``root/<name>``), then ``$ROBUSTKD_DATA``
(and ``$ROBUSTKD_DATA/<name>``), then the dataset's system or project folders, then earlier downloads
under the cache folder. A named subfolder is tried before its parent because MNIST and Fashion-MNIST use
the same file names. The file actually used is recorded in ``Dataset.source`` and logged.

Every loader takes ``splits``: an evaluation asks for ``("test",)`` and then needs only the test files
(the train split comes back empty); training asks for both and is told which train files are missing.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The sibling modules themselves, not the package: its __init__ imports this module.
import robustkd.data.cache as cache
import robustkd.data.cifar as cifar
import robustkd.data.find as find
import robustkd.data.idx as idx
import robustkd.data.imagefolder as imagefolder
import robustkd.data.pickled as pickled
import robustkd.data.sources as sources
import robustkd.data.svhn as svhn
from robustkd.data.base import Dataset, DatasetInfo, Split
from robustkd.data.cifar import SplitArrays
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
SPLITS = ("train", "test")

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
# The fine classes of CIFAR-100, in label order (the release's fine_label_names.txt).
CIFAR100_CLASSES = tuple(
    # one string, not a 100-line literal
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "  # noqa: SIM905
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm".split()
)
CIFAR100 = DatasetInfo(
    name="cifar100",
    num_classes=100,
    input_shape=(3, 32, 32),
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    classes=CIFAR100_CLASSES,
    default_augment="crop_flip",
)
SVHN = DatasetInfo(
    name="svhn",
    num_classes=10,
    input_shape=(3, 32, 32),
    mean=(0.4377, 0.4438, 0.4728),
    std=(0.1980, 0.2010, 0.1970),
    classes=tuple(str(d) for d in range(10)),
    default_augment="crop",  # a flipped digit is another digit, or none
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
IDX_NAMES: find.Names = {
    split: {key: (f"{stem}.gz", stem) for key, stem in IDX_FILES.items() if key.startswith(split)} for split in SPLITS
}
SVHN_NAMES: find.Names = {split: {split: (name,)} for split, name in svhn.FILES.items()}
CIFAR_JPEG_ZIP = "cifar10-jpeg.zip"
CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
SVHN_PAGE = "http://ufldl.stanford.edu/housenumbers/"


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


def check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    """The asked splits in canonical order; an empty or unknown one is a ConfigError."""
    asked = (splits,) if isinstance(splits, str) else tuple(splits)
    if not asked or any(s not in SPLITS for s in asked):
        raise ConfigError(f"splits: {list(asked)} is not a non-empty choice of {list(SPLITS)}")
    return tuple(s for s in SPLITS if s in asked)


def _cache_kind(kind: str, splits: tuple[str, ...]) -> str:
    # The full dataset keeps the cache entry name it always had; a partial one gets its own.
    return kind if splits == SPLITS else f"{kind}-{'-'.join(splits)}"


def _arrays(info: DatasetInfo, parts: SplitArrays) -> cache.Arrays:
    """The four arrays a Dataset is made of; a split not read is empty (0 images of the dataset's shape)."""
    empty = (np.zeros((0, *info.input_shape), np.uint8), np.zeros(0, np.int64))
    arrays: cache.Arrays = {}
    for split in SPLITS:
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = parts.get(split, empty)
    return arrays


def _splits(arrays: dict[str, np.ndarray]) -> tuple[Split, Split]:
    return (
        Split(_standard(arrays["train_images"]), _standard(arrays["train_labels"])),
        Split(_standard(arrays["test_images"]), _standard(arrays["test_labels"])),
    )


def _dataset(info: DatasetInfo, arrays: cache.Arrays, where: Path, source: str) -> Dataset:
    _check_shape(info, arrays, where)
    train, test = _splits(arrays)
    log.info("loaded %s", source)
    return Dataset(info, train, test, source)


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


def _idx_files(folder: Path, splits: Sequence[str] = SPLITS) -> dict[str, Path] | None:
    return find.files_in(folder, IDX_NAMES, splits)


def _idx_missing(name: str, bases: list[Path], splits: tuple[str, ...]) -> DataError:
    train_files = " and ".join(f"{IDX_FILES[k]}[.gz]" for k in IDX_NAMES["train"])
    partial = find.only_test_message(name, bases, IDX_NAMES, train_files) if "train" in splits else None
    wanted = [f"{IDX_FILES[k]}[.gz]" for split in splits for k in IDX_NAMES[split]]
    return DataError(
        partial
        or missing_message(
            f"{name} (IDX files)",
            wanted,
            bases,
            f"{_INSTALL_HINTS.get(name, '')}pass --data.root (or set $ROBUSTKD_DATA) to a folder "
            f"holding the {len(wanted)} files, or download them from Python: "
            f"robustkd.data.load_dataset({name!r}, download=True).",
        )
    )


def _load_idx_dataset(
    info: DatasetInfo,
    root: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    splits: Sequence[str] = SPLITS,
) -> Dataset:
    name, splits = info.name, check_splits(splits)
    root_path = check_root(root, create=download)
    bases = _search_bases(name, root_path, cache_dir, [*SYSTEM_DIRS.get(name, ())])
    if root_path is not None and name in _TORCHVISION_DIRS:  # torchvision's layout, for users who have one
        bases.insert(1, root_path / _TORCHVISION_DIRS[name] / "raw")
    files = find.find_files(bases, IDX_NAMES, splits)
    if files is None and download:
        dest = _download_dir(name, root_path, cache_dir)
        for resource in RESOURCES[name]:
            if not (dest / resource.filename).is_file():
                fetch(resource, dest)
        files = _idx_files(dest, splits)
    if files is None:
        raise _idx_missing(name, bases, splits)

    def decode() -> cache.Decoded:
        parts = {
            split: idx.read_idx_pair(files[f"{split}_images"], files[f"{split}_labels"], info.num_classes)
            for split in splits
        }
        return _arrays(info, parts), {}

    sources_read = [files[k] for k in IDX_FILES if k in files]
    arrays, _ = cache.cached(_cache_kind(name, splits), sources_read, decode, cache_dir)
    folder = sources_read[0].parent
    return _dataset(info, arrays, folder, f"{name}: IDX files in {folder}")


DATASETS.add("fashion-mnist", functools.partial(_load_idx_dataset, FASHION_MNIST))
DATASETS.add("mnist", functools.partial(_load_idx_dataset, MNIST))


# --- CIFAR-10 and CIFAR-100: binary and pickled releases ------------------------------------------------


def _layouts(binary: cifar.BinaryRelease, python: pickled.PickledRelease) -> list[find.Layout]:
    return [
        find.Layout("binary", binary.archive),
        find.Layout("binary", binary.folder, binary.files),
        find.Layout("python", python.folder, python.files),
    ]


def _read_release(
    kind: str, path: Path, binary: cifar.BinaryRelease, python: pickled.PickledRelease, splits: tuple[str, ...]
) -> SplitArrays:
    if kind == "binary":
        return cifar.read_binary(binary, path, splits)
    return pickled.read_pickled(python, path, splits)


def _release_source(title: str, kind: str, path: Path) -> str:
    return f"{title}, official {'binary' if kind == 'binary' else 'Python (pickled)'} release, {path}"


def _release_names(binary: cifar.BinaryRelease, python: pickled.PickledRelease) -> list[str]:
    return [binary.archive, f"{binary.folder}/", f"{python.folder}/"]


def _find_cifar10(bases: list[Path], root: Path | None, splits: tuple[str, ...]) -> tuple[str, Path] | None:
    if root is not None and root.is_file():  # the archive itself was given
        if root.name.endswith((".tar.gz", ".tgz", ".tar")):
            return "binary", root
        return "jpeg", root
    # The official releases anywhere beat the JPEG re-encoding: their pixels are the reference ones.
    found = find.find_release(bases, _layouts(cifar.CIFAR10_BINARY, pickled.CIFAR10_PY), splits)
    if found is not None:
        return found
    for base in bases:
        if (base / CIFAR_JPEG_ZIP).is_file():
            return "jpeg", base / CIFAR_JPEG_ZIP
    return None


def _decode_cifar10(kind: str, path: Path, splits: tuple[str, ...]) -> cache.Decoded:
    if kind == "jpeg":
        _, read = imagefolder.read_image_folder(path, expected_classes=CIFAR10.classes)
        parts = {split: read[split] for split in splits}
    else:
        parts = _read_release(kind, path, cifar.CIFAR10_BINARY, pickled.CIFAR10_PY, splits)
    return _arrays(CIFAR10, parts), {}


@DATASETS.register("cifar10")
def _load_cifar10(
    root: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    splits: Sequence[str] = SPLITS,
) -> Dataset:
    """CIFAR-10 from an official release (binary or pickled), else from the JPEG image-folder zip (close, not exact)."""
    info, splits = CIFAR10, check_splits(splits)
    root_path = check_root(root, create=download)
    bases = _search_bases(info.name, root_path, cache_dir, sources.shared_data_dirs())
    found = _find_cifar10(bases, root_path, splits)
    if found is None and download:
        dest = _download_dir(info.name, root_path, cache_dir)
        found = ("binary", fetch(RESOURCES[info.name][0], dest))
    if found is None:
        raise DataError(
            missing_message(
                "CIFAR-10",
                [*_release_names(cifar.CIFAR10_BINARY, pickled.CIFAR10_PY), CIFAR_JPEG_ZIP],
                # the project's shared folder is worth naming only where it exists
                [b for b in bases if b.exists() or b not in sources.shared_data_dirs()],
                "pass --data.root (or set $ROBUSTKD_DATA) to a folder holding cifar-10-binary.tar.gz from "
                f"{CIFAR_PAGE}, or download it from Python: robustkd.data.load_dataset('cifar10', download=True).",
            )
        )
    kind, path = found
    # The zip is decoded whole (it is one file), so one cache entry serves training and evaluation alike.
    read = SPLITS if kind == "jpeg" else splits
    decode = functools.partial(_decode_cifar10, kind, path, read)
    arrays, _ = cache.cached(_cache_kind(f"cifar10-{kind}", read), [path], decode, cache_dir)
    arrays = _arrays(info, {s: (arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in splits})
    if kind == "jpeg":
        source = (
            f"CIFAR-10 (JPEG), {path}: a JPEG re-encoding whose pixels are close to, not identical with, "
            "the official release; report numbers as CIFAR-10 (JPEG)"
        )
    else:
        source = _release_source("CIFAR-10", kind, path)
    return _dataset(info, arrays, path, source)


@DATASETS.register("cifar100")
def _load_cifar100(
    root: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    splits: Sequence[str] = SPLITS,
) -> Dataset:
    """CIFAR-100 (fine labels, 100 classes) from the official binary release or torchvision's pickled folder."""
    info, splits = CIFAR100, check_splits(splits)
    binary, python = cifar.CIFAR100_BINARY, pickled.CIFAR100_PY
    root_path = check_root(root, create=download)
    bases = _search_bases(info.name, root_path, cache_dir, sources.shared_data_dirs())
    if root_path is not None and root_path.is_file():  # the archive itself was given
        found: tuple[str, Path] | None = ("binary", root_path)
    else:
        found = find.find_release(bases, _layouts(binary, python), splits)
    if found is None:
        raise DataError(
            missing_message(
                "CIFAR-100",
                _release_names(binary, python),
                [b for b in bases if b.exists() or b not in sources.shared_data_dirs()],
                f"pass --data.root (or set $ROBUSTKD_DATA) to a folder holding {binary.archive} from {CIFAR_PAGE} "
                "(robustkd does not download CIFAR-100).",
            )
        )
    kind, path = found

    def decode() -> cache.Decoded:
        return _arrays(info, _read_release(kind, path, binary, python, splits)), {}

    arrays, _ = cache.cached(_cache_kind(f"cifar100-{kind}", splits), [path], decode, cache_dir)
    return _dataset(info, arrays, path, _release_source("CIFAR-100", kind, path))


# --- SVHN ---------------------------------------------------------------------------------------------


@DATASETS.register("svhn")
def _load_svhn(
    root: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    splits: Sequence[str] = SPLITS,
) -> Dataset:
    """SVHN cropped digits from ``train_32x32.mat`` and ``test_32x32.mat`` (labels 0..9; the file's 10 is 0)."""
    info, splits = SVHN, check_splits(splits)
    root_path = check_root(root, create=download)
    bases = _search_bases(info.name, root_path, cache_dir, [])
    files = find.find_files(bases, SVHN_NAMES, splits)
    if files is None:
        partial = find.only_test_message("svhn", bases, SVHN_NAMES, svhn.FILES["train"]) if "train" in splits else None
        raise DataError(
            partial
            or missing_message(
                "SVHN",
                [svhn.FILES[split] for split in splits],
                bases,
                f"pass --data.root (or set $ROBUSTKD_DATA) to a folder holding the cropped-digits files from "
                f"{SVHN_PAGE} (robustkd does not download SVHN).",
            )
        )

    def decode() -> cache.Decoded:
        return _arrays(info, {split: svhn.read_svhn_mat(files[split]) for split in splits}), {}

    arrays, _ = cache.cached(_cache_kind(info.name, splits), [files[s] for s in splits], decode, cache_dir)
    folder = files[splits[0]].parent
    return _dataset(info, arrays, folder, f"SVHN (cropped digits), .mat files in {folder}")


# --- generic image folders ----------------------------------------------------------------------------


@DATASETS.register("imagefolder")
def _load_imagefolder(
    root: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    splits: Sequence[str] = SPLITS,
) -> Dataset:
    """``root`` is a folder or zip of ``train/<class>/*`` and ``test/<class>/*`` images (png, jpg, bmp).

    Classes are the sorted train folder names; mean/std are measured on the train split. Greyscale
    folders default to no augmentation (flips can change a class, e.g. digits), colour ones to crop+flip.
    Both splits are always read, whatever ``splits`` asks: the train folders fix the classes and mean/std.
    """
    check_splits(splits)
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
    splits: Sequence[str] = SPLITS,
) -> Dataset:
    """Loads a registered dataset as uint8 tensors on the CPU.

    ``root``: a folder to search first (for ``imagefolder``: the folder or zip itself). ``cache_dir``:
    where decoded arrays are kept (default ``$ROBUSTKD_CACHE`` or ``~/.cache/robustkd``). ``download``:
    fetch the official files (SHA-256 verified) when they are found nowhere (MNIST, Fashion-MNIST,
    CIFAR-10). ``splits``: the splits to read; ``("test",)`` needs only the test files and leaves the
    train split empty (``imagefolder`` always reads both: its train folders fix the classes).
    """
    return DATASETS.get(name)(root, cache_dir=cache_dir, download=download, splits=splits)
