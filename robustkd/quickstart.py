"""``robustkd quickstart``: the whole pipeline, small and offline, on Fashion-MNIST.

A certifiably trained (IBP) teacher and its card (``robustkd card``), students 4.5x smaller (parameters)
distilled from it with several methods, and one report (``robustkd report``) comparing them: size and latency
against the teacher, clean / PGD / CW accuracy, empirical relative calibration (attacks) and certified relative
calibration (bounds) at two radii. Sizes are chosen so the picture is already meaningful on two CPU cores in
minutes.
Every stage resumes: a finished run (``results.json`` present) is reused, an interrupted one resumes.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from robustkd.errors import ConfigError

STUDENTS = ("kd", "kdiga", "advfunmatch", "faithful")
STUDENT_METHODS = (*STUDENTS, "ard")

TEACHER_MODEL: dict[str, Any] = {"arch": "dm_small"}
# The students keep the teacher's convolutions but a hidden layer of 20 units instead of 100: 72,726 parameters
# against the teacher's 329,606 on Fashion-MNIST, 4.5x fewer, so the report shows what distillation compresses.
STUDENT_MODEL: dict[str, Any] = {"arch": "dm_small", "args": {"linear_size": 20}}


@dataclass(frozen=True)
class Plan:
    """Sizes of a quickstart run (the defaults are the documented ten-minute run)."""

    train_subset: int = 10_000
    teacher_epochs: int = 10
    student_epochs: int = 4
    faithful_epochs: int = 8
    eps: float = 0.1
    n_eval: int = 500
    attack_steps: int = 5
    faithfulness_steps: int = 10
    card_autoattack: int = 20  # AutoAttack's test points in the teacher card (the first N): its costliest part
    seed: int = 0


def teacher_config(plan: Plan) -> dict[str, Any]:
    """IBP training (Gowal et al. 2018), DM-small, short eps ramp: a teacher with non-vacuous certificates."""
    epochs = plan.teacher_epochs
    return {
        "name": "teacher",
        "seed": plan.seed,
        "epochs": epochs,
        "data": _data(plan, 256),
        "model": copy.deepcopy(TEACHER_MODEL),
        "method": {
            "name": "ibp",
            "args": {
                "threat": {"eps": 1.5 * plan.eps},
                "warmup_epochs": 1,
                "ramp_epochs": max(1, epochs // 2),
                "kappa_start": 1.0,
                "kappa_end": 0.5,
            },
        },
        "optim": {"name": "adam", "lr": 1e-3, "schedule": "cosine"},
        # Clean accuracy peaks before the eps ramp: keep the epoch with the most certified validation points.
        "validate": {"certify": "ibp", "protocol": f"linf-{plan.eps:g}"},
    }


def student_config(method: str, plan: Plan) -> dict[str, Any]:
    step = min(plan.eps, 2.5 * plan.eps / plan.attack_steps)
    attack = {"threat": {"eps": plan.eps, "step_size": step, "steps": plan.attack_steps}}
    args: dict[str, Any] = {
        "kd": {"temperature": 4.0, "alpha": 0.9},
        "kdiga": {"temperature": 4.0, "alpha": 0.9, "gamma": 3.0, "grad_norm": "l2_squared_per_example"},
        "advfunmatch": {**attack, "temperature": 1.0},
        "ard": {**attack, "temperature": 30.0},
        "faithful": {
            "threat": {"eps": plan.eps},
            "warmup_epochs": 1,
            "ramp_epochs": max(1, plan.faithful_epochs // 2),
            "kappa_max": 0.5,
            "loss_form": "log_hinge",
        },
    }[method]
    # Certified training (an eps ramp after a warm-up) needs the longer schedule and larger batches.
    ramped = "ramp_epochs" in args
    optim = {"name": "adam", "lr": 1e-3, "schedule": "cosine", "grad_clip": 5.0}
    return {
        "name": method,
        "seed": plan.seed,
        "epochs": plan.faithful_epochs if ramped else plan.student_epochs,
        "data": _data(plan, 256 if ramped else 128),
        "model": copy.deepcopy(STUDENT_MODEL),
        "method": {"name": method, "args": args},
        "optim": optim,
        "validate": {"select": "last"},
    }


def _data(plan: Plan, batch_size: int) -> dict[str, Any]:
    return {
        "dataset": "fashion-mnist",
        "val_fraction": 0.1,
        "batch_size": batch_size,
        "train_subset": plan.train_subset,
    }


def _train(raw: dict[str, Any], out: Path, teacher: Path | None, progress: bool) -> Path:
    from robustkd.config import from_dict
    from robustkd.engine import train

    run_dir = out / raw["name"]
    if (run_dir / "results.json").exists():
        return run_dir / "best"
    cfg = from_dict({**raw, "out_dir": str(out), "teacher": str(teacher) if teacher else None})
    cfg.progress = progress
    cfg.resume = (run_dir / "resume.safetensors").exists()
    return train(cfg).best


class _Clock:
    seconds: float = 0.0


class _Stages:
    """Numbered stage headings, ``[3/6] kdiga student, 4 epochs``, each closed by its elapsed time (when shown)."""

    def __init__(self, total: int, show: bool) -> None:
        self.total, self.show, self.done = total, show, 0

    @contextmanager
    def stage(self, title: str, name: str) -> Iterator[_Clock]:
        self.done += 1
        number = f"[{self.done}/{self.total}]"
        if self.show:
            print(f"{number} {title}", flush=True)
        clock, t0 = _Clock(), time.perf_counter()
        yield clock
        clock.seconds = round(time.perf_counter() - t0, 1)
        if self.show:
            print(f"{number} {name} done in {_elapsed(clock.seconds)}", flush=True)


def _elapsed(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"


def teacher_card(teacher: Path, plan: Plan, device: str, progress: bool) -> dict[str, Any]:
    """``robustkd card`` of the teacher at the report's radius (the report shows it); reused when already made."""
    from robustkd.checkpoint import read_meta
    from robustkd.jobs.card import card_path, make_card

    path = card_path(teacher)
    try:
        card = json.loads(path.read_text())
        made = (card["weights_sha256"], card["robustness"]["n"], card["autoattack"].get("n"), card["protocol"]["eps"])
    except (OSError, ValueError, KeyError, TypeError):
        made = None  # no card yet, or one that cannot be read: make it
    if made == (read_meta(teacher).get("weights_sha256"), plan.n_eval, plan.card_autoattack, plan.eps):
        return card
    return make_card(
        teacher,
        device=device,
        progress=progress,
        n_examples=plan.n_eval,
        n_autoattack=plan.card_autoattack,
        eps=plan.eps,
    )


