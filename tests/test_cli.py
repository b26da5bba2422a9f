"""The command line: help, listing, errors as one line with exit status 2, evaluate on a checkpoint."""

import json

import pytest

from robustkd.checkpoint import save_checkpoint
from robustkd.cli import main
from robustkd.models import create_model


@pytest.mark.parametrize(
    "command", ["train", "distill", "evaluate", "certify", "quickstart", "list", "report", "export"]
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if command in ("train", "distill", "evaluate", "certify"):
        assert "examples:" in out


def test_top_level_help(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main([]) == 2


@pytest.mark.parametrize(
    ("what", "expected"),
    [("models", "dm_small"), ("datasets", "fashion-mnist"), ("methods", "advfunmatch"), ("protocols", "linf-0.1")],
)
def test_list(what, expected, capsys):
    assert main(["list", what]) == 0
    assert expected in capsys.readouterr().out.split()


def test_bad_override_is_one_line_with_suggestion(capsys):
    assert main(["train", "--optim.lrr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean --optim.lr" in err and "Traceback" not in err


def test_bad_value_names_the_field(tmp_path, capsys):
    assert main(["train", "--epochs", "0", "--out_dir", str(tmp_path)]) == 2
    assert "epochs: must be >= 1" in capsys.readouterr().err


def test_distill_requires_teacher(tmp_path, capsys):
    assert main(["distill", "--out_dir", str(tmp_path)]) == 2
    assert "--teacher" in capsys.readouterr().err


def test_unknown_method_suggests(tmp_path, capsys):
    assert main(["train", "--method.name", "pgdat", "--out_dir", str(tmp_path)]) == 2
    assert "did you mean 'pgd_at'" in capsys.readouterr().err


def test_evaluate_a_checkpoint_on_a_subset(tmp_path, capsys):
    model = create_model("dm_small", num_classes=10, in_channels=1, input_size=28, mean=[0.286], std=[0.353])
    meta = {
        "arch": "dm_small",
        "arch_args": {},
        "num_classes": 10,
        "input_shape": [1, 28, 28],
        "mean": [0.286],
        "std": [0.353],
        "dataset": "fashion-mnist",
    }
    save_checkpoint(tmp_path / "best", model, meta)
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--model", str(tmp_path / "best"), "--n-examples", "16", "--attacks", "clean,pgd5"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["subset"] is True and result["settings"]["n"] == 16
    assert result["attacks"]["pgd5"]["accuracy"] <= result["attacks"]["clean"]["accuracy"]
    assert "a subset of the test set" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(tmp_path / "best"), "--attacks", "pgd", "--n-examples", "4"]) == 2


def test_certify_pair_and_single_model(tmp_path, capsys):
    model = create_model("dm_small", num_classes=10, in_channels=1, input_size=28, mean=[0.286], std=[0.353])
    meta = {
        "arch": "dm_small",
        "arch_args": {},
        "num_classes": 10,
        "input_shape": [1, 28, 28],
        "mean": [0.286],
        "std": [0.353],
        "dataset": "fashion-mnist",
    }
    save_checkpoint(tmp_path / "t" / "best", model, meta)
    save_checkpoint(tmp_path / "s" / "best", model, meta)
    out = tmp_path / "cert.json"
    argv = ["certify", "--student", str(tmp_path / "s"), "--teacher", str(tmp_path / "t"), "--eps", "0"]
    assert main([*argv, "--n-examples", "20", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    # The same network at eps 0: every teacher-correct point is certified to agree, with a zero gap.
    assert result["teacher_correct"]["agreement_certified"] in (None, 1.0)
    assert result["subset"] is True and result["n"] == 20
    assert "certified agreement" in capsys.readouterr().out
    assert (
        main(["certify", "--student", str(tmp_path / "s"), "--eps", "0.1", "--n-examples", "8", "--no-progress"]) == 0
    )
    assert (tmp_path / "s" / "cert_best_ibp_0.1.json").is_file()
    assert main(["certify", "--student", str(tmp_path / "s"), "--eps", "0.1", "--method", "crown_ibp"]) == 2
    assert "did you mean 'crown-ibp'" in capsys.readouterr().err
