"""Distributed training: torchrun with 2 gloo processes ends where one process does at the same global batch.

The DDP runs go through torchrun, as users start them: the Python API with this file as the worker script
(``python tests/test_ddp.py JOB.json`` on every rank, on a synthetic dataset) and, once, the CLI itself
(``torchrun -m robustkd distill``) on tiny IDX files. The model (dm_small) has no BatchNorm, so per-rank
batch statistics cannot make the runs differ; no augmentation and no random attack start, so the only
difference left is the order of float32 sums (two half-batch means averaged against one global mean).
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

import robustkd
from robustkd.checkpoint import load_model
from robustkd.config import from_dict
from robustkd.data.base import Dataset, DatasetInfo, Split
from robustkd.errors import ConfigError
from robustkd.methods.standard import Standard

WORLD = 2
# After 18 SGD steps the weights differ by under 1e-7 (float32 rounding); a single process at the per-rank batch
# ends about 1e-1 away (test_the_tolerance_tells_a_wrong_batch_apart), so the tolerance separates the two.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def _toy_dataset() -> Dataset:
    """240 learnable 1x16x16 images; with val_fraction 0.25 the 180 training images split evenly over 2 ranks."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        y = torch.arange(n) % 4
        x = torch.rand(n, 1, 16, 16, generator=g) * 80
        for c in range(4):
            x[y == c, :, 4 * c : 4 * c + 4, :] += 150
        return Split(x.clamp(0, 255).to(torch.uint8), y.long())

    info = DatasetInfo("toy", 4, (1, 16, 16), (0.3,), (0.3,), ("a", "b", "c", "d"), "none")
    return Dataset(info, split(240), split(60), "synthetic")


