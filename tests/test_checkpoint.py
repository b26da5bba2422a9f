import json
import pickle

import pytest
import torch
from conftest import fmnist_meta, fmnist_model

from robustkd.checkpoint import load_model, read_meta, save_checkpoint
from robustkd.errors import CheckpointError, ConfigError
from robustkd.models import create_model


def _meta(arch="dm_small", **extra):
    return fmnist_meta(arch, **extra)


def _model(arch="dm_small"):
    return fmnist_model(arch)


@pytest.mark.parametrize("arch", ["dm_small", "small_cnn", "resnet18"])
def test_round_trip_preserves_outputs_exactly(tmp_path, arch):
    model = _model(arch).eval()
    if arch == "resnet18":  # non-trivial BatchNorm statistics must survive too
        model.train()
        with torch.no_grad():
            model(torch.rand(8, 1, 28, 28))
        model.eval()
    save_checkpoint(tmp_path / "best", model, _meta(arch, metrics={"val/acc": 0.5}))
    loaded = load_model(tmp_path / "best")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not loaded.training
    meta = read_meta(tmp_path)  # a run folder resolves to its best checkpoint
    assert meta["arch"] == arch and meta["metrics"] == {"val/acc": 0.5}
    assert meta["robustkd_version"] and meta["format"] == "robustkd-checkpoint"
    sidecar = json.loads((tmp_path / "best.json").read_text())
    assert sidecar["input_shape"] == [1, 28, 28] and len(sidecar["weights_sha256"]) == 64


def test_no_temporary_files_left(tmp_path):
    save_checkpoint(tmp_path / "last", _model(), _meta())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors"]


def test_stale_sidecar_falls_back_to_embedded_metadata(tmp_path):
    save_checkpoint(tmp_path / "best", _model(), _meta(epoch=1))
    old_sidecar = (tmp_path / "best.json").read_text()
    save_checkpoint(tmp_path / "best", _model(), _meta(epoch=2))
    (tmp_path / "best.json").write_text(old_sidecar)  # as if killed between the two renames
    with pytest.warns(UserWarning, match="describes other weights"):
        assert read_meta(tmp_path / "best")["epoch"] == 2


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nothing")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(tmp_path / "bad")


def test_sidecar_weights_mismatch_is_explained(tmp_path):
    save_checkpoint(tmp_path / "best", _model("dm_small"), _meta("dm_small"))
    meta = json.loads((tmp_path / "best.json").read_text())
    meta["arch"] = "small_cnn"
    (tmp_path / "best.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match the architecture: missing keys"):
        load_model(tmp_path / "best")


def test_foreign_state_dict_loads_weights_only(tmp_path):
    model = _model()
    bare = {f"module.{k[len('net.') :]}": v for k, v in model.state_dict().items() if k.startswith("net.")}
    torch.save({"state_dict": bare}, tmp_path / "teacher.pt")
    loaded = load_model(
        tmp_path / "teacher.pt",
        arch="dm_small",
        num_classes=10,
        in_channels=1,
        input_size=28,
        mean=[0.286],
        std=[0.353],
    )
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    with pytest.raises(CheckpointError, match="name its architecture"):
        load_model(tmp_path / "teacher.pt")


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "created_by_pickle"
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"state_dict": _Payload(marker)}, handle)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(tmp_path / "evil.pt", arch="dm_small", num_classes=10, in_channels=1, input_size=28)
    assert not marker.exists()


def test_wrong_shapes_are_named(tmp_path):
    model = create_model("dm_small", num_classes=7, in_channels=1, input_size=28)
    torch.save(model.state_dict(), tmp_path / "seven.pt")
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_model(tmp_path / "seven.pt", arch="dm_small", num_classes=10, in_channels=1, input_size=28)


def test_check_compatible_is_the_one_teacher_student_rule():
    from robustkd.checkpoint import check_compatible

    student = {"num_classes": 10, "input_shape": (1, 28, 28)}
    check_compatible({"num_classes": 10, "input_shape": [1, 28, 28]}, student)  # a list and a tuple agree
    check_compatible({"arch": "dm_small"}, student)  # a foreign .pt describes nothing: nothing to compare
    with pytest.raises(ConfigError, match=r"^teacher: teacher and student differ in classes \(7 vs 10\)"):
        check_compatible({"num_classes": 7, "input_shape": [1, 28, 28]}, student)
    with pytest.raises(ConfigError, match=r"^pair: .* input shape \(\[3, 28, 28\] vs \[1, 28, 28\]\)"):
        check_compatible({"input_shape": [3, 28, 28]}, student, what="pair")
    with pytest.raises(ConfigError, match=r"classes \(7 vs 10\); input shape"):
        check_compatible({"num_classes": 7, "input_shape": [3, 28, 28]}, student)


def _edit_sidecar(path, **changes):
    # The weights' hash is left as it is: the sidecar is trusted as the description of these weights.
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def _no_build(*args, **kwargs):
    raise AssertionError("the model was built from the edited metadata")


@pytest.mark.parametrize(
    ("arch_args", "match"),
    [
        # Over the per-option bound: refused without even a meta build.
        ({"width": 10_000_000}, r"arch_args width=10000000: model 'small_cnn': option width=10000000 is over"),
        # Within it, but 7.5e9 parameters against the file's 0.4e6.
        ({"width": 20_000}, r"does not match the architecture: wrong shapes .*width=20000 describes 7,451,121,420 par"),
        # A plausible size that is simply not these weights.
        ({"width": 33}, r"does not match the architecture: wrong shapes net\.0\.weight: file \(32, 1, 3, 3\)"),
    ],
)
def test_edited_arch_args_are_refused_before_allocating(tmp_path, monkeypatch, arch_args, match):
    import robustkd.checkpoint as checkpoint

    save_checkpoint(tmp_path / "best", fmnist_model("small_cnn"), _meta("small_cnn"))
    _edit_sidecar(tmp_path / "best.json", arch_args=arch_args)
    monkeypatch.setattr(checkpoint, "create_model", _no_build)
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path / "best")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("mean", [float("nan")], r"'mean' in the checkpoint metadata must be finite, got \[nan\]"),
        ("mean", float("inf"), r"'mean' .* must be finite"),
        ("std", [float("nan")], r"'std' .* must be finite"),
        ("std", [0.0], r"'std' .* must be > 0, got \[0\.0\]"),
        ("std", ["wide"], r"'std' .* must be numbers"),
    ],
)
def test_sidecar_normalisation_must_be_finite(tmp_path, key, value, match):
    save_checkpoint(tmp_path / "best", _model(), _meta())
    _edit_sidecar(tmp_path / "best.json", **{key: value})
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path / "best")
