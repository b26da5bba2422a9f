"""Files on disk: the run lock under races and after kills, and the mode of what we write."""

import multiprocessing
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robustkd.errors import RobustKDError
from robustkd.io import FILE_MODE, atomic_write_bytes, run_lock, temporary_files

# --- the run lock ------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _contend(run_dir: str, start, done, n: int, results) -> None:
    """One contender: all start together; a winner holds the lock until every contender has tried."""
    start.wait(timeout=60)
    try:
        with run_lock(Path(run_dir)):
            with done.get_lock():
                done.value += 1
            deadline = time.monotonic() + 30
            while done.value < n and time.monotonic() < deadline:
                time.sleep(0.01)
            results.put(("won", os.getpid(), Path(run_dir, ".lock").read_text().strip()))
    except RobustKDError as err:
        with done.get_lock():
            done.value += 1
        results.put(("refused", os.getpid(), str(err)))
    except BaseException as err:  # what the old lock let out: FileExistsError from its second open
        with done.get_lock():
            done.value += 1
        results.put(("crashed", os.getpid(), f"{type(err).__name__}: {err}"))


def _race(run: Path, n: int = 5) -> list[tuple[str, int, str]]:
    ctx = multiprocessing.get_context("fork")  # no re-import per contender: they start within milliseconds
    start, done, results = ctx.Barrier(n), ctx.Value("i", 0), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(run), start, done, n, results)) for _ in range(n)]
    for proc in procs:
        proc.start()
    out = [results.get(timeout=90) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    return out


@pytest.mark.parametrize("left", [pytest.param("dead_pid", id="dead-pid"), pytest.param("empty", id="empty")])
def test_a_lock_left_behind_goes_to_exactly_one_of_several_processes(tmp_path, left):
    # "empty": the old lock was created before its pid was written; a kill in between blocked every later run.
    for trial in range(6):
        run = tmp_path / f"run{trial}"
        run.mkdir()
        (run / ".lock").write_text(str(_dead_pid()) if left == "dead_pid" else "")
        out = _race(run)
        winners = [(pid, text) for kind, pid, text in out if kind == "won"]
        assert len(winners) == 1, out
        (winner, written), others = winners[0], [o for o in out if o[0] != "won"]
        assert written == str(winner)  # the lock names its holder
        for kind, _, message in others:
            assert kind == "refused", message
            assert f"in use by process {winner} " in message and "\n" not in message, message
        assert not (run / ".lock").exists() and temporary_files(run) == []


def test_a_live_holder_keeps_the_lock_and_is_named(tmp_path):
    with run_lock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(RobustKDError, match=f"in use by process {os.getpid()} "), run_lock(tmp_path):
            pass
    assert not (tmp_path / ".lock").exists()
    with run_lock(tmp_path):  # free again once released
        pass


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    code = (
        "import sys, time\nfrom robustkd.io import run_lock\n"
        "with run_lock(sys.argv[1]):\n    print('in', flush=True)\n    time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "in"
        with pytest.raises(RobustKDError, match=f"in use by process {child.pid} "), run_lock(tmp_path):
            pass
    finally:
        child.kill()
        child.wait()
    assert (tmp_path / ".lock").read_text().strip() == str(child.pid)  # SIGKILL leaves the file ...
    with run_lock(tmp_path):  # ... and its lock died with the process
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


# --- file modes ------------------------------------------------------------------------------------------


def test_written_files_follow_the_umask(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    assert 0o666 & ~mask == FILE_MODE
    atomic_write_bytes(tmp_path / "report.json", b"{}")
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == FILE_MODE
    with run_lock(tmp_path):
        assert stat.S_IMODE((tmp_path / ".lock").stat().st_mode) == FILE_MODE


def test_the_default_umask_gives_0644(tmp_path):
    code = "import os, sys; from robustkd.io import atomic_write_bytes; atomic_write_bytes(sys.argv[1], b'x')"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    target = tmp_path / "out.bin"
    subprocess.run(
        ["sh", "-c", 'umask 022 && exec "$@"', "sh", sys.executable, "-c", code, str(target)], env=env, check=True
    )
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
