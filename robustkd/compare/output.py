"""A comparison's outputs: leaderboard (Markdown, HTML, JSON), claim verdicts, a Pareto plot, a RESULTS fragment."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from robustkd.compare.table import ORDER
from robustkd.io import atomic_write_json, atomic_write_text

NAMES = {"clean": "clean", "pgd20": "PGD-20", "cw20": "CW-20", "robust": "robust (worst case)",
         "autoattack": "AutoAttack", "agreement": "empirical agreement on P",
         "cert_agreement": "certified agreement on P"}  # fmt: skip


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """clean, the attacks (pgd20, cw20, ...), then robust, AutoAttack and certified agreement."""
    present = {m for row in rows for m in row["metrics"]}
    rank = {m: i for i, m in enumerate(ORDER)}
    return sorted(present, key=lambda m: (rank.get(m, rank["robust"] - 0.5), m))


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "–"
    low, high = entry["ci"]
    return f"{entry['mean']:.3f} ± {entry['std']:.3f} [{low:.3f}, {high:.3f}]"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def leaderboard_markdown(rows: list[dict[str, Any]], confidence: float) -> str:
    columns = _columns(rows)
    header = ["method", "seeds", *(NAMES.get(c, c) for c in columns), "train s (mean)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"], str(len(row["seeds"])) if row["seeds"] else "not run"]
        cells += [_cell(row["metrics"].get(c)) for c in columns]
        lines.append("| " + " | ".join([*cells, _seconds(row.get("train_seconds"))]) + " |")
    notes = [
        f"Cells: mean ± std over seeds [{confidence:.0%} bootstrap interval over seeds and test points]; "
        "per-run Wilson intervals are in leaderboard.json."
    ]
    if any(row.get("cert_gap") for row in rows):
        notes.append(_gap_note(rows))
    for row in rows:
        if row.get("exceptions"):
            changed = ", ".join(f"{k} = {v}" for k, v in row["exceptions"].items())
            notes.append(f"Exception to the equal budget: **{row['label']}** runs with {changed}.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _gap_note(rows: list[dict[str, Any]]) -> str:
    """Quantiles of the certified bound on max_{x'} f_T^y(x') - f_S^y(x') over P: smaller is more faithful."""
    cells = []
    for row in rows:
        gap = row.get("cert_gap")
        if gap:
            cells.append(f"{row['label']} " + ", ".join(f"{q} {m:.3f} ± {s:.3f}" for q, (m, s) in gap.items()))
    return "Certified confidence-gap bound on P (quantiles over points, mean ± std over seeds): " + "; ".join(cells)


def _interval(row: dict[str, Any]) -> str:
    if "diff" not in row:
        return "–"
    return f"{row['diff']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}] ({row['level']:.1%})"


def _p(value: float) -> str:
    # An exact test on thousands of discordant points underflows float64: say so instead of printing 0.
    return f"{value:.3g}" if value > 0 else "< 1e-300"


def claims_markdown(claims: list[dict[str, Any]]) -> str:
    header = "| claim | comparison | verdict | difference [interval] | p (Holm) | McNemar p (Holm) |"
    lines = [header, "|---|---|---|---|---|---|"]
    for claim in claims:
        if claim["verdict"] == "not run":  # one line, not one per comparison
            lines.append(f"| {claim['claim']} — **not run** | – | not run | – | – | – |")
            continue
        for i, row in enumerate(claim["comparisons"]):
            first = f"{claim['claim']} — **{claim['verdict']}**" if i == 0 else ""
            p = _p(row["p_holm"]) if "p_holm" in row else "–"
            mc = _p(row["p_mcnemar_holm"]) if "p_mcnemar_holm" in row else "–"
            lines.append(f"| {first} | {row['comparison']} | {row['verdict']} | {_interval(row)} | {p} | {mc} |")
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (ties kept), by ascending first coordinate."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def pareto_png(rows: list[dict[str, Any]]) -> bytes | None:
    """Clean against robust accuracy (AutoAttack where run), mean over seeds with the bootstrap intervals as bars."""
    from matplotlib.figure import Figure

    robust = "autoattack" if any("autoattack" in r["metrics"] for r in rows) else "robust"
    points = [r for r in rows if "clean" in r["metrics"] and robust in r["metrics"]]
    if not points:
        return None
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for row in points:
        c, r = row["metrics"]["clean"], row["metrics"][robust]
        xerr = [[c["mean"] - c["ci"][0]], [c["ci"][1] - c["mean"]]]
        yerr = [[r["mean"] - r["ci"][0]], [r["ci"][1] - r["mean"]]]
        marker = "s" if row.get("role") == "teacher" else "o"
        ax.errorbar(c["mean"], r["mean"], xerr=xerr, yerr=yerr, fmt=marker, capsize=3, label=row["label"])
    front = pareto_front([(r["metrics"]["clean"]["mean"], r["metrics"][robust]["mean"]) for r in points])
    ax.plot(*zip(*front), color="grey", linestyle=":", linewidth=1, label="Pareto front (means)")
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel(f"{NAMES[robust]} accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("Clean vs robust accuracy (means, bootstrap intervals)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _html(title: str, command: str, board: str, claims: str, png: bytes | None) -> str:
    def table(markdown: str) -> str:
        lines = [line for line in markdown.splitlines() if line.startswith("|")]
        out = []
        for i, line in enumerate(lines):
            if i == 1:
                continue
            tag = "th" if i == 0 else "td"
            cells = [html.escape(c.strip()).replace("**", "") for c in line.strip("|").split(" | ")]
            out.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
        return "<table>" + "".join(out) + "</table>"

    image = f'<img alt="Pareto plot" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""
    notes = "".join(f"<p>{html.escape(line[2:])}</p>" for line in board.splitlines() if line.startswith("- "))
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    style += "td,th{border:1px solid #ccc;padding:4px}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><p><code>{html.escape(command)}</code></p>{table(board)}{notes}"
        f"<h2>Claims</h2>{table(claims) if claims else '<p>none</p>'}{image}</body></html>\n"
    )


def write_outputs(out: Path, summary: dict[str, Any]) -> dict[str, str]:
    """Write leaderboard.{md,html,json}, claims.md, pareto.png and results_fragment.md; returns their paths."""
    confidence = summary["evaluation"]["confidence"]
    board = leaderboard_markdown(summary["leaderboard"], confidence)
    claims = claims_markdown(summary["claims"]) if summary["claims"] else ""
    png = pareto_png(summary["leaderboard"])
    files = {"md": "leaderboard.md", "html": "leaderboard.html", "json": "leaderboard.json"}
    paths = {name: out / f for name, f in {**files, "fragment": "results_fragment.md"}.items()}
    title = f"Comparison: {summary['name']}"
    atomic_write_text(paths["md"], f"# {title}\n\n`{summary['command']}`\n\n{board}\n## Claims\n\n{claims or 'none'}\n")
    atomic_write_text(paths["html"], _html(title, summary["command"], board, claims, png))
    if png is not None:
        paths["png"] = out / "pareto.png"
        paths["png"].write_bytes(png)
    if claims:
        paths["claims"] = out / "claims.md"
        atomic_write_text(paths["claims"], claims)
    atomic_write_text(paths["fragment"], fragment(summary, board))
    atomic_write_json(paths["json"], {**summary, "outputs": {k: str(v) for k, v in paths.items()}})
    return {k: str(v) for k, v in paths.items()}


def _data(data: dict[str, Any]) -> str:
    subset = data.get("train_subset")
    images = f"a stratified {subset}-image subset" if subset else "the whole training split"
    return f"{data.get('dataset')}: {images}, batch {data.get('batch_size')}, augmentation {data.get('augment')}"


def fragment(summary: dict[str, Any], board: str) -> str:
    """A section for docs/RESULTS.md: the command that made it, the protocol in one line, the tables."""
    ev = summary["evaluation"]
    points = "all" if ev["n_examples"] is None else f"the first {ev['n_examples']}"
    extra = f"; AutoAttack on the first {ev['autoattack']}" if ev.get("autoattack") else ""
    protocol = summary["protocol"]
    lines = [
        f"### {summary['name']}",
        "",
        "```bash",
        summary["command"],
        "```",
        "",
        f"Protocol: {protocol.get('epochs')} epochs, student {protocol.get('model', {}).get('arch')}, "
        f"{_data(protocol.get('data', {}))}; evaluation {ev['protocol']} ({', '.join(ev['attacks'])}) on {points} "
        f"test points{extra}; seeds {summary['seeds']}. Device: {summary['device']}.",
        "",
        board,
    ]
    judged = [c for c in summary["claims"] if c["verdict"] != "not run"]
    if judged:
        lines += ["", claims_markdown(judged)]
    skipped = len(summary["claims"]) - len(judged)
    if skipped:
        lines.append(f"{skipped} other claims of the claims file need runs this comparison does not make (not run).")
    return "\n".join(lines) + "\n"


def claims_overview(summaries: list[dict[str, Any]]) -> str:
    """One table of every claim across comparisons (their ``leaderboard.json`` contents, in the order given).

    A claim judged by several comparisons gets one row per comparison, each with its own verdict and deciding
    intervals: the comparisons differ in protocol, so nothing is pooled. A claim no comparison ran is one
    "not run" row."""
    order: dict[str, dict[str, Any]] = {}
    for summary in summaries:
        for claim in summary.get("claims", []):
            order.setdefault(claim["claim"], {"source": claim.get("source", ""), "rows": []})
            if claim["verdict"] != "not run":
                order[claim["claim"]]["rows"].append((summary["name"], claim))
    lines = [
        "| claim | comparison (config) | verdict | difference [interval] (level) | p (Holm) |",
        "|---|---|---|---|---|",
    ]
    for text, entry in order.items():
        if not entry["rows"]:
            lines.append(f"| {text} | – | **not run** | – | – |")
        for name, claim in entry["rows"]:
            judged = [r for r in claim["comparisons"] if r["verdict"] != "not run"]
            cells = "<br>".join(f"{r['comparison']}: {_interval(r)}" for r in judged)
            p = "<br>".join(_p(r["p_holm"]) for r in judged)
            lines.append(f"| {text} | {name} | **{claim['verdict']}** | {cells} | {p} |")
    return "\n".join(lines) + "\n"
