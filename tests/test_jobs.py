"""robustkd.jobs: the chain every "checkpoint in, JSON out" job shares (models, dataset rule, test points,
output names, resumable progress, atomic output), on tiny checkpoints and synthetic test points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import robustkd.jobs.certification as certification
from robustkd.attacks.recipes import AttackRecipe
from robustkd.attacks.threat import ThreatModel
from robustkd.checkpoint import save_checkpoint
from robustkd.errors import ConfigError
from robustkd.io import temporary_files
from robustkd.jobs import (
    certify_checkpoints,
    chain,
    choose_dataset,
    evaluate_checkpoint,
    evaluate_faithfulness_checkpoints,
    load_models,
    output_path,
    progress_path,
)
from robustkd.models import create_model

META = {"arch": "dm_small", "arch_args": {}, "num_classes": 4, "input_shape": [1, 16, 16]}
META.update(mean=[0.5], std=[0.25], dataset="fashion-mnist")
N = 12


class Stop(Exception):
    """Stands in for a kill: raised inside the computation, so nothing after it happens."""


def _model(num_classes: int = 4, input_size: int = 16) -> torch.nn.Module:
    return create_model(
        "dm_small", num_classes=num_classes, in_channels=1, input_size=input_size, mean=[0.5], std=[0.25]
    )


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("timing", "output")}


@pytest.fixture
def ckpts(tmp_path, monkeypatch):
    """A teacher and a student checkpoint, and fake test points in place of the dataset's."""
    torch.manual_seed(0)
    for name in ("teacher", "student"):
        save_checkpoint(tmp_path / name / "best", _model(), {**META, "method": name})
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(N, 1, 16, 16, generator=g), torch.randint(0, 4, (N,), generator=g)
    asked = []

    def fake_points(meta, n_examples, data_root=None):
        asked.append(dict(meta))
        n = N if n_examples is None else min(n_examples, N)
        return x[:n], y[:n], 50, "fake"

    monkeypatch.setattr(chain, "load_test_points", fake_points)
    return tmp_path, asked


# ------------------------------------------------------------------------------------- output names
def test_output_names_sit_beside_the_student(ckpts):
    root, _ = ckpts
    common = {"n_examples": 4, "batch_size": 4, "device": "cpu", "progress": False}
    result = evaluate_checkpoint(root / "student", protocol="linf-8/255", attacks=["clean"], **common)
    assert result["output"] == str(root / "student" / "eval_best_linf-8_255.json")
    result = certify_checkpoints(root / "student", root / "teacher", eps=0.05, **common)
    assert result["output"] == str(root / "student" / "cert_best_ibp_0.05.json")
    faith = evaluate_faithfulness_checkpoints(root / "teacher", root / "student", eps=[0.1, 0.05], steps=1, **common)
    assert faith["output"] == str(root / "student" / "faithful_best_linf-0.05_0.1.json")
    for path in (result["output"], faith["output"]):
        assert json.loads(Path(path).read_text())["data"]["source"] == "fake"
    other = root / "elsewhere" / "mine.json"
    assert evaluate_checkpoint(root / "student", attacks=["clean"], out=other, **common)["output"] == str(other)
    assert other.is_file()


def test_output_path_and_progress_path(tmp_path):
    for name in ("best", "last"):
        save_checkpoint(tmp_path / "run" / name, _model(), META)
    assert output_path(None, tmp_path / "run" / "last", "x_{stem}_y.json") == tmp_path / "run" / "x_last_y.json"
    assert output_path(None, tmp_path / "run", "x_{stem}.json") == tmp_path / "run" / "x_best.json"
    assert output_path(tmp_path / "o.json", tmp_path / "run" / "last", "ignored") == tmp_path / "o.json"
    assert progress_path(tmp_path / "cert.json") == tmp_path / "cert.progress.json"
    assert progress_path(tmp_path / "result") == tmp_path / "result.progress.json"


# ------------------------------------------------------------------------------------- the dataset rule
@pytest.mark.parametrize(
    ("student", "teacher", "override", "expected"),
    [
        ("cifar10", "cifar10", None, "cifar10"),
        ("cifar10", None, None, "cifar10"),  # a teacher that names none (a foreign .pt) takes the student's
        (None, "cifar10", None, "cifar10"),  # and the other way round
        (None, None, None, None),
        ("cifar10", "fashion-mnist", "svhn", "svhn"),  # an explicit choice settles a disagreement
    ],
)
def test_one_dataset_rule(student, teacher, override, expected):
    assert choose_dataset({"dataset": student}, {"dataset": teacher}, override) == expected


def test_disagreeing_datasets_need_an_explicit_choice(ckpts):
    root, asked = ckpts
    save_checkpoint(root / "cifar_teacher" / "best", _model(), {**META, "dataset": "cifar10"})
    common = {"n_examples": 4, "batch_size": 4, "device": "cpu", "progress": False}
    for job in (
        lambda **k: certify_checkpoints(root / "student", root / "cifar_teacher", **k),
        lambda **k: evaluate_faithfulness_checkpoints(root / "cifar_teacher", root / "student", steps=1, **k),
    ):
        with pytest.raises(ConfigError, match="^dataset: the teacher was trained on 'cifar10' but the student"):
            job(**common)
        assert asked == []  # refused before any data is read
        job(dataset="cifar10", **common)
        assert asked.pop()["dataset"] == "cifar10"


def test_a_checkpoint_that_names_no_dataset_needs_one(tmp_path):
    with pytest.raises(ConfigError, match="^dataset: the checkpoint does not name its dataset; pass --data.dataset"):
        chain.load_test_points({"arch": "dm_small"}, 4)
    with pytest.raises(ConfigError, match="^n_examples: must be an integer >= 1"):
        chain.load_test_points({"dataset": "fashion-mnist"}, 0)