def _config(out_dir: Path, name: str, **over) -> dict:
    cfg = {
        "name": name,
        "out_dir": str(out_dir),
        "epochs": 3,
        "progress": False,
        "tensorboard": False,
        "data": {"dataset": "toy", "batch_size": 32, "val_fraction": 0.25, "augment": "none"},
        "model": {"arch": "dm_small"},
        "optim": {"lr": 0.05},
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key in cfg else value
    return cfg


def _worker(job_file: Path) -> None:
    """One rank: join the group torchrun describes, then run every job in order (kills included)."""
    import robustkd.data
    import robustkd.engine.loop as loop

    torch.set_num_threads(1)
    robustkd.data.load_dataset = lambda name, root=None, **kw: _toy_dataset()
    robustkd.methods.METHODS._entries["nan_on_last_rank"] = _NanOnLastRank
    # A rank left waiting in a collective (a bug) fails the test in a minute, not after the library's hour.
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
    real_lr = loop.learning_rate
    try:
        for job in json.loads(job_file.read_text()):
            kill_at = job.get("kill_at_step")

            def lr(optim, step, *args, kill_at=kill_at):
                if step == kill_at:
                    raise KeyboardInterrupt  # stands in for a kill, on every rank at the same step
                return real_lr(optim, step, *args)

            loop.learning_rate = lr
            try:
                robustkd.train(from_dict(job["config"]))
            except KeyboardInterrupt:
                if kill_at is None:
                    raise
        # Both ranks reach the teardown together, so neither closes its gloo pairs under a peer's last send.
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    # Every result is on disk by now. Skipping interpreter teardown avoids a rare abort there ("terminate called
    # without an active exception", seen once under load) that would fail the launch after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@dataclass
class _NanOnLastRank(Standard):
    """Standard training whose loss at step 3 is NaN on the last rank (a single process is its own last rank)."""

    def __call__(self, student, teacher, batch, info):
        out = super().__call__(student, teacher, batch, info)
        pg = torch.distributed
        if info.step == 3 and (not pg.is_initialized() or pg.get_rank() == pg.get_world_size() - 1):
            out.loss = out.loss * float("nan")
        return out


def _torchrun(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).with_name("torchrun")
    cmd = [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", f"--nproc_per_node={WORLD}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # A session of its own, so a timeout kills the ranks too: they hold the output pipes, and killing only
    # torchrun would leave communicate() waiting on them.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in 300 s\n{out[-4000:]}\n{err[-4000:]}")
    assert proc.returncode == 0, f"{out[-4000:]}\n{err[-4000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _save_teacher(path: Path, num_classes: int, size: int) -> Path:
    from robustkd.checkpoint import save_checkpoint
    from robustkd.models import create_model

    torch.manual_seed(1)
    model = create_model("dm_small", num_classes=num_classes, in_channels=1, input_size=size)
    meta = {
        "arch": "dm_small",
        "arch_args": {},
        "num_classes": num_classes,
        "input_shape": [1, size, size],
        "mean": [0.0],
        "std": [1.0],
    }
    save_checkpoint(path / "best", model, meta)
    return path / "best"


def _runs(teacher: Path) -> dict[str, dict]:
    """Name -> config overrides, each run once by DDP and once by a single process."""
    return {
        "standard": {"tensorboard": True},
        "kdiga": {
            # The per-example form is a mean over examples, so it splits over ranks (the default l2_batch, one
            # norm over the whole batch, does not). γ = 1 moves the weights about 1e-2 away from γ = 0, so the
            # double-backward gradients are checked, not only the KD ones.
            "method": {"name": "kdiga", "args": {"gamma": 1.0, "grad_norm": "l2_squared_per_example"}},
            "teacher": str(teacher),
        },
        "pgd_at": {
            "epochs": 1,
            # Attack in train mode, no random start: deterministic, and the attack's forwards bypass DDP.
            "method": {
                "name": "pgd_at",
                "args": {
                    "threat": {"eps": 0.1, "step_size": 0.05, "steps": 2, "random_start": "none"},
                    "attack_mode": "train",
                },
            },
            "validate": {"attack": "pgd10", "protocol": "linf-0.1", "max_examples": 20},
        },
        # The bound pass reads the student's layers through the DDP wrapper.
        "ibp": {
            "epochs": 1,
            "method": {"name": "ibp", "args": {"threat": {"eps": 0.1}, "warmup_epochs": 0, "ramp_epochs": 1}},
        },
        # One rank's NaN must make every rank skip the step, as one process skips it.
        "nan_skip": {"epochs": 1, "method": {"name": "nan_on_last_rank"}, "nonfinite": "skip"},
    }


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """All DDP runs from one torchrun launch per pytest run: process start-up dominates the time, so
    pytest-xdist workers share the launch through a lock in the run's temporary folder."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "ddp_runs"
    root.mkdir(exist_ok=True)
    teacher = root / "teacher" / "best"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            _save_teacher(root / "teacher", 4, 16)
            jobs = [{"config": _config(root / "ddp", name, **over)} for name, over in _runs(teacher).items()]
            # Killed inside epoch 2 (6 steps an epoch), then resumed: must end exactly where "standard" did.
            resume = _config(root / "ddp", "resumed", tensorboard=True)
            jobs += [{"config": resume, "kill_at_step": 8}, {"config": {**resume, "resume": True}}]
            (root / "jobs.json").write_text(json.dumps(jobs))
            _torchrun([__file__, str(root / "jobs.json")])
            (root / "done").touch()
    return root, teacher


@pytest.fixture
def toy(monkeypatch):
    import robustkd.data

    monkeypatch.setattr(robustkd.data, "load_dataset", lambda name, root=None, **kw: _toy_dataset())


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model(run_dir / "last").state_dict()


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


@pytest.mark.parametrize("name", ["standard", "kdiga", "pgd_at", "ibp", "nan_skip"])
def test_ddp_ends_with_single_process_weights(ddp, tmp_path, toy, monkeypatch, name):
    root, teacher = ddp
    monkeypatch.setitem(robustkd.methods.METHODS._entries, "nan_on_last_rank", _NanOnLastRank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        single = robustkd.train(from_dict(_config(tmp_path, name, **_runs(teacher)[name])))
    assert any("non-finite loss" in str(w.message) for w in caught) == (name == "nan_skip")
    run = root / "ddp" / name
    a, b = _weights(single.run_dir), _weights(run)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], **TOLERANCE, msg=key)
    # Reduced training metrics are the single-process means; validation and test run on rank 0's weights.
    for ours, theirs in zip(_rows(run), _rows(single.run_dir), strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours:
            if key.startswith("train/"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
            else:
                assert ours[key] == theirs[key], key
    assert json.loads((run / "results.json").read_text())["test"] == single.test


def test_the_tolerance_tells_a_wrong_batch_apart(ddp, tmp_path, toy):
    # A single process at the per-rank batch (16) is what DDP would compute if ranks did not average.
    root, _ = ddp
    half = robustkd.train(from_dict(_config(tmp_path, "half", tensorboard=True, data={"batch_size": 16})))
    a, b = _weights(half.run_dir), _weights(root / "ddp" / "standard")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst > 100 * TOLERANCE["atol"], worst


def test_resume_across_ranks_is_bit_exact(ddp):
    root, _ = ddp
    full, resumed = root / "ddp" / "standard", root / "ddp" / "resumed"
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(full) == _rows(resumed)
    assert [r["epoch"] for r in _rows(resumed)] == [1, 2, 3]


def test_only_rank_0_writes_the_run_folder(ddp):
    root, _ = ddp
    for name in ("standard", "resumed"):
        run = root / "ddp" / name
        files = {p.name for p in run.iterdir()}
        assert files == {
            "best.safetensors",
            "best.json",
            "last.safetensors",
            "last.json",
            "resume.safetensors",
            "config.yaml",
            "metrics.jsonl",
            "results.json",
            "tb",
        }, files
        # One writer: a second rank would leave a second event file (or a second copy after the resume).
        assert len(list((run / "tb").iterdir())) == (1 if name == "standard" else 2)


def _tiny_mnist(folder: Path, n_train: int = 80, n_test: int = 20) -> None:
    """Learnable 28x28 IDX files under the MNIST names: each class brightens its own band of rows."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label : 2 * label + 4] += 180
        header = np.array([2051, n, 28, 28], dtype=">i4").tobytes()
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
        header = np.array([2049, n], dtype=">i4").tobytes()
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))


