"""Atomic file writes and the run lock: a reader sees the old file or the new one, never half of either.

A write goes to a temporary file named ``.<target>.<pid>.<random>.tmp`` in the target's folder, is
fsynced and renamed over the target. A process killed before the rename leaves only that temporary file
behind; the next write of the same target removes it once its process is gone. Files get the mode the
user's umask gives (0644 under the usual 022), as ``open`` would, not mkstemp's private 0600.

``run_lock`` keeps one process per run folder with an ``flock`` on ``.lock``: the kernel drops it when its
process dies, so a lock left by a killed run is free for the next one, and exactly one process wins a race.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from robustkd.errors import RobustKDError

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _read_umask() -> int:
    # os.umask can only be read by setting it, and it is process-wide: read once, at import, before any
    # thread of ours writes (a later change of the umask by the caller is not seen).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()
"""The mode of every file written here: what ``open(path, "w")`` would give under the user's umask."""


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
            os.fchmod(handle.fileno(), FILE_MODE)  # mkstemp's 0600 would hide reports and weights from teammates
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


class RunInUseError(RobustKDError):
    """Another live process holds the run folder's lock."""


LOCK_FILE = ".lock"


@contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` for the body; refuse (``RunInUseError``) while another live process holds it.

    The lock is an ``flock`` on the file that is at the path; the file holds its owner's pid for the message.
    The file only ever appears complete (written beside it, then linked or renamed into place by the one
    process that holds its ``flock``), and only the holder replaces or removes it, so one process holds the
    lock at a time whatever the race; one whose owner died (an ``flock`` dies with its process) is taken over.
    """
    lock = Path(run_dir) / LOCK_FILE
    try:
        fd = _acquire(lock)
    except OSError as err:
        raise RobustKDError(f"cannot take the lock {lock} of the run folder {run_dir}: {err}") from err
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it: nobody can take a file about to vanish
        os.close(fd)


def _acquire(lock: Path) -> int:
    """The descriptor holding the lock; the path then names the locked file and it holds our pid."""
    _remove_orphans(lock)
    owner = "?"
    for _ in range(_TRIES):  # a retry means another process is changing the lock right now: it ends fast
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            fd = _create_locked(lock, replace=False)
            if fd is not None:
                return fd
            continue
        locked, current = _try_flock(fd), _names(fd, lock)
        if locked and current:
            try:
                return _create_locked(lock, replace=True)  # a dead owner's lock: ours replaces it, with our pid
            finally:
                os.close(fd)
        owner = _pid_in(fd)
        os.close(fd)
        if current and owner != "?" and pid_alive(int(owner)):
            break
        # Replaced or removed since we opened it, or held by a process that is taking over a dead owner's
        # file and is about to put its own (with its pid) in place: look again.
        time.sleep(0.002)
    raise RunInUseError(
        f"{lock.parent} is in use by process {owner} (lock file {lock}); wait for it to finish or stop it, "
        "or choose another --name"
    )


_TRIES = 500  # about a second of retries


def _create_locked(lock: Path, replace: bool) -> int | None:
    """A new lock file holding our pid, locked, then put at ``lock``; None when another process put one first."""
    fd, tmp = tempfile.mkstemp(prefix=f".{lock.name}.{os.getpid()}.", suffix=".tmp", dir=lock.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, f"{os.getpid()}\n".encode())
        fcntl.flock(fd, fcntl.LOCK_EX)  # a new file nobody else has opened: never waits
        if replace:
            os.replace(tmp, lock)
        else:
            os.link(tmp, lock)  # fails when a lock appeared meanwhile; rename would overwrite it
    except FileExistsError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)
    return fd


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _names(fd: int, path: Path) -> bool:
    """True when ``path`` is still the file open as ``fd``."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _pid_in(fd: int) -> str:
    """The pid written in the open lock file, or "?"."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return text if text.isdigit() else "?"
