"""The GPU command: ``python -m benchmarks.gpu [--dry-run] [--out FILE] [--steps N]`` (``make bench-gpu``).

1. Runs the CUDA tests (``tests/test_gpu.py``, the certification GPU test) and records their outcome.
2. Times AdvFunMatch training steps on CIFAR-10-shaped synthetic batches (3x32x32, batch 128, PGD-10 through
   the teacher, no augmentation): a ResNet-18 student with a ResNet-18 teacher, then with a WRN-34-10
   teacher, eager against the fast path (the attack replayed from one CUDA graph), with bf16 autocast and
   channels-last on and off. A step is what the engine runs per batch: the method call (under autocast when
   bf16 is on), ``loss.backward()`` and an SGD update. Epoch time = step time x 391 (50 000 images in
   batches of 128), from ``--steps`` timed steps after warm-up steps that include the graph capture.

Prints one JSON object (and writes it with ``--out``). Sized for 8 minutes on one H100, by estimate: it
has not yet run on one.
``--dry-run`` runs the same code on the CPU at a tiny size (batch 4, 16x16 inputs, 1 attack step, a small
student and teacher), skips the tests, and is what the test suite runs; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from robustkd.attacks import graph
from robustkd.methods import Batch, StepInfo, build_method

ROOT = Path(__file__).resolve().parents[1]
EPOCH_IMAGES = 50_000
CUDA_TESTS = ("tests/test_gpu.py", "tests/test_certify.py::test_gpu_matches_cpu")
# (name, student, teacher, fast path, bf16, channels_last)
VARIANTS = (
    ("eager", "resnet18", "resnet18", "off", False, False),
    ("eager_bf16_channels_last", "resnet18", "resnet18", "off", True, True),
    ("graph", "resnet18", "resnet18", "auto", False, False),
    ("graph_bf16", "resnet18", "resnet18", "auto", True, False),
    ("graph_channels_last", "resnet18", "resnet18", "auto", False, True),
    ("graph_bf16_channels_last", "resnet18", "resnet18", "auto", True, True),
    ("wrn_teacher_eager", "resnet18", "wrn_34_10", "off", False, False),
    ("wrn_teacher_graph_bf16_channels_last", "resnet18", "wrn_34_10", "auto", True, True),
)
DRY = {"batch": 4, "shape": (3, 16, 16), "attack_steps": 1, "student": "dm_small", "teacher": "dm_small"}


def run_cuda_tests() -> dict[str, Any]:
    """pytest on the CUDA tests, in a child process; its summary line and exit status."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"command": " ".join(command[1:]), "exit_status": done.returncode, "summary": lines[-1] if lines else ""}


def _step_fn(student, teacher, method, x, y, bf16: bool):
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    info = StepInfo(epoch=0, step=0, epochs=1, steps_per_epoch=1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    batch = Batch(x, y)

    def step() -> None:
        with autocast:
            loss = method(student, teacher, batch, info).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_variant(variant: tuple, size: dict[str, Any], steps: int, warmup: int) -> dict[str, Any]:
    name, student_arch, teacher_arch, fast, bf16, channels_last = variant
    bf16 = bf16 and common.DEVICE.type == "cuda"  # autocast to bf16 is a GPU setting here
    student_arch, teacher_arch = size.get("student", student_arch), size.get("teacher", teacher_arch)
    graph.clear()
    with common.models_of(size["shape"]):
        student = common.make_model(student_arch, seed=1).train()
        teacher = common.frozen(common.make_model(teacher_arch, seed=2))
        x, y, _ = common.load_images(size["batch"], seed=0)
    if channels_last:
        student, teacher = (m.to(memory_format=torch.channels_last) for m in (student, teacher))
        x = x.contiguous(memory_format=torch.channels_last)
    threat = {"steps": size["attack_steps"]} if size.get("attack_steps") else {}
    method = build_method("advfunmatch", {"threat": threat} if threat else {})
    step = _step_fn(student, teacher, method, x, y, bf16)
    with graph.fast_path(fast):
        for _ in range(warmup):  # the first replayed step also captures the graph
            step()
        wall, cpu = common.sample_both(step, steps)
    replayed = bool(graph._GRAPHS)
    graph.clear()
    return {
        "name": name,
        "student": student_arch,
        "teacher": teacher_arch,
        "fast_path": fast,
        "graph_replayed": replayed,
        "bf16": bf16,
        "channels_last": channels_last,
        "step_ms": common.ms(wall),
        "step_cpu_ms": common.ms(cpu),
        "epoch_s": round(wall * EPOCH_IMAGES / size["batch"], 2),
    }


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {row["name"]: row for row in rows}
    pairs = [
        ("graph_bf16_channels_last", "eager"),
        ("graph", "eager"),
        ("eager_bf16_channels_last", "eager"),
        ("wrn_teacher_graph_bf16_channels_last", "wrn_teacher_eager"),
    ]
    return [
        {"name": f"gpu/{fast}_speedup_over_{slow}", "ratio": round(by[slow]["step_ms"] / by[fast]["step_ms"], 3)}
        for fast, slow in pairs
        if fast in by and slow in by
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, no tests: checks that it runs")
    parser.add_argument("--steps", type=int, help="timed training steps per variant (default 20; dry run 1)")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or pass --dry-run for the CPU smoke run")
    started = time.perf_counter()
    common.use_device("cpu" if args.dry_run else "cuda")
    try:
        size = DRY if args.dry_run else {"batch": 128, "shape": (3, 32, 32)}
        steps = args.steps or (1 if args.dry_run else 20)
        tests = {"skipped": "--dry-run"} if args.dry_run else run_cuda_tests()
        rows = [time_variant(v, size, steps, warmup=1 if args.dry_run else 3) for v in VARIANTS]
        result = {
            "benchmark": "gpu",
            "what": "AdvFunMatch step and epoch time on CIFAR-10 shapes: eager vs the graph-captured attack, "
            "bf16 and channels-last on and off",
            "setting": common.setting(1, steps, batch=size["batch"], dry_run=args.dry_run, input=list(size["shape"])),
            "tests": tests,
            "rows": rows,
            "ratios": _ratios(rows),
            "seconds": round(time.perf_counter() - started, 1),
        }
    finally:
        common.use_device("cpu")
    print(json.dumps(result, indent=2), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
