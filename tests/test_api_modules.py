"""Modules of one's own in the Python API: wrap, distil, save, reload, evaluate, certify, export, and refusals."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest
import torch
import yaml
from torch import nn

import robustkd
from robustkd.checkpoint import load_model, read_meta, save_checkpoint
from robustkd.errors import CheckpointError, ConfigError, RobustKDError
from robustkd.models import WrappedModel

FMNIST = {"dataset": "fashion-mnist", "train_subset": 300, "test_subset": 100, "val_fraction": 0.005}
QUIET = {"progress": False, "tensorboard": False, "epochs": 1, "device": "cpu"}


class TinyCNN(nn.Sequential):
    """A user's network: a class of its own, built from layers the bound propagators know (so certifiable)."""

    def __init__(self, width: int = 4, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(width * 14 * 14, num_classes),
        )


class CustomForward(nn.Module):
    """A user's network with a forward of its own (nothing can bound it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * 2


def _points(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# --- wrap


def test_wrap_puts_the_stated_normalisation_in_front():
    net = TinyCNN()
    wrapped = robustkd.wrap(net, mean=[0.25], std=[0.5], num_classes=10, input_shape=(1, 28, 28))
    x, _ = _points(6)
    assert isinstance(wrapped, WrappedModel) and wrapped.net is net
    torch.testing.assert_close(wrapped(x), net((x - 0.25) / 0.5), rtol=0, atol=0)
    assert set(wrapped.state_dict()) == {"normalize.mean", "normalize.std"} | {f"net.{k}" for k in net.state_dict()}
    assert wrapped.describe() == {
        "arch": f"{__name__}:TinyCNN",
        "arch_args": {},
        "num_classes": 10,
        "input_shape": [1, 28, 28],
        "mean": [0.25],
        "std": [0.5],
    }
    assert robustkd.wrap(wrapped) is wrapped


def test_wrap_without_normalisation_passes_images_through():
    net = TinyCNN()
    x, _ = _points(4)
    torch.testing.assert_close(robustkd.wrap(net)(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mean": [0.1, 0.2], "std": [0.3, 0.4, 0.5]}, "mean has 2 values but std has 3"),
        ({"std": [0.0]}, "std: must be positive"),
        ({"mean": [float("nan")]}, "mean: must be one or more finite"),
        ({"input_shape": (28, 28)}, "input_shape"),
        ({"mean": [0.1, 0.2, 0.3], "input_shape": (1, 28, 28)}, "3 values but input_shape has 1 channels"),
        ({"num_classes": 1}, "num_classes"),
    ],
)
def test_wrap_refuses_nonsense(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        robustkd.wrap(TinyCNN(), **kwargs)
    _one_line(err)


def test_wrap_refuses_what_is_not_a_module():
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        robustkd.wrap(lambda x: x)


# --- distillation with modules


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three one-epoch runs on a Fashion-MNIST subset: module teacher -> arch student, module -> module, and
    a plain module trained by robustkd.train."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    teacher = robustkd.wrap(TinyCNN(width=6), mean=[0.3], std=[0.35], num_classes=10)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    common = {"out_dir": str(root), "data": FMNIST, **QUIET}
    arch = robustkd.distill(teacher=teacher, student="dm_small", name="arch", **common)
    student = robustkd.wrap(TinyCNN(width=3), arch_args={"width": 3})
    own = robustkd.distill(teacher=teacher, student=student, method="kd", name="own", **common)
    plain = TinyCNN()
    trained = robustkd.train({"name": "plain", **common}, model=plain)
    return {
        "root": root, "teacher": teacher, "before": before, "arch": arch, "own": own, "student": student,
        "plain": plain, "trained": trained,
    }  # fmt: skip


def test_distill_from_a_module_teacher_into_an_arch_student(runs):
    config = yaml.safe_load((runs["arch"].run_dir / "config.yaml").read_text())
    assert config["teacher"] == "<nn.Module TinyCNN>"
    assert config["model"]["arch"] == "dm_small"
    student = robustkd.load_model(runs["arch"].best)  # a registered architecture rebuilds from its sidecar
    assert read_meta(runs["arch"].best)["arch"] == "dm_small"
    assert student(_points(2)[0]).shape == (2, 10)
    # The teacher is frozen: its weights are those it came with.
    for key, value in runs["teacher"].state_dict().items():
        assert torch.equal(value, runs["before"][key]), key
    assert not any(p.requires_grad for p in runs["teacher"].parameters())


def test_a_module_student_is_saved_with_its_import_path(runs):
    meta = read_meta(runs["own"].best)
    assert meta["arch"] == f"{__name__}:TinyCNN"
    assert meta["arch_args"] == {"width": 3}
    assert (meta["mean"], meta["std"]) == ([0.0], [1.0])  # no normalisation was asked for
    assert (meta["num_classes"], meta["input_shape"], meta["dataset"]) == (10, [1, 28, 28], "fashion-mnist")
    config = yaml.safe_load((runs["own"].run_dir / "config.yaml").read_text())
    assert config["model"]["arch"] == config["teacher"] == "<nn.Module TinyCNN>"
    results = json.loads((runs["own"].run_dir / "results.json").read_text())
    assert results["test"]["n"] == 100


def test_the_saved_student_reloads_into_an_instance_and_by_named_import_path(runs):
    x, _ = _points(8)
    student = runs["student"].eval()  # one epoch: the best checkpoint is the last weights, still in memory
    expected = student(x)
    into = robustkd.load_model(runs["own"].best, model=TinyCNN(width=3))
    torch.testing.assert_close(into(x), expected, rtol=0, atol=0)
    assert isinstance(into, WrappedModel) and not into.training
    wrapped = robustkd.load_model(runs["own"].best, model=robustkd.wrap(TinyCNN(width=3)))
    torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=0)
    named = robustkd.load_model(runs["own"].best, arch=f"{__name__}:TinyCNN")  # built with arch_args width=3
    torch.testing.assert_close(named(x), expected, rtol=0, atol=0)
    assert named.robustkd_meta["dataset"] == "fashion-mnist"


def test_loading_user_code_without_naming_it_is_refused(runs):
    with pytest.raises(CheckpointError, match="user code") as err:
        robustkd.load_model(runs["own"].best)
    message = _one_line(err)
    assert f"{__name__}:TinyCNN" in message and "model=TinyCNN(...)" in message and "arch=" in message


def test_a_wrong_instance_is_refused_strictly(runs):
    with pytest.raises(CheckpointError, match="wrong shapes"):
        robustkd.load_model(runs["own"].best, model=TinyCNN(width=5))


def test_train_takes_a_plain_module(runs):
    meta = read_meta(runs["trained"].best)
    assert meta["arch"] == f"{__name__}:TinyCNN" and meta["method"] == "standard"
    loaded = robustkd.load_model(runs["trained"].best, model=TinyCNN())
    x, _ = _points(4)
    torch.testing.assert_close(loaded(x), runs["plain"].eval()(x), rtol=0, atol=0)


def test_resume_needs_the_same_modules(runs):
    config = runs["own"].run_dir / "config.yaml"
    with pytest.raises(ConfigError, match="pass the same module again") as err:
        robustkd.train(str(config), resume=True, epochs=2)
    assert "<nn.Module TinyCNN>" in _one_line(err)
    raw = yaml.safe_load(config.read_text())
    with pytest.raises(ConfigError, match="teacher: the run config names an in-memory module"):
        robustkd.train(raw, model=TinyCNN(width=3), resume=True, epochs=2)


def test_resume_with_the_modules_passed_again(runs):
    common = {"out_dir": str(runs["root"]), "data": FMNIST, **QUIET, "epochs": 2}
    resumed = robustkd.distill(
        teacher=runs["teacher"], student=robustkd.wrap(TinyCNN(width=3)), method="kd", name="own", resume=True,
        **common,
    )  # fmt: skip
    assert [row["epoch"] for row in resumed.history] == [1, 2]


@pytest.mark.parametrize(
    ("student", "message"),
    [
        (TinyCNN(num_classes=3), r"outputs shape \(2, 3\).*expected \(batch, 10\)"),
        (robustkd.wrap(TinyCNN(), num_classes=3), "wrapped for 3 classes but fashion-mnist has 10"),
        (robustkd.wrap(TinyCNN(), input_shape=(3, 32, 32)), r"wrapped for input \(3, 32, 32\)"),
        (TinyCNN(in_channels=3), r"cannot take fashion-mnist input \(1, 28, 28\)"),
    ],
)
def test_a_module_that_does_not_fit_the_data_is_refused_before_training(tmp_path, student, message):
    with pytest.raises(ConfigError, match=message) as err:
        robustkd.train({"name": "bad", "out_dir": str(tmp_path), "data": FMNIST, **QUIET}, model=student)
    assert _one_line(err).startswith("model: TinyCNN")
    assert not (tmp_path / "bad" / "last.safetensors").exists()


def test_a_teacher_module_that_does_not_fit_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="teacher: TinyCNN") as err:
        robustkd.distill(
            teacher=TinyCNN(num_classes=4), student="dm_small", out_dir=str(tmp_path), data=FMNIST, **QUIET
        )
    _one_line(err)


# --- a sidecar's import path is data


PAYLOAD = "robustkd_test_payload_pkg"


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """A checkpoint whose sidecar names ``os:system``, another naming a module that records being imported."""
    (tmp_path / f"{PAYLOAD}.py").write_text(
        textwrap.dedent(
            f"""
            import pathlib
            pathlib.Path({str(tmp_path / "imported")!r}).write_text("ran")
            from torch import nn

            class Net(nn.Sequential):
                def __init__(self):
                    super().__init__(nn.Flatten(), nn.Linear(784, 10))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PAYLOAD, raising=False)
    calls = []
    monkeypatch.setattr("os.system", lambda command: calls.append(command) or 0)
    net = robustkd.wrap(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    base = {"arch_args": {}, "num_classes": 10, "input_shape": [1, 28, 28], "mean": [0.0], "std": [1.0]}
    base["dataset"] = "fashion-mnist"
    save_checkpoint(tmp_path / "system", net, {**base, "arch": "os:system", "arch_args": {"command": "touch x"}})
    save_checkpoint(tmp_path / "payload", net, {**base, "arch": f"{PAYLOAD}:Net"})
    return tmp_path, calls


def test_a_sidecar_naming_code_never_imports_it(hostile, monkeypatch):
    root, calls = hostile
    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    from robustkd.jobs import evaluate_checkpoint, load_models

    for name in ("system", "payload"):
        with pytest.raises(CheckpointError, match="never imports") as err:
            load_model(root / name)
        _one_line(err)
        with pytest.raises(CheckpointError, match="user code"):
            load_models(root / name, device="cpu")
        with pytest.raises(CheckpointError, match="user code"):
            evaluate_checkpoint(root / name, attacks=["clean"], progress=False, device="cpu")
    assert calls == [] and imported == [] and PAYLOAD not in sys.modules
    assert not (root / "imported").exists() and not (root / "x").exists()


def test_an_import_path_is_imported_only_when_named(hostile):
    root, calls = hostile
    model = load_model(root / "payload", arch=f"{PAYLOAD}:Net")
    assert (root / "imported").read_text() == "ran"  # named by the caller: imported
    assert model(_points(2)[0]).shape == (2, 10)
    with pytest.raises(CheckpointError, match="not a torch.nn.Module"):
        load_model(root / "system", arch="os:system")  # named, so called; it is no model: refused after
    assert calls == ["touch x"]


@pytest.mark.parametrize(
    ("arch", "message"),
    [("two:colons:here", "no import path"), ("no_such_pkg_xyz:Net", "cannot import"), (f"{PAYLOAD}:Nope", "has no")],
)
def test_a_bad_import_path_is_one_line(hostile, arch, message):
    root, _ = hostile
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(root / "payload", arch=arch)
    _one_line(err)


# --- evaluate, certify, export with modules


def test_evaluate_takes_plain_and_wrapped_modules():
    net = TinyCNN()
    x, y = _points(30)
    wrapped = robustkd.wrap(net, mean=[0.5], std=[0.25])
    for model, inputs in ((net, x), (wrapped, (x - 0.5) / 0.25)):
        result = robustkd.evaluate(model, x, y, protocol="linf-0.1", attacks=("clean", "pgd5"), progress=False)
        with torch.no_grad():
            expected = (net(inputs).argmax(1) == y).float().mean().item()
        assert result["attacks"]["clean"]["accuracy"] == pytest.approx(expected)
        assert result["attacks"]["pgd5"]["accuracy"] <= expected


def test_certify_takes_plain_and_wrapped_modules():
    teacher, student = robustkd.wrap(TinyCNN(width=6), mean=[0.5], std=[0.25]), TinyCNN()
    x, y = _points(20)
    result = robustkd.certify(teacher, student, x, y, 0.0, method="ibp", progress=False)
    with torch.no_grad():
        clean_t = (teacher(x).argmax(1) == y).float().mean().item()
        clean_s = (student(x).argmax(1) == y).float().mean().item()
    # At eps 0 the interval bounds are the logits: certified accuracy is clean accuracy.
    assert result["teacher"]["certified_accuracy"] == pytest.approx(clean_t)
    assert result["student"]["certified_accuracy"] == pytest.approx(clean_s)
    wider = robustkd.certify(teacher, student, x, y, 0.05, method="crown-ibp", progress=False)
    assert wider["student"]["certified_accuracy"] <= clean_s


def test_certify_names_a_module_it_cannot_bound():
    from robustkd.certify._graph import UnsupportedModelError

    x, y = _points(4)
    with pytest.raises(UnsupportedModelError, match="CustomForward") as err:
        robustkd.certify(None, robustkd.wrap(CustomForward()), x, y, 0.01, method="ibp", progress=False)
    _one_line(err)


def test_export_model_of_a_wrapped_module_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from robustkd.export import export_model

    x, _ = _points(16)
    model = robustkd.wrap(TinyCNN(), mean=[0.5], std=[0.25]).eval()
    result = export_model(model, tmp_path / "m.onnx", x, exporter="legacy", progress=False)
    assert result["passed"] and result["max_logit_diff"] <= 1e-4
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model.net((x - 0.5) / 0.25), rtol=1e-4, atol=1e-4)


