"""The GPU command (`make bench-gpu`, `python -m benchmarks.gpu`): its CPU dry run, and its refusal without CUDA."""

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

from benchmarks import common, gpu  # noqa: E402


def test_dry_run_times_every_variant_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    result = gpu.main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert json.loads(capsys.readouterr().out) == result
    assert result["tests"] == {"skipped": "--dry-run"}
    assert result["setting"]["device"] == "cpu" and result["setting"]["dry_run"] is True
    assert [row["name"] for row in result["rows"]] == [v[0] for v in gpu.VARIANTS]
    for row, variant in zip(result["rows"], gpu.VARIANTS, strict=True):
        assert row["fast_path"] == variant[3] and row["channels_last"] == variant[5]
        assert row["graph_replayed"] is False and row["bf16"] is False  # CPU: eager loop, no bf16 autocast
        assert row["step_ms"] > 0 and row["epoch_s"] == pytest.approx(row["step_ms"] / 1e3 * 50_000 / 4, rel=1e-2)
    names = {r["name"] for r in result["ratios"]}
    assert "gpu/graph_bf16_channels_last_speedup_over_eager" in names
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in result["ratios"])
    assert common.DEVICE.type == "cpu"  # the run's device is put back


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_full_run_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu.main([])
    assert exit_info.value.code == 2
    assert "no CUDA device here" in capsys.readouterr().err


def test_make_target_runs_the_gpu_command():
    makefile = (ROOT / "Makefile").read_text()
    assert "bench-gpu: setup\n\t$(PY) -m benchmarks.gpu\n" in makefile
    assert "bench-gpu" in makefile.split(".PHONY:")[1].splitlines()[0]
