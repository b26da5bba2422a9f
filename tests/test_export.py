"""robustkd export: ONNX round trip, the check against PyTorch and the teacher, the record the report reads."""

from __future__ import annotations

import json
import shutil
import stat
import warnings

import numpy as np
import pytest
import torch
from conftest import fmnist_meta, fmnist_model

pytest.importorskip("onnxruntime", reason="export needs onnx and onnxruntime (requirements/dev.txt)")

from robustkd import export
from robustkd.checkpoint import load_model, save_checkpoint
from robustkd.cli import main
from robustkd.errors import CheckpointError, ConfigError
from robustkd.evaluate import evaluate_faithfulness
from robustkd.export import calibration_metrics
from robustkd.io import FILE_MODE
from robustkd.jobs import export_onnx, load_test_points

META = fmnist_meta("small_cnn", {"width": 2, "hidden": 8})
N = 40


def _tiny(num_classes: int = 10) -> torch.nn.Module:
    return fmnist_model("small_cnn", num_classes, width=2, hidden=8)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(1)
    save_checkpoint(root / "teacher" / "best", _tiny(), {**META, "method": "standard"})
    config = {"teacher": str(root / "teacher" / "best"), "teacher_arch": None}
    save_checkpoint(root / "kd" / "best", _tiny(), {**META, "method": "kd", "config": config})
    return root


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "student.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_onnx(
            ckpts / "kd" / "best", out, teacher=ckpts / "teacher" / "best", n_examples=N, batch_size=16,
            exporter="legacy", progress=False,
        )  # fmt: skip
    return result, out, caught


def test_onnx_matches_pytorch_on_the_test_points(ckpts, exported):
    import onnxruntime as ort

    result, out, _ = exported
    x, _, _, _ = load_test_points(META, N)
    with torch.no_grad():
        ref = load_model(ckpts / "kd" / "best")(x).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    got = np.concatenate([session.run(None, {"input": x[i : i + 7].numpy()})[0] for i in range(0, N, 7)])
    assert got.shape == (N, 10)  # batches of 7 (and a last one of 5): the batch axis is dynamic
    assert result["max_logit_diff"] == pytest.approx(float(np.abs(ref - got).max()), abs=1e-7)
    assert result["max_logit_diff"] <= 1e-4 and result["agreement"] == 1.0 and result["disagreeing_points"] == 0
    assert result["exporter"] == "legacy" and result["opset"] == 17
    assert result["data"]["n"] == N and result["subset"] is True and result["passed"] is True


def test_calibration_against_the_teacher_is_the_faithfulness_evaluation(ckpts, exported):
    result, _, _ = exported
    x, y, _, _ = load_test_points(META, N)
    teacher, student = load_model(ckpts / "teacher" / "best"), load_model(ckpts / "kd" / "best")
    direct = evaluate_faithfulness(teacher, student, x, y, eps=0.0, batch_size=16, progress=False, checks=False)
    metrics = calibration_metrics(direct)
    cal = result["calibration"]
    assert cal["unchanged"] is True and cal["mismatched_keys"] == [] and cal["max_abs_difference"] <= 1e-4
    assert cal["torch"] == {k: metrics[k] for k in cal["torch"]}
    assert cal["torch"]["clean.agreement.rate"] == direct["clean"]["agreement"]["rate"]
    assert cal["onnx"]["clean.agreement.rate"] == cal["torch"]["clean.agreement.rate"]
    assert cal["onnx"]["eps=0.teacher_correct.gap_clean.q90"] == pytest.approx(
        cal["torch"]["eps=0.teacher_correct.gap_clean.q90"], abs=1e-6
    )


def test_records_beside_the_onnx_and_in_the_run_dir(ckpts, exported):
    result, out, caught = exported
    beside = json.loads(out.with_name("student.export.json").read_text())
    in_run = json.loads((ckpts / "kd" / "export_best.json").read_text())
    expected = {k: v for k, v in result.items() if k != "outputs"}
    assert beside == in_run == json.loads(json.dumps(expected))
    assert beside["weights_sha256"] == json.loads((ckpts / "kd" / "best.json").read_text())["weights_sha256"]
    # The exporters' deprecation notices are recorded, not printed.
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning | FutureWarning)]


def test_the_report_reads_the_record(ckpts, exported):
    from robustkd.report import collect, render

    _, students = collect.find_models([ckpts / "kd"])
    record = collect.export_record(students[0])
    assert record is not None and record["passed"] is True
    assert render._export_cell(record) == f"ok (agree 1.0000, max |Δ| {record['max_logit_diff']:.1e})"
    students[0].sha256 = "0" * 64  # other weights than the exported ones: the record no longer applies
    assert collect.export_record(students[0]) is None


def test_a_mismatch_fails_the_check(ckpts, tmp_path, monkeypatch):
    forward = export.OnnxModule.forward

    def shifted(self, x):
        logits = forward(self, x)
        logits[:, 0] += 100.0  # the "exported" model now always says class 0
        return logits

    monkeypatch.setattr(export.OnnxModule, "forward", shifted)
    shutil.copytree(ckpts / "kd", tmp_path / "kd")  # its own run dir: the shared one keeps the good record
    result = export_onnx(
        tmp_path / "kd" / "best", tmp_path / "bad.onnx", teacher=ckpts / "teacher" / "best", n_examples=N,
        exporter="legacy", progress=False,
    )  # fmt: skip
    assert result["passed"] is False and result["max_logit_diff"] >= 99
    assert result["agreement"] < 1 and result["calibration"]["unchanged"] is False


