"""KD, KDIGA, ARD and RSLAD epochs with the teacher cache, without it, and in a hand-written loop.

``python -m benchmarks.teacher_cache [--quick] [--n N] [--repeats R] [--threads T]`` prints JSON.

Three ways to train one epoch of each method (student dm_small, teacher dm_medium, frozen; batch 128, SGD). The
two engine sides get the teacher as the engine holds it (``engine_teacher``: channels-last on a CPU), the
hand-written loop gets it frozen and contiguous:

- ``cached``: robustkd's training loop (``engine.loop._train_epoch``) with ``teacher_cache: always``: the
  teacher's logits (KDIGA: and its input gradients) were computed once, in the first epoch;
- ``uncached``: the same loop with ``teacher_cache: never``: the teacher runs every step;
- ``hand``: a loop as a competent engineer writes it without a cache: float images already on the device, the
  teacher run once a step under no_grad (KDIGA: one teacher pass for its logits and input gradient with
  ``torch.autograd.grad``, input gradients only), the student's forward shared by both terms, one SGD update.
  ARD and RSLAD use the hand-written losses of ``benchmarks/reference.py`` (input-gradient PGD, the teacher
  once a step).

KD and KDIGA: the cache must make an epoch at least twice as fast as either uncached loop (target >= 2).
ARD and RSLAD, whose steps are dominated by the 10-step attack, only run their teacher on clean inputs: the
cache spares that forward, and robustkd's epoch must cost no more than the hand-written one (hand / cached
>= 1). AdvFunMatch's teacher sees the attack's points, which change every step: nothing to cache. The attack
methods train on ``min(n, 1024)`` images an epoch (an epoch of theirs costs ten of KD's).

The first epoch of each is untimed (it builds the cache); then every round times one epoch of each of the six in
turn, so load from other processes on a shared machine hits them alike, and the ratios are taken within a round.
Wall time and CPU time (``time.process_time``, user + system of this process) are both reported. As a like-for-like
check, the cached and uncached students start from the same weights and seeds: their weights after the first
epoch must agree to float tolerance (``max_weight_diff_epoch1``).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import common
from benchmarks.common import engine_teacher, frozen, load_images, make_model, median, round_ratios, setting
from benchmarks.reference import handwritten_ard_loss, handwritten_rslad_loss
from robustkd.config import from_dict, validate
from robustkd.data import DatasetInfo, Split
from robustkd.engine import loop
from robustkd.engine.distributed import Dist
from robustkd.engine.optim import build_optimizer
from robustkd.methods import Method, build_method

TARGETS = {"kd": 2.0, "kdiga": 2.0, "ard": 1.0, "rslad": 1.0}  # uncached or hand epoch time / cached
STUDENT, TEACHER = "dm_small", "dm_medium"
BATCH = 128
METHODS = tuple(TARGETS)
ATTACK_METHODS = ("ard", "rslad")
ATTACK_N = 1024
INFO = DatasetInfo("fashion-mnist", 10, (1, 28, 28), (0.286,), (0.353,), tuple("0123456789"), "none")


def _engine_epoch(method: str, cache: str, split: Split, teacher: nn.Module, run_dir: Path) -> Callable[[], None]:
    """One more epoch of robustkd's loop each call, on a run of its own (student seeded like every other)."""
    cfg = validate(
        from_dict(
            {
                "out_dir": str(run_dir),
                "epochs": 1000,
                "progress": False,
                "tensorboard": False,
                "teacher_cache": cache,
                "method": {"name": method},
                "data": {"batch_size": BATCH},
                "optim": {"schedule": "constant", "lr": 0.01},
            }
        )
    )
    student = make_model(STUDENT, seed=1)
    empty = Split(split.images[:0], split.labels[:0])
    run = loop._Run(
        cfg=cfg,
        dist=Dist(common.DEVICE),
        run_dir=run_dir,
        method=build_method(method),
        data=loop._Data(INFO, split, empty, empty, None),
        model=student,
        student=student,
        teacher=teacher,
        optimizer=build_optimizer(list(student.parameters()), cfg.optim),
        batch_size=BATCH,
        steps_per_epoch=-(-len(split) // BATCH),
        meta={},
        autocast=nullcontext(),
    )
    epochs = iter(range(cfg.epochs))
    progress = loop._Progress(False)

    def epoch() -> None:
        loop._train_epoch(run, next(epochs), progress)

    epoch.model = student  # type: ignore[attr-defined]
    return epoch


def _kd_loss(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, m: Method) -> Tensor:
    with torch.no_grad():
        t = teacher(x)
    s = student(x)
    tau = m.temperature
    kl = F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t / tau, 1), reduction="batchmean", log_target=True)
    return m.alpha * tau * tau * kl + (1 - m.alpha) * F.cross_entropy(s, y)


