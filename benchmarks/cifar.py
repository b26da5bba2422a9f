"""The reference comparison on CIFAR-10-shaped data: a ResNet-18 student and a WRN-34-10 teacher.

The same three loops as ``benchmarks/reference.py`` (robustkd's step, the hand-written loop, the papers'
loop structure where there is one) for ARD, RSLAD and AdvFunMatch, on synthetic 3x32x32 batches (timings do
not depend on pixel values). On a CPU the size is tiny (batch 2, one attack step: a WRN-34-10 pass costs
about 6 GFLOP an image); with ``--device cuda`` it runs the real size (batch 128, 10 steps).
"""

from __future__ import annotations

from typing import Any

from benchmarks import common, reference

SHAPE = (3, 32, 32)
STUDENT, TEACHER = "resnet18", "wrn_34_10"


def run(quick: bool = False, threads: int = 1, repeats: int | None = None) -> dict[str, Any]:
    cuda = common.DEVICE.type == "cuda"
    student, teacher = ("dm_small", "dm_small") if quick else (STUDENT, TEACHER)  # quick: checks that it runs
    batch, steps = (128, None) if cuda and not quick else (2, 1)
    repeats = repeats or (1 if quick else 3)
    with common.models_of(SHAPE, student=student, teacher=teacher):
        x, y, source = common.load_images(batch, seed=0)
        rows = [reference.compare(name, x, y, repeats, steps) for name in reference.LOOPS]
        about = common.setting(
            threads,
            repeats,
            model={"student": student, "teacher": teacher},
            batch=batch,
            attack_steps=steps or "method default (10)",
            data=source,
            quick=quick,
        )
    return {
        "benchmark": "cifar",
        "what": "CIFAR-10 shapes, ResNet-18 student / WRN-34-10 teacher: robustkd step time / hand-written loop "
        "(target <= 1.0); paper-style loop / robustkd, labelled",
        "setting": about,
        "rows": rows,
        "ratios": [
            {
                "name": f"cifar/{row['method']}_over_handwritten",
                "ratio": row["ours_over_handwritten"],
                "target": f"<= {reference.TARGET}",
                "meets": row["ours_over_handwritten"] <= reference.TARGET,
            }
            for row in rows
        ],
    }
