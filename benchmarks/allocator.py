"""Whole processes: robustkd's training step as its own commands run it, against the hand-written loop's process.

``python -m benchmarks.allocator [--quick] [--repeats R] [--threads T]`` prints JSON.

``robustkd train`` and every other command call :func:`robustkd.runtime.keep_freed_memory` once: glibc then
keeps freed memory mapped instead of handing every freed activation back to the kernel and faulting it in
again at the next step (system time). A hand-written training script runs with glibc's defaults. The other
benchmarks time both sides inside one process, so they share one allocator setting and cannot see this; here
each side is its own process:

- ``ours``: robustkd's step (the method object, the teacher as the engine holds it) in a process that called
  ``keep_freed_memory()``, as the ``robustkd`` commands and ``robustkd.train`` do;
- ``ours_default_allocator``: the same step with glibc's defaults (``ROBUSTKD_KEEP_FREED_MEMORY=0``): how much
  of the difference is the allocator;
- ``handwritten``: the hand-written loop of ``benchmarks/reference.py`` (input gradients only, the teacher once,
  the same passes; the teacher frozen and contiguous) with glibc's defaults, as a script runs.

The three processes start together and stay up; in every round each times one sample in turn (the order turns
each round), so load from elsewhere hits them alike and ratios are taken within a round. Each sample lasts at
least 0.05 s of steps (SGD updates included) after two untimed warm-up steps; wall and CPU time (user + system,
and system alone) and the page faults of a step are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks import common
from benchmarks.common import median, ms, round_ratios, setting
from benchmarks.reference import STUDENT, TEACHER
from robustkd.runtime import ALLOCATOR_ENV, KEEP_FREED_ENV

METHODS = ("advfunmatch", "ard", "rslad")
SIDES = ("ours", "ours_default_allocator", "handwritten")
TARGET = 1.0  # ours / handwritten


def _child(side: str, method_name: str, threads: int, quick: bool) -> None:
    """One side's process: builds its step, then answers every line on stdin with one timed sample."""
    import resource

    import torch

    from benchmarks.reference import INFO, LOOPS, _training_step
    from robustkd.methods import Batch, build_method
    from robustkd.runtime import keep_freed_memory

    if side == "ours":
        keep_freed_memory()
    torch.set_num_threads(threads)
    x, y, _ = common.load_images(16 if quick else 128, seed=0)
    method = build_method(method_name, {"threat": {"steps": 2}} if quick else {})
    student = common.make_model(STUDENT, seed=1).train()
    teacher = common.make_model(TEACHER, seed=2)
    if side == "handwritten":
        net, loop = common.frozen(teacher), LOOPS[method_name]["handwritten"]
        step = _training_step(student, lambda: loop(student, net, x, y, method))
    else:
        net, batch = common.engine_teacher(teacher), Batch(x, y)
        step = _training_step(student, lambda: method(student, net, batch, INFO).loss)
    calls = common.calibrate(step)
    print("ready", flush=True)
    for _ in sys.stdin:
        before = resource.getrusage(resource.RUSAGE_SELF)
        wall, cpu = common.sample_both(step, calls)
        after = resource.getrusage(resource.RUSAGE_SELF)
        system = (after.ru_stime - before.ru_stime) / calls
        faults = (after.ru_minflt - before.ru_minflt) / calls
        print(json.dumps({"wall": wall, "cpu": cpu, "sys": system, "faults": faults}), flush=True)


def _spawn(side: str, method: str, threads: int, quick: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}  # glibc's defaults, unless ours
    env[KEEP_FREED_ENV] = "1" if side == "ours" else "0"
    command = [sys.executable, "-m", "benchmarks.allocator", "--child", side, method, str(threads)]
    proc = subprocess.Popen(
        command + (["--quick"] if quick else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"benchmark process {side}/{method} did not start")
    return proc


def compare(method: str, threads: int, repeats: int, quick: bool) -> dict[str, Any]:
    procs = {side: _spawn(side, method, threads, quick) for side in SIDES}
    samples: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    try:
        for r in range(repeats):
            order = SIDES[r % len(SIDES) :] + SIDES[: r % len(SIDES)]
            for side in order:
                procs[side].stdin.write("go\n")
                procs[side].stdin.flush()
                samples[side].append(json.loads(procs[side].stdout.readline()))
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()

    def series(side: str, key: str) -> list[float]:
        return [s[key] for s in samples[side]]

    return {
        "method": method,
        "time_ms": {side: ms(median(series(side, "wall"))) for side in SIDES},
        "cpu_ms": {side: ms(median(series(side, "cpu"))) for side in SIDES},
        "sys_ms": {side: ms(median(series(side, "sys"))) for side in SIDES},
        "page_faults_per_step": {side: round(median(series(side, "faults"))) for side in SIDES},
        "ours_over_handwritten": round(median(round_ratios(series("ours", "wall"), series("handwritten", "wall"))), 3),
        "ours_over_handwritten_cpu": round(
            median(round_ratios(series("ours", "cpu"), series("handwritten", "cpu"))), 3
        ),
        "ours_over_ours_default_allocator": round(
            median(round_ratios(series("ours", "wall"), series("ours_default_allocator", "wall"))), 3
        ),
    }


def run(quick: bool = False, threads: int = 1, repeats: int | None = None) -> dict[str, Any]:
    repeats = repeats or (1 if quick else 9)
    # The allocator is the CPU process's; the child processes build the default models on Fashion-MNIST.
    default = common.DEVICE.type == "cpu" and common.INPUT == common.FASHION_MNIST and not common.ARCH
    names = (METHODS[:1] if quick else METHODS) if default else ()
    rows = [compare(name, threads, repeats, quick) for name in names]
    ratios = []
    for row in rows:
        for key, target in (("ours_over_handwritten", TARGET), ("ours_over_ours_default_allocator", None)):
            meets = None if target is None else row[key] <= target
            ratios.append(
                {
                    "name": f"allocator/{row['method']}_{key}",
                    "ratio": row[key],
                    "target": None if target is None else f"<= {target}",
                    "meets": meets,
                }
            )
    return {
        "benchmark": "allocator",
        "what": "robustkd's step in a process as robustkd's commands set it up (freed memory kept) / the "
        "hand-written loop in a process with glibc's defaults (target <= 1.0); the allocator's share labelled",
        "setting": setting(
            threads,
            repeats,
            model={"student": STUDENT, "teacher": TEACHER},
            batch=16 if quick else 128,
            processes="one per side",
            quick=quick,
        ),
        "rows": rows,
        "ratios": ratios,
        **({} if default else {"skipped": "runs on the CPU with the default models and input only"}),
    }


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.allocator", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks that everything runs")
    parser.add_argument("--repeats", type=int, help="rounds (default 9)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every process (default 1)")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "METHOD", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        side, method, threads = args.child
        _child(side, method, int(threads), args.quick)
        return None
    started = time.perf_counter()
    result = run(quick=args.quick, threads=args.threads, repeats=args.repeats)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