# ------------------------------------------------------------------------------------- compatibility
@pytest.mark.parametrize(
    ("num_classes", "input_size", "message"),
    [(7, 16, r"classes \(7 vs 4\)"), (4, 20, r"input shape \(\[1, 20, 20\] vs \[1, 16, 16\]\)")],
)
def test_an_incompatible_teacher_is_refused_by_every_job(ckpts, num_classes, input_size, message):
    root, asked = ckpts
    meta = {**META, "num_classes": num_classes, "input_shape": [1, input_size, input_size]}
    save_checkpoint(root / "other" / "best", _model(num_classes, input_size), meta)
    with pytest.raises(ConfigError, match=f"^teacher: teacher and student differ in {message}"):
        load_models(root / "student", root / "other", device="cpu")
    common = {"n_examples": 4, "device": "cpu", "progress": False}
    with pytest.raises(ConfigError, match=message):
        certify_checkpoints(root / "student", root / "other", **common)
    with pytest.raises(ConfigError, match=message):
        evaluate_faithfulness_checkpoints(root / "other", root / "student", **common)
    assert asked == []


# ------------------------------------------------------------------------------------- killed and resumed
def _stop_at(monkeypatch, owner, name: str, at: int) -> dict:
    """Make ``owner.name`` raise Stop on its ``at``-th call; counts every call."""
    real = getattr(owner, name)
    calls = {"n": 0, "at": at}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_a_killed_evaluation_resumes_where_it_stopped(ckpts, monkeypatch):
    root, _ = ckpts
    args = {"attacks": ["clean", "pgd5"], "batch_size": 2, "device": "cpu", "progress": False}
    calls = _stop_at(monkeypatch, AttackRecipe, "run", None)
    reference = evaluate_checkpoint(root / "student", out=root / "reference.json", **args)
    full = calls["n"]
    out = root / "student" / "eval_best_linf-0.1.json"
    calls.update(n=0, at=4)
    with pytest.raises(Stop):
        evaluate_checkpoint(root / "student", **args)
    assert progress_path(out).is_file() and not out.exists()
    calls.update(n=0, at=None)
    result = evaluate_checkpoint(root / "student", **args)
    assert _strip(result) == _strip(reference)
    assert calls["n"] == full - 3  # the three batches done before the stop were saved, and not run again
    assert out.is_file() and not progress_path(out).exists() and temporary_files(out.parent) == []
    # resume=False starts over, and the same call continues only progress made for the same settings
    calls.update(n=0, at=3)
    with pytest.raises(Stop):
        evaluate_checkpoint(root / "student", **args)
    calls.update(n=0, at=None)
    with pytest.warns(UserWarning, match="saved for other settings, weights or data"):
        evaluate_checkpoint(root / "student", **{**args, "seed": 1})
    calls.update(n=0, at=3)
    with pytest.raises(Stop):
        evaluate_checkpoint(root / "student", **args)
    calls.update(n=0, at=None)
    assert _strip(evaluate_checkpoint(root / "student", resume=False, **args)) == _strip(reference)
    assert calls["n"] == full


def test_a_killed_certification_resumes_where_it_stopped(ckpts, monkeypatch):
    root, _ = ckpts
    args = {"eps": ThreatModel("linf", 0.05), "batch_size": 2, "device": "cpu", "progress": False}
    reference = certify_checkpoints(root / "student", root / "teacher", out=root / "reference.json", **args)
    assert reference["eps"] == pytest.approx(0.05) and reference["data"]["n_total"] == 50
    bare = certify_checkpoints(root / "student", root / "teacher", out=root / "r2.json", **{**args, "eps": 0.05})
    assert _strip(bare) == _strip(reference)  # a bare radius is the same Linf threat model
    out = root / "cert.json"
    calls = _stop_at(monkeypatch, certification, "certify", 4)
    with pytest.raises(Stop):
        certify_checkpoints(root / "student", root / "teacher", out=out, **args)
    saved = json.loads(progress_path(out).read_text())["state"]["per_example"]
    assert len(saved["gap_upper"]) == 6  # three batches of two were kept
    calls.update(n=0, at=None)
    result = certify_checkpoints(root / "student", root / "teacher", out=out, **args)
    assert calls["n"] == N // 2 - 3
    assert _strip(result) == _strip(reference)
    assert not progress_path(out).exists() and json.loads(out.read_text())["per_example"] == reference["per_example"]


def test_a_killed_faithfulness_evaluation_resumes_where_it_stopped(ckpts, monkeypatch):
    import robustkd.evaluate.faithfulness as faithfulness

    root, _ = ckpts
    args = {"eps": [0.05, 0.1], "steps": 2, "restarts": 1, "batch_size": 2, "device": "cpu", "progress": False}
    calls = _stop_at(monkeypatch, faithfulness, "perturb", None)
    reference = evaluate_faithfulness_checkpoints(root / "teacher", root / "student", out=root / "ref.json", **args)
    full = calls["n"]
    out = root / "faithful.json"
    calls.update(n=0, at=full // 2)
    with pytest.raises(Stop):
        evaluate_faithfulness_checkpoints(root / "teacher", root / "student", out=out, **args)
    assert progress_path(out).is_file() and not out.exists()
    calls.update(n=0, at=None)
    result = evaluate_faithfulness_checkpoints(root / "teacher", root / "student", out=out, **args)
    assert _strip(result) == _strip(reference)
    # Only the batch it stopped in is searched again (at most 7 searches: 3 disagreement, 2 x 2 gap).
    assert full - full // 2 < calls["n"] <= full - full // 2 + 7
    assert not progress_path(out).exists()
