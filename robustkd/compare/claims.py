"""Paper claims as data, judged by a comparison: reproduced, within noise, contradicted, or not run.

A claim is a comparison of mean accuracies, ``LEFT.metric OP RIGHT[.metric]`` with OP ``<`` or ``>``; either side
may list alternatives in braces, and every combination is one comparison::

    kd.robust < teacher.robust
    advfunmatch.{clean,robust} > {ard,rslad,iad}        # six comparisons; the right side takes the left's metric
    advfunmatch[randaugment].robust > advfunmatch[none].robust

Each comparison is a paired bootstrap of the difference (left − right) on the same test points. The p-values of
all comparisons a comparison run judges are adjusted together (Holm); a comparison is **reproduced** when the
adjusted p is below alpha and the difference has the claimed sign, **contradicted** when it is below alpha with
the other sign, and **within noise** otherwise. The interval shown is the one that decides: the bootstrap interval
at Holm's level for that comparison (1 − alpha / (m − rank)). A side with no runs makes the comparison **not run**.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import robustkd.compare.stats as stats
from robustkd.errors import ConfigError

_SIDE = re.compile(r"^\s*(\{[^}]*\}|[\w.\-]+(?:\[[^\]]*\])?)(?:\.(\{[^}]*\}|\w+))?\s*$")


@dataclass(frozen=True)
class Comparison:
    """One expanded comparison: ``left.metric op right.metric``."""

    claim: str
    left: str
    right: str
    metric: str
    op: str

    @property
    def text(self) -> str:
        return f"{self.left}.{self.metric} {self.op} {self.right}.{self.metric}"


def _alternatives(text: str) -> list[str]:
    if text.startswith("{"):
        parts = [p.strip() for p in text[1:-1].split(",") if p.strip()]
        if not parts:
            raise ConfigError(f"claim: empty braces in {text!r}")
        return parts
    return [text]


def _side(text: str, claim: str) -> tuple[list[str], list[str] | None]:
    # A label may hold dots inside brackets (advfunmatch[0.5]); split the metric off after the last bracket.
    match = _SIDE.match(text)
    if match is None:
        raise ConfigError(f"claim {claim!r}: cannot read {text.strip()!r}; write label.metric, e.g. kd.robust")
    label, metric = match.group(1), match.group(2)
    if metric is None and "." in label and not label.startswith("{") and "[" not in label:
        label, metric = label.rsplit(".", 1)
    return _alternatives(label), _alternatives(metric) if metric else None


def parse_claim(text: str) -> list[Comparison]:
    """Every comparison a claim stands for; the right side's metric defaults to the left's."""
    ops = [op for op in ("<", ">") if op in text]
    if len(ops) != 1 or text.count(ops[0]) != 1:
        raise ConfigError(f"claim {text!r}: expected exactly one '<' or '>'")
    left_text, right_text = text.split(ops[0])
    lefts, metrics = _side(left_text, text)
    rights, right_metrics = _side(right_text, text)
    if metrics is None:
        raise ConfigError(f"claim {text!r}: the left side needs a metric, e.g. kd.robust")
    if right_metrics is not None and right_metrics != metrics:
        raise ConfigError(f"claim {text!r}: both sides must compare the same metric")
    return [
        Comparison(text, left, right, metric, ops[0])
        for left, right, metric in itertools.product(lefts, rights, metrics)
    ]


def load_claims(path: str | Path) -> list[dict[str, Any]]:
    """The claims file: a list of {claim, source, note}; each claim parsed now, so a typo fails before any run."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"claims: cannot read {path} ({str(err).splitlines()[0]})") from None
    entries = data.get("claims") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"claims: {path} must hold 'claims:' with a list of {{claim: ..., source: ...}}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("claim"), str):
            raise ConfigError(f"claims: {path}: entry {i + 1} needs a 'claim' string")
        unknown = set(entry) - {"claim", "source", "note"}
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"claims: {path}: entry {i + 1}: unknown key {key!r} (claim, source, note)")
        parse_claim(entry["claim"])
    return entries


def _verdict(diff: float, p_adj: float, op: str, alpha: float) -> str:
    if p_adj >= alpha or diff == 0:
        return "within noise"
    return "reproduced" if (diff < 0) == (op == "<") else "contradicted"


def judge(
    entries: list[dict[str, Any]],
    results: dict[str, dict[str, np.ndarray]],
    *,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Every claim with its comparisons' verdicts; ``results[label][metric]`` is a (seeds, points) 0/1 matrix."""
    comparisons = [c for entry in entries for c in parse_claim(entry["claim"])]
    ran = [c for c in comparisons if c.metric in results.get(c.left, {}) and c.metric in results.get(c.right, {})]
    rng = np.random.default_rng(seed)
    tests = {}
    for c in ran:
        a, b = results[c.left][c.metric], results[c.right][c.metric]
        samples = stats.paired_differences(a, b, n_boot, rng)
        tests[c] = (float(a.mean() - b.mean()), samples, stats.bootstrap_p(samples), stats.mcnemar(a, b))
    adjusted = dict(zip(ran, stats.holm([tests[c][2] for c in ran])))
    mcnemar_adjusted = dict(zip(ran, stats.holm([tests[c][3] for c in ran])))
    levels = dict(zip(ran, stats.holm_levels([tests[c][2] for c in ran], alpha)))
    out = []
    for entry in entries:
        rows = []
        for c in parse_claim(entry["claim"]):
            row: dict[str, Any] = {"comparison": c.text, "verdict": "not run"}
            if c in tests:
                diff, samples, p, p_mc = tests[c]
                low, high = stats.interval(samples, levels[c])
                row.update(diff=diff, low=low, high=high, level=levels[c], p=p, p_holm=adjusted[c])
                row.update(p_mcnemar=p_mc, p_mcnemar_holm=mcnemar_adjusted[c])
                row["verdict"] = _verdict(diff, adjusted[c], c.op, alpha)
            rows.append(row)
        out.append({**entry, "verdict": overall([r["verdict"] for r in rows]), "comparisons": rows})
    return out


def overall(verdicts: list[str]) -> str:
    """A claim's verdict from its comparisons': all reproduced, any contradicted, else within noise (runs missing
    from some comparisons: judged on those that ran, 'not run' only when none ran)."""
    judged = [v for v in verdicts if v != "not run"]
    if not judged:
        return "not run"
    if "contradicted" in judged:
        return "contradicted"
    if all(v == "reproduced" for v in judged):
        return "reproduced" if len(judged) == len(verdicts) else "reproduced (partly run)"
    return "within noise"
