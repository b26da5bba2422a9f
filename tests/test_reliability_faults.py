"""Fault matrix: SIGKILL at chosen and at random moments, a full disk, an unwritable folder, a second
process on the same run. Every kill is real: a child process runs robustkd on a tiny image-folder
dataset and SIGKILLs itself at the chosen point (or is killed by this process); what it left behind
must load, and the resumed work must end exactly where an uninterrupted run ends. See docs/RELIABILITY.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

import robustkd
from robustkd.checkpoint import load_model, read_meta
from robustkd.errors import RobustKDError
from robustkd.io import WriteError, atomic_write_bytes, preflight_write, temporary_files
from robustkd.jobs import certify_checkpoints, evaluate_checkpoint, progress_path

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("a", "b", "c", "d")

# The child: install the fault named in the spec, then run robustkd as a user would.
CHILD = r"""
import json, os, signal, sys
from pathlib import Path

spec = json.loads(sys.argv[1])
import torch

torch.set_num_threads(spec["threads"])
fault = spec.get("fault") or {}
kind = fault.get("kind")
calls = {"n": 0}


def nth_call() -> bool:
    calls["n"] += 1
    return calls["n"] == fault["at"]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if kind == "step":  # inside a training epoch, before optimisation step `at`
    import robustkd.engine.loop as loop

    real_lr = loop.learning_rate

    def lr(optim, step, *args):
        if step == fault["at"]:
            die()
        return real_lr(optim, step, *args)

    loop.learning_rate = lr
elif kind == "validation":  # inside the `at`-th validation pass
    import robustkd.engine.loop as loop

    real_accuracy = loop.accuracy

    def accuracy(model, images, labels, batch_size):
        if nth_call():
            die()
        return real_accuracy(model, images, labels, batch_size)

    loop.accuracy = accuracy
elif kind == "rename":  # between writing a file in full and renaming it into place
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == fault["target"] and nth_call():
            die()
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
elif kind == "attack_batch":  # inside the evaluation, before its `at`-th attack batch
    from robustkd.attacks.recipes import AttackRecipe

    real_run = AttackRecipe.run

    def run(self, *args, **kwargs):
        if nth_call():
            die()
        return real_run(self, *args, **kwargs)

    AttackRecipe.run = run
elif kind == "certify_batch":  # inside the certification, before its `at`-th batch
    import robustkd.jobs.certification as checkpoints

    real_certify = checkpoints.certify

    def certify(*args, **kwargs):
        if nth_call():
            die()
        return real_certify(*args, **kwargs)

    checkpoints.certify = certify
elif kind == "disk_full_after_epoch":  # every file write past `bytes` fails once epoch `at` is committed
    import resource

    import robustkd.engine.loop as loop

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
    real_save_state = loop.save_state

    def save_state(*args, **kwargs):
        real_save_state(*args, **kwargs)
        if nth_call():
            resource.setrlimit(resource.RLIMIT_FSIZE, (fault["bytes"], resource.RLIM_INFINITY))

    loop.save_state = save_state
elif kind == "disk_full":  # from the start
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (fault["bytes"], resource.RLIM_INFINITY))
elif kind == "slow_steps":  # announce the first step, then go slowly: a long-running run to collide with
    import time

    import robustkd.engine.loop as loop

    real_lr = loop.learning_rate

    def lr(optim, step, *args):
        Path(fault["marker"]).touch()
        time.sleep(fault["sleep"])
        return real_lr(optim, step, *args)

    loop.learning_rate = lr

from robustkd.cli import main

sys.exit(main(spec["argv"]))
"""


# --- fixtures -----------------------------------------------------------------------------------------


def make_image_folder(root: Path, n_train: int = 24, n_test: int = 8, size: int = 16, seed: int = 0) -> Path:
    """Four learnable classes of grey PNGs: class c lights up its own band of rows."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = rng.integers(0, 90, (size, size), dtype=np.uint8)
                image[4 * c : 4 * c + 4] += 140
                Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