def report_settings(plan: Plan) -> dict[str, Any]:
    return {
        "eps": plan.eps,
        "eps_sweep": (plan.eps / 2, plan.eps),
        "attacks": ("clean", "pgd20", "cw20"),
        "n_examples": plan.n_eval,
        "seed": plan.seed,
        "certify_method": "best",
        "faithfulness_steps": plan.faithfulness_steps,
        "faithfulness_restarts": 1,
    }


def run(
    out: str | Path = "runs/quickstart",
    *,
    methods: Sequence[str] = STUDENTS,
    plan: Plan | None = None,
    progress: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    """Train the teacher and the students, then write the report comparing them (``<out>/report``).

    Returns the report's summary (as :func:`robustkd.report` does) with the run folders and the seconds each
    stage took.
    """
    from robustkd.report import make_report

    plan = plan or Plan()
    unknown = sorted(set(methods) - set(STUDENT_METHODS))
    if unknown:
        raise ConfigError(f"methods: {', '.join(unknown)} not offered here; choose from {', '.join(STUDENT_METHODS)}")
    out = Path(out)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    stages = _Stages(3 + len(methods), progress)

    def timed(name: str, raw: dict[str, Any], teacher: Path | None, title: str) -> Path:
        reused = " (finished earlier: reused)" if (out / raw["name"] / "results.json").exists() else ""
        with stages.stage(f"{title}, {raw['epochs']} epochs{reused}", name) as clock:
            path = _train({**raw, "device": device}, out, teacher, progress)
        seconds[name] = clock.seconds
        return path

    teacher = timed("teacher", teacher_config(plan), None, "teacher (IBP, certifiable)")
    title = f"teacher card: {plan.n_eval} test points, AutoAttack on {plan.card_autoattack}"
    with stages.stage(title, "teacher card") as clock:
        teacher_card(teacher, plan, device, progress)
    seconds["card"] = clock.seconds
    runs = [timed(m, student_config(m, plan), teacher, f"{m} student").parent for m in methods]
    with stages.stage(f"report: {1 + len(methods)} models on {plan.n_eval} test points", "report") as clock:
        result = make_report(runs, out / "report", settings=report_settings(plan), device=device, progress=progress)
    seconds["report"] = clock.seconds
    result["runs"] = {"teacher": str(teacher.parent), **{m: str(r) for m, r in zip(methods, runs)}}
    result["seconds"] = {**seconds, "total": round(time.perf_counter() - started, 1)}
    result["plan"] = asdict(plan)
    return result
