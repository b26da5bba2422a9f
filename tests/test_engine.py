"""The training loop: checkpoints, resume bit for bit, validation split, errors, and a real run."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

import robustkd
from robustkd.attacks import ThreatModel
from robustkd.checkpoint import load_model, read_meta
from robustkd.config import from_dict
from robustkd.data.base import Dataset, DatasetInfo, Split
from robustkd.errors import ConfigError, RobustKDError
from robustkd.io import run_lock


def _toy_dataset(n_train=240, n_test=60, seed=0) -> Dataset:
    """Learnable 1x16x16 images: each class lights up its own pixel block."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        y = torch.arange(n) % 4
        x = torch.rand(n, 1, 16, 16, generator=g) * 80
        for c in range(4):
            x[y == c, :, 4 * c : 4 * c + 4, :] += 150
        return Split(x.clamp(0, 255).to(torch.uint8), y.long())

    info = DatasetInfo("toy", 4, (1, 16, 16), (0.3,), (0.3,), ("a", "b", "c", "d"), "none")
    return Dataset(info, split(n_train), split(n_test), "synthetic")


def train_toy_teacher(out_dir) -> str:
    """A dm_small teacher trained one epoch on the toy data (for module-scoped fixtures): its best checkpoint."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(robustkd.data, "load_dataset", lambda name, root=None, **kw: _toy_dataset())
        return str(robustkd.train(_cfg(out_dir, epochs=1)).best)


def _cfg(tmp_path, **over):
    base = {
        "name": "toy",
        "out_dir": str(tmp_path),
        "epochs": 2,
        "progress": False,
        "tensorboard": False,
        "data": {"dataset": "toy", "batch_size": 32, "val_fraction": 0.25},
        "model": {"arch": "dm_small"},
        "optim": {"lr": 0.05},
    }
    for key, value in over.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return from_dict(base)


def test_run_writes_checkpoints_config_and_metrics(tmp_path, toy):
    result = robustkd.train(_cfg(tmp_path))
    run = tmp_path / "toy"
    for name in (
        "best.safetensors",
        "best.json",
        "last.safetensors",
        "last.json",
        "resume.safetensors",
        "config.yaml",
        "metrics.jsonl",
        "results.json",
    ):
        assert (run / name).is_file(), name
    assert not (run / ".lock").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("val/acc" in r for r in rows)
    meta = read_meta(run / "best")
    assert meta["dataset"] == "toy" and meta["method"] == "standard" and meta["config"]["epochs"] == 2
    assert result.test["n"] == 60 and 0.0 <= result.test["acc"] <= 1.0
    best_epoch = max(rows, key=lambda r: r["val/acc"])["epoch"]
    assert meta["epoch"] == best_epoch  # chosen on validation accuracy


@pytest.mark.parametrize("kill_at_step", [6, 8])  # 6 steps an epoch: just after epoch 1; inside epoch 2
def test_resume_after_kill_is_bit_exact(tmp_path, toy, monkeypatch, kill_at_step):
    import robustkd.engine.loop as loop

    cfg = {"epochs": 3, "data": {"augment": "crop"}}
    full = robustkd.train(_cfg(tmp_path / "a", **cfg))

    real_lr = loop.learning_rate

    def dying_lr(optim, step, *args):
        if step == kill_at_step:
            raise KeyboardInterrupt  # stands in for a kill: nothing after this point runs
        return real_lr(optim, step, *args)

    monkeypatch.setattr(loop, "learning_rate", dying_lr)
    with pytest.raises(KeyboardInterrupt):
        robustkd.train(_cfg(tmp_path / "b", **cfg))
    monkeypatch.setattr(loop, "learning_rate", real_lr)
    assert read_meta(tmp_path / "b" / "toy" / "last")["epoch"] == 1
    resumed = robustkd.train(_cfg(tmp_path / "b", resume=True, **cfg))
    a = load_model(full.run_dir / "last").state_dict()
    b = load_model(resumed.run_dir / "last").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["val/acc"] for r in full.history] == [r["val/acc"] for r in resumed.history]
    assert load_model(full.run_dir / "best").state_dict().keys() == b.keys()


def test_existing_run_needs_resume_flag(tmp_path, toy):
    robustkd.train(_cfg(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match="--resume true"):
        robustkd.train(_cfg(tmp_path, epochs=1))


def test_a_kill_before_the_metrics_row_is_written_is_repaired_on_resume(tmp_path, toy):
    # The state commits an epoch before metrics.jsonl gets its row; a kill between the two, on the last epoch,
    # left a finished run whose metrics file was one row short, with no epoch left to rewrite it.
    robustkd.train(_cfg(tmp_path, epochs=2))
    metrics = tmp_path / "toy" / "metrics.jsonl"
    full = metrics.read_text().splitlines()
    metrics.write_text(full[0] + "\n")
    result = robustkd.train(_cfg(tmp_path, epochs=2, resume=True))
    assert metrics.read_text().splitlines() == full
    assert [r["epoch"] for r in result.history] == [1, 2]


def _damage_state(run):
    state = run / "resume.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # truncated, as a full disk or a copy cut short leaves it


def test_a_damaged_resume_state_continues_from_last(tmp_path, toy):
    robustkd.train(_cfg(tmp_path, epochs=2))
    run = tmp_path / "toy"
    _damage_state(run)
    last = load_model(run / "last").state_dict()
    with pytest.raises(ConfigError, match="pass --resume true"):  # the refusal names the way out ...
        robustkd.train(_cfg(tmp_path, epochs=3))
    with pytest.warns(UserWarning, match=r"not a readable training state.*from last.safetensors \(epoch 2\).*lost"):
        result = robustkd.train(_cfg(tmp_path, epochs=3, resume=True))  # ... and it works
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert read_meta(run / "last")["epoch"] == 3
    assert any(not torch.equal(v, load_model(run / "last").state_dict()[k]) for k, v in last.items())
    assert (run / "best.safetensors").exists()
    assert robustkd.train(_cfg(tmp_path, epochs=3, resume=True)).history == result.history  # a sound state again


def test_a_damaged_resume_state_without_a_usable_last_names_the_way_out(tmp_path, toy):
    robustkd.train(_cfg(tmp_path, epochs=1))
    run = tmp_path / "toy"
    _damage_state(run)
    (run / "last.safetensors").write_bytes(b"")
    with pytest.raises(RobustKDError, match=r"cannot stand in for it .*start over under another --name") as info:
        robustkd.train(_cfg(tmp_path, epochs=2, resume=True))
    assert "\n" not in str(info.value)
    assert (run / "best.safetensors").exists() and (run / "resume.safetensors").exists()  # nothing removed


def test_second_process_on_same_run_is_refused(tmp_path, toy):
    run = tmp_path / "toy"
    run.mkdir(parents=True)
    with run_lock(run), pytest.raises(RobustKDError, match=f"in use by process {os.getpid()} "):
        robustkd.train(_cfg(tmp_path, epochs=1))
    assert sorted(p.name for p in run.iterdir()) == []  # the refused run wrote nothing, and the lock is gone


def test_a_lock_file_nobody_holds_is_taken_over(tmp_path, toy):
    # Left by a killed run, or by a run killed between creating the file and writing its pid (empty).
    run = tmp_path / "toy"
    run.mkdir(parents=True)
    for text in ("1", ""):
        (run / ".lock").write_text(text)
        robustkd.train(_cfg(tmp_path, epochs=1, resume=True))
        assert not (run / ".lock").exists()


def test_nonfinite_loss_before_any_checkpoint(tmp_path, toy):
    # The largest rate config accepts (larger ones are refused before training) still diverges at once.
    with pytest.raises(RobustKDError, match=r"non-finite loss .* method 'standard'.*no checkpoint was written"):
        robustkd.train(_cfg(tmp_path, epochs=1, optim={"lr": 1e6}))


def _nan_in_epoch_2(monkeypatch):
    from dataclasses import dataclass

    from robustkd.methods import METHODS
    from robustkd.methods.standard import Standard

    @dataclass
    class NanLater(Standard):
        def __call__(self, student, teacher, batch, info):
            out = super().__call__(student, teacher, batch, info)
            if info.epoch == 1 and info.step % 2 == 0:
                out.loss = out.loss * float("nan")
            return out

    monkeypatch.setitem(METHODS._entries, "nan_later", NanLater)


def test_nonfinite_loss_keeps_last_good_checkpoint_and_resumes(tmp_path, toy, monkeypatch):
    _nan_in_epoch_2(monkeypatch)
    cfg = _cfg(tmp_path, epochs=2, method={"name": "nan_later"})
    with pytest.raises(RobustKDError, match=r"epoch 2, step 6, method 'nan_later'.*checkpoint \(epoch 1\) is kept"):
        robustkd.train(cfg)
    assert read_meta(tmp_path / "toy" / "last")["epoch"] == 1
    assert not (tmp_path / "toy" / ".lock").exists()
    monkeypatch.setitem(robustkd.methods.METHODS._entries, "nan_later", robustkd.methods.standard.Standard)
    result = robustkd.train(_cfg(tmp_path, epochs=2, method={"name": "nan_later"}, resume=True))
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_nonfinite_skip_option_skips_bad_steps(tmp_path, toy, monkeypatch):
    _nan_in_epoch_2(monkeypatch)
    with pytest.warns(UserWarning, match="non-finite loss at epoch 2"):
        result = robustkd.train(_cfg(tmp_path, epochs=2, method={"name": "nan_later"}, nonfinite="skip"))
    weights = load_model(result.run_dir / "last").state_dict()
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


def test_teacher_method_needs_teacher(tmp_path, toy, monkeypatch):
    from dataclasses import dataclass

    from robustkd.methods import METHODS, Method

    @dataclass
    class NeedsTeacher(Method):
        needs_teacher = True

    monkeypatch.setitem(METHODS._entries, "needs_teacher_test", NeedsTeacher)
    with pytest.raises(ConfigError, match="^teacher:"):
        robustkd.train(_cfg(tmp_path, method={"name": "needs_teacher_test"}))


def test_distill_without_teacher_is_refused_before_any_work(tmp_path, toy):
    # One check, in the engine: the Python API and the config file reach the same refusal.
    with pytest.raises(ConfigError, match="^teacher: method 'kd' distils from a teacher"):
        robustkd.distill(student="dm_small", data={"dataset": "toy"}, out_dir=str(tmp_path), name="kd")
    assert not (tmp_path / "kd").exists()


def _balled(monkeypatch, threat):
    """A registered method (removed after the test) that trains against ``threat``."""
    from dataclasses import dataclass, field

    from robustkd.methods import METHODS
    from robustkd.methods.standard import Standard

    @dataclass
    class Balled(Standard):
        threat: ThreatModel = field(default_factory=lambda: threat)

    monkeypatch.setitem(METHODS._entries, "balled_test", Balled)
    return {"name": "balled_test"}


@pytest.mark.parametrize(
    ("trained", "protocol", "shown"),
    [
        (ThreatModel("linf", 0.05), "linf-0.1", r"linf eps=0.05 but validate.protocol is 'linf-0.1' \(linf eps=0.1\)"),
        (
            ThreatModel("linf", 0.1),
            "linf-8/255",
            r"linf eps=0.1 but validate.protocol is 'linf-8/255' \(linf eps=0.03137",
        ),
        (ThreatModel("l2", 0.1), "linf-0.1", r"l2 eps=0.1 but validate.protocol is 'linf-0.1' \(linf eps=0.1\)"),
    ],
)
def test_training_and_validation_balls_that_differ_warn_at_start(tmp_path, toy, monkeypatch, trained, protocol, shown):
    from robustkd.engine import ThreatMismatchWarning

    cfg = _cfg(tmp_path, epochs=1, method=_balled(monkeypatch, trained), validate={"protocol": protocol})
    with pytest.warns(ThreatMismatchWarning, match=f"'balled_test' trains against {shown}.*Make the two agree") as seen:
        robustkd.train(cfg)
    assert len([w for w in seen if issubclass(w.category, ThreatMismatchWarning)]) == 1
    assert issubclass(ThreatMismatchWarning, UserWarning)


def test_training_and_validation_balls_that_agree_do_not_warn(tmp_path, toy, monkeypatch):
    import warnings

    from robustkd.engine import ThreatMismatchWarning

    # The preset's step size and budget differ from the method's; only the ball (norm, eps) must agree.
    method = _balled(monkeypatch, ThreatModel("linf", 0.1, steps=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ThreatMismatchWarning)
        robustkd.train(_cfg(tmp_path, name="a", epochs=1, method=method, validate={"protocol": "linf-0.1"}))
        robustkd.train(_cfg(tmp_path, name="b", epochs=1, method=method))  # no protocol: nothing to compare
        # Certified training's larger training ball (up to twice the protocol's eps) is a choice, not a slip.
        wider = _balled(monkeypatch, ThreatModel("linf", 0.2))
        robustkd.train(_cfg(tmp_path, name="c", epochs=1, method=wider, validate={"protocol": "linf-0.1"}))


def test_validation_protocol_is_saved_as_written_and_reads_back(tmp_path, toy):
    from robustkd.config import load_config

    mapping = {"norm": "linf", "eps": 0.05, "steps": 3}
    for name, protocol in (("preset", "linf-0.1"), ("fraction", "linf-4/255"), ("mapping", mapping)):
        cfg = _cfg(tmp_path, name=name, epochs=1, validate={"attack": "pgd2", "protocol": protocol, "max_examples": 8})
        assert isinstance(cfg.validate.protocol, ThreatModel)
        robustkd.train(cfg)
        saved = load_config(tmp_path / name / "config.yaml")
        assert saved == cfg and saved.validate.protocol == ThreatModel.parse(protocol)
        sidecar = read_meta(tmp_path / name / "best")["config"]
        written = protocol if isinstance(protocol, str) else dataclasses.asdict(saved.validate.protocol)
        assert sidecar["validate"]["protocol"] == written
        assert load_config(sidecar) == cfg
    rows = [json.loads(line) for line in (tmp_path / "mapping" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= rows[0]["val/robust_acc"] <= rows[0]["val/acc"]


def test_unknown_method_option_is_refused(tmp_path, toy):
    with pytest.raises(ConfigError, match="method.args.label_smoothng.*did you mean 'label_smoothing'"):
        robustkd.train(_cfg(tmp_path, method={"name": "standard", "args": {"label_smoothng": 0.1}}))


@pytest.mark.slow
def test_standard_small_cnn_fashion_mnist_reaches_85_percent(tmp_path):
    # 2 epochs on a 20 000-image stratified subset of the training split, full 10 000-image test set.
    cfg = from_dict(
        {
            "name": "fmnist",
            "out_dir": str(tmp_path),
            "epochs": 2,
            "progress": False,
            "tensorboard": False,
            "data": {"dataset": "fashion-mnist", "train_subset": 20000, "batch_size": 128},
            "model": {"arch": "small_cnn"},
            "optim": {"lr": 0.05},
        }
    )
    result = robustkd.train(cfg)
    assert result.test["n"] == 10000
    assert result.test["acc"] >= 0.85, result.test


def _toy_teacher(tmp_path, num_classes=4, in_channels=1, input_size=16):
    from robustkd.checkpoint import save_checkpoint
    from robustkd.models import create_model

    model = create_model("dm_small", num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    meta = {
        "arch": "dm_small",
        "arch_args": {},
        "num_classes": num_classes,
        "input_shape": [in_channels, input_size, input_size],
        "mean": [0.0] * in_channels,
        "std": [1.0] * in_channels,
    }
    save_checkpoint(tmp_path / "teacher" / "best", model, meta)
    torch.save(model.state_dict(), tmp_path / "teacher.pt")
    return model


def test_distill_from_checkpoint_and_from_pt(tmp_path, toy):
    _toy_teacher(tmp_path)
    kd = {"name": "kd", "args": {"temperature": 2.0}}
    a = robustkd.distill(_cfg(tmp_path, name="a", epochs=1, method=kd, teacher=str(tmp_path / "teacher" / "best")))
    b = robustkd.distill(
        _cfg(tmp_path, name="b", epochs=1, method=kd, teacher=str(tmp_path / "teacher.pt"), teacher_arch="dm_small")
    )
    wa, wb = load_model(a.run_dir / "last").state_dict(), load_model(b.run_dir / "last").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the same teacher, however it was stored
    assert read_meta(a.run_dir / "best")["method"] == "kd"


@pytest.mark.parametrize(
    ("teacher_kwargs", "message"),
    [
        ({"num_classes": 7}, r"classes \(7 vs 4\)"),
        ({"in_channels": 3}, r"input shape \(\[3, 16, 16\] vs \[1, 16, 16\]\)"),
        ({"input_size": 20}, r"input shape \(\[1, 20, 20\] vs \[1, 16, 16\]\)"),
    ],
)
def test_teacher_student_mismatch_is_refused_before_training(tmp_path, toy, teacher_kwargs, message):
    _toy_teacher(tmp_path, **teacher_kwargs)
    cfg = _cfg(tmp_path, epochs=1, method={"name": "kd"}, teacher=str(tmp_path / "teacher" / "best"))
    with pytest.raises(ConfigError, match=f"^teacher: .*{message}"):
        robustkd.distill(cfg)
    assert not (tmp_path / "toy" / "last.safetensors").exists()


def test_distill_keyword_api_and_student_init(tmp_path, toy):
    teacher = _toy_teacher(tmp_path)
    result = robustkd.distill(
        teacher=tmp_path / "teacher" / "best",
        student="dm_small",
        method={"name": "kd", "args": {"temperature": 2.0}},
        data={"dataset": "toy", "batch_size": 32, "val_fraction": 0.25},
        epochs=1,
        out_dir=str(tmp_path),
        name="kw",
        progress=False,
        tensorboard=False,
    )
    assert read_meta(result.run_dir / "best")["method"] == "kd"
    # A student that starts from pre-trained weights (here the teacher's): its first step starts there.
    init = robustkd.train(
        _cfg(
            tmp_path,
            name="init",
            epochs=1,
            model={"arch": "dm_small", "init": str(tmp_path / "teacher" / "best")},
            optim={"lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0},
        )
    )
    start = teacher.state_dict()
    end = load_model(init.run_dir / "last").state_dict()
    assert all(torch.allclose(start[k], end[k], atol=1e-6) for k in start)


def test_certified_validation_selects_the_most_certified_epoch(tmp_path, toy):
    from robustkd.certify import certified_accuracy
    from robustkd.data.batches import stratified_split

    cfg = _cfg(
        tmp_path,
        epochs=3,
        method={"name": "ibp", "args": {"threat": {"eps": 0.05}, "warmup_epochs": 1, "ramp_epochs": 1}},
        validate={"certify": "ibp", "protocol": "linf-0.05"},
    )
    robustkd.train(cfg)
    run = tmp_path / "toy"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["val/cert_acc"] <= r["val/acc"] for r in rows)
    best = max(rows, key=lambda r: (r["val/cert_acc"], -r["epoch"]))
    assert read_meta(run / "best")["epoch"] == best["epoch"]
    # The logged figure is certify's own on the validation split.
    train = _toy_dataset().train
    _, val_idx = stratified_split(train.labels, 0.25, cfg.seed)
    val = train.subset(val_idx)
    last = load_model(run / "last")
    assert rows[-1]["val/cert_acc"] == certified_accuracy(last, val.images, val.labels, 0.05, "ibp")


def test_select_last_keeps_the_latest_epoch(tmp_path, toy):
    robustkd.train(_cfg(tmp_path, epochs=3, validate={"select": "last"}))
    assert read_meta(tmp_path / "toy" / "best")["epoch"] == 3


@pytest.mark.parametrize(
    ("validate", "field"),
    [
        ({"select": "certified"}, "validate.select"),
        ({"certify": "ibp"}, "validate.protocol"),
        ({"certify": "ibq", "protocol": "linf-0.1"}, "validate.certify"),
        ({"certify": "ibp", "protocol": "l2-0.5"}, "validate.certify"),
    ],
)
def test_certified_validation_options_are_checked(tmp_path, validate, field):
    from robustkd.config import validate as check

    with pytest.raises(ConfigError, match=field):
        check(_cfg(tmp_path, validate=validate))


@pytest.mark.parametrize(
    "path",
    sorted(str(p) for p in Path(__file__).resolve().parents[1].glob("configs/**/*.yaml") if "compare" not in p.parts),
)
def test_no_shipped_config_warns_of_a_threat_mismatch(path):
    import warnings

    from robustkd.config import load_config
    from robustkd.engine import ThreatMismatchWarning
    from robustkd.engine.loop import _warn_threat_mismatch
    from robustkd.methods import build_method

    cfg = load_config(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ThreatMismatchWarning)
        _warn_threat_mismatch(cfg, build_method(cfg.method.name, cfg.method.args))
