"""The report's figures as PNG bytes (matplotlib's Agg renderer; no pyplot, so no global state)."""

from __future__ import annotations

import io
import math
from typing import Any

from robustkd.report.settings import ReportSettings, Thresholds

DPI = 100


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    # No Software tag: it would carry matplotlib's web address into the file.
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _figure(width: float, height: float, cols: int = 1, rows: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _style(row: dict[str, Any]) -> dict[str, Any]:
    teacher = row["role"] == "teacher"
    return {"linewidth": 2.4 if teacher else 1.5, "linestyle": "-" if teacher else "--", "marker": "o"}


def robust_accuracy(rows: list[dict[str, Any]], settings: ReportSettings) -> bytes:
    """Worst-case accuracy over the attacks against eps, every model; eps 0 is clean accuracy."""
    fig, axes = _figure(7, 4.2)
    ax = axes[0][0]
    for row in rows:
        xs = [0.0] + [point["eps"] for point in row["robust_vs_eps"]]
        ys = [row["clean"]] + [point["robust"] for point in row["robust_vs_eps"]]
        ax.plot(xs, ys, label=f"{row['name']} ({row['role']})", **_style(row))
    ax.axvline(settings.eps, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("Linf eps")
    ax.set_ylabel(f"accuracy under {', '.join(a for a in settings.attacks if a != 'clean') or 'clean'} (worst case)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("Robust accuracy against eps")
    return _png(fig)


def gap_range(values: list[float], marker: float | None) -> tuple[float, float]:
    """The x range of a gap histogram: the data (and the max_gap line) with a margin of 5 % of the span.

    A fixed -1..1 would squash gaps that all lie within a few hundredths; a span under 0.02 is widened to 0.02
    so a single repeated value still gets a readable axis.
    """
    points = [*values, *([] if marker is None else [marker])] or [0.0]
    low, high = min(points), max(points)
    if high - low < 0.02:
        middle = (low + high) / 2
        low, high = middle - 0.01, middle + 0.01
    margin = 0.05 * (high - low)
    return low - margin, high + margin


def gap_histograms(
    students: list[dict[str, Any]], extras: dict[str, dict[str, Any]], settings: ReportSettings, thresholds: Thresholds
) -> bytes:
    """Per student: the empirical gap G_under and its certified upper bound on the teacher-correct points."""
    cols = min(3, len(students))
    grid_rows = math.ceil(len(students) / cols)
    fig, axes = _figure(4.2 * cols, 3.3 * grid_rows, cols, grid_rows)
    for i, row in enumerate(students):
        ax = axes[i // cols][i % cols]
        extra = extras[row["name"]]
        low, high = gap_range([*extra.get("gap", []), *extra.get("certified_gap", [])], thresholds.max_gap)
        bins = [low + (high - low) * b / 40 for b in range(41)]
        if extra.get("gap"):
            ax.hist(extra["gap"], bins=bins, alpha=0.6, label="empirical (attack)")
        vacuous = extra.get("certified_gap_vacuous", 0)
        label = "certified bound" + (f" ({vacuous} vacuous not shown)" if vacuous else "")
        if extra.get("certified_gap") or vacuous:
            ax.hist(extra.get("certified_gap", []), bins=bins, histtype="step", linewidth=1.5, label=label)
        ax.set_xlim(low, high)
        if thresholds.max_gap is not None:
            ax.axvline(thresholds.max_gap, color="red", linewidth=1, linestyle=":", label="max_gap")
        ax.set_title(row["name"], fontsize="medium")
        ax.set_xlabel(f"f_T^y - f_S^y (worst over the ball, eps {settings.eps:g})")
        ax.set_ylabel("teacher-correct points")
        ax.legend(fontsize="x-small")
    for j in range(len(students), grid_rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    fig.suptitle("Confidence-gap histograms")
    return _png(fig)


def agreement(students: list[dict[str, Any]], extras: dict[str, dict[str, Any]], settings: ReportSettings) -> bytes:
    """Certified (lower bound) and empirical (upper bound) agreement with the teacher against eps."""
    fig, axes = _figure(7, 4.2)
    ax = axes[0][0]
    colors = [f"C{i % 10}" for i in range(len(students))]
    for color, row in zip(colors, students):
        extra = extras[row["name"]]
        for key, style, what in (
            ("empirical_agreement", "-", "empirical"),
            ("certified_agreement", "--", f"certified ({settings.certify_method})"),
        ):
            points = [(eps, v) for eps, v in extra.get(key, []) if v is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, linestyle=style, marker="o", color=color, label=f"{row['name']}: {what}")
    ax.set_xlabel("Linf eps")
    ax.set_ylabel("agreement on teacher-correct points")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("Certified against empirical agreement")
    return _png(fig)


def training_curves(rows: list[dict[str, Any]], extras: dict[str, dict[str, Any]]) -> bytes | None:
    """Validation accuracy (and robust accuracy when validated under attack) and training loss per epoch."""
    curves = [(row, extras[row["name"]]["curve"]) for row in rows if extras[row["name"]]["curve"]]
    if not curves:
        return None
    fig, axes = _figure(11, 4.0, cols=2)
    acc_ax, loss_ax = axes[0]
    for i, (row, curve) in enumerate(curves):
        color = f"C{i % 10}"
        epochs = [r["epoch"] for r in curve]
        for key, style in (("val/acc", "-"), ("val/robust_acc", "--")):
            values = [(e, r[key]) for e, r in zip(epochs, curve) if key in r]
            if values:
                xs, ys = zip(*values)
                acc_ax.plot(xs, ys, linestyle=style, marker=".", color=color, label=f"{row['name']} {key}")
        losses = [(e, r["train/loss"]) for e, r in zip(epochs, curve) if "train/loss" in r]
        if losses:
            xs, ys = zip(*losses)
            loss_ax.plot(xs, ys, marker=".", color=color, label=row["name"])
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("validation accuracy")
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize="x-small")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize="x-small")
    fig.suptitle("Training curves (metrics.jsonl)")
    return _png(fig)


def all_figures(
    rows: list[dict[str, Any]], extras: dict[str, dict[str, Any]], settings: ReportSettings, thresholds: Thresholds
) -> dict[str, bytes]:
    """Every figure by name, in the order the report shows them."""
    students = [row for row in rows if row["role"] == "student"]
    figures = {
        "robust_accuracy": robust_accuracy(rows, settings),
        "gap_histograms": gap_histograms(students, extras, settings, thresholds),
        "agreement": agreement(students, extras, settings),
    }
    curves = training_curves(rows, extras)
    if curves is not None:
        figures["training_curves"] = curves
    return figures
