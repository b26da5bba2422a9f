"""Attacks: robustkd's PGD-k against torchattacks' PGD-k, and the AutoAttack adapter against pyautoattack.

PGD: the same adversarially trained dm_small, the same Fashion-MNIST test points, eps, step size, steps and
seed. The headline compares like with like: ``robustkd.attacks.pgd`` (the flat training-time loop: whole
batch, K steps, last iterate, no early stop) against ``torchattacks.PGD``, which has no early stop either.
Ratio = torchattacks time / ours (target >= 1.0), at equal strength. The evaluation recipe
(``get_attack("pgd20")``: eval mode, early stop on broken points, best-iterate tracking) is timed too and
labelled as such: it is faster only because it stops early on points already broken, which torchattacks'
PGD cannot do; its robust accuracy must not exceed theirs.

AutoAttack: ``robustkd.attacks.autoattack`` against ``pyautoattack.AutoAttack(...).run_standard_evaluation``
with the same model, points and seed. Ratio = adapter time / direct time (the adapter's overhead); the
adversarial points must be the same. The adapter's extra work is a fixed cost per call (input checks, one
forward to count classes, mode and random-state bookkeeping), so it is measured where it weighs most: at eps
0.3, where APGD-CE breaks every point and the later attacks have nothing left to run (about a second of
attack instead of a minute for 32 points at eps 0.1 on this CPU).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.common import (
    accuracy,
    interleaved,
    load_images,
    median,
    ms,
    robust_model,
    round_ratios,
    sample,
    setting,
)
from robustkd.attacks import ThreatModel, autoattack, get_attack, pgd

PGD_TARGET = 1.0  # torchattacks time / robustkd.attacks.pgd time, both without early stop
EPS, STEP, STEPS, SEED = 0.1, 0.01, 20, 0  # the linf-0.1 protocol's step size, PGD-20
AA_EPS = 0.3
BATCH = 128


def _in_batches(fn, x: Tensor, y: Tensor) -> Tensor:
    return torch.cat([fn(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)])


def pgd_vs_torchattacks(model: nn.Module, x: Tensor, y: Tensor, repeats: int, steps: int) -> dict[str, Any]:
    import torchattacks

    threat = ThreatModel("linf", EPS, STEP, steps)
    recipe = get_attack(f"pgd{steps}")
    theirs_attack = torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=steps, random_start=True)

    def ours() -> Tensor:
        generator = torch.Generator().manual_seed(SEED)
        return _in_batches(lambda a, b: recipe.run(model, a, b, threat, generator=generator), x, y)

    def ours_training_loop() -> Tensor:
        generator = torch.Generator().manual_seed(SEED)
        return _in_batches(lambda a, b: pgd(model, a, b, threat, generator=generator), x, y)

    def theirs() -> Tensor:
        torch.manual_seed(SEED)
        return _in_batches(theirs_attack, x, y)

    fns = {"robustkd": ours, "robustkd_pgd": ours_training_loop, "torchattacks": theirs}
    robust = {name: accuracy(model, fn(), y) for name, fn in fns.items()}
    cpu: dict[str, list[float]] = {}
    samples = interleaved(fns, repeats, warmup=1, cpu=cpu)
    speedup_recipe = median(round_ratios(samples["torchattacks"], samples["robustkd"]))
    speedup = median(round_ratios(samples["torchattacks"], samples["robustkd_pgd"]))
    stronger = robust["robustkd_pgd"] <= robust["torchattacks"] and robust["robustkd"] <= robust["torchattacks"]
    return {
        "attack": f"PGD-{steps}, Linf eps {EPS}, step {STEP}, uniform random start, seed {SEED}",
        "points": len(x),
        "clean_accuracy": accuracy(model, x, y),
        "robust_accuracy": robust,
        "time_ms": {name: ms(median(values)) for name, values in samples.items()},
        "cpu_ms": {name: ms(median(values)) for name, values in cpu.items()},
        "speedup": round(speedup, 3),
        "speedup_cpu": round(median(round_ratios(cpu["torchattacks"], cpu["robustkd_pgd"])), 3),
        "speedup_early_stop_recipe": round(speedup_recipe, 3),
        "at_least_as_strong": stronger,
        "target": PGD_TARGET,
        "meets_target": speedup >= PGD_TARGET and stronger,
    }


def autoattack_overhead(model: nn.Module, x: Tensor, y: Tensor, repeats: int) -> dict[str, Any]:
    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.ERROR)  # its progress lines, not the figures

    def adapter() -> Tensor:
        return autoattack(model, x, y, AA_EPS, seed=SEED, batch_size=len(x))

    def direct() -> Tensor:
        model.eval()
        adversary = AutoAttack(model, norm="Linf", eps=AA_EPS, version="standard", device="cpu", seed=SEED)
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv

    same = float((adapter() - direct()).abs().max())
    samples: dict[str, list[float]] = {"adapter": [], "direct": []}
    for _ in range(repeats):
        samples["adapter"].append(sample(adapter, 1))
        samples["direct"].append(sample(direct, 1))
    overhead = median(round_ratios(samples["adapter"], samples["direct"]))
    extra = median([a - d for a, d in zip(samples["adapter"], samples["direct"])])
    return {
        "attack": f"AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square), Linf eps {AA_EPS}, seed {SEED}",
        "points": len(x),
        "robust_accuracy": {"adapter": accuracy(model, adapter(), y), "direct": accuracy(model, direct(), y)},
        "x_adv_max_abs_diff": same,
        "time_ms": {name: ms(median(values)) for name, values in samples.items()},
        "extra_ms": ms(extra),
        "overhead": round(overhead, 3),
    }


def run(quick: bool = False, threads: int = 1, repeats: int | None = None) -> dict[str, Any]:
    repeats = repeats or (1 if quick else 5)
    model, about = robust_model(quick)
    n_pgd, n_aa, steps = (32, 4, 2) if quick else (256, 64, STEPS)
    x, y, source = load_images(max(n_pgd, n_aa), seed=1, split="test")
    results: dict[str, Any] = {
        "benchmark": "attacks",
        "what": "PGD-k without early stop: torchattacks time / robustkd.attacks.pgd time (target >= 1.0 at equal "
        "strength; the early-stopping evaluation recipe reported beside it); "
        "AutoAttack: adapter time / direct pyautoattack time",
        "setting": setting(threads, repeats, model=about, batch=BATCH, data=source, quick=quick),
        "ratios": [],
    }
    try:
        results["pgd"] = pgd_vs_torchattacks(model, x[:n_pgd], y[:n_pgd], repeats, steps)
        results["ratios"].append(
            {
                "name": "attacks/pgd_speedup_vs_torchattacks_same_early_stop",
                "ratio": results["pgd"]["speedup"],
                "target": f">= {PGD_TARGET}",
                "meets": results["pgd"]["meets_target"],
            }
        )
    except ImportError as err:
        results["pgd"] = {"skipped": f"torchattacks is not installed ({err})"}
    try:
        results["autoattack"] = autoattack_overhead(model, x[:n_aa], y[:n_aa], repeats)
        results["ratios"].append(
            {
                "name": "attacks/autoattack_adapter_overhead",
                "ratio": results["autoattack"]["overhead"],
                "target": None,
                "meets": None,
            }
        )
    except ImportError as err:
        results["autoattack"] = {"skipped": f"pyautoattack is not installed ({err})"}
    return results
