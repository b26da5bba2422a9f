"""Bad-input matrix, the rows not already covered by the module tests (docs/RELIABILITY.md lists all):
each bad input is refused with one message that names the bad thing and the fix, and nothing runs or
is written that should not be."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fmnist_meta
from PIL import Image

from robustkd.checkpoint import load_model, save_checkpoint
from robustkd.cli import main
from robustkd.config import from_dict, validate
from robustkd.data import load_dataset
from robustkd.errors import CheckpointError, ConfigError, DataError, RegistryError
from robustkd.jobs import certify_checkpoints, evaluate_checkpoint
from robustkd.methods import build_method
from robustkd.models import create_model

SHAPE = {"num_classes": 10, "in_channels": 1, "input_size": 28}


def _meta(**over):
    return fmnist_meta(**{"mean": [0.5], "std": [0.25], **over})


def _model(**over):
    return create_model("dm_small", **{**SHAPE, **over})


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


class _Payload:
    """Unpickling this calls open(path, 'w'): the file appears if, and only if, the pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


# --- data ---------------------------------------------------------------------------------------------


def _grey_folder(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("x", "y"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


def test_decoded_and_cached_data_are_the_same_tensors(tmp_path):
    # Strides included: grey images once came out of the decoder with a channel stride of 0, which torch
    # read as channels_last and trained on with other kernels than the cached copy (a resume then differed).
    root = _grey_folder(tmp_path / "f")
    fresh = load_dataset("imagefolder", root, cache_dir=tmp_path / "cache")
    cached = load_dataset("imagefolder", root, cache_dir=tmp_path / "cache")
    for a, b in ((fresh.train, cached.train), (fresh.test, cached.test)):
        for ta, tb in ((a.images, b.images), (a.labels, b.labels)):
            assert torch.equal(ta, tb)
            assert ta.stride() == tb.stride() == _row_major(ta.shape)


def _row_major(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= size
    return tuple(strides)


def test_zip_slip_archive_writes_nothing_anywhere(tmp_path):
    import zipfile

    root = _grey_folder(tmp_path / "f")
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(root.rglob("*.png")):
            z.write(path, path.relative_to(root).as_posix())
        z.writestr("train/x/../../../../outside.png", (root / "train" / "x" / "0.png").read_bytes())
    before = _files(tmp_path)
    with pytest.raises(DataError, match=r"refusing the archive, member .*outside\.png.* '\.\.'"):
        load_dataset("imagefolder", archive, cache_dir=tmp_path / "cache")
    assert _files(tmp_path) == before  # no extracted file, not even a cache entry
    assert not (tmp_path.parent / "outside.png").exists()


def test_poisoned_cache_entry_runs_no_code_and_is_rebuilt(tmp_path):
    root = _grey_folder(tmp_path / "f")
    first = load_dataset("imagefolder", root, cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    marker = tmp_path / "made-by-the-cache"
    poison = np.empty(1, dtype=object)
    poison[0] = _Payload(marker)
    np.save(entry / "train_images.npy", poison, allow_pickle=True)
    with pytest.warns(UserWarning, match="damaged data cache entry"):
        again = load_dataset("imagefolder", root, cache_dir=tmp_path / "cache")
    assert not marker.exists()
    assert torch.equal(first.train.images, again.train.images)


# --- models and checkpoints ---------------------------------------------------------------------------


def test_checkpoint_of_an_unknown_architecture_suggests_close_names(tmp_path):
    save_checkpoint(tmp_path / "best", _model(), _meta())
    meta = json.loads((tmp_path / "best.json").read_text())
    meta["arch"] = "dm_smal"
    (tmp_path / "best.json").write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match="unknown model 'dm_smal'; did you mean 'dm_small'"):
        load_model(tmp_path / "best")


def test_missing_keys_are_named(tmp_path):
    state = _model().state_dict()
    del state["net.0.bias"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"does not match the architecture: missing keys net\.0\.bias"):
        load_model(tmp_path / "partial.pt", arch="dm_small", **SHAPE)


def test_wrong_dtype_is_named(tmp_path):
    state = _model().state_dict()
    state["net.0.weight"] = state["net.0.weight"].to(torch.int64)
    torch.save(state, tmp_path / "ints.pt")
    with pytest.raises(
        CheckpointError, match=r"wrong dtypes net\.0\.weight: file torch\.int64 vs model torch\.float32"
    ):
        load_model(tmp_path / "ints.pt", arch="dm_small", **SHAPE)


def test_whole_pickled_module_is_refused(tmp_path):
    torch.save(_model(), tmp_path / "module.pt")  # what torch.save(model) gives: needs full unpickling
    with pytest.raises(CheckpointError, match="holds more than tensors .* refused. Re-save it as a plain state dict"):
        load_model(tmp_path / "module.pt", arch="dm_small", **SHAPE)


def test_malicious_torch_file_is_refused_and_runs_nothing(tmp_path):
    # The zip-based torch.save format, as real checkpoints are (tests/test_checkpoint.py covers raw pickle).
    marker = tmp_path / "made-by-the-checkpoint"
    torch.save({"state_dict": _model().state_dict(), "extra": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_model(tmp_path / "evil.pt", arch="dm_small", **SHAPE)
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.exists()


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_bytes(b""), "not a readable PyTorch file"),
        (lambda p: p.write_bytes(b"hello, not a checkpoint"), "not a readable PyTorch file"),
        (lambda p: torch.save({0: torch.zeros(1)}, p), "not a state dict"),
        (lambda p: torch.save([torch.zeros(1)], p), "not a state dict"),
    ],
    ids=["empty", "garbage", "int-keys", "list"],
)
def test_damaged_or_odd_pt_files(tmp_path, write, message):
    path = tmp_path / "odd.pt"
    write(path)
    with pytest.raises(CheckpointError, match=message):
        load_model(path, arch="dm_small", **SHAPE)


def test_sidecar_that_is_not_a_description(tmp_path):
    save_checkpoint(tmp_path / "best", _model(), _meta())
    (tmp_path / "best.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"best.json is not a checkpoint description"):
        load_model(tmp_path / "best")


def test_foreign_safetensors_without_metadata(tmp_path):
    from safetensors.torch import save_file

    save_file(_model().state_dict(), tmp_path / "best.safetensors")
    with pytest.raises(CheckpointError, match="has no robustkd metadata .* load_model\\(path, arch=...\\)"):
        load_model(tmp_path / "best")


def test_metadata_that_describes_no_model(tmp_path):
    save_checkpoint(tmp_path / "best", _model(), _meta())
    meta = json.loads((tmp_path / "best.json").read_text())
    meta["input_shape"] = "twenty-eight"
    (tmp_path / "best.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="metadata does not describe a model"):
        load_model(tmp_path / "best")


def test_certify_refuses_a_teacher_of_another_shape_before_loading_data(tmp_path):
    save_checkpoint(tmp_path / "s" / "best", _model(), _meta())
    save_checkpoint(tmp_path / "t" / "best", _model(num_classes=7), _meta(num_classes=7))
    with pytest.raises(ConfigError, match=r"teacher and student differ in classes \(7 vs 10\)"):
        certify_checkpoints(tmp_path / "s", tmp_path / "t", eps=0.1, data_root=str(tmp_path / "no-data"))


# --- configs and the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"epochs": "three"}, "^epochs: expected an integer, got 'three'"),
        ({"epochs": 2.5}, "^epochs: expected an integer"),
        ({"seed": True}, "^seed: expected an integer, got True"),
        ({"resume": "yes"}, "^resume: expected true or false"),
        ({"optim": {"lr": "fast"}}, "^optim.lr: expected a number, got 'fast'"),
        ({"optim": {"lr": float("inf")}}, "^optim.lr: must be a finite number"),
        ({"optim": {"betas": [0.9]}}, r"^optim.betas: expected a list of 2 numbers"),
        ({"optim": {"milestones": [1, "x"]}}, r"^optim.milestones\[1\]: expected a number"),
        ({"data": "mnist"}, "^data: expected a mapping, got str"),
        ({"data": {"root": 3}}, "^data.root: expected a string"),
        ({"model": {"args": ["width", 2]}}, "^model.args: expected a mapping"),
    ],
)
def test_wrong_types_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_yaml_numbers_written_as_text_are_read_as_numbers():
    # YAML 1.1 reads 1e-3 (no dot) as a string; a float field takes it as the number it plainly is.
    assert from_dict({"optim": {"lr": "1e-3"}}).optim.lr == 0.001


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"validate": {"attack": "pgd10", "protocol": "linf-5"}}, "^validate.protocol: eps: .* above 1"),
        ({"validate": {"attack": "pgdd10", "protocol": "linf-0.1"}}, "^validate.attack: unknown attack 'pgdd10'"),
        ({"validate": {"attack": "pgd0", "protocol": "linf-0.1"}}, "^validate.attack: .* at least one step"),
        ({"validate": {"attack": "pgd10", "protocol": "linf-0.1", "max_examples": 0}}, "^validate.max_examples"),
        ({"optim": {"betas": [0.9, 1.5]}}, "^optim.betas"),
        ({"seed": -1}, "^seed"),
        ({"name": ".."}, "^name"),
        ({"name": "."}, "^name"),
        ({"name": "a\\b"}, "^name"),
        ({"name": ""}, "^name"),
        ({"name": "runs/../../etc"}, "^name"),
    ],
)
def test_nonsense_values_are_refused_before_any_work(raw, message):
    with pytest.raises(ConfigError, match=message):
        validate(from_dict(raw))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"threat": {"eps": -0.1}}, "eps: must be >= 0"),
        ({"threat": {"eps": 2.0}}, "eps: inputs live in"),
        ({"threat": {"step_size": 0.5, "eps": 0.1}}, "step_size: a Linf step of 0.5 is larger than eps"),
        ({"threat": {"steps": 0}}, "steps: must be >= 1"),
    ],
)
def test_method_attack_nonsense_is_refused(args, message):
    with pytest.raises(ConfigError, match=f"^method.args.threat: {message}"):
        build_method("pgd_at", args)


