"""``robustkd compare`` end to end at a tiny size: runs, reuse after a kill, leaderboard, verdicts, bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import robustkd
from robustkd.cli import main
from robustkd.compare import load_compare_config
from robustkd.errors import ConfigError

TINY = Path(__file__).resolve().parents[1] / "configs" / "compare" / "tiny.yaml"


def _tiny(out: Path) -> dict:
    raw = yaml.safe_load(TINY.read_text())
    raw["out"] = str(out)
    root = TINY.parents[2]
    raw["teacher"]["config"] = str(root / raw["teacher"]["config"])
    raw["methods"]["kd"]["config"] = str(root / raw["methods"]["kd"]["config"])
    raw["claims"] = str(root / raw["claims"])
    return raw


class _Killed(Exception):
    pass


def _counting_train(monkeypatch, kill_after: int | None = None) -> list[str]:
    """Count the trainings the comparison starts; raise after ``kill_after`` finished ones (a killed compare)."""
    import robustkd.engine

    real, calls = robustkd.engine.train, []

    def train(cfg):
        result = real(cfg)
        calls.append(f"{Path(cfg.out_dir).name}/{cfg.name}")
        if kill_after is not None and len(calls) >= kill_after:
            raise _Killed
        return result

    monkeypatch.setattr(robustkd.engine, "train", train)
    return calls


@pytest.mark.slow  # about a minute on two shared CPU cores: five tiny trainings and their evaluations
def test_a_tiny_comparison_resumes_after_a_kill_and_judges_the_claims(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    config = _tiny(out)
    # Killed right after the second run (kd seed 0) finished training, before its evaluation.
    with monkeypatch.context() as patch:
        calls = _counting_train(patch, kill_after=2)
        with pytest.raises(_Killed):
            robustkd.compare(config)
    assert calls == ["teacher/seed0", "kd/seed0"]
    first = (out / "runs/kd/seed0/best.safetensors").stat().st_mtime_ns
    assert not (out / "runs/kd/seed0/compare.json").exists()

    calls = _counting_train(monkeypatch)
    assert robustkd.compare(config) == out
    assert calls == ["kd/seed1", "advfunmatch/seed0", "advfunmatch/seed1"]  # the finished runs were reused
    assert (out / "runs/kd/seed0/best.safetensors").stat().st_mtime_ns == first
    lines = capsys.readouterr().out
    assert "teacher seed 0: reused" in lines and "kd seed 0: reused" in lines and "kd seed 1: trained" in lines

    board = json.loads((out / "leaderboard.json").read_text())
    rows = {row["label"]: row for row in board["leaderboard"]}
    assert list(rows) == ["teacher", "kd", "advfunmatch"]
    assert rows["kd"]["seeds"] == [0, 1] and rows["teacher"]["seeds"] == [0]
    for row in rows.values():
        clean = row["metrics"]["clean"]
        assert clean["n"] == 200 and len(clean["runs"]) == len(row["seeds"])
        accs = [r["accuracy"] for r in clean["runs"]]
        assert clean["mean"] == pytest.approx(sum(accs) / len(accs))
        for run in clean["runs"]:
            assert run["wilson"][0] <= run["accuracy"] <= run["wilson"][1]
        assert clean["ci"][0] <= clean["mean"] <= clean["ci"][1]
        robust = row["metrics"]["robust"]
        assert all(r["accuracy"] <= c["accuracy"] for r, c in zip(robust["runs"], clean["runs"]))
    # The per-point record agrees with the job layer's JSON it was read from.
    record = json.loads((out / "runs/kd/seed1/compare.json").read_text())
    evaluated = json.loads((out / "runs/kd/seed1/eval.json").read_text())
    assert record["metrics"]["clean"].count("1") == evaluated["attacks"]["clean"]["correct"]
    assert "cert_agreement" in record["metrics"] and "cert_agreement" not in rows["teacher"]["metrics"]
    faithful = json.loads((out / "runs/kd/seed1/faithful.json").read_text())
    p = faithful["per_example"]["teacher_correct"]
    assert len(record["metrics"]["agreement"]) == sum(p) == len(record["metrics"]["cert_agreement"])
    gap = rows["kd"]["cert_gap"]
    assert rows["teacher"]["cert_gap"] is None and 0 <= gap["q50"][0] <= gap["q90"][0] <= 1
    assert "Certified confidence-gap bound on P" in (out / "leaderboard.md").read_text()

    claims = {c["claim"]: c for c in board["claims"]}
    judged = claims["kd.robust < teacher.robust"]
    assert judged["verdict"] in ("reproduced", "within noise", "contradicted")
    assert {"diff", "low", "high", "p_holm", "p_mcnemar"} <= set(judged["comparisons"][0])
    assert claims["kdiga.robust > kd.robust"]["verdict"] == "not run"
    for name in ("leaderboard.md", "leaderboard.html", "pareto.png", "results_fragment.md", "claims.md"):
        assert (out / name).stat().st_size > 0, name
    assert "robustkd compare" in (out / "results_fragment.md").read_text()

    # Everything finished: a third call trains and evaluates nothing.
    stamp = (out / "runs/advfunmatch/seed1/compare.json").stat().st_mtime_ns
    calls = _counting_train(monkeypatch)
    robustkd.compare(config, progress=False)
    assert calls == [] and (out / "runs/advfunmatch/seed1/compare.json").stat().st_mtime_ns == stamp


def test_a_run_folder_made_for_other_settings_is_refused(tmp_path):
    from robustkd.compare.runs import check_plan

    check_plan(tmp_path, "aaaa")
    check_plan(tmp_path, "aaaa")
    with pytest.raises(ConfigError, match="holds a run made with other settings"):
        check_plan(tmp_path, "bbbb")


def test_workers_run_in_spawned_processes_and_their_errors_come_back(tmp_path):
    """Two processes: each refuses its folder (planned for other settings) and the error reaches the caller."""
    from robustkd.compare.runs import check_plan, run_all

    tasks = []
    for seed in (0, 1):
        run_dir = tmp_path / f"seed{seed}"
        run_dir.mkdir()
        check_plan(run_dir, "other")
        tasks.append({"run_dir": str(run_dir), "key": "mine", "config": {}, "device": "cpu"})
    seen = []
    with pytest.raises(ConfigError, match="holds a run made with other settings"):
        run_all(tasks, 2, seen.append)
    assert seen == []


def test_the_ablation_axis_and_exceptions_make_labelled_runs(tmp_path):
    raw = _tiny(tmp_path)
    raw["methods"]["kd"]["exceptions"] = {"optim.lr": 0.001}
    raw["ablation"] = {"key": "data.augment", "values": ["none", "crop_flip"], "methods": ["advfunmatch"]}
    cfg = load_compare_config(raw)
    assert [r.folder for r in cfg.runs] == [
        "kd/seed0", "kd/seed1", "advfunmatch[none]/seed0", "advfunmatch[none]/seed1",
        "advfunmatch[crop_flip]/seed0", "advfunmatch[crop_flip]/seed1",
    ]  # fmt: skip
    kd, aug = cfg.runs[0], cfg.runs[-1]
    assert kd.config["optim"]["lr"] == 0.001 and kd.exceptions == {"optim.lr": 0.001}
    assert aug.config["data"]["augment"] == "crop_flip" and aug.config["optim"]["lr"] == 0.003
    assert kd.config["epochs"] == aug.config["epochs"] == 1  # the protocol is the same for all
    assert kd.key() != cfg.runs[1].key()  # the seed is part of what a run is


BAD = [
    ({"seed": [0]}, "unknown option 'seed'; did you mean 'seeds'"),
    ({"methods": {"kd": {"argz": {}}}}, "methods.kd.argz: unknown key; did you mean 'args'"),
    ({"methods": {"kdd": {}}}, "unknown method 'kdd'"),
    ({"protocol": {"optim": {"lrr": 0.1}}}, "lrr"),
    ({"evaluation": {"attacks": ["clean", "pgdd"]}}, "evaluation.attacks"),
    ({"ablation": {"key": "data.augment", "values": ["none", "randaug"]}}, "randaug"),
    ({"protocol": {"seed": 3}}, "protocol.seed: set per run"),
    ({"seeds": [0, 0]}, "repeats a seed"),
    ({"evaluation": {"certify": {"method": "crown-ibb"}}}, "evaluation.certify.method"),
    ({"evaluation": {"confidence": 95}}, "evaluation.confidence: must be a number in [0.5, 1)"),
    ({"evaluation": {"n_examples": 0}}, "evaluation.n_examples: must be an integer >= 1 or null"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_a_bad_config_is_one_line(tmp_path, capsys, change, message):
    raw = _tiny(tmp_path / "out")
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict) and key != "methods":
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["compare", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{path}:" in err  # the file, and for a key the parser knows, its line
    assert not (tmp_path / "out").exists()


def test_the_python_api_names_the_key_too(tmp_path):
    raw = {**_tiny(tmp_path / "out"), "seed": [0]}
    with pytest.raises(ConfigError, match="^compare config: seed: unknown key; did you mean 'seeds'"):
        load_compare_config(raw)


def test_a_malformed_claims_file_fails_before_any_run(tmp_path):
    raw = _tiny(tmp_path / "out")
    (tmp_path / "claims.yaml").write_text("claims:\n  - claim: kd.robust << teacher.robust\n")
    raw["claims"] = str(tmp_path / "claims.yaml")
    with pytest.raises(ConfigError, match="exactly one"):
        robustkd.compare(raw)
    assert not (tmp_path / "out").exists()


COMPARE_CONFIGS = sorted(p.name for p in TINY.parent.glob("*.yaml") if p.name != "claims.yaml")


@pytest.mark.parametrize("name", COMPARE_CONFIGS)
def test_every_shipped_comparison_loads_and_names_its_command(name, monkeypatch):
    monkeypatch.chdir(TINY.parents[2])
    path = TINY.parent / name
    text = path.read_text()
    assert text.startswith("#") and f"robustkd compare --config configs/compare/{name}" in text
    cfg = load_compare_config(f"configs/compare/{name}")  # every run's training config validated
    assert cfg.runs and cfg.claims is not None and cfg.claims.exists()
    budgets = {(r.config["epochs"], json.dumps(r.config["data"], sort_keys=True)) for r in cfg.runs if not r.exceptions}
    ablated = {r.label for r in cfg.runs if "[" in r.label}
    assert len(budgets) == 1 or ablated, f"{name}: runs without a written exception differ in budget"


def test_the_shipped_claims_parse():
    from robustkd.compare import load_claims

    claims = load_claims(TINY.parent / "claims.yaml")
    assert {"kd.robust < teacher.robust", "advfunmatch[randaugment].robust > advfunmatch[none].robust"} <= {
        c["claim"] for c in claims
    }


def test_certified_gap_quantiles_read_the_teachers_correct_points_only(tmp_path):
    from robustkd.certify import certify
    from robustkd.compare.runs import certified_gaps

    assert certified_gaps(tmp_path) is None  # no cert.json: no column
    # The certify job's own summary of a real pair, 7 points: the quantiles are over the teacher's correct ones.
    torch.manual_seed(0)
    teacher, student = (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval() for _ in range(2))
    x = torch.randint(0, 256, (7, 1, 2, 2), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    cert = certify(teacher, student, x, y, 0.05, "ibp", progress=False)
    (tmp_path / "cert.json").write_text(json.dumps(cert))
    per = cert["per_example"]
    gaps = np.array([g for g, t in zip(per["gap_upper"], per["teacher_correct"]) if t])
    assert 0 < len(gaps) < 7  # some points outside P
    assert certified_gaps(tmp_path) == pytest.approx({"q50": np.quantile(gaps, 0.5), "q90": np.quantile(gaps, 0.9)})
    cert["teacher_correct"]["gap_upper"] = dict.fromkeys(cert["teacher_correct"]["gap_upper"])  # P empty
    (tmp_path / "cert.json").write_text(json.dumps(cert))
    assert certified_gaps(tmp_path) is None


def _summary(name: str, verdicts: dict[str, tuple[str, float]]) -> dict:
    """A leaderboard.json as compare writes it, reduced to what ``robustkd claims`` reads."""
    claims = []
    for claim, (verdict, diff) in verdicts.items():
        row = {"comparison": claim, "verdict": verdict}
        if verdict != "not run":
            row.update(diff=diff, low=diff - 0.05, high=diff + 0.05, level=0.975, p_holm=0.004)
        claims.append({"claim": claim, "source": "s", "verdict": verdict, "comparisons": [row]})
    return {"name": name, "claims": claims}


def test_claims_across_comparisons_keep_one_row_per_protocol(tmp_path, capsys):
    a = {"kd.robust < teacher.robust": ("reproduced", -0.237), "rslad.robust > ard.robust": ("not run", 0.0)}
    b = {"kd.robust < teacher.robust": ("within noise", -0.01), "rslad.robust > ard.robust": ("not run", 0.0)}
    for name, verdicts in (("cpu_a", a), ("cpu_b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "leaderboard.json").write_text(json.dumps(_summary(name, verdicts)))
    assert main(["claims", str(tmp_path / "cpu_a"), str(tmp_path / "cpu_b")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| kd") or "rslad" in line]
    assert rows == [
        "| kd.robust < teacher.robust | cpu_a | **reproduced** | kd.robust < teacher.robust: -0.237 [-0.287, -0.187]"
        " (97.5%) | 0.004 |",
        "| kd.robust < teacher.robust | cpu_b | **within noise** | kd.robust < teacher.robust: -0.010 [-0.060, +0.040]"
        " (97.5%) | 0.004 |",
        "| rslad.robust > ard.robust | – | **not run** | – | – |",
    ]


def test_claims_of_a_folder_compare_never_finished_is_one_line(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "leaderboard.json").write_text("{truncated")
    for folder, message in ((tmp_path / "none", "no leaderboard.json"), (tmp_path / "half", "unreadable")):
        assert main(["claims", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "robustkd compare" in err and "\n" not in err


def test_a_killed_comparison_takes_its_workers_with_it(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    # A parent that starts a worker the way run_all does, then is killed outright (no Ctrl-C to the group).
    script = f"""
import multiprocessing, os, time
from concurrent.futures import ProcessPoolExecutor
from robustkd.compare.runs import exit_with_parent

def work(path):
    open(path, "w").write(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(), 0.2))
    pool.submit(work, {str(tmp_path / "worker.pid")!r})
    time.sleep(120)
"""
    (tmp_path / "parent.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], cwd=tmp_path)
    pid_file = tmp_path / "worker.pid"
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived its comparison")