def train_config(out_dir: Path, data: Path, **over) -> dict:
    cfg = {
        "name": "run",
        "out_dir": str(out_dir),
        "epochs": 3,
        "progress": False,
        "tensorboard": False,
        "data": {"dataset": "imagefolder", "root": str(data), "batch_size": 16, "val_fraction": 0.25},
        "model": {"arch": "dm_small"},
        "optim": {"lr": 0.05},
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, the cache they share, and the uninterrupted reference run every resumed one must equal."""
    base = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ROBUSTKD_CACHE", str(base / "cache"))  # children inherit it
        data = make_image_folder(base / "data")
        reference = robustkd.train(train_config(base / "reference", data))
        yield {"base": base, "data": data, "reference": reference}


def run_child(argv: list[str], fault: dict | None = None, wait: bool = True, timeout: float = 300):
    spec = json.dumps({"argv": argv, "fault": fault, "threads": torch.get_num_threads()})
    env = {**os.environ, "PYTHONPATH": str(REPO), "ROBUSTKD_TEST_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, spec],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if not wait:
        return proc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the child did not finish in {timeout} s\n{out[-4000:]}\n{err[-4000:]}")
    return proc.returncode, out, err


def train_argv(tmp_path: Path, cfg: dict) -> list[str]:
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["train", "--config", str(path)]


@contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def assert_killed(result) -> None:
    code, out, err = result
    assert code == -signal.SIGKILL, f"the child was meant to be killed, exit {code}\n{out}\n{err}"


def assert_intact(run: Path) -> None:
    """Every file a killed run left either loads or is absent; best/last are whole checkpoints."""
    epochs = {}
    for name in ("best", "last"):
        if (run / f"{name}.safetensors").exists():
            with quiet():  # a sidecar older than its weights warns, and the weights' own metadata is used
                epochs[name] = read_meta(run / name)["epoch"]
                load_model(run / name)
        else:
            assert not (run / f"{name}.json").exists(), f"{name}.json without its weights"
    if (run / "resume.safetensors").exists():
        with safe_open(str(run / "resume.safetensors"), framework="pt") as handle:
            info = json.loads(handle.metadata()["state"])["info"]
            names = handle.keys()
            assert any(k.startswith("model.") for k in names)
        assert epochs.get("last") in (info["epoch"] + 1, info["epoch"] + 2)  # last is saved before the state
    if "best" in epochs and "last" in epochs:
        assert epochs["best"] <= epochs["last"] + 1  # best is saved before last
    for path in run.iterdir():
        if path.name.endswith(".json"):
            json.loads(path.read_text())
        elif path.name == "metrics.jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.name == "config.yaml":
            assert isinstance(yaml.safe_load(path.read_text()), dict)
        elif path.name.startswith("."):
            # Only the lock and unfinished temporary files: neither is ever read as data.
            assert path.name == ".lock" or path in temporary_files(run), path


def assert_same_run(a: Path, b: Path) -> None:
    """Bit for bit: best, last and the resume state's weights; the same per-epoch metrics."""
    for name in ("best", "last"):
        sa, sb = load_model(a / name).state_dict(), load_model(b / name).state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}: {key} differs"
        assert read_meta(a / name)["epoch"] == read_meta(b / name)["epoch"]
    with safe_open(str(a / "resume.safetensors"), "pt") as fa, safe_open(str(b / "resume.safetensors"), "pt") as fb:
        names = sorted(fa.keys())
        assert names == sorted(fb.keys())
        for key in names:
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key

    def rows(run):
        return [
            {k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]

    assert rows(a) == rows(b)
    assert temporary_files(b) == [] and not (b / ".lock").exists()


def resume_and_compare(world, out_dir: Path) -> None:
    assert_intact(out_dir / "run")
    with quiet():
        robustkd.train(train_config(out_dir, world["data"], resume=True))
    assert_same_run(world["reference"].run_dir, out_dir / "run")


# --- training: SIGKILL at chosen moments -----------------------------------------------------------


def _best_epochs(world) -> list[int]:
    best, out = -1.0, []
    for row in world["reference"].history:
        if row["val/acc"] > best:
            best = row["val/acc"]
            out.append(row["epoch"])
    return out


FAST_FAULTS = [
    pytest.param({"kind": "rename", "target": "resume.safetensors", "at": 2}, id="rename-resume-state"),
]
SLOW_FAULTS = [
    pytest.param({"kind": "step", "at": 8}, id="inside-epoch-2"),
    pytest.param({"kind": "step", "at": 0}, id="first-step"),
    pytest.param({"kind": "validation", "at": 2}, id="inside-validation-2"),
    pytest.param({"kind": "rename", "target": "last.safetensors", "at": 2}, id="rename-last-weights"),
    pytest.param({"kind": "rename", "target": "last.json", "at": 2}, id="rename-last-sidecar"),
    pytest.param({"kind": "rename", "target": "best.safetensors", "at": "last-improvement"}, id="rename-best-weights"),
    pytest.param({"kind": "rename", "target": "best.json", "at": "last-improvement"}, id="rename-best-sidecar"),
    pytest.param({"kind": "rename", "target": "metrics.jsonl", "at": 2}, id="rename-metrics"),
    pytest.param({"kind": "rename", "target": "resume.safetensors", "at": 3}, id="rename-final-state"),
    pytest.param({"kind": "rename", "target": "config.yaml", "at": 1}, id="rename-config"),
    pytest.param({"kind": "rename", "target": "results.json", "at": 1}, id="rename-results"),
]


def _kill_and_resume(world, tmp_path, fault):
    fault = dict(fault)
    if fault["at"] == "last-improvement":
        fault["at"] = len(_best_epochs(world))
    out_dir = tmp_path / "out"
    assert_killed(run_child(train_argv(tmp_path, train_config(out_dir, world["data"])), fault))
    if fault["kind"] == "rename":  # the kill came after the temporary file was written in full
        assert [p.name.split(".")[1] for p in temporary_files(out_dir / "run")] == [fault["target"].split(".")[0]]
    resume_and_compare(world, out_dir)


@pytest.mark.parametrize("fault", FAST_FAULTS)
def test_training_killed_resumes_bit_exact(world, tmp_path, fault):
    _kill_and_resume(world, tmp_path, fault)


@pytest.mark.slow
@pytest.mark.parametrize("fault", SLOW_FAULTS)
def test_training_killed_anywhere_resumes_bit_exact(world, tmp_path, fault):
    _kill_and_resume(world, tmp_path, fault)


@pytest.mark.slow
def test_training_killed_at_random_moments_resumes_bit_exact(world, tmp_path):
    """Three kills at random times once training has begun, each run continued with --resume true."""
    rng = random.Random(1)
    out_dir = tmp_path / "out"
    marker = tmp_path / "started"
    killed = 0
    for round_ in range(3):
        cfg = train_config(out_dir, world["data"], resume=round_ > 0)
        fault = {"kind": "slow_steps", "marker": str(marker), "sleep": 0.05}
        marker.unlink(missing_ok=True)
        proc = run_child(train_argv(tmp_path, cfg), fault, wait=False)
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), f"exit {proc.returncode}\n{out}\n{err}"
        killed += proc.returncode == -signal.SIGKILL
        if (out_dir / "run").exists():
            assert_intact(out_dir / "run")
    assert killed >= 1  # at least one kill landed while the run was still going
    resume_and_compare(world, out_dir)