# --- the jobs take modules wherever they take checkpoints


def test_jobs_take_modules(tmp_path):
    from robustkd.jobs import certify_checkpoints, evaluate_checkpoint, evaluate_faithfulness_checkpoints

    student, teacher = TinyCNN(), robustkd.wrap(TinyCNN(width=6), mean=[0.3], std=[0.35])
    common = {"dataset": "fashion-mnist", "n_examples": 24, "device": "cpu", "progress": False}
    result = evaluate_checkpoint(student, attacks=["clean"], out=tmp_path / "e.json", **common)
    data = robustkd.data.load_dataset("fashion-mnist")
    x, y = data.test.images[:24].float() / 255, data.test.labels[:24]
    with torch.no_grad():
        expected = (student(x).argmax(1) == y).float().mean().item()
    assert result["attacks"]["clean"]["accuracy"] == pytest.approx(expected)
    assert result["model"]["path"] == "<nn.Module TinyCNN>" and result["model"]["arch"] == f"{__name__}:TinyCNN"
    assert json.loads((tmp_path / "e.json").read_text())["data"]["dataset"] == "fashion-mnist"
    cert = certify_checkpoints(student, teacher, eps=0.0, out=tmp_path / "c.json", **common)
    assert cert["student"]["certified_accuracy"] == pytest.approx(expected)
    assert (cert["student_path"], cert["teacher_path"]) == ("<nn.Module TinyCNN>", "<nn.Module TinyCNN>")
    faith = evaluate_faithfulness_checkpoints(
        teacher, student, eps=0.05, steps=2, restarts=1, out=tmp_path / "f.json", **common
    )
    assert faith["models"]["teacher"]["path"] == "<nn.Module TinyCNN>"


