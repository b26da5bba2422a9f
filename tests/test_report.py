"""robustkd report: numbers equal separate evaluation calls, caching, verdicts, a self-contained HTML page."""

from __future__ import annotations

import base64
import copy
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import fmnist_meta

import robustkd
from robustkd.checkpoint import load_model, save_checkpoint
from robustkd.cli import main
from robustkd.errors import CheckpointError, ConfigError
from robustkd.models import create_model
from robustkd.report import ReportSettings, Thresholds, verdict

META = fmnist_meta("small_cnn", {"width": 2, "hidden": 8})
# Light settings: the first 24 test points, short attacks and searches, IBP.
OPTIONS = {
    "eps": 0.1,
    "eps_sweep": (0.05,),
    "attacks": ("clean", "pgd3", "cw3"),
    "n_examples": 24,
    "faithfulness_steps": 2,
    "faithfulness_restarts": 1,
    "certify_method": "ibp",
    "batch_size": 16,
}


def _tiny() -> torch.nn.Module:
    return create_model("small_cnn", num_classes=10, in_channels=1, input_size=28, mean=[0.286], std=[0.353],
                        width=2, hidden=8)  # fmt: skip


def make_runs(root: Path, students: tuple[str, ...] = ("kd", "ard")) -> dict[str, Path]:
    """A teacher fitted for a few steps on 1000 training images, and students that are noisy copies of it.

    Each student's checkpoint names the teacher in its config, as ``robustkd distill`` writes it, and its
    run dir holds a metrics.jsonl.
    """
    from robustkd.data import load_dataset

    torch.manual_seed(0)
    data = load_dataset("fashion-mnist")
    x, y = data.train.images[:1000].float() / 255, data.train.labels[:1000]
    teacher = _tiny()
    opt = torch.optim.Adam(teacher.parameters(), lr=0.02)
    for step in range(60):
        idx = torch.arange(step * 100, step * 100 + 100) % 1000
        loss = torch.nn.functional.cross_entropy(teacher(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    save_checkpoint(root / "teacher" / "best", teacher, {**META, "method": "standard", "config": {"teacher": None}})
    paths = {"teacher": root / "teacher"}
    for i, name in enumerate(students):
        student = copy.deepcopy(teacher)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.05 * (i + 1))
        config = {"teacher": str(root / "teacher" / "best"), "teacher_arch": None}
        save_checkpoint(root / name / "best", student, {**META, "method": name, "config": config})
        rows = [{"epoch": e, "train/loss": 2.0 / e, "val/acc": 0.5 + 0.1 * e} for e in (1, 2, 3)]
        (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = robustkd.report([runs["kd"], runs["ard"]], out, device="cpu", progress=False, **OPTIONS)
    return result, out


def _rows(result):
    return {row["name"]: row for row in result["models"]}


# ---------------------------------------------------------------------------------------------------
# The numbers are those of the evaluation functions


def test_robustness_equals_robustkd_evaluate(report, runs, tmp_path):
    from robustkd.jobs import evaluate_checkpoint

    result, _ = report
    rows = _rows(result)
    assert set(rows) == {"teacher", "kd", "ard"}
    for name in ("teacher", "kd", "ard"):
        for eps, protocol in ((0.05, "linf-0.05"), (0.1, "linf-0.1")):
            direct = evaluate_checkpoint(
                runs[name] / "best",
                protocol=protocol,
                attacks=["clean", "pgd3", "cw3"],
                n_examples=24,
                batch_size=16,
                seed=0,
                device="cpu",
                out=tmp_path / f"{name}_{eps}.json",
                progress=False,
            )
            point = next(p for p in rows[name]["robust_vs_eps"] if p["eps"] == eps)
            assert point["protocol"] == protocol
            assert point["accuracy"] == {k: v["accuracy"] for k, v in direct["attacks"].items()}
            assert point["robust"] == direct["worst_case"]["accuracy"]
            if eps == 0.1:
                assert rows[name]["clean"] == direct["attacks"]["clean"]["accuracy"]
                assert rows[name]["robust"] == direct["worst_case"]["accuracy"]
    # The teacher was fitted, so the numbers are not all trivially zero.
    assert rows["teacher"]["clean"] > 0.3
    assert rows["teacher"]["n"] == 24 and rows["teacher"]["subset"] is True


def test_faithfulness_and_certificates_equal_their_functions(report, runs, tmp_path):
    from robustkd.jobs import certify_checkpoints, evaluate_faithfulness_checkpoints

    result, _ = report
    rows = _rows(result)
    for name in ("kd", "ard"):
        faith = evaluate_faithfulness_checkpoints(
            runs["teacher"] / "best",
            runs[name] / "best",
            eps=[0.05, 0.1],
            n_examples=24,
            steps=2,
            restarts=1,
            batch_size=16,
            seed=0,
            device="cpu",
            out=tmp_path / f"faith_{name}.json",
            progress=False,
        )
        block = faith["results"][1]["teacher_correct"]
        assert faith["results"][1]["eps"] == 0.1
        assert rows[name]["disagreement"] == block["disagreement"]["rate"]
        assert rows[name]["gap"] == {k: block["gap_under"][k] for k in ("mean", "q50", "q90", "q99", "max")}
        assert rows[name]["n_teacher_correct"] == block["n"] > 0
        cert = certify_checkpoints(
            runs[name] / "best",
            runs["teacher"] / "best",
            eps=0.1,
            method="ibp",
            n_examples=24,
            batch_size=16,
            device="cpu",
            out=tmp_path / f"cert_{name}.json",
            progress=False,
        )
        p = cert["teacher_correct"]
        assert rows[name]["certified_agreement"] == p["agreement_certified"]
        assert rows[name]["certified_gap"] == {k: p["gap_upper"][k] for k in ("mean", "median", "q90", "max")}
        # A certified bound on the gap can never lie below the gap an attack found.
        assert rows[name]["certified_gap"]["max"] >= rows[name]["gap"]["max"] - 1e-6
    # The noisier student strays further from the teacher.
    assert rows["ard"]["gap"]["q90"] > rows["kd"]["gap"]["q90"]


def test_size_speed_and_training_curves(report, runs):
    result, out = report
    rows = _rows(result)
    params = sum(p.numel() for p in load_model(runs["kd"] / "best").parameters())
    assert rows["kd"]["params"] == params == rows["teacher"]["params"]
    assert all(row["latency_ms"] > 0 and row["latency_device"] == "cpu" for row in rows.values())
    assert (out / "plots" / "training_curves.png").is_file()
    # Compression and latency ratio: the teacher's over the student's, students only (a noisy copy: 1x the size).
    assert rows["kd"]["compression"] == 1.0 and "compression" not in rows["teacher"]
    assert rows["kd"]["latency_ratio"] == rows["teacher"]["latency_ms"] / rows["kd"]["latency_ms"]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):
        assert "compression (T/S params)" in text and "latency ratio (T/S)" in text
    assert f"| {rows['kd']['latency_ratio']:.2f}x |" in md and "| 1.00x |" in md


def test_teacher_card_from_the_reports_own_figures(report):
    result, out = report
    rows = _rows(result)
    (card,) = result["teacher_cards"]
    assert card["source"].startswith("this report") and card["params"] == rows["teacher"]["params"]
    shown = {row["measure"]: row["accuracy"] for row in card["rows"]}
    assert {k: shown[k] for k in rows["teacher"]["accuracy"]} == rows["teacher"]["accuracy"]
    # The teacher's certified accuracy is the one the pair certificate states for it.
    cert = json.loads(Path(rows["kd"]["certify_sources"]["certify@0.1"]).read_text())
    assert shown["certified (ibp)"] == cert["teacher"]["certified_accuracy"]
    assert card["weights_sha256"] == rows["teacher"]["weights_sha256"]
    md = (out / "report.md").read_text()
    assert "## Teacher card" in md
    assert f"| certified (ibp) | {shown['certified (ibp)']:.4f} | first 24 (a subset) |" in md


def test_results_are_cached_and_keyed_by_settings(report, runs, tmp_path, monkeypatch):
    import robustkd.jobs as jobs

    result, _ = report

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated again although the cache holds this result")

    with monkeypatch.context() as m:
        for module, name in (
            (jobs, "evaluate_checkpoint"),
            (jobs, "evaluate_faithfulness_checkpoints"),
            (jobs, "certify_checkpoints"),
        ):
            m.setattr(module, name, refuse)
        again = robustkd.report([runs["kd"], runs["ard"]], tmp_path / "again", device="cpu", progress=False, **OPTIONS)
    for old, new in zip(result["models"], again["models"]):
        for key in ("clean", "robust", "robust_vs_eps", "disagreement", "gap", "certified_agreement"):
            assert old.get(key) == new.get(key)
    cache = runs["kd"] / "report_cache"
    before = set(cache.iterdir())
    # Another seed is another evaluation: robustness and faithfulness are evaluated afresh, certificates reused.
    robustkd.report(runs["kd"], tmp_path / "seed1", device="cpu", progress=False, **{**OPTIONS, "seed": 1})
    added = {p.name.split("_")[0] for p in set(cache.iterdir()) - before}
    assert added == {"robustness", "faithfulness"}


@pytest.mark.filterwarnings("ignore::robustkd.attacks.ZeroGradientWarning")  # the zeroed model has no gradient
def test_retrained_weights_are_not_served_from_the_cache(runs, tmp_path):
    run = tmp_path / "kd"
    shutil.copytree(runs["kd"], run, ignore=shutil.ignore_patterns("report_cache"))
    options = {**OPTIONS, "eps_sweep": (0.1,), "attacks": ("clean",)}
    first = robustkd.report(run, tmp_path / "r1", device="cpu", progress=False, **options)
    model = load_model(run / "best")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # a constant classifier now: clean accuracy changes
    meta = json.loads((run / "best.json").read_text())
    save_checkpoint(run / "best", model, {k: v for k, v in meta.items() if k != "weights_sha256"})
    second = robustkd.report(run, tmp_path / "r2", device="cpu", progress=False, **options)
    labels = _test_labels(24)
    assert _rows(second)["kd"]["clean"] == labels.count(0) / 24  # all-zero logits predict class 0
    assert _rows(first)["kd"]["clean"] != _rows(second)["kd"]["clean"]
    assert len(list((run / "report_cache").glob("robustness_*.json"))) == 2


def _test_labels(n):
    from robustkd.data import load_dataset

    return load_dataset("fashion-mnist").test.labels[:n].tolist()


# ---------------------------------------------------------------------------------------------------
# Verdicts


TEACHER = {"clean": 0.90, "robust": 0.70}
GOOD = {
    "clean": 0.89,
    "robust": 0.68,
    "disagreement": 0.05,
    "gap": {"q90": 0.08},
    "certified_agreement": 0.6,
    "certified_gap": {"q90": 0.3},
}


def test_verdict_passes_when_every_set_check_holds():
    result = verdict(GOOD, TEACHER, Thresholds(min_certified_agreement=0.5, max_certified_gap=0.4), eps=0.1)
    assert result["safe"] is True and result["failed"] == []
    assert result["text"] == "safe to deploy in the teacher's place at Linf eps 0.1"
    assert [c["check"] for c in result["checks"]] == [
        "max_clean_drop",
        "max_robust_drop",
        "max_disagreement",
        "max_gap",
        "min_certified_agreement",
        "max_certified_gap",
    ]
    drop = next(c for c in result["checks"] if c["check"] == "max_robust_drop")
    assert drop["value"] == pytest.approx(0.02) and drop["passed"]


@pytest.mark.parametrize(
    ("change", "thresholds", "message"),
    [
        ({"clean": 0.85}, {}, "clean accuracy drop 0.0500 > 0.02"),
        ({"robust": 0.60}, {}, "robust accuracy drop 0.1000 > 0.03"),
        ({"disagreement": 0.2}, {}, "empirical disagreement 0.2000 > 0.1"),
        ({"gap": {"q90": 0.3}}, {}, "empirical gap q90 0.3000 > 0.1"),
        ({}, {"min_certified_agreement": 0.7}, "certified agreement 0.6000 < 0.7"),
        ({}, {"max_certified_gap": 0.25}, "certified gap bound q90 0.3000 > 0.25"),
        ({"certified_agreement": None}, {"min_certified_agreement": 0.1}, "certified agreement not measured"),
    ],
)
def test_verdict_names_the_failing_metric_and_threshold(change, thresholds, message):
    result = verdict({**GOOD, **change}, TEACHER, Thresholds(**thresholds), eps=0.05)
    assert result["safe"] is False
    assert len(result["failed"]) == 1 and result["failed"][0].startswith(message)
    assert result["text"].startswith("not safe at Linf eps 0.05: ")
    assert message in result["text"]


def test_verdict_boundaries_and_switched_off_checks():
    at_limit = {**GOOD, "clean": 0.88, "disagreement": 0.1}  # a drop of exactly 0.02, a rate of exactly 0.1
    assert verdict(at_limit, TEACHER, Thresholds(), eps=0.1)["safe"] is True
    bad = {**GOOD, "disagreement": 0.9, "gap": {"q90": None}}
    off = Thresholds(max_disagreement=None, max_gap=None)
    result = verdict(bad, TEACHER, off, eps=0.1)
    assert result["safe"] is True and {c["check"] for c in result["checks"]} == {"max_clean_drop", "max_robust_drop"}
    nothing = Thresholds(**dict.fromkeys(Thresholds().to_dict()))
    assert verdict(bad, TEACHER, nothing, eps=0.1)["text"].endswith("(no check was set)")


def test_report_verdicts_follow_the_thresholds(report):
    result, _ = report
    rows = _rows(result)
    for name in ("kd", "ard"):
        again = verdict(rows[name], rows["teacher"], Thresholds(), eps=0.1)
        assert rows[name]["verdict"] == again
        assert result["summary"][name] == {"safe": again["safe"], "text": again["text"]}
    # The same rows under other thresholds: nothing required is safe; a zero gap budget fails the noisy student.
    nothing = Thresholds(**dict.fromkeys(Thresholds().to_dict()))
    assert verdict(rows["ard"], rows["teacher"], nothing, eps=0.1)["safe"] is True
    gap_only = Thresholds(max_clean_drop=None, max_robust_drop=None, max_disagreement=None, max_gap=0.0)
    assert rows["ard"]["gap"]["q90"] > 0
    failed = verdict(rows["ard"], rows["teacher"], gap_only, eps=0.1)["failed"]
    assert failed == [f"empirical gap q90 {rows['ard']['gap']['q90']:.4f} > 0"]


# ---------------------------------------------------------------------------------------------------
# The page


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_html_is_self_contained(report):
    _, out = report
    page = (out / "report.html").read_text()
    # No address of any kind (base64 has no ':', so this also holds inside the images).
    assert "://" not in page and "url(" not in page and "@import" not in page
    parser = _Tags()
    parser.feed(page)
    tags = [tag for tag, _ in parser.tags]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    images = [attrs for tag, attrs in parser.tags if tag == "img"]
    assert len(images) == 4  # robust accuracy, gap histograms, agreement, training curves
    for attrs in images:
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix)
        assert base64.b64decode(attrs["src"][len(prefix) :]).startswith(b"\x89PNG\r\n\x1a\n")
    models = [attrs["data-model"] for tag, attrs in parser.tags if tag == "tr" and "data-model" in attrs]
    assert models == ["teacher", "kd", "ard"]


