"""``robustkd report``: evaluate (or reuse) every student and teacher, judge, plot and write the report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import robustkd.report.collect as collect
import robustkd.report.plots as plots
import robustkd.report.ranking as ranking
import robustkd.report.render as render
import robustkd.report.teachercard as teachercard
from robustkd.checkpoint import load_model
from robustkd.errors import ConfigError, RobustKDError
from robustkd.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from robustkd.report.collect import Context, Model
from robustkd.report.settings import ReportSettings, Thresholds, split_options
from robustkd.report.vacuity import vacuous_points, vacuous_quantiles
from robustkd.report.verdict import verdict
from robustkd.runtime import resolve_device

GAP_KEYS = ("mean", "q50", "q90", "q99", "max")
CERT_GAP_KEYS = ("mean", "median", "q90", "max")


def make_report(
    runs: str | Path | Sequence[str | Path],
    out: str | Path = "report",
    *,
    settings: ReportSettings | dict[str, Any] | None = None,
    thresholds: Thresholds | dict[str, Any] | None = None,
    teacher: str | Path | None = None,
    device: str = "auto",
    data_root: str | None = None,
    recompute: bool = False,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Compare distilled students with their teachers and write ``report.html``, ``report.md``, ``report.json``.

    ``runs`` are run dirs written by ``robustkd distill`` (or checkpoint paths such as ``runs/kd/best``);
    each one's teacher is the checkpoint its saved config names, unless ``teacher`` overrides it for all.
    ``settings`` (:class:`ReportSettings`) say what is evaluated, ``thresholds`` (:class:`Thresholds`) what
    a student must meet; keyword ``options`` set single fields of either (``eps=0.05, max_gap=0.2``).
    Results are cached as JSON under each run dir's ``report_cache/`` and reused when the weights and
    settings match; ``recompute=True`` evaluates again. Returns the content of ``report.json`` plus
    ``"outputs"`` (the paths written).
    """
    setting_opts, threshold_opts = split_options(options)
    settings = _settings(settings, setting_opts)
    thresholds = _thresholds(thresholds, threshold_opts)
    paths = [runs] if isinstance(runs, str | Path) else list(runs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file; give a folder for the report")
    dev = resolve_device(device)
    teachers, students = collect.find_models(paths, settings.checkpoint, teacher)
    ctx = Context(str(dev), dev.type, data_root, progress, recompute, _logger(progress))
    rows, extras = _rows(teachers, students, settings, thresholds, ctx, dev)
    ordered = []
    for t in teachers:
        ordered.append(rows[t.name])
        ordered += [rows[s.name] for s in students if s.teacher is t]
    result = {
        "title": "robustkd report",
        "settings": _stated(settings, dev, data_root),
        "thresholds": thresholds.to_dict(),
        "models": ordered,
        "summary": {
            s.name: {"safe": rows[s.name]["verdict"]["safe"], "text": rows[s.name]["verdict"]["text"]} for s in students
        },
        **_ranking(ordered),
    }
    cards = {t.name: collect.card_record(t) for t in teachers}
    result["teacher_cards"] = teachercard.teacher_cards(ordered, result["settings"], cards)
    figures = plots.all_figures(ordered, extras, settings, thresholds)
    _write(out, result, figures)
    result["outputs"] = {kind: str(out / f"report.{kind}") for kind in ("html", "md", "json")}
    return result


def _stated(settings: ReportSettings, dev: Any, data_root: str | None) -> dict[str, Any]:
    """The settings as the report states them: with the protocol at eps, its attack budget, device and data."""
    protocol, threat = collect.threat_at(settings.eps)
    extra = {"protocol": protocol, "threat": threat.to_dict(), "device": str(dev), "data_root": data_root}
    return {**settings.to_dict(), **extra}


def _ranking(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which student to ship: the rule, the students in its order, the best-ranked one that is not safe."""
    ranked = ranking.rank_students(rows)
    return {"ranking_rule": ranking.RULE, "ranking": ranked, "nearest_miss": ranking.nearest_miss(ranked)}


def _rows(
    teachers: list[Model],
    students: list[Model],
    settings: ReportSettings,
    thresholds: Thresholds,
    ctx: Context,
    dev: Any,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """A row (and the extra data of its plots) per model; each student's row with its verdict."""
    rows: dict[str, dict[str, Any]] = {}
    extras: dict[str, dict[str, Any]] = {}
    for model in [*teachers, *students]:
        rows[model.name], extras[model.name] = _model_row(model, settings, ctx, dev)
    for student in students:
        row, extra = rows[student.name], extras[student.name]
        row.update(_faithfulness_columns(student, settings, ctx, extra))
        row.update(_certified_columns(student, settings, ctx, extra))
        row.update(teachercard.compression(row, rows[student.teacher.name]))
        row["verdict"] = verdict(row, rows[student.teacher.name], thresholds, settings.eps)
    return rows, extras


def _write(out: Path, result: dict[str, Any], figures: dict[str, bytes]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, png in figures.items():
            atomic_write_bytes(out / "plots" / f"{name}.png", png)
        atomic_write_json(out / "report.json", result)
        atomic_write_text(out / "report.md", render.markdown(result, list(figures)))
        atomic_write_text(out / "report.html", render.html(result, figures))
    except OSError as err:
        raise RobustKDError(f"cannot write the report into {out}: {err}") from err


def _settings(settings: ReportSettings | dict[str, Any] | None, opts: dict[str, Any]) -> ReportSettings:
    if settings is None:
        settings = ReportSettings()
    elif isinstance(settings, dict):
        _, unknown = split_options(settings)
        if unknown:
            raise ConfigError(f"settings: {', '.join(unknown)} are thresholds, not settings")
        settings = ReportSettings(**settings)
    elif not isinstance(settings, ReportSettings):
        raise ConfigError(f"settings: expected a ReportSettings or a dict, got {type(settings).__name__}")
    return replace(settings, **opts) if opts else settings


def _thresholds(thresholds: Thresholds | dict[str, Any] | None, opts: dict[str, Any]) -> Thresholds:
    if thresholds is None:
        thresholds = Thresholds()
    elif isinstance(thresholds, dict):
        unknown, _ = split_options(thresholds)
        if unknown:
            raise ConfigError(f"thresholds: {', '.join(unknown)} are settings, not thresholds")
        thresholds = Thresholds(**thresholds)
    elif not isinstance(thresholds, Thresholds):
        raise ConfigError(f"thresholds: expected a Thresholds or a dict, got {type(thresholds).__name__}")
    return replace(thresholds, **opts) if opts else thresholds


def _logger(progress: bool):
    if not progress:
        return lambda message: None
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    return lambda message: console.print(f"report: {message}", markup=False, soft_wrap=True)


def _model_row(model: Model, settings: ReportSettings, ctx: Context, dev: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Size, speed and robustness (every radius of the sweep) of one checkpoint."""
    net = load_model(model.checkpoint, device=dev)
    meta = model.meta
    row: dict[str, Any] = {
        "name": model.name,
        "role": model.role,
        "teacher": model.teacher.name if model.teacher is not None else None,
        "checkpoint": str(model.checkpoint),
        "weights_sha256": model.sha256,
        "arch": meta.get("arch"),
        "method": meta.get("method"),
        "dataset": meta.get("dataset"),
        "params": collect.parameter_count(net),
        "latency_ms": collect.latency_ms(net, list(meta["input_shape"]), settings.batch_size, dev),
        "latency_batch": settings.batch_size,
        "latency_device": str(dev),
    }
    del net
    sweep, sources, commands = [], {}, {}
    for eps in settings.eps_sweep:
        data, path = collect.robustness(model, eps, settings, ctx)
        accuracy = {name: block["accuracy"] for name, block in data["attacks"].items()}
        sweep.append({"eps": eps, "protocol": data["settings"]["protocol"], "accuracy": accuracy})
        sweep[-1]["robust"] = data["worst_case"]["accuracy"]
        sources[f"robustness@{eps:g}"] = str(path)
        commands[f"robustness@{eps:g}"] = collect.robustness_command(model, eps, settings, path, ctx)
        if eps == settings.eps:
            row["accuracy"] = accuracy
            row["clean"] = accuracy["clean"]
            row["robust"] = data["worst_case"]["accuracy"]
            row["n"] = data["settings"]["n"]
            row["subset"] = data["settings"]["subset"]
            row["warnings"] = data.get("warnings", [])
    row["robust_vs_eps"] = sweep
    row["export"] = collect.export_record(model)
    row["sources"], row["commands"] = sources, commands
    extra = {"curve": collect.training_curve(model.run_dir)}
    return row, extra


def _faithfulness_columns(
    student: Model, settings: ReportSettings, ctx: Context, extra: dict[str, Any]
) -> dict[str, Any]:
    data, path = collect.faithfulness(student, settings, ctx)
    by_eps = {block["eps"]: block for block in data["results"]}
    block = by_eps[settings.eps]["teacher_correct"]
    index = data["settings"]["eps"].index(settings.eps)
    gaps = data["per_example"]["eps"][index]["gap_under"]
    extra["gap"] = [g for g in gaps if g is not None]
    rates = [(eps, b["teacher_correct"]["disagreement"]["rate"]) for eps, b in sorted(by_eps.items())]
    extra["empirical_agreement"] = [(eps, None if rate is None else 1 - rate) for eps, rate in rates]
    return {
        "n_teacher_correct": block["n"],
        "disagreement": block["disagreement"]["rate"],
        "gap": {key: block["gap_under"][key] for key in GAP_KEYS},
        "faithfulness_source": str(path),
        "faithfulness_call": collect.faithfulness_call(student, settings, path, ctx),
    }


def _certified_columns(student: Model, settings: ReportSettings, ctx: Context, extra: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"certified_agreement": None, "certified_gap": None, "certified_error": None}
    curve = []
    for eps in settings.eps_sweep:
        data, path, error = collect.certification(student, eps, settings, ctx)
        if data is None:
            out["certified_error"] = error
            curve.append((eps, None))
            continue
        block = data["teacher_correct"]
        curve.append((eps, block["agreement_certified"]))
        out.setdefault("certify_sources", {})[f"certify@{eps:g}"] = str(path)
        out.setdefault("certify_commands", {})[f"certify@{eps:g}"] = collect.certify_command(
            student, eps, settings, path, ctx
        )
        if eps == settings.eps:
            out["certified_agreement"] = block["agreement_certified"]
            out["teacher_certified_accuracy"] = data["teacher"]["certified_accuracy"]
            out["certified_gap"] = {key: block["gap_upper"][key] for key in CERT_GAP_KEYS}
            out.update(_vacuity(data["per_example"], extra))
    extra["certified_agreement"] = curve
    return out


def _vacuity(per: dict[str, list[Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """Which certified gap bounds of the teacher-correct points say nothing (see ``report.vacuity``)."""
    keep = per["teacher_correct"]
    bounds = [g for g, k in zip(per["gap_upper"], keep) if k]
    lower = [low for low, k in zip(per["student_conf_lower"], keep) if k]
    vacuous = vacuous_points(lower, bounds)
    extra["certified_gap"] = [g for g, v in zip(bounds, vacuous) if not v]
    extra["certified_gap_vacuous"] = sum(vacuous)
    return {
        "certified_gap_vacuous": vacuous_quantiles(vacuous),
        "certified_gap_vacuous_share": sum(vacuous) / len(vacuous) if vacuous else None,
    }
