"""Faithfulness evaluation interrupted part-way continues from its saved per-point results and ends exactly
where an uninterrupted run ends: every per-example value and every random start (see docs/RELIABILITY.md).

The fast tests stop the evaluation by raising from a search (nothing after it runs, as after a kill); the slow
one SIGKILLs a real ``evaluate_faithfulness_checkpoints`` process on a tiny checkpoint pair.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import robustkd.evaluate.faithfulness as faithfulness
from robustkd.evaluate import evaluate_faithfulness
from robustkd.io import temporary_files
from robustkd.jobs import chain, evaluate_faithfulness_checkpoints, progress_path
from robustkd.jobs.progress import model_tensors

REPO = Path(__file__).resolve().parents[1]
# Two radii, several batches each, every search and the separate confidences: all the state that must survive.
SETTINGS = {
    "eps": [0.05, 0.1],
    "steps": 3,
    "restarts": 2,
    "batch_size": 8,
    "separate_confidence": True,
    "progress": False,
}


class Stop(Exception):
    """Stands in for a kill: raised before a search runs, so nothing after it happens."""


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("timing", "output")}


def _with_progress(teacher, student, x, y, *, progress_file, **kwargs) -> dict:
    """``evaluate_faithfulness`` with its state kept in ``progress_file``, as the jobs keep it."""
    tensors = [*model_tensors("student", student), *model_tensors("teacher", teacher), ("x", x), ("y", y)]
    saved = chain.open_progress(progress_file, what="faithfulness", settings={}, tensors=tensors)
    return evaluate_faithfulness(teacher, student, x, y, state=saved.state, on_batch=saved.save, **kwargs)


@pytest.fixture
def spy(monkeypatch) -> dict:
    """Log (eps, objective, generator state, batch size) per search; raise Stop at call ``at``."""
    spy = {"log": [], "n": 0, "at": None}
    real = faithfulness.perturb

    def perturb(model, x, y, threat, objective, *, generator, **kwargs):
        spy["n"] += 1
        if spy["n"] == spy["at"]:
            raise Stop
        state = hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()
        spy["log"].append((threat.eps, repr(objective), state, x.shape[0]))
        return real(model, x, y, threat, objective, generator=generator, **kwargs)

    monkeypatch.setattr(faithfulness, "perturb", perturb)
    return spy


@pytest.fixture(scope="module")
def reference(pair):
    teacher, student, x, y = pair
    return evaluate_faithfulness(teacher, student, x, y, **SETTINGS)


def _stopped(spy: dict, at: int, run) -> list:
    spy.update(log=[], n=0, at=at)
    with pytest.raises(Stop):
        run()
    spy.update(n=0, at=None)
    before = spy["log"][:]
    spy["log"] = []
    return before


@pytest.mark.parametrize(
    ("at", "save_every"),
    [
        pytest.param(12, 1, id="first-radius"),
        pytest.param(95, 1, id="second-radius"),
        pytest.param(100, 3, id="every-third-batch"),
    ],
)
def test_interrupted_evaluation_resumes_bit_exact(pair, reference, spy, tmp_path, at, save_every):
    teacher, student, x, y = pair
    saved = tmp_path / "faithful.progress.json"
    spy["log"] = []
    assert _strip(evaluate_faithfulness(teacher, student, x, y, **SETTINGS)) == _strip(reference)
    uninterrupted = spy["log"][:]

    def run():
        return _with_progress(teacher, student, x, y, progress_file=saved, save_every=save_every, **SETTINGS)

    before = _stopped(spy, at, run)
    assert len(before) == at - 1 < len(uninterrupted) and saved.is_file()
    result = run()
    after = spy["log"]
    # Per-example values, summaries, found_by and recorded warnings are all the same.
    assert _strip(result) == _strip(reference)
    # The resumed run starts at a saved batch, runs each remaining search once, and draws the same random starts
    # (the per-(eps, search, batch) streams are keyed by the absolute batch number, not by where it resumed).
    start = len(uninterrupted) - len(after)
    assert 0 < start <= len(before)
    assert before == uninterrupted[: len(before)] and before[:start] + after == uninterrupted
    assert len(before) - start < 9 * save_every  # at most the unsaved batches are run again (9 searches each)


def test_finished_progress_is_reused_without_searching(pair, reference, spy, tmp_path):
    teacher, student, x, y = pair
    saved = tmp_path / "faithful.progress.json"
    _with_progress(teacher, student, x, y, progress_file=saved, **SETTINGS)
    assert saved.is_file()  # the caller removes it once the result is kept
    spy.update(log=[], n=0)
    assert _strip(_with_progress(teacher, student, x, y, progress_file=saved, **SETTINGS)) == _strip(reference)
    assert spy["n"] == 0


def test_progress_for_other_settings_weights_or_data_or_damaged_is_ignored(pair, reference, spy, tmp_path):
    teacher, student, x, y = pair
    saved = tmp_path / "faithful.progress.json"

    def run(**over):
        args = {"teacher": teacher, "student": student, "x": x, "y": y, **SETTINGS, **over}
        return _with_progress(**args, progress_file=saved)

    spy["n"] = 0
    run()
    saved.unlink()
    full = spy["n"]

    other_student = copy.deepcopy(student)
    with torch.no_grad():
        other_student[1].bias[0] += 1e-3
    other_x = x.clone()
    other_x[0, 0, 0, 0] = 1 - other_x[0, 0, 0, 0]
    for change in ({"seed": 1}, {"student": other_student}, {"x": other_x}):
        _stopped(spy, 40, lambda change=change: run(**change))
        spy["n"] = 0
        with pytest.warns(UserWarning, match="saved for other settings, weights or data"):
            assert _strip(run()) == _strip(reference)
        assert spy["n"] == full  # all of it again
        saved.unlink()

    saved.write_text('{"format": "robustkd-progress-v1", "key": ')  # torn by hand, not by us
    with pytest.warns(UserWarning, match="unreadable progress file"):
        assert _strip(run()) == _strip(reference)

    def damage_tensor(state):
        state["state"]["gap_under"] = state["state"]["gap_under"][:-8]  # the right key, but too few values

    def damage_batch(state):
        state["current"]["chunk"] = 99  # past the last batch

    def damage_counts(state):
        del state["current"]["found_by"]["mismatch"]

    for damage in (damage_tensor, damage_batch, damage_counts):
        saved.unlink()
        _stopped(spy, 40, run)
        content = json.loads(saved.read_text())
        assert content["state"]["current"] is not None
        damage(content["state"])
        saved.write_text(json.dumps(content))
        spy["n"] = 0
        with pytest.warns(UserWarning, match="contents are damaged"):
            assert _strip(run()) == _strip(reference)
        assert spy["n"] == full  # all of it again


def test_checkpoints_resume_and_remove_their_progress(tmp_path, monkeypatch, spy):
    from robustkd.checkpoint import load_model, save_checkpoint
    from robustkd.models import create_model

    meta = {"arch": "dm_small", "arch_args": {}, "num_classes": 10, "input_shape": [1, 28, 28]}
    meta.update(mean=[0.286], std=[0.353], dataset="fashion-mnist")
    torch.manual_seed(0)
    for name in ("teacher", "student"):
        model = create_model("dm_small", num_classes=10, in_channels=1, input_size=28, mean=[0.286], std=[0.353])
        save_checkpoint(tmp_path / name / "best", model, {**meta, "method": name})

    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 1, 28, 28, generator=g)
    with torch.no_grad():
        y = load_model(tmp_path / "teacher" / "best")(x).argmax(1)  # most points in P: many batches to search
    y[:3] = (y[:3] + 1) % 10

    def fake_points(meta, n_examples, data_root=None):
        return x[:n_examples], y[:n_examples], 50, "fake"

    monkeypatch.setattr(chain, "load_test_points", fake_points)
    args = {"eps": [0.05, 0.1], "n_examples": 24, "steps": 2, "restarts": 1, "batch_size": 2, "device": "cpu"}
    args.update(progress=False)
    reference = evaluate_faithfulness_checkpoints(tmp_path / "teacher", tmp_path / "student", **args)
    total = spy["n"]
    out = tmp_path / "student" / "faithful_best_linf-0.05_0.1.json"
    assert reference["output"] == str(out)
    out.unlink()

    def run(**over):
        return evaluate_faithfulness_checkpoints(tmp_path / "teacher", tmp_path / "student", **args, **over)

    searched = len(_stopped(spy, total // 2, run))
    assert progress_path(out).is_file() and not out.exists()
    result = run()
    assert _strip(result) == _strip(reference)
    assert total - searched <= spy["n"] < total - searched + 7  # only the interrupted batch is searched again
    assert out.is_file() and not progress_path(out).exists() and temporary_files(out.parent) == []

    _stopped(spy, total // 2, run)
    assert _strip(run(resume=False)) == _strip(reference)
    assert spy["n"] == total  # all of it again
    assert not progress_path(out).exists()


# --- a real SIGKILL -------------------------------------------------------------------------------------

CHILD = r"""
import json, os, signal, sys
from pathlib import Path

