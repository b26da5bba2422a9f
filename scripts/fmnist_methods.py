"""Train the Fashion-MNIST PGD-AT teacher, distil it with every method, evaluate, and write the table.

Every row of the table is the output of two commands printed beside it (``robustkd distill`` and
``robustkd evaluate``); this script only runs them (in parallel with ``--jobs``) and collects the JSON.

    python scripts/fmnist_methods.py --out runs/fmnist_table --epochs 5 --train-subset 20000 --jobs 4

``--student vit_tiny --student-args '{...}'`` distils into another architecture than the configs' DM-small.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = ("kd", "kdiga", "advfunmatch", "ard", "rslad", "iad", "adaad")


class RunFailed(RuntimeError):
    pass


def _run(cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RunFailed(f"failed ({done.returncode}): {shlex.join(cmd)}; see {log}")
    return time.perf_counter() - started


def _train(cmd: list[str], run_dir: Path) -> float:
    """Train unless the run has finished before (its results.json exists): a re-run only evaluates."""
    if (run_dir / "results.json").exists():
        return 0.0
    return _run(cmd, run_dir.parent / f"{run_dir.name}.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/fmnist_table", help="folder for the runs")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-subset", type=int, default=None, help="stratified training subset (default: all)")
    parser.add_argument("--attacks", default="clean,pgd20,cw20")
    parser.add_argument("--n-test", type=int, default=None, help="evaluate on the first N test points (default: all)")
    parser.add_argument("--autoattack-n", type=int, default=0, help="also run AutoAttack on the first N test points")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (useful on a GPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--table", default=None, help="write the Markdown table here")
    parser.add_argument("--student", default=None, help="student architecture (default: each config's, dm_small)")
    parser.add_argument("--student-args", default=None, help="its arguments as JSON, e.g. '{\"depth\": 4}'")
    parser.add_argument("--distill-args", default="", help="more flags for every distill command, e.g. optimiser")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "robustkd"]
    common = ["--out_dir", str(out), "--epochs", str(args.epochs), "--device", args.device, "--progress", "false"]
    if args.train_subset:
        common += ["--data.train_subset", str(args.train_subset)]
    teacher_cmd = [*exe, "train", "--config", "configs/fmnist/teacher_pgd_at.yaml", "--name", "teacher", *common]
    print("$", shlex.join(teacher_cmd[2:]), flush=True)
    seconds = {"teacher": _train(teacher_cmd, out / "teacher")}
    teacher = str(out / "teacher" / "best")

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    extra = ["--teacher", teacher, *common]
    extra += ["--model.arch", args.student] if args.student else []
    extra += ["--model.args", args.student_args] if args.student_args else []
    extra += shlex.split(args.distill_args)
    distill = {m: [*exe, "distill", "--config", f"configs/fmnist/{m}.yaml", "--name", m, *extra] for m in methods}

    def evaluate(name: str) -> tuple[list[str], float]:
        cmd = [*exe, "evaluate", "--model", str(out / name / "best"), "--protocol", "linf-0.1"]
        cmd += ["--attacks", args.attacks, "--device", args.device, "--progress", "false"]
        if args.n_test:
            cmd += ["--n_examples", str(args.n_test)]
        cmd += ["--out", str(out / f"{name}_eval.json")]
        took = _run(cmd, out / f"{name}_eval.log")
        if args.autoattack_n:
            aa = [*exe, "evaluate", "--model", str(out / name / "best"), "--protocol", "linf-0.1"]
            aa += ["--attacks", "clean,autoattack", "--n_examples", str(args.autoattack_n), "--device", args.device]
            aa += ["--progress", "false", "--out", str(out / f"{name}_aa.json")]
            took += _run(aa, out / f"{name}_aa.log")
        return cmd, took

    def one(method: str) -> tuple[str, float, float]:
        print("$", shlex.join(distill[method][2:]), flush=True)
        try:
            took = _train(distill[method], out / method)
            _, eval_took = evaluate(method)
        except RunFailed as err:  # one failed method must not lose the others' results
            print(err, flush=True)
            return method, float("nan"), float("nan")
        return method, took, eval_took

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        teacher_eval = pool.submit(evaluate, "teacher")
        results = list(pool.map(one, methods))
        teacher_eval.result()
    for method, took, _ in results:
        seconds[method] = took

    rows = []
    for name in ["teacher", *methods]:
        if not (out / f"{name}_eval.json").exists():
            rows.append({"name": name, "failed": True})
            continue
        data = json.loads((out / f"{name}_eval.json").read_text())
        row = {"name": name, **{k: v["accuracy"] for k, v in data["attacks"].items()}, "n": data["settings"]["n"]}
        if args.autoattack_n:
            aa = json.loads((out / f"{name}_aa.json").read_text())
            row["autoattack"] = aa["attacks"]["autoattack"]["accuracy"]
            row["autoattack_n"] = aa["settings"]["n"]
        row["train_seconds"] = round(seconds.get(name, 0.0), 1)
        rows.append(row)
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    attacks = [a for a in args.attacks.split(",") if a]
    header = ["model", *attacks] + (["autoattack"] if args.autoattack_n else []) + ["train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row.get("failed"):
            lines.append("| " + " | ".join([row["name"]] + ["failed"] * (len(header) - 1)) + " |")
            continue
        cells = [row["name"], *(f"{row[a]:.3f}" for a in attacks)]
        if args.autoattack_n:
            cells.append(f"{row['autoattack']:.3f}")
        cells.append(f"{row['train_seconds']:.0f}" if row["train_seconds"] else "reused")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.table:
        Path(args.table).write_text(table + "\n")


if __name__ == "__main__":
    main()
