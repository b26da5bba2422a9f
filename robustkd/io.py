"""Atomic file writes: a reader sees the old file or the new one, never half of either.

A write goes to a temporary file named ``.<target>.<pid>.<random>.tmp`` in the target's folder, is
fsynced and renamed over the target. A process killed before the rename leaves only that temporary file
behind; the next write of the same target removes it once its process is gone.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from robustkd.errors import RobustKDError

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


class WriteError(RobustKDError, OSError):
    """A file could not be written (disk full, no permission, ...); the previous version is unchanged."""


def _explain(err: OSError, path: Path, action: str) -> WriteError:
    reason = err.strerror or str(err)
    if err.errno in _FULL:
        hint = "the disk (or the file-size limit) is full: free some space or write somewhere else"
    elif err.errno in _DENIED:
        hint = f"{path.parent} is not writable: fix its permissions or write somewhere else"
    else:
        hint = "check the folder and the disk"
    out = WriteError(f"cannot {action} {path}: {reason}; {hint}")
    out.errno = err.errno
    return out


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then rename.

    Raises :class:`WriteError` (an ``OSError``) when the write fails; ``path`` is then left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _explain(err, path, "create the folder of") from err
    _remove_orphans(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _explain(err, path, "write") from err
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise _explain(err, path, "write") from err
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def preflight_write(folder: str | os.PathLike, need_bytes: int = 0) -> None:
    """Fail before any work when ``folder`` cannot take our files: not creatable, not writable, or full.

    Writes and removes a small probe file; with ``need_bytes`` also compares the free space of the disk
    (what the run will write, e.g. its checkpoints) and refuses when it is short.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _explain(err, folder, "create the folder") from err
    probe = folder / ".write-test"
    atomic_write_bytes(probe, b"\0" * 4096)
    probe.unlink(missing_ok=True)
    if need_bytes > 0:
        free = shutil.disk_usage(folder).free
        if free < need_bytes:
            raise WriteError(
                f"not enough space in {folder}: {_mib(free)} free, about {_mib(need_bytes)} needed for the "
                "checkpoints; free some space or choose another output folder"
            )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Temporary files of unfinished atomic writes in ``folder`` (left by a killed process, or in flight)."""
    return sorted(Path(folder).glob(".*.*.tmp"))


def _remove_orphans(path: Path) -> None:
    # Only this target's temporary files, and only those whose writer is gone: another live process may
    # be writing the same file right now.
    prefix = f".{path.name}."
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return
    for candidate in candidates:
        pid = candidate.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            candidate.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """True when a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
