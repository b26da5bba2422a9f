"""The report's teacher card and each student's compression: what the teacher is worth, and what a student saves.

A teacher's card is read from ``<name>.card.json`` (written by ``robustkd card`` or ``robustkd import``) when one
of the same weights lies beside it; otherwise it is made of the figures the report computed itself (accuracy at
the stated eps, the teacher's certified accuracy from the pair certificates, size and latency).
"""

from __future__ import annotations

from typing import Any

from robustkd.jobs.card import ATTACKS, VERIFIERS


def compression(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float | None]:
    """Teacher parameters / student parameters, and teacher latency / student latency (both measured here)."""
    ratio = teacher["params"] / student["params"] if student.get("params") else None
    speed = teacher["latency_ms"] / student["latency_ms"] if student.get("latency_ms") else None
    return {"compression": ratio, "latency_ratio": speed}


def _order(name: str, known: tuple[str, ...]) -> tuple[int, str]:
    """The card's own order (clean, pgd20, cw20; ibp, crown-ibp), not the JSON file's alphabetical one."""
    return (known.index(name) if name in known else len(known), name)


def _points(n: int | None, subset: bool | None) -> str:
    return f"first {n} (a subset)" if subset else f"all {n}"


def from_card(teacher: dict[str, Any], card: dict[str, Any]) -> dict[str, Any]:
    """The card section of a teacher from its card file."""
    robustness = card["robustness"]
    rows = [
        {"measure": name, "accuracy": block["accuracy"], "points": _points(robustness["n"], robustness["subset"])}
        for name, block in sorted(robustness["attacks"].items(), key=lambda item: _order(item[0], ATTACKS))
    ]
    certified = sorted(card["certified"].items(), key=lambda item: _order(item[0], VERIFIERS))
    for name, block in [("autoattack", card["autoattack"]), *certified]:
        measure = name if name == "autoattack" else f"certified ({name})"
        if "skipped" in block:
            rows.append({"measure": measure, "accuracy": None, "points": f"skipped: {block['skipped']}"})
            continue
        points = _points(block["n"], block["subset"])
        if name == "autoattack" and block["subset"]:  # its own, smaller subset: the clean accuracy there says more
            points += f"; clean accuracy on them {block['clean']:.4f}"
        rows.append({"measure": measure, "accuracy": block["accuracy"], "points": points})
    latency = card["latency"]
    batches = {key[len("batch_") : -len("_ms")]: ms for key, ms in latency.items() if key.startswith("batch_")}
    batches = dict(sorted(batches.items(), key=lambda item: int(item[0])))  # the JSON file sorts its keys as text
    return {
        **_identity(teacher),
        "source": card["output"],
        "protocol": card["protocol"]["name"],
        "eps": card["protocol"]["eps"],
        "params": card["params"],
        "latency": {"device": latency["device"], "ms": batches},
        "rows": rows,
    }


def from_report(teacher: dict[str, Any], students: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """The card section of a teacher that has no card file: the report's own figures for it."""
    points = _points(teacher.get("n"), teacher.get("subset"))
    rows = [{"measure": name, "accuracy": value, "points": points} for name, value in teacher["accuracy"].items()]
    certified = [s["teacher_certified_accuracy"] for s in students if s.get("teacher_certified_accuracy") is not None]
    method = settings["certify_method"]
    if certified:
        rows.append({"measure": f"certified ({method})", "accuracy": certified[0], "points": points})
    return {
        **_identity(teacher),
        "source": "this report (no card file beside the teacher; make one with robustkd card)",
        "protocol": settings["protocol"],
        "eps": settings["eps"],
        "params": teacher["params"],
        "latency": {"device": teacher["latency_device"], "ms": {str(teacher["latency_batch"]): teacher["latency_ms"]}},
        "rows": rows,
    }


def _identity(teacher: dict[str, Any]) -> dict[str, Any]:
    keys = ("name", "checkpoint", "arch", "dataset", "weights_sha256")
    return {key: teacher.get(key) for key in keys}


def teacher_cards(
    rows: list[dict[str, Any]], settings: dict[str, Any], card_files: dict[str, dict[str, Any] | None]
) -> list[dict[str, Any]]:
    """One card section per teacher, from its card file (``card_files`` by teacher name) or the report's figures."""
    cards = []
    for row in rows:
        if row["role"] != "teacher":
            continue
        students = [s for s in rows if s.get("teacher") == row["name"] and s["role"] == "student"]
        card = card_files.get(row["name"])
        cards.append(from_card(row, card) if card else from_report(row, students, settings))
    return cards
