"""report.json -> a self-contained HTML page (inline CSS, PNGs as data: URIs) and a Markdown page."""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any

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
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.5em; text-align: right; }
th { background: #eee; } td.text { text-align: left; }
tr.teacher { background: #f4f4f4; font-weight: bold; }
.safe { color: #17692c; } .unsafe { color: #a01818; }
figure { margin: 1.5em 0; } figcaption { font-size: 0.9em; color: #555; max-width: 900px; }
img { max-width: 100%; } pre, code { font-size: 0.85em; } pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
"""


def _num(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _delta(value: float | None, reference: float | None) -> str:
    if value is None or reference is None:
        return _num(value)
    return f"{value:.4f} ({value - reference:+.4f})"


def _attacks(result: dict[str, Any]) -> list[str]:
    return [a for a in result["settings"]["attacks"] if a != "clean"]


def table(result: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Header and (role, cells) per model: every student beside its teacher, deltas against the teacher."""
    settings = result["settings"]
    attacks = _attacks(result)
    header = [
        "model", "role", "arch", "method", "params", f"latency (ms / {settings['batch_size']})", "clean",
        *attacks, "robust (worst)", "disagreement", "gap q50", "gap q90", "gap q99",
        f"cert. agreement ({settings['certify_method']})", "cert. gap bound q50", "cert. gap bound q90", "ONNX",
        "verdict",
    ]  # fmt: skip
    teachers = {row["name"]: row for row in result["models"] if row["role"] == "teacher"}
    body = []
    for row in result["models"]:
        ref = teachers.get(row["teacher"]) if row["role"] == "student" else None
        cells = [row["name"], row["role"], str(row["arch"]), str(row["method"]), f"{row['params']:,}"]
        cells.append(f"{row['latency_ms']:.2f}")
        for key in ("clean", *attacks):
            value = row["accuracy"].get(key)
            cells.append(_delta(value, ref["accuracy"].get(key)) if ref else _num(value))
        cells.append(_delta(row["robust"], ref["robust"]) if ref else _num(row["robust"]))
        if row["role"] == "student":
            gap, cert_gap = row.get("gap") or {}, row.get("certified_gap") or {}
            cells += [_num(row.get("disagreement")), _num(gap.get("q50")), _num(gap.get("q90")), _num(gap.get("q99"))]
            cells += [_num(row.get("certified_agreement")), _num(cert_gap.get("median")), _num(cert_gap.get("q90"))]
            export = row.get("export")
            cells.append(_export_cell(export))
            cells.append("safe" if row["verdict"]["safe"] else "not safe")
        else:
            cells += ["—"] * 7 + [_export_cell(row.get("export")), "teacher"]
        body.append((row["role"], cells))
    return header, body


def _export_cell(export: dict[str, Any] | None) -> str:
    if not export:
        return "—"
    state = "ok" if export.get("passed") else "FAILED"
    return f"{state} (agree {export['agreement']:.4f}, max |Δ| {export['max_logit_diff']:.1e})"


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


def html(result: dict[str, Any], figures: dict[str, bytes]) -> str:
    """One HTML file that needs nothing else: no network, no external CSS, scripts or images."""
    e = html_escape
    header, body = table(result)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>robustkd report</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>robustkd report</h1>",
        f"<p>{e(_scope(result))}.</p>",
        "<h2>Verdicts</h2>",
        '<ul id="verdicts">',
    ]
    for row in result["models"]:
        if row["role"] == "student":
            cls = "safe" if row["verdict"]["safe"] else "unsafe"
            who = f"<b>{e(row['name'])}</b> (teacher {e(row['teacher'])})"
            parts.append(f'<li class="{cls}">{who}: {e(row["verdict"]["text"])}</li>')
    parts += ["</ul>", "<h2>Students against their teachers</h2>", '<table id="models"><thead><tr>']
    parts += [f"<th>{e(h)}</th>" for h in header]
    parts.append("</tr></thead><tbody>")
    for (role, cells), row in zip(body, result["models"]):
        tds = "".join(
            f'<td class="text">{e(c)}</td>' if i < 4 else f"<td>{e(c)}</td>" for i, c in enumerate(cells[:-1])
        )
        verdict_class = {"safe": "safe", "not safe": "unsafe"}.get(cells[-1], "text")
        tds += f'<td class="{verdict_class}">{e(cells[-1])}</td>'
        parts.append(f'<tr class="{role}" data-model="{e(row["name"])}">{tds}</tr>')
    parts.append("</tbody></table>")
    parts.append(f"<p>{e(_column_note(result))}</p>")
    errors = [(row["name"], row["certified_error"]) for row in result["models"] if row.get("certified_error")]
    for name, error in errors:
        parts.append(f"<p>{e(name)}: not certified ({e(error)}).</p>")
    parts.append("<h2>Plots</h2>")
    for name, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure><img alt="{e(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{e(CAPTIONS[name])}</figcaption></figure>"
        )
    parts += ["<h2>Thresholds</h2>", _thresholds_html(result), "<h2>Settings</h2>"]
    parts.append(f"<pre>{e(json.dumps(result['settings'], indent=2))}</pre>")
    parts.append("<h2>Where each number comes from</h2>")
    for row in result["models"]:
        parts.append(f"<h3>{e(row['name'])}</h3><pre>{e(chr(10).join(_commands(row)))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def html_escape(value: Any) -> str:
    return escape(str(value), quote=True)


def _column_note(result: dict[str, Any]) -> str:
    return (
        f"Accuracies at eps {result['settings']['eps']:g}; for students, in brackets, the difference from the "
        "teacher. Disagreement and gaps are on the teacher-correct points: disagreement is the share where an "
        "attack found the two predictions differing, gap qXX the quantiles of the worst confidence gap found "
        "(f_T^y - f_S^y, student under-confident). Certified columns are lower (agreement) and upper (gap) "
        "bounds over the whole ball. Latency is the median of 10 forward passes of one batch on the device named "
        "in the settings. See docs/report.md."
    )


def _thresholds_html(result: dict[str, Any]) -> str:
    rows = [
        f"<tr><td class='text'>{html_escape(k)}</td><td>{html_escape(v)}</td></tr>"
        for k, v in result["thresholds"].items()
    ]
    return (
        "<table><thead><tr><th>threshold</th><th>value (None: not checked)</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def markdown(result: dict[str, Any], figure_names: list[str]) -> str:
    """The same table, verdicts and settings in Markdown; the plots are the PNGs under plots/."""
    header, body = table(result)
    lines = ["# robustkd report", "", _scope(result) + ".", "", "## Verdicts", ""]
    for row in result["models"]:
        if row["role"] == "student":
            lines.append(f"- **{row['name']}** (teacher {row['teacher']}): {row['verdict']['text']}")
    lines += ["", "## Students against their teachers", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for _, cells in body:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", _column_note(result), ""]
    for row in result["models"]:
        if row.get("certified_error"):
            lines += [f"{row['name']}: not certified ({row['certified_error']}).", ""]
    lines += ["## Plots", ""]
    for name in figure_names:
        lines += [f"![{name}](plots/{name}.png)", "", CAPTIONS[name], ""]
    lines += ["## Thresholds", "", "| threshold | value (None: not checked) |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["thresholds"].items()]
    lines += ["", "## Settings", "", "```json", json.dumps(result["settings"], indent=2), "```", ""]
    lines += ["## Where each number comes from", ""]
    for row in result["models"]:
        lines += [f"### {row['name']}", "", "```", *_commands(row), "```", ""]
    return "\n".join(lines)
