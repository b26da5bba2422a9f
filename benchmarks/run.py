"""Run the benchmarks: ``python -m benchmarks.run [--quick] [--only NAME ...] [--out FILE] [--threads N] [--device D]
[--arch ROLE=ARCH,...] [--dataset-shape C,H,W]``.

Each benchmark prints its JSON as it finishes; the last object printed lists every ratio of the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import allocator, attacks, bounds, cifar, common, depthwise, layout, methods, reference, teacher_cache
from robustkd.errors import RobustKDError

BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "methods": methods.run,
    "attacks": attacks.run,
    "bounds": bounds.run,
    "reference": reference.run,
    "depthwise": depthwise.run,
    "cifar": cifar.run,
    "teacher_cache": teacher_cache.run,
    "layout": layout.run,
    "allocator": allocator.run,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks that everything runs")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), help="run only this part (repeatable)")
    parser.add_argument("--out", type=Path, help="also write the JSON of the whole run to this file")
    parser.add_argument("--repeats", type=int, help="timed rounds per figure (default: each benchmark's own)")
    # One thread by default: on a small shared machine two threads per op stall whenever another process
    # holds a core, and the two sides of a ratio would see different stalls.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N; timers wait for the device")
    parser.add_argument("--arch", help="models by role, e.g. student=resnet18,teacher=wrn_34_10 (methods, reference)")
    parser.add_argument("--dataset-shape", help="input C,H,W, e.g. 3,32,32 (synthetic data unless 1,28,28)")
    args = parser.parse_args(argv)
    try:
        common.use_device(args.device)
        common.use_shape(args.dataset_shape or ",".join(map(str, common.FASHION_MNIST)))
        common.ARCH.clear()
        if args.arch:
            common.use_arch(args.arch)
    except (ValueError, RobustKDError) as err:
        parser.error(str(err))

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = []
    for name in args.only or list(BENCHMARKS):
        begun = time.perf_counter()
        result = BENCHMARKS[name](quick=args.quick, threads=args.threads, repeats=args.repeats)
        result["seconds"] = round(time.perf_counter() - begun, 1)
        results.append(result)
        print(json.dumps(result, indent=2), flush=True)
    run = {
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": round(time.perf_counter() - started, 1),
        "ratios": [ratio for result in results for ratio in result["ratios"]],
    }
    print(json.dumps(run, indent=2), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"run": run, "benchmarks": results}, indent=2) + "\n")
    return {"run": run, "benchmarks": results}


if __name__ == "__main__":
    main()