def _kdiga_loss(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, m: Method) -> Tensor:
    xt = x.detach().requires_grad_(True)
    t = teacher(xt)
    (g_t,) = torch.autograd.grad(F.cross_entropy(t, y), xt)
    xs = x.detach().requires_grad_(True)
    s = student(xs)
    (g_s,) = torch.autograd.grad(F.cross_entropy(s, y), xs, create_graph=True)
    tau = m.temperature
    kl = F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t.detach() / tau, 1), reduction="batchmean", log_target=True)
    kd = m.alpha * tau * tau * kl + (1 - m.alpha) * F.cross_entropy(s, y)
    return kd + m.gamma / len(x) * (g_s - g_t).flatten().norm()


def _hand_epoch(method: str, split: Split, teacher: nn.Module) -> Callable[[], None]:
    student = make_model(STUDENT, seed=1).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x_all, y_all = split.images.float().div(255), split.labels
    losses = {"kd": _kd_loss, "kdiga": _kdiga_loss, "ard": handwritten_ard_loss, "rslad": handwritten_rslad_loss}
    loss_fn, m = losses[method], build_method(method)
    generator = torch.Generator().manual_seed(0)

    def epoch() -> None:
        for index in torch.randperm(len(y_all), generator=generator).to(common.DEVICE).split(BATCH):
            loss = loss_fn(student, teacher, x_all[index], y_all[index], m)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return epoch


def _timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    if common.DEVICE.type == "cuda":
        torch.cuda.synchronize(common.DEVICE)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if common.DEVICE.type == "cuda":
        torch.cuda.synchronize(common.DEVICE)
    return time.perf_counter() - wall, time.process_time() - cpu


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def _rows(samples: dict[str, dict[str, list[float]]], checks: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        row: dict[str, Any] = {"method": method, "max_weight_diff_epoch1": checks[method]}
        for way in ("cached", "uncached", "hand"):
            for clock in ("wall", "cpu"):
                row[f"{way}_{clock}_s"] = round(median(samples[f"{method}/{way}"][clock]), 4)
        for other in ("uncached", "hand"):
            for clock in ("wall", "cpu"):
                ratios = round_ratios(samples[f"{method}/{other}"][clock], samples[f"{method}/cached"][clock])
                row[f"{other}_over_cached_{clock}"] = round(median(ratios), 3)
        rows.append(row)
    return rows


def run(quick: bool = False, threads: int = 1, repeats: int | None = None, n: int | None = None) -> dict[str, Any]:
    repeats = repeats or (1 if quick else 5)
    n = n or (256 if quick else 4096)
    x, y, source = load_images(n, seed=0)
    full = Split(x.mul(255).round().to(torch.uint8), y)
    few = min(n, ATTACK_N)
    teacher = frozen(make_model(TEACHER, seed=0))
    ours_teacher = engine_teacher(copy.deepcopy(teacher))  # the engine's sides get the teacher as it holds it
    epochs: dict[str, Callable[[], None]] = {}
    checks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            split = Split(full.images[:few], full.labels[:few]) if method in ATTACK_METHODS else full
            cached = _engine_epoch(method, "always", split, ours_teacher, Path(tmp) / method / "cached")
            uncached = _engine_epoch(method, "never", split, ours_teacher, Path(tmp) / method / "uncached")
            epochs |= {f"{method}/cached": cached, f"{method}/uncached": uncached}
            epochs[f"{method}/hand"] = _hand_epoch(method, split, teacher)
        for fn in epochs.values():  # the first epoch, untimed: builds the caches, warms everything
            fn()
        for method in METHODS:
            checks[method] = _max_diff(epochs[f"{method}/cached"].model, epochs[f"{method}/uncached"].model)
        samples: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in epochs}
        for _ in range(repeats):
            for name, fn in epochs.items():
                wall, cpu = _timed(fn)
                samples[name]["wall"].append(wall)
                samples[name]["cpu"].append(cpu)
    rows = _rows(samples, checks)
    return {
        "benchmark": "teacher_cache",
        "what": "epoch time from the second epoch on: without the teacher cache (and a hand-written loop) / with it",
        "setting": setting(
            threads,
            repeats,
            model={"student": STUDENT, "teacher": TEACHER},
            batch=BATCH,
            input=[1, 28, 28],
            data=source,
            n=n,
            n_attack_methods=min(n, ATTACK_N),
            quick=quick,
        ),
        "rows": rows,
        "ratios": [
            {
                "name": f"teacher_cache/{row['method']}_{other}_over_cached",
                "ratio": row[f"{other}_over_cached_wall"],
                "target": target,
                "meets": None if target is None else row[f"{other}_over_cached_wall"] >= TARGETS[row["method"]],
            }
            for row in rows
            for other in ("uncached", "hand")
            for target in [_target(row["method"], other)]
        ],
    }


def _target(method: str, other: str) -> str | None:
    if method in ATTACK_METHODS and other == "uncached":
        return None  # the teacher's share of an attack step: reported, no target
    return f">= {TARGETS[method]}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.teacher_cache", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 images, one round: checks that it runs")
    parser.add_argument("--n", type=int, help="training images per epoch (default 4096)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(quick=args.quick, threads=args.threads, repeats=args.repeats, n=args.n)
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
