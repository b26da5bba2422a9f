"""The quickstart pipeline at a tiny size: every stage runs, the report is complete, its numbers are exactly
what ``robustkd evaluate`` and ``robustkd certify`` give when run separately, and a second run reuses all."""

import json
import shlex

import pytest

from robustkd.cli import main
from robustkd.cli.quickstart import table
from robustkd.quickstart import STUDENTS, Plan, run

pytestmark = pytest.mark.slow

TINY = Plan(
    train_subset=400,
    teacher_epochs=2,
    student_epochs=1,
    faithful_epochs=2,
    n_eval=40,
    card_autoattack=8,
    attack_steps=2,
    faithfulness_steps=2,
)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    return out, run(out, plan=TINY, progress=False, device="cpu")


def _rerun(command: str, out) -> dict:
    argv = shlex.split(command)[1:]
    argv[argv.index("--out") + 1] = str(out)
    assert main([*argv, "--no-progress"]) == 0
    return json.loads(out.read_text())


def test_report_has_every_model_and_output(quick):
    out, result = quick
    names = [row["name"] for row in result["models"]]
    assert names == ["teacher", *STUDENTS]
    for kind in ("html", "md", "json"):
        assert (out / "report" / f"report.{kind}").is_file()
    assert set(result["summary"]) == set(STUDENTS)
    assert all(result["seconds"][stage] >= 0 for stage in ("teacher", "card", *STUDENTS, "report", "total"))
    for row in result["models"][1:]:
        assert row["certified_agreement"] is not None and row["disagreement"] is not None


def test_students_are_at_least_four_times_smaller_and_the_report_says_so(quick):
    out, result = quick
    rows = {row["name"]: row for row in result["models"]}
    teacher = rows["teacher"]
    # DM-small on Fashion-MNIST: conv 1->16 4x4, conv 16->32 4x4, FC 32*10*10 -> hidden, FC hidden -> 10.
    convs = (16 * 16 + 16) + (32 * 16 * 16 + 32)
    assert teacher["params"] == convs + (3200 * 100 + 100) + (100 * 10 + 10) == 329_606
    for name in STUDENTS:
        assert rows[name]["params"] == convs + (3200 * 20 + 20) + (20 * 10 + 10) == 72_726
        assert rows[name]["compression"] == teacher["params"] / rows[name]["params"] >= 4
        assert rows[name]["latency_ratio"] == teacher["latency_ms"] / rows[name]["latency_ms"] > 0
    md = (out / "report" / "report.md").read_text()
    assert "compression (T/S params)" in md and "latency ratio (T/S)" in md and "| 4.53x |" in md
    assert "## Teacher card" in md and "329,606 parameters" in md
    # The teacher card is the card file robustkd card wrote beside the teacher, at the report's radius.
    card = json.loads((out / "teacher" / "best.card.json").read_text())
    (section,) = result["teacher_cards"]
    assert section["source"] == str(out / "teacher" / "best.card.json") and card["protocol"]["eps"] == TINY.eps
    assert (card["robustness"]["n"], card["autoattack"]["n"]) == (TINY.n_eval, TINY.card_autoattack)
    shown = {row["measure"]: row["accuracy"] for row in section["rows"]}
    assert shown["clean"] == rows["teacher"]["clean"] and shown["autoattack"] == card["accuracy"]["autoattack"]
    assert shown["certified (crown-ibp)"] == card["accuracy"]["certified_crown-ibp"] <= shown["pgd20"]
    printed = table(result["models"])
    assert "smaller" in printed and "faster" in printed and "4.53x" in printed


def test_report_numbers_equal_separate_commands(quick, tmp_path):
    _, result = quick
    row = next(r for r in result["models"] if r["name"] == "faithful")
    robustness = _rerun(row["commands"][f"robustness@{TINY.eps:g}"], tmp_path / "eval.json")
    assert {k: v["accuracy"] for k, v in robustness["attacks"].items()} == row["accuracy"]
    cert = _rerun(row["certify_commands"][f"certify@{TINY.eps:g}"], tmp_path / "cert.json")
    assert cert["teacher_correct"]["agreement_certified"] == row["certified_agreement"]


def test_second_run_reuses_everything(quick):
    out, first = quick
    again = run(out, plan=TINY, progress=False, device="cpu")

    def numbers(rows):  # latency is measured afresh on every report
        return [{k: v for k, v in row.items() if k not in ("latency_ms", "latency_ratio")} for row in rows]

    assert numbers(again["models"]) == numbers(first["models"])
    assert [c["rows"] for c in again["teacher_cards"]] == [c["rows"] for c in first["teacher_cards"]]
    assert again["seconds"]["total"] < first["seconds"]["total"]