# --- evaluation and certification: SIGKILL, then the same command again -------------------------------


def _eval_args(world, out: Path) -> dict:
    model = world["reference"].run_dir / "best"
    return {
        "model_path": model,
        "protocol": "linf-0.1",
        "attacks": ["clean", "pgd5", "cw5"],
        "batch_size": 4,
        "data_root": str(world["data"]),
        "out": out,
        "progress": False,
    }


def _eval_argv(world, out: Path) -> list[str]:
    a = _eval_args(world, out)
    return ["evaluate", "--model", str(a["model_path"]), "--protocol", a["protocol"],
            "--attacks", ",".join(a["attacks"]), "--batch-size", "4", "--data-root", a["data_root"],
            "--out", str(out), "--no-progress"]  # fmt: skip


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("timing", "output")}


def _count_attack_batches(monkeypatch) -> dict:
    from robustkd.attacks.recipes import AttackRecipe

    calls = {"n": 0}
    real = AttackRecipe.run

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AttackRecipe, "run", counting)
    return calls


@pytest.fixture(scope="module")
def reference_eval(world):
    out = world["base"] / "reference-eval.json"
    return evaluate_checkpoint(**_eval_args(world, out))


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"kind": "attack_batch", "at": 11}, id="inside-pgd"),
        pytest.param({"kind": "rename", "target": "eval.progress.json", "at": 9}, id="rename-progress"),
    ],
)
def test_evaluation_killed_resumes_from_saved_examples(world, reference_eval, tmp_path, monkeypatch, fault):
    out = tmp_path / "eval.json"
    assert_killed(run_child(_eval_argv(world, out), fault))
    assert not out.exists() and progress_path(out).is_file()
    done = json.loads(progress_path(out).read_text())["state"]
    assert "clean" in done["done"]  # it really stopped part-way, with results saved
    calls = _count_attack_batches(monkeypatch)
    result = evaluate_checkpoint(**_eval_args(world, out))
    assert _strip(result) == _strip(reference_eval)
    total = sum(-(-r["total"] // 4) for r in reference_eval["attacks"].values())
    assert calls["n"] < total - 3  # the saved batches were not run again
    assert not progress_path(out).exists() and temporary_files(tmp_path) == []


CERT_ARGS = {"eps": 0.05, "method": "crown-ibp", "batch_size": 4, "joint": True, "progress": False}


@pytest.mark.slow
def test_certification_killed_resumes_from_saved_examples(world, tmp_path, monkeypatch):
    run = world["reference"].run_dir
    args = {**CERT_ARGS, "data_root": str(world["data"])}
    reference = certify_checkpoints(run / "best", run / "last", out=tmp_path / "reference.json", **args)
    out = tmp_path / "cert.json"
    argv = ["certify", "--student", str(run / "best"), "--teacher", str(run / "last"), "--eps", "0.05",
            "--method", "crown-ibp", "--joint", "--batch-size", "4", "--data-root", str(world["data"]),
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert_killed(run_child(argv, {"kind": "certify_batch", "at": 5}))
    saved = json.loads(progress_path(out).read_text())["state"]["per_example"]
    assert len(saved["gap_upper"]) == 16  # four batches of four were kept

    import robustkd.jobs.certification as checkpoints

    calls = {"n": 0}
    real = checkpoints.certify

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(checkpoints, "certify", counting)
    result = certify_checkpoints(run / "best", run / "last", out=out, **args)
    assert calls["n"] == 8 - 4
    assert _strip(result) == _strip(reference)
    assert not progress_path(out).exists()


def _spy_attack_batches(monkeypatch) -> dict:
    """Log (attack, generator state, batch size) per attack batch; raise KeyboardInterrupt at call ``at``."""
    from robustkd.attacks.recipes import AttackRecipe

    spy = {"log": [], "n": 0, "at": None}
    real = AttackRecipe.run

    def run(self, model, x, y, protocol, *, generator=None, **kwargs):
        spy["n"] += 1
        if spy["n"] == spy["at"]:
            raise KeyboardInterrupt  # stands in for a kill: nothing after it runs
        state = hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()
        spy["log"].append((self.name, state, x.shape[0]))
        return real(self, model, x, y, protocol, generator=generator, **kwargs)

    monkeypatch.setattr(AttackRecipe, "run", run)
    return spy


def test_resumed_evaluation_runs_each_remaining_batch_once_with_the_same_random_stream(world, tmp_path, monkeypatch):
    spy = _spy_attack_batches(monkeypatch)
    evaluate_checkpoint(**_eval_args(world, tmp_path / "a.json"))
    uninterrupted = spy["log"][:]
    spy.update(log=[], n=0, at=11)
    args = _eval_args(world, tmp_path / "b.json")
    with pytest.raises(KeyboardInterrupt):
        evaluate_checkpoint(**args)
    before = spy["log"][:]
    spy.update(log=[], n=0, at=None)
    evaluate_checkpoint(**args)
    assert len(before) == 10 and before + spy["log"] == uninterrupted


def test_progress_saved_for_other_settings_or_damaged_is_not_used(world, reference_eval, tmp_path, monkeypatch):
    spy = _spy_attack_batches(monkeypatch)
    out = tmp_path / "e.json"
    spy["at"] = 11
    with pytest.raises(KeyboardInterrupt):
        evaluate_checkpoint(**_eval_args(world, out), seed=1)
    spy["at"] = None
    with pytest.warns(UserWarning, match="saved for other settings, weights or data"):
        result = evaluate_checkpoint(**_eval_args(world, out))
    assert _strip(result) == _strip(reference_eval)

    progress_path(out).write_text('{"format": "robustkd-progress-v1", "key": ')  # torn by hand, not by us
    with pytest.warns(UserWarning, match="unreadable progress file"):
        assert _strip(evaluate_checkpoint(**_eval_args(world, out))) == _strip(reference_eval)

    spy.update(n=0, at=11)
    with pytest.raises(KeyboardInterrupt):
        evaluate_checkpoint(**_eval_args(world, out))
    saved = json.loads(progress_path(out).read_text())
    saved["state"]["done"]["clean"] = "01"  # the right key, but not one flag per point
    progress_path(out).write_text(json.dumps(saved))
    spy.update(n=0, at=None)
    with pytest.warns(UserWarning, match="contents are damaged"):
        assert _strip(evaluate_checkpoint(**_eval_args(world, out))) == _strip(reference_eval)

    spy.update(n=0, at=11)
    with pytest.raises(KeyboardInterrupt):
        evaluate_checkpoint(**_eval_args(world, out))
    spy.update(n=0, at=None)
    evaluate_checkpoint(**_eval_args(world, out), resume=False)
    assert spy["n"] == sum(-(-r["total"] // 4) for r in reference_eval["attacks"].values())  # all of it again


@pytest.mark.parametrize("pair", [True, False])
def test_batched_certification_equals_one_certify_call(world, tmp_path, pair):
    from robustkd.certify import certify
    from robustkd.jobs import load_test_points

    run = world["reference"].run_dir
    student, teacher = load_model(run / "best"), load_model(run / "last") if pair else None
    x, y, _, _ = load_test_points(read_meta(run / "best"), None, str(world["data"]))
    direct = certify(teacher, student, x, y, 0.05, "crown-ibp", 4, joint=pair, progress=False)
    args = {**CERT_ARGS, "joint": pair, "data_root": str(world["data"]), "out": tmp_path / "c.json"}
    result = certify_checkpoints(run / "best", run / "last" if pair else None, **args)
    assert {k: result[k] for k in direct} == direct


# --- disk full, unwritable folders ------------------------------------------------------------------


@pytest.mark.slow
def test_disk_full_mid_run_keeps_the_previous_checkpoint(world, tmp_path):
    out_dir = tmp_path / "out"
    fault = {"kind": "disk_full_after_epoch", "at": 1, "bytes": 4096}
    code, out, err = run_child(train_argv(tmp_path, train_config(out_dir, world["data"])), fault)
    assert code == 2, f"{out}\n{err}"
    assert "Traceback" not in err
    assert "robustkd train: error: cannot write" in err and "full" in err
    run = out_dir / "run"
    assert read_meta(run / "last")["epoch"] == 1 and temporary_files(run) == []
    assert not (run / ".lock").exists()
    resume_and_compare(world, out_dir)


@pytest.mark.slow
def test_disk_full_before_training_is_a_clear_error(world, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run_child(
        train_argv(tmp_path, train_config(out_dir, world["data"])), {"kind": "disk_full", "bytes": 64}
    )
    assert code == 2, f"{out}\n{err}"
    assert "Traceback" not in err and "cannot write" in err and str(out_dir / "run") in err
    assert not (out_dir / "run" / "resume.safetensors").exists() and temporary_files(out_dir / "run") == []


def test_failed_write_leaves_the_old_file_and_no_litter(tmp_path, monkeypatch):
    target = tmp_path / "last.safetensors"
    atomic_write_bytes(target, b"old")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match=r"cannot write .*last.safetensors: No space left on device; the disk"):
        atomic_write_bytes(target, b"new" * 1000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_bytes() == b"old" and temporary_files(tmp_path) == []
    assert isinstance(WriteError("x"), OSError)  # callers that catch OSError still do


def test_orphaned_temporary_files_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".best.safetensors.{dead.stdout.strip()}.abcd.tmp"
    alive = tmp_path / f".best.safetensors.{os.getppid()}.efgh.tmp"  # a live writer's file is left alone
    other = tmp_path / f".last.safetensors.{dead.stdout.strip()}.ijkl.tmp"
    for path in (orphan, alive, other):
        path.write_bytes(b"half a file")
    atomic_write_bytes(tmp_path / "best.safetensors", b"whole")
    assert not orphan.exists() and alive.exists() and other.exists()


def test_preflight_refuses_a_full_or_unwritable_folder(tmp_path, monkeypatch):
    preflight_write(tmp_path / "ok", need_bytes=1)
    assert list((tmp_path / "ok").iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(WriteError, match="cannot create the folder"):
        preflight_write(blocker / "run")
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 9, 1 << 20))
    with pytest.raises(WriteError, match=r"not enough space .* 1.0 MiB free, about 100.0 MiB needed"):
        preflight_write(tmp_path / "ok", need_bytes=100 << 20)


def test_checkpoint_size_estimate_matches_the_file(tmp_path):
    from robustkd.checkpoint import checkpoint_bytes, save_checkpoint
    from robustkd.models import create_model

    model = create_model("dm_small", num_classes=4, in_channels=1, input_size=16)
    meta = {"arch": "dm_small", "num_classes": 4, "input_shape": [1, 16, 16], "mean": [0.5], "std": [0.5]}
    weights = save_checkpoint(tmp_path / "best", model, meta)
    assert 0 < weights.stat().st_size - checkpoint_bytes(model) < 16 << 10


def test_too_little_disk_space_is_found_before_training(world, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 1 << 40, 64 << 10))
    with pytest.raises(WriteError, match="not enough space"):
        robustkd.train(train_config(tmp_path, world["data"]))
    assert not (tmp_path / "run" / "resume.safetensors").exists()


def test_run_directory_that_cannot_be_created(world, tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")
    with pytest.raises(RobustKDError, match="cannot create the (run directory|folder)"):
        robustkd.train(train_config(blocker, world["data"]))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_directory(world, tmp_path):
    (tmp_path / "ro" / "run").mkdir(parents=True)
    (tmp_path / "ro" / "run").chmod(0o500)
    try:
        with pytest.raises(RobustKDError, match="cannot write|not writable"):
            robustkd.train(train_config(tmp_path / "ro", world["data"]))
    finally:
        (tmp_path / "ro" / "run").chmod(0o700)


# --- two processes on one run ------------------------------------------------------------------------


@pytest.mark.slow
def test_second_process_on_a_live_run_is_refused_and_a_killed_ones_lock_is_not(world, tmp_path):
    out_dir = tmp_path / "out"
    marker = tmp_path / "started"
    fault = {"kind": "slow_steps", "marker": str(marker), "sleep": 0.5}
    first = run_child(train_argv(tmp_path, train_config(out_dir, world["data"])), fault, wait=False)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), first.communicate()
        before = {p.name: p.stat().st_mtime_ns for p in (out_dir / "run").iterdir()}
        with pytest.raises(RobustKDError, match=f"in use by process {first.pid}"):
            robustkd.train(train_config(out_dir, world["data"], resume=True))
        after = {p.name: p.stat().st_mtime_ns for p in (out_dir / "run").iterdir()}
        assert before == after  # the refused process wrote nothing
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert (out_dir / "run" / ".lock").exists()  # SIGKILL leaves the lock behind ...
    resume_and_compare(world, out_dir)  # ... and a later run sees its owner is gone


def test_reliability_doc_cites_only_tests_that_exist():
    import re

    doc = (REPO / "docs" / "RELIABILITY.md").read_text()
    cited = re.findall(r"`(test_\w+\.py)::(\w+)((?:\[[\w-]+\])?)`", doc)
    assert len(cited) > 60
    sources = {file: (REPO / "tests" / file).read_text() for file, _, _ in cited}
    for file, name, case in cited:
        assert re.search(rf"^def {name}\(", sources[file], re.M), f"{file}::{name} is cited but does not exist"
        assert not case or f'id="{case[1:-1]}"' in sources[file], f"{file}::{name}{case}: no such case"
    for case in re.findall(r"`\[([\w-]+)\]`", doc):  # a bare `[case]` continues the test named before it
        assert any(f'id="{case}"' in source for source in sources.values()), case