def test_markdown_and_json(report):
    result, out = report
    saved = json.loads((out / "report.json").read_text())
    assert saved["summary"] == result["summary"]
    assert saved["settings"]["eps_sweep"] == [0.05, 0.1] and saved["settings"]["protocol"] == "linf-0.1"
    md = (out / "report.md").read_text()
    for name in ("teacher", "kd", "ard"):
        assert f"| {name} |" in md
    for name in ("robust_accuracy", "gap_histograms", "agreement", "training_curves"):
        assert f"(plots/{name}.png)" in md and (out / "plots" / f"{name}.png").is_file()
    # Every robustness number names the robustkd evaluate line that writes the same file.
    row = _rows(saved)["kd"]
    line = row["commands"]["robustness@0.1"]
    assert line.startswith("robustkd evaluate --model ") and "--protocol linf-0.1" in line
    assert "--attacks clean,pgd3,cw3" in line and "--n_examples 24" in line


# ---------------------------------------------------------------------------------------------------
# Errors and the command line


def test_bad_inputs_name_the_fix(runs, tmp_path):
    with pytest.raises(ConfigError, match="^max_gapp: not a report option; did you mean max_gap"):
        robustkd.report(runs["kd"], tmp_path, max_gapp=0.1)
    with pytest.raises(ConfigError, match="^eps: must be > 0"):
        robustkd.report(runs["kd"], tmp_path, eps=0)
    with pytest.raises(ConfigError, match="^attacks: attack 'pgd' needs a step count"):
        ReportSettings(attacks=("clean", "pgd"))
    with pytest.raises(ConfigError, match="^attacks: an attack is listed more than once"):
        ReportSettings(attacks=("clean", "pgd3", "pgd3"))
    with pytest.raises(ConfigError, match="^eps_sweep: images live in"):
        ReportSettings(eps_sweep=(0.5, 2.0))
    assert ReportSettings(eps=0.2).eps_sweep == (0.05, 0.1, 0.2)
    with pytest.raises(ConfigError, match="^max_disagreement: a rate lies in"):
        Thresholds(max_disagreement=2)
    with pytest.raises(ConfigError, match="trained without a teacher"):
        robustkd.report(runs["teacher"], tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="holds no best.safetensors"):
        robustkd.report(tmp_path, tmp_path / "out", progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="^out: .* is a file"):
        robustkd.report(runs["kd"], tmp_path / "file", progress=False)
    # A teacher path that does not resolve from here: the message says how to name it.
    moved = tmp_path / "moved"
    model = load_model(runs["kd"] / "best")
    save_checkpoint(moved / "best", model, {**META, "method": "kd", "config": {"teacher": "runs/gone/best"}})
    with pytest.raises(ConfigError, match="pass --teacher PATH"):
        robustkd.report(moved, tmp_path / "out", progress=False)


