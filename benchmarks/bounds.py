"""Certified bounds: native IBP against auto_LiRPA's IBP, and native CROWN-IBP against native IBP.

Margin bounds (spec C = e_j − e_y for j ≠ y) of the same network over the same box Ball_inf(x, eps) ∩ [0, 1],
under no_grad (certification) and with a backward pass (training). Both sides are handed the same box, computed
once beforehand (native: ``Verifier.bounds``; auto_LiRPA: a ``BoundedTensor`` holding it), so both time the
bounds alone. auto_LiRPA runs on a ``BoundedModule`` built once beforehand (its tracing cost, paid again
whenever the weights change, is reported on its own as ``lirpa_build_ms`` and folded into
``speedup_first_call``). The headline ratio is CPU time (user + system, from the same interleaved samples):
native IBP / auto_LiRPA IBP (target <= 0.8); wall-time speedups are reported beside it. CROWN-IBP time / IBP
time is a cost (no target). The bounds of the two IBP implementations must agree up to float32 rounding.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import nn

from benchmarks.common import interleaved, load_images, make_model, median, ms, round_ratios, setting
from robustkd.certify import get_verifier, input_box, interval_bounds, margin_spec

TARGET = 0.8  # native IBP CPU time / auto_LiRPA IBP CPU time
# The kernels both libraries must run: convolutions and matrix products.
GEMM_OPS = ("aten::mkldnn_convolution", "aten::convolution_overrideable", "aten::addmm", "aten::mm", "aten::bmm")
EPS = 0.1
NETWORKS = ("dm_small", "dm_medium", "small_cnn")
CROWN_NETWORKS = ("dm_small", "dm_medium")  # small_cnn's max-pooled 28x28 maps make CROWN-IBP very slow here


def _lirpa_module(model: nn.Module, x: torch.Tensor) -> tuple[Any, float]:
    from robustkd.certify.lirpa import _BOUND_OPTS, _import_lirpa

    lirpa = _import_lirpa()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript tracing deprecation noise
        bounded = lirpa.BoundedModule(model, x, bound_opts=_BOUND_OPTS, device=x.device)
    return bounded, time.perf_counter() - start


def gemm_share(fn, calls: int = 10) -> float:
    """Share of ``fn``'s self CPU time spent in convolution and matrix-product kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return round(sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / max(total, 1e-9), 3)