@pytest.mark.slow
def test_torchrun_cli_distill_matches_single_process(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _tiny_mnist(data)
    teacher = _save_teacher(tmp_path / "teacher", 10, 28)
    monkeypatch.setenv("ROBUSTKD_CACHE", str(tmp_path / "cache"))
    args = {
        "data.dataset": "mnist",
        "data.root": str(data),
        "data.val_fraction": "0.25",  # 60 training images: 4 steps of 16, the last one 12 (6 a rank)
        "data.batch_size": "16",
        "model.arch": "dm_small",
        "method.name": "kd",
        "teacher": str(teacher),
        "epochs": "2",
        "optim.lr": "0.05",
        "out_dir": str(tmp_path / "runs"),
        "progress": "false",
        "tensorboard": "false",
    }
    flags = [part for key, value in args.items() for part in (f"--{key}", value)]
    proc = _torchrun(["-m", "robustkd", "distill", *flags, "--name", "ddp"])
    assert proc.stdout.count("test accuracy of the best checkpoint") == 1, proc.stdout  # rank 0 prints

    single = robustkd.distill(from_dict({**_nested(args), "name": "single"}))
    a, b = _weights(single.run_dir), _weights(tmp_path / "runs" / "ddp")
    for key in a:
        torch.testing.assert_close(b[key], a[key], **TOLERANCE, msg=key)
    for ours, theirs in zip(_rows(tmp_path / "runs" / "ddp"), _rows(single.run_dir), strict=True):
        assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6)


def _nested(flat: dict[str, str]) -> dict:
    import yaml

    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def test_global_batch_must_split_evenly():
    from robustkd.engine.distributed import Dist

    dist = Dist(torch.device("cpu"), rank=1, world_size=4)
    assert dist.rank_batch(128) == 32
    with pytest.raises(ConfigError, match="data.batch_size: 30 is the global batch .* divisible .* 4"):
        dist.rank_batch(30)


def test_single_process_joins_no_group(monkeypatch):
    from robustkd.engine.distributed import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed(torch.device("cpu")) as dist:
        assert (dist.rank, dist.world_size, dist.enabled) == (0, 1, False)
        assert not torch.distributed.is_initialized()
        model = torch.nn.Linear(2, 2)
        assert dist.wrap(model) is model


def test_only_gradient_forwards_go_through_ddp(tmp_path, monkeypatch):
    """Attack steps (frozen parameters) and no_grad forwards bypass DDP: no reducer state, no collective."""
    from torch.nn.parallel import DistributedDataParallel

    from robustkd.attacks import attack_mode
    from robustkd.engine.distributed import StudentDDP

    calls = []
    real = DistributedDataParallel.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DistributedDataParallel, "forward", counting)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        student = StudentDDP(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        x = torch.rand(4, 3, requires_grad=True)
        with attack_mode(student, mode="train"):
            torch.autograd.grad(student(x).sum(), x)
        with torch.no_grad():
            student(x)
        assert calls == []
        student(x).sum().backward()
        assert calls == [1]
        assert all(p.grad is not None for p in student.parameters())
    finally:
        torch.distributed.destroy_process_group()


def test_cli_refuses_other_commands_under_torchrun(monkeypatch, capsys):
    from robustkd.__main__ import run

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run(["evaluate", "--model", "x"]) == 2
    assert "only train and distill run under torchrun" in capsys.readouterr().err


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
