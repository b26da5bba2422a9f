"""Making a comparison's runs: train (or reuse, or resume), evaluate through the job layer, keep per-point results.

Each run lives in ``<out>/runs/<label>/seed<k>``: an ordinary robustkd run folder (``config.yaml``, ``best`` and
``last`` checkpoints, ``results.json``), the evaluation JSONs of the job layer (``eval.json``, ``autoattack.json``,
``cert.json``) and ``compare.json``, the per-point results the statistics read. ``plan.json`` holds the digest of
the run's training config: a folder made for other settings is refused rather than silently mixed in.

:func:`execute` is a plain top-level function of plain data, so a process pool (spawn) can run it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from robustkd.errors import ConfigError
from robustkd.io import atomic_write_json

RECORD = "compare.json"
PLAN = "plan.json"


def _bits(flags: Iterable[Any]) -> str:
    return "".join("1" if f else "0" for f in flags)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_plan(run_dir: Path, key: str) -> dict[str, Any]:
    """The run folder's plan, written now when new; a folder planned for another config is refused."""
    plan = _read(run_dir / PLAN)
    if plan is not None and plan.get("key") != key:
        raise ConfigError(
            f"{run_dir}: holds a run made with other settings (plan {plan.get('key')}, now {key}); "
            "delete that folder or choose another out"
        )
    if plan is None:
        plan = {"key": key, "train_seconds": 0.0}
        atomic_write_json(run_dir / PLAN, plan)
    return plan


