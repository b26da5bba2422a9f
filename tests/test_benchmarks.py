"""Smoke test of the benchmarks: every part runs at a tiny size and prints well-formed JSON.

No timing is asserted (a shared CI machine cannot promise speed); only structure, finite positive ratios, the
pass counts the hooks see, and the equality checks that make each comparison like-for-like.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder of the repository, not part of the package
    sys.path.insert(0, str(ROOT))

from benchmarks import run as bench  # noqa: E402
from robustkd.methods import METHODS  # noqa: E402

SETTING_KEYS = {"device", "threads", "torch", "repeats", "model", "batch", "quick"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = bench.main(["--quick", "--threads", str(torch.get_num_threads()), "--out", str(out)])
    return result, out


def _by_name(result: dict, name: str) -> dict:
    (found,) = [b for b in result["benchmarks"] if b["benchmark"] == name]
    return found


def test_every_benchmark_reports_its_setting_and_ratios(quick):
    result, out = quick
    assert [b["benchmark"] for b in result["benchmarks"]] == list(bench.BENCHMARKS)
    for b in result["benchmarks"]:
        assert set(b["setting"]) >= SETTING_KEYS, b["benchmark"]
        assert b["setting"]["quick"] is True
        for ratio in b["ratios"]:
            assert ratio["name"].startswith(b["benchmark"] + "/")
            assert math.isfinite(ratio["ratio"]) and ratio["ratio"] > 0, ratio
    assert result["run"]["ratios"] == [r for b in result["benchmarks"] for r in b["ratios"]]
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))


def test_methods_cover_the_registry_with_counted_passes(quick):
    methods = _by_name(quick[0], "methods")
    rows = {row["name"]: row for row in methods["rows"]}
    assert set(rows) == set(METHODS.names())
    for row in rows.values():
        assert row["step_ms"] > 0 and row["passes_ms"] > 0 and row["step_cpu_ms"] > 0
        assert row["passes"].get("student_fwd", 0) >= 1
    # Quick mode runs 2 attack steps: the hooks see 2 attack passes, then the outer forward and backward.
    assert rows["pgd_at"]["passes"] == {"student_fwd": 3, "student_input_grad": 2, "student_bwd": 1}
    assert rows["kdiga"]["passes"]["student_double_bwd"] == 1
    assert rows["ibp"]["passes"]["student_ibp"] == 1
    units = methods["units_ms"]
    assert all(math.isfinite(v) for v in units.values())
    # Parts found by subtraction may dip below zero on a loaded machine; the ones measured whole cannot.
    assert units["student_fwd"] > 0 and units["teacher_fwd"] > 0


def test_comparisons_are_like_for_like(quick):
    result = quick[0]
    attacks = _by_name(result, "attacks")
    if "robust_accuracy" in attacks["pgd"]:
        assert all(0 <= acc <= 1 for acc in attacks["pgd"]["robust_accuracy"].values())
    if "x_adv_max_abs_diff" in attacks["autoattack"]:
        assert attacks["autoattack"]["x_adv_max_abs_diff"] == 0
    bounds = _by_name(result, "bounds")
    for row in bounds.get("rows", []):
        assert row["bound_max_abs_diff"] <= 1e-4 * max(1.0, row["bound_max_abs"])
        assert row["cpu_ms"]["native_ibp"] > 0 and row["cpu_ratio"] > 0
    for part in ("reference", "cifar"):
        rows = {row["method"]: row for row in _by_name(result, part)["rows"]}
        assert set(rows) == {"ard", "rslad", "advfunmatch"}
        for row in rows.values():
            assert all(diff < 1e-4 for diff in row["loss_rel_diff"].values()), row
            assert set(row["time_ms"]) == set(row["cpu_ms"]) == {"ours", *row["loss_rel_diff"]}
        # The papers' loop structure is a labelled extra row where the papers have scripts; never the headline.
        # So is the hand-written loop given robustkd's channels-last teacher.
        loops = {"handwritten", "handwritten_channels_last"}
        assert set(rows["ard"]["loss_rel_diff"]) == set(rows["rslad"]["loss_rel_diff"]) == {*loops, "paper_style"}
        assert set(rows["advfunmatch"]["loss_rel_diff"]) == loops
    # Each side its own process: robustkd's keeps freed memory, the other two run with glibc's defaults.
    (row,) = _by_name(result, "allocator")["rows"]
    assert set(row["time_ms"]) == {"ours", "ours_default_allocator", "handwritten"}
    assert all(v >= 0 for v in row["page_faults_per_step"].values())
    (row,) = _by_name(result, "depthwise")["rows"]
    assert row["grad_max_rel_diff"] < 1e-4, row
    assert row["kdiga_convolution_calls"]["native"] > 2 * row["kdiga_convolution_calls"]["ours"], row


def test_only_runs_one_part(capsys):
    result = bench.main(["--quick", "--only", "bounds", "--threads", str(torch.get_num_threads())])
    assert [b["benchmark"] for b in result["benchmarks"]] == ["bounds"]
    printed = capsys.readouterr().out
    assert '"benchmark": "bounds"' in printed and '"ratios"' in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_missing_device_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--device", "cuda"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "--device cuda: this machine has no CUDA device" in captured.err
    assert captured.out == ""  # no benchmark started


def test_the_device_reaches_models_batches_and_setting():
    from benchmarks import common

    try:
        common.use_device("cpu")
        x, y, _ = common.load_images(4)
        model = common.make_model("dm_small")
        assert x.device == y.device == next(model.parameters()).device == torch.device("cpu")
        assert common.setting(1, 1)["device"] == "cpu"
        with pytest.raises(ValueError, match="only cpu and cuda"):
            common.use_device("meta")
    finally:
        common.use_device("cpu")


def test_models_and_input_shape_are_options(capsys):
    argv = [
        "--quick",
        "--only",
        "reference",
        "--arch",
        "student=dm_small,teacher=dm_small",
        "--dataset-shape",
        "3,32,32",
    ]
    (part,) = bench.main([*argv, "--threads", str(torch.get_num_threads())])["benchmarks"]
    assert part["setting"]["model"] == {"student": "dm_small", "teacher": "dm_small"}
    assert part["setting"]["input"] == [3, 32, 32] and part["setting"]["data"] == "synthetic 3x32x32"
    capsys.readouterr()
    from benchmarks import common

    assert common.INPUT == (3, 32, 32)
    bench.main(["--quick", "--only", "depthwise", "--threads", "1"])  # the next run starts from the defaults
    assert common.INPUT == common.FASHION_MNIST and common.ARCH == {}


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--arch", "student=resnt18"], "resnet18"),  # an unknown architecture names the close match
        (["--arch", "pupil=resnet18"], "unknown role 'pupil'"),
        (["--dataset-shape", "3,32"], "expected C,H,W"),
    ],
)
def test_bad_model_options_are_refused(option, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--only", "bounds", *option])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
