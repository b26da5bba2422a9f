"""keep_freed_memory: freed activations stay mapped, so a repeated step stops faulting pages in."""

from __future__ import annotations

import subprocess
import sys

import pytest

from robustkd import runtime

# One "training step" shape over and over on one thread: a convolution, a ReLU and a reduction on a 32 MiB
# batch. After four warm-up steps (the heap reaches its size in about three), the fewest page faults in any of
# three windows of five steps: now and then the heap still grows by one map in a window.
STEPS = """
import resource, sys, torch
from robustkd.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "on" else False
torch.set_num_threads(1)
torch.set_grad_enabled(False)
x = torch.rand(256, 16, 32, 32)
conv = torch.nn.Conv2d(16, 32, 3, padding=1)
def step():
    y = torch.relu(conv(x))
    return float((y * 2).sum())
for _ in range(4):
    step()
windows = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    windows.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, min(windows))
"""

ALLOCATOR_ENV = (*runtime.ALLOCATOR_ENV, runtime.KEEP_FREED_ENV)


def _faults(setting: str, monkeypatch) -> tuple[str, int]:
    for name in ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    out = subprocess.run([sys.executable, "-c", STEPS, setting], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(runtime._glibc() is None, reason="glibc only")
def test_a_repeated_step_stops_faulting_pages_in(monkeypatch) -> None:
    kept, faults = _faults("on", monkeypatch)
    _, default = _faults("off", monkeypatch)
    assert kept == "True"
    # glibc's defaults hand each freed 32 MiB map back and fault it in again (8 192 pages a step).
    assert default > 5 * 4096
    assert faults < default / 100


class FakeLibc:
    def __init__(self, refuse: tuple[int, ...] = ()) -> None:
        self.calls: list[tuple[int, int]] = []
        self.refuse = refuse

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return int(value not in self.refuse)


def _set(monkeypatch, libc: FakeLibc | None, **env: str) -> bool:
    for name in ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(runtime, "_glibc", lambda: libc)
    return runtime._set_thresholds()


def test_the_thresholds_set_and_the_fallback(monkeypatch) -> None:
    libc = FakeLibc()
    assert _set(monkeypatch, libc)
    assert libc.calls == [(runtime.M_MMAP_THRESHOLD, 2**30), (runtime.M_TRIM_THRESHOLD, 2**31 - 1)]
    libc = FakeLibc(refuse=(2**30,))  # a glibc that caps the mmap threshold at 32 MiB
    assert _set(monkeypatch, libc)
    assert libc.calls[1] == (runtime.M_MMAP_THRESHOLD, 2**25)


@pytest.mark.parametrize(
    "env",
    [
        {"ROBUSTKD_KEEP_FREED_MEMORY": "0"},
        {"ROBUSTKD_KEEP_FREED_MEMORY": "off"},
        {"MALLOC_TRIM_THRESHOLD_": "1000000"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
        {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
    ],
)
def test_an_allocator_already_chosen_is_left_alone(monkeypatch, env: dict[str, str]) -> None:
    libc = FakeLibc()
    assert not _set(monkeypatch, libc, **env)
    assert libc.calls == []


def test_nothing_happens_without_glibc(monkeypatch) -> None:
    assert not _set(monkeypatch, None)