def test_cli_export(ckpts, tmp_path, capsys):
    shutil.copytree(ckpts / "kd", tmp_path / "kd")
    argv = ["export", str(tmp_path / "kd" / "best"), "--onnx", str(tmp_path / "s.onnx"), "--test-subset", "16"]
    assert main([*argv, "--exporter", "legacy", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "same class on 1.0000" in out and "check passed" in out
    assert json.loads((tmp_path / "s.export.json").read_text())["calibration"] is None
    assert json.loads((tmp_path / "kd" / "export_best.json").read_text())["passed"] is True


def test_bad_inputs_name_the_fix(ckpts, tmp_path, capsys):
    student = ckpts / "kd" / "best"
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        export_onnx(tmp_path / "missing", tmp_path / "s.onnx")
    with pytest.raises(ConfigError, match=r"^onnx: the output must end in \.onnx"):
        export_onnx(student, tmp_path / "s.txt")
    with pytest.raises(ConfigError, match="^onnx: .* is a folder"):
        export_onnx(student, tmp_path)
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ConfigError, match="^onnx: .* is a folder"):
        export_onnx(student, tmp_path / "dir.onnx")
    with pytest.raises(ConfigError, match="^exporter: choose from auto, dynamo, legacy"):
        export_onnx(student, tmp_path / "s.onnx", exporter="tracing")
    with pytest.raises(ConfigError, match="^n_examples: must be"):
        export_onnx(student, tmp_path / "s.onnx", n_examples=0, exporter="legacy")
    save_checkpoint(tmp_path / "five" / "best", _tiny(5), {**META, "num_classes": 5})
    with pytest.raises(ConfigError, match=r"^teacher: teacher and student differ in classes \(5 vs 10\)"):
        export_onnx(student, tmp_path / "s.onnx", teacher=tmp_path / "five" / "best", exporter="legacy")
    assert main(["export", str(student), "--onnx", str(tmp_path / "s.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must end in .onnx" in err and "Traceback" not in err


@pytest.mark.slow
def test_dynamo_exporter_round_trip(ckpts, tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    result = export_onnx(
        ckpts / "kd" / "best", tmp_path / "d.onnx", teacher=ckpts / "teacher" / "best", n_examples=N,
        batch_size=16, exporter="auto", progress=False,
    )  # fmt: skip
    assert result["exporter"] == "dynamo" and result["opset"] == 18
    assert result["passed"] is True and result["agreement"] == 1.0 and result["max_logit_diff"] <= 1e-4
    assert result["calibration"]["unchanged"] is True


def test_export_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: robustkd export" in out and "examples:" in out and "--teacher" in out


def test_auto_falls_back_to_the_legacy_exporter(ckpts, tmp_path, monkeypatch):
    real = export._export_with

    def dynamo_breaks(kind, *args, **kwargs):
        if kind == "dynamo":
            raise RuntimeError("unsupported operator\nlong trace")
        return real(kind, *args, **kwargs)

    monkeypatch.setattr(export, "_has_onnxscript", lambda: True)
    monkeypatch.setattr(export, "_export_with", dynamo_breaks)
    shutil.copytree(ckpts / "kd", tmp_path / "kd")
    with pytest.warns(UserWarning, match="the dynamo exporter failed"):
        result = export_onnx(tmp_path / "kd" / "best", tmp_path / "s.onnx", n_examples=8, progress=False)
    assert result["exporter"] == "legacy" and result["passed"] is True
    assert (
        "the dynamo exporter failed (dynamo: RuntimeError: unsupported operator); trying the legacy exporter"
        in (result["notes"])
    )
    assert not list(tmp_path.glob(".s.onnx.*"))  # no temporary file left behind
    monkeypatch.setattr(export, "_export_with", lambda *args, **kwargs: dynamo_breaks("dynamo"))
    with pytest.raises(
        export.RobustKDError, match="^cannot export small_cnn to ONNX: legacy: RuntimeError: unsupported operator$"
    ):
        export_onnx(tmp_path / "kd" / "best", tmp_path / "t.onnx", n_examples=8, exporter="legacy", progress=False)
    assert not (tmp_path / "t.onnx").exists()


def test_the_onnx_file_is_self_contained_and_leaves_nothing_beside_it(ckpts, tmp_path):
    # The dynamo exporter puts the weights in a side file; it once stayed, hidden, beside the .onnx.
    import onnxruntime as ort

    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    shutil.copytree(ckpts / "kd", tmp_path / "kd")
    out = tmp_path / "out" / "m.onnx"
    for _ in range(2):  # a second export over the first leaves nothing either
        result = export_onnx(tmp_path / "kd" / "best", out, n_examples=8, exporter="dynamo", progress=False)
        assert result["exporter"] == "dynamo" and result["passed"] is True
        assert sorted(p.name for p in out.parent.iterdir()) == ["m.export.json", "m.onnx"]
        assert stat.S_IMODE(out.stat().st_mode) == FILE_MODE
    alone = tmp_path / "elsewhere" / "copy.onnx"
    alone.parent.mkdir()
    shutil.copyfile(out, alone)
    x, _, _, _ = load_test_points(META, 8)
    session = ort.InferenceSession(str(alone), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = load_model(tmp_path / "kd" / "best")(x).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
