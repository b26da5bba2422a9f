"""Where dataset files live: search folders, checksums, and verified downloads."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from robustkd.errors import DataError
from robustkd.io import FILE_MODE

log = logging.getLogger("robustkd.data")

DATA_ENV = "ROBUSTKD_DATA"
CACHE_ENV = "ROBUSTKD_CACHE"


@dataclass(frozen=True)
class Resource:
    """One downloadable file: its name on disk, mirrors tried in order, and its SHA-256."""

    filename: str
    urls: tuple[str, ...]
    sha256: str


def _mirrored(filename: str, bases: Iterable[str], sha256: str) -> Resource:
    return Resource(filename, tuple(base + filename for base in bases), sha256)


_FASHION_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# Official releases. The checksums are of the published .gz/.tar.gz files; Debian's dataset-fashion-mnist
# recompressed its copies, so they are not checked against these (only downloads are).
RESOURCES: dict[str, tuple[Resource, ...]] = {
    "fashion-mnist": (
        _mirrored(
            "train-images-idx3-ubyte.gz",
            _FASHION_MIRRORS,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        ),
        _mirrored(
            "train-labels-idx1-ubyte.gz",
            _FASHION_MIRRORS,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        ),
        _mirrored(
            "t10k-images-idx3-ubyte.gz",
            _FASHION_MIRRORS,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        ),
        _mirrored(
            "t10k-labels-idx1-ubyte.gz",
            _FASHION_MIRRORS,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
    ),
    "mnist": (
        _mirrored(
            "train-images-idx3-ubyte.gz",
            _MNIST_MIRRORS,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        _mirrored(
            "train-labels-idx1-ubyte.gz",
            _MNIST_MIRRORS,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        _mirrored(
            "t10k-images-idx3-ubyte.gz",
            _MNIST_MIRRORS,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        _mirrored(
            "t10k-labels-idx1-ubyte.gz",
            _MNIST_MIRRORS,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    ),
    "cifar10": (
        Resource(
            "cifar-10-binary.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
            "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        ),
    ),
}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def env_data_dir() -> Path | None:
    """``$ROBUSTKD_DATA`` as a path, or None when unset or empty."""
    value = os.environ.get(DATA_ENV, "").strip()
    return Path(value).expanduser() if value else None


def default_cache_dir() -> Path:
    """``$ROBUSTKD_CACHE``, else ``~/.cache/robustkd``."""
    value = os.environ.get(CACHE_ENV, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "robustkd"


def shared_data_dirs() -> list[Path]:
    """The project's shared data folder, ``../shared/data`` from the working directory and the repository."""
    repo = Path(__file__).resolve().parents[2]
    return unique_paths([Path.cwd().parent / "shared" / "data", repo.parent / "shared" / "data"])


def unique_paths(paths: Iterable[Path | None]) -> list[Path]:
    """Drops None and repeats (after resolving), keeping the first occurrence's order."""
    seen: set[Path] = set()
    out: list[Path] = []
    for path in paths:
        if path is None:
            continue
        key = path.resolve() if path.exists() else path.absolute()
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out


def check_root(root: str | os.PathLike | None, *, create: bool = False) -> Path | None:
    """The explicit data root as a Path; a root that does not exist is an error (a typo must not pass)."""
    if root is None:
        return None
    path = Path(root).expanduser()
    if not path.exists():
        if create:
            path.mkdir(parents=True, exist_ok=True)
        else:
            raise DataError(f"data root {path} does not exist; check --data.root (or the data root argument)")
    return path


def fetch(resource: Resource, dest_dir: str | os.PathLike, *, timeout: float = 60.0) -> Path:
    """Downloads ``resource`` into ``dest_dir``, verifying its SHA-256 before it gets its final name.

    Each mirror is tried in turn. The bytes go to a temporary file beside the target and are renamed only
    when the checksum matches, so an interrupted or tampered download never leaves a file that looks valid.
    """
    dest = Path(dest_dir)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the download folder {dest} ({err}); pass a writable --data.root") from err
    target = dest / resource.filename
    failures: list[str] = []
    for url in resource.urls:
        log.info("downloading %s from %s", resource.filename, url)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{resource.filename}.", suffix=".part", dir=dest)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            os.fchmod(fd, FILE_MODE)  # the user's umask, not mkstemp's 0600: a shared data folder stays shared
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            got = digest.hexdigest()
            if got != resource.sha256:
                failures.append(f"{url}: SHA-256 {got} does not match the expected {resource.sha256}")
                continue
            os.replace(tmp, target)
            return target
        # URLError, HTTPError, timeouts and disk errors are OSErrors; a cut connection is an HTTPException.
        except (OSError, http.client.HTTPException, ValueError) as err:
            failures.append(f"{url}: {err}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(
        f"could not download {resource.filename} into {dest}; nothing was saved:\n  "
        + "\n  ".join(failures)
        + "\nCopy the file there by hand, or point --data.root at a folder that holds it."
    )


def missing_message(what: str, looked_for: Iterable[str], searched: Iterable[Path], fix: str) -> str:
    """A 'not found' message that lists every place searched and how to fix it."""
    places = "\n".join(f"  - {p}" for p in searched) or "  (no places to search)"
    return f"{what} not found. Looked for {', '.join(looked_for)} in:\n{places}\nFix: {fix}"


def one_line_error(err: BaseException, limit: int = 200) -> str:
    """``Type: message`` of an exception from a parser, on one line and at most ``limit`` characters."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
