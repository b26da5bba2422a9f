"""``robustkd.compare(config)``: the runs (teacher first, then methods × seeds in parallel), statistics, outputs."""

from __future__ import annotations

import platform
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from robustkd.compare.claims import judge, load_claims
from robustkd.compare.config import CompareConfig, Run, load_compare_config
from robustkd.compare.output import claims_overview, write_outputs
from robustkd.compare.runs import execute, run_all
from robustkd.compare.table import leaderboard, matrices
from robustkd.errors import ConfigError


def _task(cfg: CompareConfig, run: Run, teacher: str | None) -> dict[str, Any]:
    return {
        "label": run.label,
        "seed": run.seed,
        "role": run.role,
        "config": run.config,
        "exceptions": run.exceptions,
        "key": run.key(),
        "run_dir": str(cfg.out / "runs" / run.folder),
        "teacher": teacher if run.role == "student" else None,
        "evaluation": cfg.evaluation.key(),
        "device": cfg.device,
    }


def _teacher_task(cfg: CompareConfig) -> dict[str, Any] | None:
    """The teacher's own row: trained by the comparison, or a given checkpoint only evaluated."""
    if cfg.teacher is not None:
        return _task(cfg, cfg.teacher, None)
    if cfg.teacher_checkpoint is None:
        return None
    if not Path(str(cfg.teacher_checkpoint) + ".safetensors").exists() and not cfg.teacher_checkpoint.exists():
        raise ConfigError(f"teacher.checkpoint: {cfg.teacher_checkpoint} not found; train it or fix the path")
    run = Run(cfg.teacher_label, 0, {"checkpoint": str(cfg.teacher_checkpoint)}, role="teacher")
    return {**_task(cfg, run, None), "checkpoint": str(cfg.teacher_checkpoint)}


def _line(total: int, show: bool) -> Callable[[dict[str, Any]], None]:
    done = [0]

    def report(record: dict[str, Any]) -> None:
        done[0] += 1
        if not show:
            return
        metrics = record["metrics"]
        shown = [f"{m} {metrics[m].count('1') / len(metrics[m]):.3f}" for m in ("clean", "robust") if m in metrics]
        print(f"[{done[0]}/{total}] {record['label']} seed {record['seed']}: {record['done']} "
              f"in {record['seconds']:.1f} s; {' '.join(shown)}", flush=True)  # fmt: skip

    return report


def command_line(source: str, workers: int, out: str | Path | None, device: str | None) -> str:
    """The command that makes this comparison again, as written beside its outputs."""
    parts = ["robustkd", "compare", "--config", source]
    parts += ["--device", device] if device is not None else []
    parts += ["--workers", str(workers)] if workers > 1 else []
    parts += ["--out", str(out)] if out is not None else []
    return shlex.join(parts)


def compare(
    config: str | Path | dict[str, Any],
    *,
    workers: int = 1,
    out: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    source: str | None = None,
) -> Path:
    """Run a comparison (a YAML file or its mapping) and write its leaderboard and claim verdicts.

    Finished runs are reused and killed ones resume, so running it again is cheap. ``source`` names a mapping's
    file in messages and in the command written beside the outputs. Returns the folder of the
    outputs (``leaderboard.md/.html/.json``, ``claims.md``, ``pareto.png``, ``results_fragment.md``).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers: must be an integer >= 1, got {workers!r}")
    cfg = load_compare_config(config, out=str(out) if out is not None else None, device=device, source=source)
    claims = load_claims(cfg.claims) if cfg.claims else []
    cfg.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    teacher_task = _teacher_task(cfg)
    total = len(cfg.runs) + (teacher_task is not None)
    report = _line(total, progress)
    records = []
    teacher_path = None
    if teacher_task is not None:
        records.append(execute(teacher_task))
        report(records[-1])
        teacher_path = str(Path(teacher_task["run_dir"]) / "best") if cfg.teacher else str(cfg.teacher_checkpoint)
    tasks = [_task(cfg, run, teacher_path) for run in cfg.runs]
    records += run_all(tasks, workers, report)
    summary = _summary(cfg, records, claims, command_line(cfg.source, workers, out, device))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["outputs"] = write_outputs(cfg.out, summary)
    if progress:
        print(f"compare: {summary['outputs']['md']} (also .html, .json); {summary['seconds']:.0f} s", flush=True)
    return cfg.out


def collect_claims(folders: list[str | Path]) -> str:
    """The claims table across finished comparisons (their output folders, in this order), as Markdown."""
    import json

    if not folders:
        raise ConfigError("claims: name at least one comparison folder (the OUT of robustkd compare)")
    summaries = []
    for folder in folders:
        path = Path(folder) / "leaderboard.json"
        try:
            summary = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{folder}: no leaderboard.json; run robustkd compare for it first") from None
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: unreadable ({err}); run robustkd compare for it again") from None
        if not isinstance(summary, dict) or not isinstance(summary.get("claims"), list) or "name" not in summary:
            raise ConfigError(f"{path}: not a robustkd compare leaderboard; run robustkd compare for it again")
        summaries.append(summary)
    return claims_overview(summaries)


def machine(device: str) -> str:
    """Where the runs ran, for the record: the device, and the GPU's name or the CPU's core count; torch's version."""
    import os

    import torch

    from robustkd.runtime import resolve_device

    dev = resolve_device(device)
    what = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{os.cpu_count()} CPU cores"
    return f"{dev.type} ({what}, {platform.machine()}, torch {torch.__version__})"


def _summary(cfg: CompareConfig, records: list[dict[str, Any]], claims: list[dict[str, Any]], command: str) -> dict:
    ev = cfg.evaluation
    board = leaderboard(records, cfg.labels, confidence=ev.confidence, n_boot=ev.bootstrap, seed=ev.seed)
    verdicts = judge(claims, matrices(records), alpha=1 - ev.confidence, n_boot=ev.bootstrap, seed=ev.seed)
    return {
        "name": cfg.name,
        "command": command,
        "seeds": cfg.seeds,
        "protocol": cfg.protocol,
        "evaluation": asdict(ev),
        "device": machine(cfg.device),
        "leaderboard": board,
        "claims": verdicts,
        "runs": [{k: v for k, v in r.items() if k != "metrics"} for r in records],
    }
