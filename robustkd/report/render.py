"""report.json -> a self-contained HTML page (inline CSS, PNGs as data: URIs) and a Markdown page."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from robustkd.report.verdict import CHECKS

CAPTIONS = {
    "robust_accuracy": "Accuracy under the strongest of the attacks (worst case per point) against eps; eps 0 is "
    "clean accuracy. Teachers solid, students dashed; the dotted line is the stated eps.",
    "gap_histograms": "Confidence gap f_T^y - f_S^y at its worst over the eps-ball, on the teacher-correct points: "
    "filled, the gap an attack found (a lower bound on the true worst case); outlined, the certified upper bound.",
    "agreement": "Share of teacher-correct points on which the student agrees with the teacher over the whole ball: "
    "empirical (no attack found a disagreement; an upper bound) solid, certified (a lower bound) dashed.",
    "training_curves": "Per epoch, from each run's metrics.jsonl: validation accuracy (robust accuracy dashed, "
    "when the run validated under attack) and training loss.",
}

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; max-width: 100%; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.5em; text-align: right; vertical-align: top; }
th { background: #eee; } td.text, th.text { text-align: left; }
tr.teacher { background: #f4f4f4; font-weight: bold; }
td.safe, td.unsafe { white-space: nowrap; }
.safe { color: #17692c; } .unsafe { color: #a01818; } .vacuous { color: #777; font-style: italic; }
figure { margin: 1.5em 0; } figcaption { font-size: 0.9em; color: #555; max-width: 900px; }
img { max-width: 100%; } pre, code { font-size: 0.85em; }
pre { background: #f6f6f6; padding: 0.6em; margin: 0.4em 0; white-space: pre-wrap; overflow-wrap: anywhere; }
"""

# The words a cell holds instead of a number: a certificate that says nothing, a check switched off.
VACUOUS = "vacuous"
OFF = "off"

SETTING_MEANINGS = {
    "eps": "stated Linf radius of the tables and the verdicts",
    "protocol": "robustkd evaluate protocol at eps",
    "threat": "its attack budget",
    "eps_sweep": "radii of the plots",
    "attacks": "robustkd evaluate recipes at every radius",
    "n_examples": "test points evaluated (the first N)",
    "seed": "seed of every attack's random starts",
    "certify_method": "verifier of robustkd certify",
    "faithfulness_steps": "steps of each disagreement and gap search",
    "faithfulness_restarts": "restarts of each search",
    "rho": "gap thresholds recorded by both faithfulness evaluations",
    "batch_size": "batch size of every evaluation and of the latency",
    "checkpoint": "which checkpoint of a run dir is the student",
    "device": "where the evaluations ran",
    "data_root": "where the data was read",
}