@pytest.mark.parametrize("eps", ["-1", "nan", "inf", "2"])
def test_certify_eps_nonsense_is_one_line(tmp_path, capsys, eps):
    save_checkpoint(tmp_path / "best", _model(), _meta())
    assert main(["certify", "--student", str(tmp_path), "--eps", eps, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "eps: must be a number in [0, 1]" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--protocol", "linf-5"], "protocol: eps: inputs live in [0, 1]"),
        (["--protocol", "linf-0.l"], "protocol: unknown threat-model preset"),
        (["--attacks", "pgd0"], "at least one step"),
        (["--n-examples", "0"], "n_examples: must be an integer >= 1"),
    ],
)
def test_evaluate_nonsense_fails_before_loading_anything(tmp_path, capsys, argv, message):
    save_checkpoint(tmp_path / "best", _model(), _meta(dataset="imagefolder"))
    # The data root does not exist: reaching the data would be a different error.
    code = main(["evaluate", "--model", str(tmp_path), "--data-root", str(tmp_path / "none"), *argv, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_evaluate_refuses_nonsense_from_python_too(tmp_path):
    save_checkpoint(tmp_path / "best", _model(), _meta(dataset="imagefolder"))
    with pytest.raises(ConfigError, match="^protocol:"):
        evaluate_checkpoint(tmp_path, protocol="linf-1.5", data_root=str(tmp_path / "none"))