def compare(arch: str, x: torch.Tensor, y: torch.Tensor, repeats: int, crown: bool) -> dict[str, Any]:
    from robustkd.certify.lirpa import _import_lirpa

    lirpa = _import_lirpa()
    model = make_model(arch, seed=0).eval()
    C = margin_spec(y, 10, dtype=x.dtype)
    bounded, build_s = _lirpa_module(model, x)
    x_lower, x_upper = input_box(x, EPS)
    ball = lirpa.BoundedTensor(x, lirpa.PerturbationLpNorm(norm=float("inf"), eps=EPS, x_L=x_lower, x_U=x_upper))

    def lirpa_ibp() -> tuple[torch.Tensor, torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bounded.compute_bounds(x=(ball,), C=C, method="IBP")

    def native(method: str = "ibp") -> tuple[torch.Tensor, torch.Tensor]:
        # The same precomputed box auto_LiRPA's BoundedTensor holds: both sides time the bounds alone.
        return get_verifier(method).bounds(model, x_lower, x_upper, C, True, True)

    def no_grad(fn):
        def run() -> None:
            with torch.no_grad():
                fn()

        return run

    def with_backward(fn):
        def run() -> None:
            model.zero_grad(set_to_none=True)
            bounded.zero_grad(set_to_none=True)
            lower, upper = fn()
            (upper.sum() - lower.sum()).backward()

        return run

    with torch.no_grad():
        ours, theirs = native(), lirpa_ibp()
        # The public entry point (which also builds and checks the box) gives the same bounds.
        assert all(torch.equal(a, b) for a, b in zip(ours, interval_bounds(model, x, EPS, C=C)))
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    scale = max(float(t.abs().max()) for t in ours)
    fns = {
        "native_ibp": no_grad(native),
        "lirpa_ibp": no_grad(lirpa_ibp),
        "native_ibp_backward": with_backward(native),
        "lirpa_ibp_backward": with_backward(lirpa_ibp),
    }
    if crown:
        fns["native_crown_ibp"] = no_grad(lambda: native("crown-ibp"))
    cpu: dict[str, list[float]] = {}
    samples = interleaved(fns, repeats, warmup=1, cpu=cpu)
    out: dict[str, Any] = {
        "network": arch,
        "bound_max_abs_diff": diff,
        "bound_max_abs": round(scale, 3),
        "time_ms": {name: ms(median(values)) for name, values in samples.items()},
        "cpu_ms": {name: ms(median(values)) for name, values in cpu.items()},
        "cpu_ratio": round(median(round_ratios(cpu["native_ibp"], cpu["lirpa_ibp"])), 3),
        "cpu_ratio_backward": round(median(round_ratios(cpu["native_ibp_backward"], cpu["lirpa_ibp_backward"])), 3),
        "lirpa_build_ms": ms(build_s),
        "speedup": round(median(round_ratios(samples["lirpa_ibp"], samples["native_ibp"])), 3),
        "speedup_backward": round(
            median(round_ratios(samples["lirpa_ibp_backward"], samples["native_ibp_backward"])), 3
        ),
        # A first call on new weights pays the BoundedModule build as well (robustkd's backend caches it).
        "speedup_first_call": round((build_s + median(samples["lirpa_ibp"])) / median(samples["native_ibp"]), 3),
    }
    # What could still be cut: everything outside the kernels both libraries run (profiled apart from timing).
    out["gemm_share"] = {"native_ibp": gemm_share(fns["native_ibp"]), "lirpa_ibp": gemm_share(fns["lirpa_ibp"])}
    if crown:
        out["crown_ibp_over_ibp"] = round(median(round_ratios(samples["native_crown_ibp"], samples["native_ibp"])), 3)
    return out


def run(quick: bool = False, threads: int = 1, repeats: int | None = None) -> dict[str, Any]:
    repeats = repeats or (1 if quick else 5)
    batch = 8 if quick else 128
    networks = NETWORKS[:1] if quick else NETWORKS
    x, y, source = load_images(batch, seed=1, split="test")
    results: dict[str, Any] = {
        "benchmark": "bounds",
        "what": "native IBP CPU time (user + system) / auto_LiRPA IBP CPU time (target <= 0.8, bounds equal); "
        "native CROWN-IBP time / IBP time",
        "setting": setting(threads, repeats, model=list(networks), batch=batch, eps=EPS, data=source, quick=quick),
        "ratios": [],
    }
    from robustkd.certify.lirpa import lirpa_available

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices raised while auto_LiRPA imports
        usable = lirpa_available()
    if not usable:
        results["skipped"] = "auto_LiRPA 0.3 is not usable here (pip install --no-deps auto_LiRPA==0.3)"
        return results
    rows = [compare(arch, x, y, repeats, crown=arch in CROWN_NETWORKS) for arch in networks]
    results["rows"] = rows
    for row in rows:
        results["ratios"].append(
            {
                "name": f"bounds/ibp_cpu_vs_auto_lirpa/{row['network']}",
                "ratio": row["cpu_ratio"],
                "target": f"<= {TARGET}",
                "meets": row["cpu_ratio"] <= TARGET,
            }
        )
        if "crown_ibp_over_ibp" in row:
            results["ratios"].append(
                {
                    "name": f"bounds/crown_ibp_cost_over_ibp/{row['network']}",
                    "ratio": row["crown_ibp_over_ibp"],
                    "target": None,
                    "meets": None,
                }
            )
    return results