def _num(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _delta(value: float | None, reference: float | None) -> str:
    if value is None or reference is None:
        return _num(value)
    return f"{value:.4f} ({value - reference:+.4f})"


def _attacks(result: dict[str, Any]) -> list[str]:
    return [a for a in result["settings"]["attacks"] if a != "clean"]


def _teachers(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in result["models"] if row["role"] == "teacher"}


def who(row: dict[str, Any]) -> str:
    """``kd (teacher: teacher_pgd)``: a student and the teacher it is compared with."""
    return f"{row['name']} (teacher: {row['teacher']})"


def accuracy_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Every model, each student below its teacher: size, speed and accuracy, students' deltas in brackets."""
    settings = result["settings"]
    attacks = _attacks(result)
    header = ["model", "role", "arch", "method", "params", f"latency (ms / {settings['batch_size']})",
              "compression (T/S params)", "latency ratio (T/S)", "clean", *attacks, "robust (worst)",
              "ONNX"]  # fmt: skip
    teachers = _teachers(result)
    body = []
    for row in result["models"]:
        ref = teachers.get(row["teacher"]) if row["role"] == "student" else None
        cells = [row["name"], row["role"], str(row["arch"]), str(row["method"]), f"{row['params']:,}"]
        cells.append(f"{row['latency_ms']:.2f}")
        cells += [_ratio(row.get("compression")), _ratio(row.get("latency_ratio"))]
        for key in ("clean", *attacks):
            value = row["accuracy"].get(key)
            cells.append(_delta(value, ref["accuracy"].get(key)) if ref else _num(value))
        cells.append(_delta(row["robust"], ref["robust"]) if ref else _num(row["robust"]))
        cells.append(_export_cell(row.get("export")))
        body.append(cells)
    return header, body


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def card_lines(card: dict[str, Any]) -> list[str]:
    """What a teacher card says about the model before its numbers: identity, size, latency, where it comes from."""
    latency = ", ".join(f"{ms:.2f} ms at batch {batch}" for batch, ms in card["latency"]["ms"].items())
    return [
        f"{card['name']}: {card['arch']} on {card['dataset']}, {card['params']:,} parameters; "
        f"protocol {card['protocol']} (eps {card['eps']:.4g})",
        f"latency on {card['latency']['device']}: {latency}",
        f"weights SHA-256 {card['weights_sha256']}",
        f"source: {card['source']}",
    ]


def card_table(card: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The teacher card's accuracies, each with the test points it was measured on (or why it was skipped)."""
    body = [[row["measure"], _num(row["accuracy"]), row["points"]] for row in card["rows"]]
    return ["measure", "accuracy", "test points"], body


def _card_html(result: dict[str, Any]) -> list[str]:
    e = html_escape
    parts = []
    for i, card in enumerate(result.get("teacher_cards", [])):
        parts.append(f'<div class="card" data-teacher="{e(card["name"])}">')
        parts += [f"<p>{e(line)}</p>" for line in card_lines(card)]
        parts += [_html_table(*card_table(card), f"teacher-card-{i}", text_columns=1), "</div>"]
    return parts


def _cert_gap_cell(row: dict[str, Any], key: str) -> str:
    if (row.get("certified_gap_vacuous") or {}).get(key):
        return VACUOUS
    return _num((row.get("certified_gap") or {}).get(key))


def faithfulness_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Every student against its teacher on the teacher-correct points: attacks, then certificates."""
    header = ["student", "teacher", "disagreement", "gap q50", "gap q90", "gap q99",
              f"cert. agreement ({result['settings']['certify_method']})", "cert. gap bound q50",
              "cert. gap bound q90", "verdict"]  # fmt: skip
    body = []
    for row in result["models"]:
        if row["role"] != "student":
            continue
        gap = row.get("gap") or {}
        cells = [row["name"], str(row["teacher"]), _num(row.get("disagreement"))]
        cells += [_num(gap.get("q50")), _num(gap.get("q90")), _num(gap.get("q99"))]
        cells += [_num(row.get("certified_agreement")), _cert_gap_cell(row, "median"), _cert_gap_cell(row, "q90")]
        cells.append("safe" if row["verdict"]["safe"] else "not safe")
        body.append(cells)
    return header, body


def ranking_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The students in the order of the ranking rule, with what each one misses."""
    header = ["rank", "student", "teacher", "verdict", "failed checks", "relative excess", "robust (worst)", "fails"]
    body = [
        [
            str(e["rank"]),
            e["name"],
            str(e["teacher"]),
            "safe" if e["safe"] else "not safe",
            str(e["failed_checks"]),
            f"{e['relative_excess']:.3f}",
            _num(e["robust"]),
            "; ".join(e["misses"]) or "—",
        ]
        for e in result["ranking"]
    ]
    return header, body


def _verdict_class(cell: str) -> str:
    return {"safe": "safe", "not safe": "unsafe", VACUOUS: "vacuous"}.get(cell, "")


def _export_cell(export: dict[str, Any] | None) -> str:
    if not export:
        return "—"
    state = "ok" if export.get("passed") else "FAILED"
    return f"{state} (agree {export['agreement']:.4f}, max |Δ| {export['max_logit_diff']:.1e})"


def _setting_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(_setting_value(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_setting_value(v)}" for k, v in value.items())
    return str(value)


def settings_rows(result: dict[str, Any]) -> list[list[str]]:
    """(option, value, meaning) per setting, readable: lists joined, None as —, n_examples None as all."""
    rows = []
    for key, value in result["settings"].items():
        shown = "all" if key == "n_examples" and value is None else _setting_value(value)
        rows.append([key, shown, SETTING_MEANINGS.get(key, "")])
    return rows


def threshold_rows(result: dict[str, Any]) -> list[list[str]]:
    """(threshold, value or "off", the check it sets)."""
    meaning = {field: f"{label} {rule} threshold" for field, label, _, rule in CHECKS}
    return [[k, OFF if v is None else f"{v:g}", meaning.get(k, "")] for k, v in result["thresholds"].items()]


def _scope(result: dict[str, Any]) -> str:
    first = result["models"][0]
    n = first.get("n")
    scope = f"the first {n}, a subset" if first.get("subset") else "all of them"
    s = result["settings"]
    return (
        f"Test split of {first.get('dataset')}: {n} points ({scope}); stated radius Linf eps {s['eps']:g} "
        f"(protocol {s['protocol']}); attacks {', '.join(s['attacks'])}; seed {s['seed']}; certification "
        f"{s['certify_method']}; faithfulness searches {s['faithfulness_steps']} steps x "
        f"{s['faithfulness_restarts']} restarts; device {s['device']}"
    )


def _commands(row: dict[str, Any]) -> list[str]:
    lines = list(row.get("commands", {}).values()) + list(row.get("certify_commands", {}).values())
    if row.get("faithfulness_call"):
        lines.append(row["faithfulness_call"])
    return lines


def _html_table(
    header: list[str], body: list[list[str]], table_id: str, attrs: list[str] | None = None, text_columns: int = 2
) -> str:
    """A table; the first ``text_columns`` columns (and any non-numeric cell) left-aligned."""
    e = html_escape
    # A header sits over its column: left over text, right over numbers (as read in the first row).
    text = [j < text_columns or (bool(body) and not _numeric(body[0][j])) for j in range(len(header))]
    ths = (f'<th class="text">{e(h)}</th>' if t else f"<th>{e(h)}</th>" for h, t in zip(header, text))
    parts = [f'<table id="{table_id}"><thead><tr>', *ths, "</tr></thead><tbody>"]
    for i, cells in enumerate(body):
        tds = []
        for j, cell in enumerate(cells):
            cls = _verdict_class(cell) or ("text" if j < text_columns or not _numeric(cell) else "")
            tds.append(f'<td class="{cls}">{e(cell)}</td>' if cls else f"<td>{e(cell)}</td>")
        parts.append(f"<tr{attrs[i] if attrs else ''}>{''.join(tds)}</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _numeric(cell: str) -> bool:
    return cell[:1].isdigit() or cell[:1] in "-—"


def _ranking_html(result: dict[str, Any]) -> list[str]:
    e = html_escape
    header, body = ranking_table(result)
    parts = [f'<p id="ranking-rule">Ranked by this rule: {e(result["ranking_rule"])}.</p>']
    parts.append(_html_table(header, body, "ranking", text_columns=3))
    miss = result.get("nearest_miss")
    if miss is not None:
        parts.append(f'<p id="nearest-miss"><b>Nearest miss</b>: {e(miss["text"])}.</p>')
    return parts


def html(result: dict[str, Any], figures: dict[str, bytes]) -> str:
    """One HTML file that needs nothing else: no network, no external CSS, scripts or images."""
    e = html_escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>robustkd report</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>robustkd report</h1>",
        f"<p>{e(_scope(result))}.</p>",
        "<h2>Which student to ship</h2>",
        *_ranking_html(result),
        "<h2>Verdicts</h2>",
        '<ul id="verdicts">',
    ]
    for row in result["models"]:
        if row["role"] == "student":
            cls = "safe" if row["verdict"]["safe"] else "unsafe"
            name = f"<b>{e(row['name'])}</b> (teacher: {e(row['teacher'])})"
            parts.append(f'<li class="{cls}">{name}: {e(row["verdict"]["text"])}</li>')
    parts += ["</ul>", "<h2>Teacher card</h2>", *_card_html(result), "<h2>Size and accuracy</h2>"]
    header, body = accuracy_table(result)
    attrs = [f' class="{row["role"]}" data-model="{e(row["name"])}"' for row in result["models"]]
    parts.append(_html_table(header, body, "models", attrs, text_columns=4))
    parts += ["<h2>Faithfulness to the teacher</h2>"]
    header, body = faithfulness_table(result)
    parts.append(_html_table(header, body, "faithfulness"))
    parts += [f"<p>{e(line)}</p>" for line in _notes(result)]
    parts.append("<h2>Plots</h2>")
    for name, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure><img alt="{e(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{e(CAPTIONS[name])}</figcaption></figure>"
        )
    thresholds = _html_table(["threshold", "value", "the check"], threshold_rows(result), "thresholds", None, 3)
    settings = _html_table(["option", "value", "meaning"], settings_rows(result), "settings", None, 3)
    parts += ["<h2>Thresholds</h2>", thresholds, "<h2>Settings</h2>", settings]
    parts.append("<h2>Where each number comes from</h2>")
    for row in result["models"]:
        # One block per command: a long line wraps inside its own block, so where each command ends stays clear.
        parts.append(f"<h3>{e(row['name'])}</h3>" + "".join(f"<pre>{e(line)}</pre>" for line in _commands(row)))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def html_escape(value: Any) -> str:
    return escape(str(value), quote=True)


def _notes(result: dict[str, Any]) -> list[str]:
    """The notes under the tables: how to read the columns, vacuous certificates, models not certified."""
    notes = [_column_note(result)]
    vacuous = [row for row in result["models"] if any((row.get("certified_gap_vacuous") or {}).values())]
    if vacuous:
        shares = ", ".join(f"{row['name']} {row['certified_gap_vacuous_share']:.0%}" for row in vacuous)
        notes.append(
            f"{VACUOUS}: the certified gap bound at that quantile carries no information about the student: the "
            "student's certified lower bound on its confidence is 0 there (the bound is then the teacher's own "
            f"upper bound) or the bound is the trivial 1. Share of teacher-correct points so bounded: {shares}."
        )
    for row in result["models"]:
        if row.get("certified_error"):
            notes.append(f"{row['name']}: not certified ({row['certified_error']}).")
    return notes


def _column_note(result: dict[str, Any]) -> str:
    return (
        f"Accuracies at eps {result['settings']['eps']:g}; for students, in brackets, the difference from the "
        "teacher. Disagreement and gaps are on the teacher-correct points: disagreement is the share where an "
        "attack found the two predictions differing, gap qXX the quantiles of the worst confidence gap found "
        "(f_T^y - f_S^y, student under-confident). Certified columns are lower (agreement) and upper (gap) "
        "bounds over the whole ball. Latency is the median of 10 forward passes of one batch on the device named "
        "in the settings; for students, compression is the teacher's parameter count over the student's and the "
        "latency ratio the teacher's latency over the student's (above 1: the student is faster). "
        "See docs/report.md."
    )


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    return [*lines, ""]


def markdown(result: dict[str, Any], figure_names: list[str]) -> str:
    """The same tables, ranking, verdicts and settings in Markdown; the plots are the PNGs under plots/."""
    lines = ["# robustkd report", "", _scope(result) + ".", "", "## Which student to ship", ""]
    lines += [f"Ranked by this rule: {result['ranking_rule']}.", "", *_md_table(*ranking_table(result))]
    if result.get("nearest_miss") is not None:
        lines += [f"**Nearest miss**: {result['nearest_miss']['text']}.", ""]
    lines += ["## Verdicts", ""]
    for row in result["models"]:
        if row["role"] == "student":
            lines.append(f"- **{who(row)}**: {row['verdict']['text']}")
    lines += ["", "## Teacher card", ""]
    for card in result.get("teacher_cards", []):
        lines += [*(f"{line}  " for line in card_lines(card)), "", *_md_table(*card_table(card))]
    lines += ["## Size and accuracy", "", *_md_table(*accuracy_table(result))]
    lines += ["## Faithfulness to the teacher", "", *_md_table(*faithfulness_table(result))]
    for note in _notes(result):
        lines += [note, ""]
    lines += ["## Plots", ""]
    for name in figure_names:
        lines += [f"![{name}](plots/{name}.png)", "", CAPTIONS[name], ""]
    lines += ["## Thresholds", "", *_md_table(["threshold", "value", "the check"], threshold_rows(result))]
    lines += ["## Settings", "", *_md_table(["option", "value", "meaning"], settings_rows(result))]
    lines += ["## Where each number comes from", ""]
    for row in result["models"]:
        lines += [f"### {row['name']}", "", "```", *_commands(row), "```", ""]
    return "\n".join(lines)