spec = json.loads(sys.argv[1])
import torch

torch.set_num_threads(spec["threads"])
import robustkd.evaluate.faithfulness as faithfulness
import robustkd.jobs as jobs

fault = spec["fault"]
calls = {"n": 0}


def nth_call() -> bool:
    calls["n"] += 1
    return calls["n"] == fault["at"]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if fault["kind"] == "search":  # before the `at`-th search
    real_perturb = faithfulness.perturb

    def perturb(*args, **kwargs):
        if nth_call():
            die()
        return real_perturb(*args, **kwargs)

    faithfulness.perturb = perturb
elif fault["kind"] == "rename":  # between writing the progress file in full and renaming it into place
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == fault["target"] and nth_call():
            die()
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace

kwargs = spec["kwargs"]
jobs.evaluate_faithfulness_checkpoints(kwargs.pop("teacher"), kwargs.pop("student"), **kwargs)
"""


@pytest.fixture(scope="module")
def checkpoint_pair(tmp_path_factory):
    """A random dm_small teacher, a noisy copy as student, and test images labelled mostly by the teacher."""
    from robustkd.checkpoint import load_model, save_checkpoint
    from robustkd.models import create_model

    base = tmp_path_factory.mktemp("faithful-kill")
    meta = {"arch": "dm_small", "arch_args": {}, "num_classes": 4, "input_shape": [1, 16, 16]}
    meta.update(mean=[0.5], std=[0.25], dataset="imagefolder")
    torch.manual_seed(0)
    teacher = create_model("dm_small", num_classes=4, in_channels=1, input_size=16, mean=[0.5], std=[0.25])
    save_checkpoint(base / "teacher" / "best", teacher, {**meta, "method": "teacher"})
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(base / "student" / "best", teacher, {**meta, "method": "student"})
    teacher = load_model(base / "teacher" / "best")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 16, 16), dtype=np.uint8)
    with torch.no_grad():
        labels = teacher(torch.from_numpy(images)[:, None].float() / 255).argmax(1).tolist()
    for i, (image, label) in enumerate(zip(images, labels)):
        label = (label + 1) % 4 if i % 6 == 0 else label  # some teacher-wrong points
        folder = base / "data" / "test" / "abcd"[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    for c, name in enumerate("abcd"):  # every class in train/, which fixes the label of each folder name
        (base / "data" / "train" / name).mkdir(parents=True)
        Image.fromarray(images[c]).save(base / "data" / "train" / name / "0.png")
    return base


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"kind": "search", "at": "middle-of-second-radius"}, id="inside-search"),
        pytest.param({"kind": "rename", "target": "faithful.progress.json", "at": 5}, id="rename-progress"),
    ],
)
def test_faithfulness_killed_resumes_from_saved_points(checkpoint_pair, tmp_path, monkeypatch, spy, fault):
    base = checkpoint_pair
    monkeypatch.setenv("ROBUSTKD_CACHE", str(base / "cache"))  # the child inherits it
    kwargs = {"teacher": str(base / "teacher" / "best"), "student": str(base / "student" / "best")}
    kwargs.update(eps=[0.05, 0.1], steps=3, restarts=1, batch_size=4, separate_confidence=True, device="cpu")
    kwargs.update(data_root=str(base / "data"), progress=False)
    common = {k: v for k, v in kwargs.items() if k not in ("teacher", "student")}
    reference = evaluate_faithfulness_checkpoints(
        kwargs["teacher"], kwargs["student"], out=tmp_path / "reference.json", **common
    )
    total = spy["n"]
    assert reference["clean"]["teacher_correct"] == 20 and total > 60
    if fault["at"] == "middle-of-second-radius":
        first = sum(entry[0] == 0.05 for entry in spy["log"])
        fault = {**fault, "at": first + (total - first) // 2 + 1}

    out = tmp_path / "faithful.json"
    spec = json.dumps({"kwargs": {**kwargs, "out": str(out)}, "fault": fault, "threads": torch.get_num_threads()})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, spec], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert not out.exists()
    saved = json.loads(progress_path(out).read_text())["state"]  # whole, even when killed before its rename
    assert saved["current"]["chunk"] > 0  # it stopped inside a radius, with some of its batches saved

    spy["n"] = 0
    result = evaluate_faithfulness_checkpoints(kwargs["teacher"], kwargs["student"], out=out, **common)
    assert _strip(result) == _strip(reference)
    assert spy["n"] < total - 8  # the saved batches were not searched again
    assert json.loads(out.read_text())["per_example"] == reference["per_example"]
    assert not progress_path(out).exists() and temporary_files(tmp_path) == []