def test_cli_report(report, runs, tmp_path, capsys):
    argv = ["report", str(runs["kd"]), "--out", str(tmp_path / "cli"), "--eps", "0.1", "--eps_sweep", "0.05"]
    argv += ["--attacks", "clean,pgd3,cw3", "--n_examples", "24", "--faith_steps", "2", "--faith_restarts", "1"]
    argv += ["--certify_method", "ibp", "--batch_size", "16", "--device", "cpu", "--no_progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "kd: " in out and "report.html" in out
    saved = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert _rows(saved)["kd"]["clean"] == _rows(report[0])["kd"]["clean"]
    # A gate that no student can pass makes the command fail with --fail-unsafe.
    assert main([*argv, "--max-clean-drop", "-1", "--fail-unsafe"]) == 2
    assert "max_clean_drop: must be >= 0" in capsys.readouterr().err
    # The noisy student is under-confident somewhere, so a zero gap budget fails it, and the gate says so.
    assert _rows(saved)["kd"]["gap"]["q90"] > 0
    gate = ["--max-clean-drop", "none", "--max-robust-drop", "off", "--max-disagreement", "none", "--max-gap", "0"]
    assert main([*argv, *gate, "--fail-unsafe"]) == 1
    gap = _rows(saved)["kd"]["gap"]["q90"]
    assert f"kd: not safe at Linf eps 0.1: empirical gap q90 {gap:.4f} > 0\n" in capsys.readouterr().out
    thresholds = json.loads((tmp_path / "cli" / "report.json").read_text())["thresholds"]
    assert thresholds == {**dict.fromkeys(thresholds), "max_gap": 0.0}


def test_report_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: robustkd report" in out and "examples:" in out and "--max_disagreement" in out


# ---------------------------------------------------------------------------------------------------
# Which student to ship: the ranking, the nearest miss, vacuous certificates, the page's tables


def _student(name, robust, **change):
    row = {"name": name, "role": "student", "teacher": "teacher", **GOOD, "robust": robust, **change}
    row["verdict"] = verdict(row, TEACHER, Thresholds(), eps=0.1)
    return row


def test_ranking_follows_the_stated_rule():
    from robustkd.report.ranking import RULE, nearest_miss, rank_students

    rows = [
        _student("two_fails", 0.69, clean=0.80, disagreement=0.5),  # two failed checks
        _student("far", 0.60),  # robust drop 0.10: one check, excess 0.07 / 0.03
        _student("kdiga", 0.666),  # robust drop 0.034: one check, excess 0.004 / 0.03
        _student("safe_low", 0.675),
        _student("safe_high", 0.69),
        {"name": "teacher", "role": "teacher", "teacher": None, **TEACHER},
    ]
    ranking = rank_students(rows)
    assert [e["name"] for e in ranking] == ["safe_high", "safe_low", "kdiga", "far", "two_fails"]
    assert [e["rank"] for e in ranking] == [1, 2, 3, 4, 5]
    assert ranking[2]["relative_excess"] == pytest.approx(0.004 / 0.03)
    assert ranking[4]["failed_checks"] == 2
    miss = nearest_miss(ranking)
    assert miss["name"] == "kdiga"
    assert miss["text"] == "kdiga: robust accuracy drop 0.034 > 0.03 (+0.004)"
    assert nearest_miss(ranking[:2]) is None
    assert "safe students first" in RULE and "fewer failed checks" in RULE


def test_a_check_not_measured_counts_as_a_full_miss():
    from robustkd.report.ranking import excess

    check = {"passed": False, "value": None, "threshold": 0.5, "rule": ">="}
    assert excess(check) == 1.0
    assert excess({**check, "value": 0.4}) == pytest.approx(0.2)
    assert excess({**check, "value": 0.1, "rule": "<=", "threshold": 0.0}) == pytest.approx(10.0)  # floor 0.01


def test_vacuous_certificates_rule():
    from robustkd.report.vacuity import vacuous_points, vacuous_quantiles

    # Student lower bound 0, a bound of 1, and two informative bounds.
    assert vacuous_points([0.0, 0.3, 0.2, 0.4], [0.7, 1.0, 0.5, 0.2]) == [True, True, False, False]
    # 10 points, 1 vacuous: q90 sits at position ceil(0.9 * 9) = 9, the vacuous one; the median does not.
    assert vacuous_quantiles([True] + [False] * 9) == {"median": False, "q90": True}
    assert vacuous_quantiles([False] * 10) == {"median": False, "q90": False}
    assert vacuous_quantiles([True] * 10) == {"median": True, "q90": True}


def test_report_ranks_students_in_every_format(report):
    result, out = report
    names = [e["name"] for e in result["ranking"]]
    assert sorted(names) == ["ard", "kd"] and result["ranking_rule"].startswith("safe students first")
    saved = json.loads((out / "report.json").read_text())
    assert [e["name"] for e in saved["ranking"]] == names
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert '<table id="ranking">' in page and result["ranking_rule"] in page and result["ranking_rule"] in md
    assert f"| 1 | {names[0]} | teacher |" in md and f"| 2 | {names[1]} | teacher |" in md
    if result["nearest_miss"] is not None:
        assert result["nearest_miss"]["name"] == next(e["name"] for e in result["ranking"] if not e["safe"])
        assert html_escape(result["nearest_miss"]["text"]) in page and result["nearest_miss"]["text"] in md


def html_escape(text):
    from html import escape

    return escape(text, quote=True)


def test_vacuous_certified_gap_bounds_are_marked(report):
    from robustkd.report.vacuity import vacuous_points, vacuous_quantiles

    result, out = report
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    marked = 0
    for row in _rows(result).values():
        if row["role"] != "student":
            continue
        cert = json.loads(Path(row["certify_sources"]["certify@0.1"]).read_text())["per_example"]
        keep = cert["teacher_correct"]
        flags = vacuous_points(
            [v for v, k in zip(cert["student_conf_lower"], keep) if k],
            [v for v, k in zip(cert["gap_upper"], keep) if k],
        )
        assert row["certified_gap_vacuous"] == vacuous_quantiles(flags)
        for key in ("median", "q90"):
            if row["certified_gap_vacuous"][key]:
                marked += 1
                number = f"{row['certified_gap'][key]:.4f}"
                line = next(line for line in md.splitlines() if line.startswith(f"| {row['name']} | teacher | "))
                assert "vacuous" in line and number not in line.split("|")[8 if key == "median" else 9]
    # The tiny students' IBP bounds at eps 0.1 say nothing: the fixture exercises the marking.
    assert marked > 0
    assert '<td class="vacuous">vacuous</td>' in page and "carries no information about the student" in page


def test_gap_histograms_fit_the_data(monkeypatch):
    import robustkd.report.plots as plots

    figures = []
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or b"")
    rows = [{"name": "kd", "role": "student"}]
    extras = {"kd": {"gap": [0.20, 0.25, 0.31], "certified_gap": [0.40]}}
    plots.gap_histograms(rows, extras, ReportSettings(eps=0.1), Thresholds(max_gap=0.1))
    low, high = figures[0].axes[0].get_xlim()
    assert 0.05 < low < 0.1 and 0.4 < high < 0.45  # the data and the max_gap line, with a margin; not -1..1
    assert plots.gap_range([0.5, 0.5], None) == pytest.approx((0.489, 0.511))


def test_settings_and_thresholds_are_readable_tables(report):
    _, out = report
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert '"faithfulness_steps":' not in page and "```json" not in md  # no JSON dump
    assert '<table id="settings">' in page and '<table id="thresholds">' in page
    assert "| attacks | clean, pgd3, cw3 |" in md and "| eps_sweep | 0.05, 0.1 |" in md
    assert "| max_certified_gap | off |" in md and "| max_gap | 0.1 |" in md
    assert "None" not in page.split("<h2>Thresholds</h2>")[1].split("<h2>Where")[0]
    assert "None" not in md.split("## Thresholds")[1].split("## Where")[0]


def test_verdict_lines_name_the_teacher_once(report):
    _, out = report
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert "<b>kd</b> (teacher: teacher): not safe" in page or "<b>kd</b> (teacher: teacher): safe" in page
    assert "- **kd (teacher: teacher)**: " in md
    assert "(teacher teacher)" not in page and "(teacher teacher)" not in md
