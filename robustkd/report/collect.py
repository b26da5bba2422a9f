"""Find the students and teachers of run dirs, and get their evaluations, cached per settings.

Every number comes from the functions behind ``robustkd evaluate`` (``evaluate_checkpoint``),
``robustkd certify`` (``certify_checkpoints``) and the faithfulness evaluation
(``evaluate_faithfulness_checkpoints``), which write their JSON straight into the cache: a cached file
is exactly what those functions wrote. A cache file's name holds a hash of everything that can change
its numbers (the weights' SHA-256, the settings, the device type, the library version), so a retrained
checkpoint or a changed setting is evaluated afresh and nothing stale is reused.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

import robustkd.jobs as jobs
import robustkd.jobs.card as card
from robustkd._version import __version__
from robustkd.attacks.threat import PRESETS, ThreatModel
from robustkd.certify._graph import UnsupportedModelError
from robustkd.checkpoint import read_meta, resolve
from robustkd.errors import CheckpointError, ConfigError, RobustKDError
from robustkd.report.settings import ReportSettings

CACHE_DIR = "report_cache"


@dataclass
class Model:
    """A checkpoint in the report: a student (with its teacher) or a teacher."""

    name: str
    role: str
    weights: Path
    meta: dict[str, Any]
    teacher: Model | None = None
    sha256: str = field(default="", repr=False)

    @property
    def run_dir(self) -> Path:
        return self.weights.parent

    @property
    def checkpoint(self) -> Path:
        """``runs/x/best``: the form every robustkd command takes."""
        return self.weights.with_suffix("")


@dataclass
class Context:
    """Where and how the evaluations run; of these, the device type and data root enter the cache keys."""

    device: str
    device_type: str
    data_root: str | None
    progress: bool
    recompute: bool
    log: Callable[[str], None]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model(name: str, role: str, weights: Path) -> Model:
    return Model(name, role, weights, read_meta(weights), sha256=_sha256(weights))


def _student_weights(path: Path, checkpoint: str) -> Path:
    if path.suffix in jobs.FOREIGN_SUFFIXES:
        raise ConfigError(f"{path}: a bare state dict is no run; give a run dir holding {checkpoint}.safetensors")
    if path.is_dir():
        if not (path / f"{checkpoint}.safetensors").is_file():
            raise CheckpointError(
                f"{path} holds no {checkpoint}.safetensors: give a run dir written by robustkd distill "
                "(or a checkpoint path such as runs/kd/best)"
            )
        return resolve(path / checkpoint)
    return resolve(path)


def _teacher_weights(student: Model, override: str | Path | None) -> Path:
    config = student.meta.get("config") or {}
    if override is not None:
        named, source = str(override), "--teacher"
    else:
        named, source = config.get("teacher"), "its config (teacher)"
        if not named:
            raise ConfigError(
                f"teacher: {student.checkpoint} was trained without a teacher (method "
                f"{student.meta.get('method')!r}); give distilled runs, or name the teacher with --teacher PATH"
            )
        if config.get("teacher_arch"):
            raise ConfigError(
                f"teacher: {student.checkpoint} was distilled from the bare state dict {named}; the report "
                "evaluates robustkd checkpoints only: save that teacher with robustkd.checkpoint.save_checkpoint "
                "and pass --teacher PATH"
            )
    if Path(named).suffix in jobs.FOREIGN_SUFFIXES:
        raise ConfigError(f"teacher: {named} is a bare state dict; save it as a robustkd checkpoint first")
    try:
        return resolve(named)
    except CheckpointError:
        raise ConfigError(
            f"teacher: {student.checkpoint} names {named!r} (from {source}), which is no checkpoint seen from "
            f"{Path.cwd()}; run the report from the folder it was distilled in, or pass --teacher PATH"
        ) from None


def find_models(
    paths: list[str | Path], checkpoint: str = "best", teacher: str | Path | None = None
) -> tuple[list[Model], list[Model]]:
    """(teachers, students): one student per path, each linked to its teacher; shared teachers once."""
    if not paths:
        raise ConfigError("runs: give at least one run dir (e.g. runs/fmnist_kd)")
    students: list[Model] = []
    teachers: dict[Path, Model] = {}
    for raw in paths:
        weights = _student_weights(Path(raw), checkpoint)
        if any(s.weights.resolve() == weights.resolve() for s in students):
            raise ConfigError(f"runs: {raw} is listed more than once")
        student = _model(weights.parent.name, "student", weights)
        t_weights = _teacher_weights(student, teacher)
        key = t_weights.resolve()
        if key not in teachers:
            teachers[key] = _model(t_weights.parent.name, "teacher", t_weights)
        student.teacher = teachers[key]
        if key == weights.resolve():
            raise ConfigError(f"runs: {raw} is its own teacher")
        jobs.choose_dataset(student.meta, student.teacher.meta)  # a report compares both on one test split
        students.append(student)
    _unique_names([*teachers.values(), *students])
    return list(teachers.values()), students


def _unique_names(models: list[Model]) -> None:
    # Runs named alike in different folders (a/kd, b/kd) keep their paths, so no row is ambiguous.
    names = [m.name for m in models]
    for m in models:
        if names.count(m.name) > 1:
            m.name = str(m.checkpoint)


# ------------------------------------------------------------------------------------- cached evaluations
def threat_at(eps: float) -> tuple[str, ThreatModel]:
    """The Linf threat model the report uses at radius ``eps``, parsed once, with its ``--protocol`` name.

    A preset when one has exactly this eps (its attack budget then applies), else ``linf-<eps>``.
    """
    for name in PRESETS.names():
        threat = PRESETS.get(name)
        if threat.norm == "linf" and threat.eps == eps:
            return name, threat
    name = ThreatModel("linf", eps).name  # parses back to exactly this eps
    return name, ThreatModel.parse(name, field="eps")


def _cached(
    kind: str, model: Model, key: dict[str, Any], compute: Callable[[Path], Any], ctx: Context, what: str
) -> tuple[dict[str, Any], Path]:
    full = {"kind": kind, "robustkd_version": __version__, "device_type": ctx.device_type, **key}
    digest = hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = model.run_dir / CACHE_DIR / f"{kind}_{model.weights.stem}_{digest}.json"
    if not ctx.recompute and path.is_file():
        try:
            data = json.loads(path.read_text())
            ctx.log(f"{what}: cached {path}")
            return data, path
        except (json.JSONDecodeError, UnicodeDecodeError):
            ctx.log(f"{what}: {path} is unreadable, evaluating again")
    ctx.log(f"{what}: evaluating")
    start = time.perf_counter()
    try:
        compute(path)
    except OSError as err:
        raise RobustKDError(f"cannot write the cached result {path}: {err}; make {model.run_dir} writable") from err
    ctx.log(f"{what}: {time.perf_counter() - start:.1f} s -> {path}")
    # Read back what the function wrote, so fresh and cached runs give the report the same numbers.
    return json.loads(path.read_text()), path


def robustness(model: Model, eps: float, settings: ReportSettings, ctx: Context) -> tuple[dict[str, Any], Path]:
    """``robustkd evaluate`` of one checkpoint at one radius (all the settings' attacks)."""
    protocol, _ = threat_at(eps)
    key = {
        "weights": model.sha256,
        "protocol": protocol,
        "attacks": list(settings.attacks),
        "n_examples": settings.n_examples,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "data_root": ctx.data_root,
    }

    def compute(out: Path) -> None:
        jobs.evaluate_checkpoint(
            model.checkpoint,
            protocol=protocol,
            attacks=list(settings.attacks),
            n_examples=settings.n_examples,
            batch_size=settings.batch_size,
            seed=settings.seed,
            device=ctx.device,
            data_root=ctx.data_root,
            out=out,
            progress=ctx.progress,
        )

    return _cached("robustness", model, key, compute, ctx, f"{model.name}: evaluate {protocol}")


def faithfulness(student: Model, settings: ReportSettings, ctx: Context) -> tuple[dict[str, Any], Path]:
    """Empirical disagreement and confidence gaps against the teacher over the whole eps sweep, in one call."""
    assert student.teacher is not None
    key = {
        "weights": student.sha256,
        "teacher_weights": student.teacher.sha256,
        "eps": list(settings.eps_sweep),
        "steps": settings.faithfulness_steps,
        "restarts": settings.faithfulness_restarts,
        "rho": list(settings.rho),
        "n_examples": settings.n_examples,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "data_root": ctx.data_root,
    }

    def compute(out: Path) -> None:
        jobs.evaluate_faithfulness_checkpoints(
            student.teacher.checkpoint,
            student.checkpoint,
            eps=list(settings.eps_sweep),
            n_examples=settings.n_examples,
            steps=settings.faithfulness_steps,
            restarts=settings.faithfulness_restarts,
            rho=settings.rho,
            batch_size=settings.batch_size,
            seed=settings.seed,
            device=ctx.device,
            data_root=ctx.data_root,
            out=out,
            progress=ctx.progress,
        )

    return _cached("faithfulness", student, key, compute, ctx, f"{student.name}: faithfulness")


def certification(
    student: Model, eps: float, settings: ReportSettings, ctx: Context
) -> tuple[dict[str, Any] | None, Path | None, str | None]:
    """``robustkd certify`` of the pair at one radius; (None, None, why) when the verifier cannot bound it."""
    assert student.teacher is not None
    key = {
        "weights": student.sha256,
        "teacher_weights": student.teacher.sha256,
        "eps": eps,
        "method": settings.certify_method,
        "rho": list(settings.rho),
        "n_examples": settings.n_examples,
        "batch_size": settings.batch_size,
        "data_root": ctx.data_root,
    }

    def compute(out: Path) -> None:
        jobs.certify_checkpoints(
            student.checkpoint,
            student.teacher.checkpoint,
            eps=threat_at(eps)[1],
            method=settings.certify_method,
            n_examples=settings.n_examples,
            batch_size=settings.batch_size,
            rho=settings.rho,
            device=ctx.device,
            data_root=ctx.data_root,
            out=out,
            progress=ctx.progress,
        )

    what = f"{student.name}: certify {settings.certify_method} at eps {eps:g}"
    try:
        data, path = _cached("certify", student, key, compute, ctx, what)
    except UnsupportedModelError as err:
        ctx.log(f"{what}: not certifiable ({err})")
        return None, None, str(err)
    return data, path, None


# ------------------------------------------------------------------------------------- commands
def robustness_command(model: Model, eps: float, settings: ReportSettings, out: Path, ctx: Context) -> str:
    """The ``robustkd evaluate`` line that writes exactly this cached result."""
    args = [
        "robustkd", "evaluate", "--model", str(model.checkpoint), "--protocol", threat_at(eps)[0],
        "--attacks", ",".join(settings.attacks), "--batch_size", str(settings.batch_size),
        "--seed", str(settings.seed), "--device", ctx.device_type,
    ]  # fmt: skip
    args += [*_common_args(settings, ctx), "--out", str(out)]
    return shlex.join(args)


def certify_command(student: Model, eps: float, settings: ReportSettings, out: Path, ctx: Context) -> str:
    assert student.teacher is not None
    args = [
        "robustkd", "certify", "--student", str(student.checkpoint), "--teacher", str(student.teacher.checkpoint),
        "--eps", np.format_float_positional(eps, trim="-"), "--method", settings.certify_method,
        "--rho", ",".join(f"{r:g}" for r in settings.rho), "--batch_size", str(settings.batch_size),
        "--device", ctx.device_type,
    ]  # fmt: skip
    args += [*_common_args(settings, ctx), "--out", str(out)]
    return shlex.join(args)


def faithfulness_call(student: Model, settings: ReportSettings, out: Path, ctx: Context) -> str:
    assert student.teacher is not None
    return (
        "robustkd.jobs.evaluate_faithfulness_checkpoints("
        f"{str(student.teacher.checkpoint)!r}, {str(student.checkpoint)!r}, eps={list(settings.eps_sweep)}, "
        f"n_examples={settings.n_examples}, steps={settings.faithfulness_steps}, "
        f"restarts={settings.faithfulness_restarts}, rho={list(settings.rho)}, batch_size={settings.batch_size}, "
        f"seed={settings.seed}, device={ctx.device_type!r}, data_root={ctx.data_root!r}, out={str(out)!r})"
    )


def _common_args(settings: ReportSettings, ctx: Context) -> list[str]:
    args = [] if settings.n_examples is None else ["--n_examples", str(settings.n_examples)]
    return args + ([] if ctx.data_root is None else ["--data.root", ctx.data_root])


# ------------------------------------------------------------------------------------- size and speed
# One latency measurement for the report and the teacher card: the median of timed eval-mode forwards.
latency_ms = card.latency_ms


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_curve(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (one per epoch); empty when the run has none or it is unreadable."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed run: keep the epochs that were written
        if isinstance(row, dict) and "epoch" in row:
            rows.append(row)
    return rows


def card_record(model: Model) -> dict[str, Any] | None:
    """The card ``robustkd card`` wrote beside this checkpoint (``<name>.card.json``), if it is of these weights."""
    path = card.card_path(model.weights)
    record = _record_of_these_weights(path, model)
    return None if record is None else {**record, "output": str(path)}


def export_record(model: Model) -> dict[str, Any] | None:
    """What ``robustkd export`` wrote into the run dir for this checkpoint, if it ran."""
    return _record_of_these_weights(model.run_dir / f"export_{model.weights.stem}.json", model)


def _record_of_these_weights(path: Path, model: Model) -> dict[str, Any] | None:
    """A JSON record beside a checkpoint, if it names these weights: one of older weights says nothing."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("weights_sha256") == model.sha256 else None