def test_export_job_takes_a_module(tmp_path):
    pytest.importorskip("onnxruntime")
    from robustkd.jobs import export_onnx

    model = robustkd.wrap(TinyCNN(), mean=[0.3], std=[0.35])
    result = export_onnx(
        model, tmp_path / "m.onnx", dataset="fashion-mnist", n_examples=16, exporter="legacy", progress=False
    )
    assert result["passed"] and result["checkpoint"] == "<nn.Module TinyCNN>"
    assert result["outputs"] == [str(tmp_path / "m.export.json")]
    assert len(result["weights_sha256"]) == 64


def test_a_module_loaded_from_a_checkpoint_keeps_its_dataset(tmp_path):
    from robustkd.jobs import evaluate_checkpoint

    net = robustkd.wrap(TinyCNN(), num_classes=10, input_shape=(1, 28, 28))
    meta = {**net.describe(), "dataset": "fashion-mnist"}
    save_checkpoint(tmp_path / "best", net, meta)
    loaded = load_model(tmp_path / "best", model=TinyCNN())
    result = evaluate_checkpoint(loaded, attacks=["clean"], n_examples=8, out=tmp_path / "e.json", progress=False)
    assert result["data"]["dataset"] == "fashion-mnist"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out": "e.json"}, "dataset: an in-memory nn.Module names no dataset; pass dataset=NAME"),
        ({"dataset": "fashion-mnist"}, "out: the student is an in-memory <nn.Module TinyCNN>"),
        ({"dataset": "fashion-mnist", "out": "e.json", "model": TinyCNN(num_classes=4)}, "outputs shape"),
    ],
)
def test_jobs_refuse_a_module_without_what_it_needs(tmp_path, kwargs, message):
    from robustkd.jobs import evaluate_checkpoint

    kwargs = dict(kwargs)
    model = kwargs.pop("model", TinyCNN())
    if "out" in kwargs:
        kwargs["out"] = tmp_path / kwargs["out"]
    with pytest.raises(RobustKDError, match=message) as err:
        evaluate_checkpoint(model, attacks=["clean"], n_examples=4, progress=False, device="cpu", **kwargs)
    _one_line(err)
    assert not (tmp_path / "e.json").exists()
