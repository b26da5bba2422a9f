"""``robustkd quickstart``: a small, offline run of the whole pipeline on Fashion-MNIST."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from robustkd.config import from_dict
from robustkd.engine import train


def quickstart_config(out: str | Path) -> dict[str, Any]:
    out = Path(out)
    return {
        "name": out.name or "quickstart",
        "out_dir": str(out.parent),
        "seed": 0,
        "epochs": 2,
        "data": {"dataset": "fashion-mnist", "val_fraction": 0.1, "batch_size": 128},
        "model": {"arch": "small_cnn"},
        "method": {"name": "standard"},
        "optim": {"name": "sgd", "lr": 0.05, "schedule": "cosine"},
    }


def run(out: str | Path = "runs/quickstart", progress: bool = True) -> dict[str, Any]:
    """Train the small CNN on Fashion-MNIST and report its test accuracy."""
    started = time.perf_counter()
    cfg = from_dict(quickstart_config(out))
    cfg.progress = progress
    cfg.resume = (Path(cfg.out_dir) / cfg.name / "resume.safetensors").exists()
    result = train(cfg)
    return {
        "run_dir": str(result.run_dir),
        "test_acc": result.test["acc"],
        "seconds": time.perf_counter() - started,
    }