def train_run(task: dict[str, Any]) -> tuple[Path, str]:
    """Train the run unless it finished before (``results.json`` and ``best``); a killed one resumes."""
    from robustkd.config import from_dict
    from robustkd.engine import train

    run_dir = Path(task["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = check_plan(run_dir, task["key"])
    best = run_dir / "best"
    if (run_dir / "results.json").exists() and (run_dir / "best.safetensors").exists():
        return best, "reused"
    from robustkd.methods import METHODS

    # A teacher-free student (an IBP-trained baseline) is trained without the teacher, not warned about it.
    teacher = task.get("teacher") if METHODS.get(task["config"]["method"]["name"]).needs_teacher else None
    raw = {**task["config"], "out_dir": str(run_dir.parent), "teacher": teacher, "device": task["device"]}
    cfg = from_dict(raw)
    cfg.progress = False
    cfg.tensorboard = False
    cfg.resume = (run_dir / "resume.safetensors").exists()
    started = time.perf_counter()
    train(cfg)
    # Time adds up over interruptions: a resumed run's total is that of all its pieces.
    plan["train_seconds"] = round(plan.get("train_seconds", 0.0) + time.perf_counter() - started, 1)
    atomic_write_json(run_dir / PLAN, plan)
    return best, "resumed" if cfg.resume else "trained"


def _robustness(best: Path, run_dir: Path, ev: dict[str, Any], device: str) -> dict[str, str]:
    """Per-point results of the main attacks and their worst case ('robust'), and AutoAttack where asked."""
    from robustkd.jobs import evaluate_checkpoint

    common = {"protocol": ev["protocol"], "batch_size": ev["batch_size"], "seed": ev["seed"], "device": device}
    result = evaluate_checkpoint(
        best, attacks=list(ev["attacks"]), n_examples=ev["n_examples"], out=run_dir / "eval.json", progress=False,
        **common,
    )  # fmt: skip
    correct = result["per_example"]["correct"]
    metrics = {name: _bits(values) for name, values in correct.items()}
    adversarial = [name for name in correct if name != "clean"]
    if adversarial:
        metrics["robust"] = _bits(all(correct[a][i] for a in adversarial) for i in range(len(correct["clean"])))
    if ev.get("autoattack"):
        aa = evaluate_checkpoint(
            best, attacks=["clean", "autoattack"], n_examples=ev["autoattack"], out=run_dir / "autoattack.json",
            progress=False, **common,
        )  # fmt: skip
        metrics["autoattack"] = _bits(aa["per_example"]["correct"]["autoattack"])
    return metrics


def _certified_agreement(
    best: Path, teacher: str, run_dir: Path, spec: dict[str, Any], ev: dict[str, Any], device: str
) -> str:
    """Certified agreement with the teacher on the teacher's correct points P (the same P for every student)."""
    from robustkd.jobs import certify_checkpoints

    result = certify_checkpoints(
        best, teacher, eps=spec.get("eps", 0.1), method=spec.get("method", "ibp"),
        n_examples=spec.get("n_examples", ev["n_examples"]),
        batch_size=spec.get("batch_size", 256), device=device, out=run_dir / "cert.json", progress=False,
    )  # fmt: skip
    per = result["per_example"]
    return _bits(a for a, t in zip(per["agreement_certified"], per["teacher_correct"]) if t)


def _agreement(best: Path, teacher: str, run_dir: Path, spec: dict[str, Any], ev: dict[str, Any], device: str) -> str:
    """Empirical agreement on P: 1 where the disagreement searches found no point of the ball on which the student
    and the teacher predict differently (the teacher's correct points only, as for certified agreement)."""
    from robustkd.jobs import evaluate_faithfulness_checkpoints

    eps = spec.get("eps", 0.1)
    result = evaluate_faithfulness_checkpoints(
        teacher, best, eps=eps, steps=spec.get("steps", 20), restarts=spec.get("restarts", 1),
        n_examples=spec.get("n_examples", ev["n_examples"]), batch_size=spec.get("batch_size", 256), seed=ev["seed"],
        device=device,
        gap_surrogates=["prob"], out=run_dir / "faithful.json", progress=False,
    )  # fmt: skip
    (block,) = result["per_example"]["eps"]
    return _bits(not flag for flag in block["disagreement"] if flag is not None)


# Quantiles of the certified gap bound kept in the leaderboard, as the certify job's summary names them.
GAP_QUANTILES = {"q50": "median", "q90": "q90"}


def certified_gaps(run_dir: Path) -> dict[str, float] | None:
    """Quantiles of the certified bound on the confidence gap max_{x'} f_T^y(x') − f_S^y(x') over the teacher's
    correct points P, read from the summary of the run's ``cert.json`` (None without one, or with P empty)."""
    cert = _read(run_dir / "cert.json")
    gaps = ((cert or {}).get("teacher_correct") or {}).get("gap_upper") or {}
    if any(gaps.get(name) is None for name in GAP_QUANTILES.values()):
        return None
    return {key: gaps[name] for key, name in GAP_QUANTILES.items()}


def evaluate_run(task: dict[str, Any], best: Path) -> dict[str, Any]:
    """The run's per-point results, reused from ``compare.json`` when made for the same weights and settings."""
    run_dir = Path(task["run_dir"])
    weights = Path(f"{best}.safetensors")
    stamp = (weights if weights.exists() else best).stat().st_mtime_ns
    record = _read(run_dir / RECORD) or {}
    made_for = (record.get("key"), record.get("evaluation"), record.get("stamp"))
    if made_for != (task["key"], task["evaluation"], stamp):
        record = _evaluate(task, best, run_dir, stamp)
        atomic_write_json(run_dir / RECORD, record)
    return {**record, "gaps": certified_gaps(run_dir)}


def _evaluate(task: dict[str, Any], best: Path, run_dir: Path, stamp: int) -> dict[str, Any]:
    """The run's per-point record, evaluated now through the job layer."""
    ev, device = task["evaluation"], task["device"]
    metrics = _robustness(best, run_dir, ev, device)
    paired = task.get("teacher") and task["role"] == "student"
    if ev.get("certify") and paired:
        metrics["cert_agreement"] = _certified_agreement(best, task["teacher"], run_dir, ev["certify"], ev, device)
    if ev.get("faithfulness") and paired:
        metrics["agreement"] = _agreement(best, task["teacher"], run_dir, ev["faithfulness"], ev, device)
    plan = _read(run_dir / PLAN) or {}
    return {
        "label": task["label"], "seed": task["seed"], "role": task["role"], "key": task["key"], "evaluation": ev,
        "stamp": stamp, "train_seconds": plan.get("train_seconds"), "exceptions": task["exceptions"],
        "epochs": task["config"].get("epochs"), "method": task["config"].get("method", {}).get("name"),
        "metrics": metrics,
    }  # fmt: skip


def execute(task: dict[str, Any]) -> dict[str, Any]:
    """Train (or reuse) and evaluate one run; returns its record and what was done ('trained', 'reused', ...)."""
    if task.get("threads"):
        import torch

        torch.set_num_threads(task["threads"])
    started = time.perf_counter()
    if task.get("checkpoint"):  # a given teacher: evaluated only
        Path(task["run_dir"]).mkdir(parents=True, exist_ok=True)
        best, done = Path(task["checkpoint"]), "given"
    else:
        best, done = train_run(task)
    record = evaluate_run(task, best)
    return {**record, "done": done, "seconds": round(time.perf_counter() - started, 1)}


def exit_with_parent(parent: int, every: float = 2.0) -> None:
    """Worker initializer: leave when the comparison that spawned this process is gone.

    A ``kill`` of the comparison (not Ctrl-C, which reaches the whole process group) would otherwise leave its
    workers training as orphans, holding their run folders' locks. Exiting abruptly is safe: a run resumes
    from its last saved epoch and an evaluation from its progress file."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def run_all(
    tasks: list[dict[str, Any]], workers: int, on_done: Callable[[dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """Run the tasks, ``workers`` processes at a time (in this process for one); ``on_done`` sees each record."""
    if workers <= 1 or len(tasks) <= 1:
        records = []
        for task in tasks:
            records.append(execute(task))
            on_done(records[-1])
        return records
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # fork after torch has started threads can hang
    records = []
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=exit_with_parent, initargs=(os.getpid(),)
    )
    with pool:
        futures = [pool.submit(execute, {**task, "threads": threads}) for task in tasks]
        for future in as_completed(futures):
            records.append(future.result())
            on_done(records[-1])
    return records
