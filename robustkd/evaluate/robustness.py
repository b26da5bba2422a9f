"""Robustness evaluation: clean and adversarial accuracy under a protocol, per attack and worst case."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkd.attacks.checks import (
    RobustnessWarning,
    check_deterministic,
    check_output_is_logits,
    check_zero_gradients,
)
from robustkd.attacks.engine import attack_mode, check_unit_range
from robustkd.attacks.recipes import AttackRecipe, get_attack
from robustkd.attacks.threat import ThreatModel
from robustkd.errors import ConfigError, RegistryError
from robustkd.evaluate.progress import (
    ProgressFile,
    fingerprint,
    model_tensors,
    pack_bits,
    pack_generator,
    unpack_bits,
    unpack_generator,
)


def resolve_protocol(protocol: str | ThreatModel) -> tuple[str, ThreatModel]:
    """(name, threat model) for a preset name, a parsed ``linf-<eps>`` name or a ThreatModel."""
    if isinstance(protocol, ThreatModel):
        return "custom", protocol
    if not isinstance(protocol, str):
        raise ConfigError(f"protocol: expected a preset name or a ThreatModel, got {type(protocol).__name__}")
    try:
        return protocol, ThreatModel.preset(protocol)
    except (RegistryError, ConfigError) as err:
        raise ConfigError(f"protocol: {err}") from None


def _resolve_attacks(attacks: Sequence[str]) -> list[AttackRecipe]:
    if isinstance(attacks, str) or not isinstance(attacks, Sequence):
        raise ConfigError(f"attacks: expected a list of attack names, got {attacks!r}")
    if len(attacks) == 0:
        raise ConfigError("attacks: empty; give at least one attack, e.g. ['clean', 'pgd20']")
    recipes = []
    for name in attacks:
        try:
            recipes.append(get_attack(name))
        except (RegistryError, ConfigError) as err:
            raise ConfigError(f"attacks: {err}") from None
    names = [r.name for r in recipes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"attacks: {', '.join(duplicates)} listed more than once")
    # Clean accuracy always comes first: adversarial accuracy is only defined on points classified
    # correctly without attack, and only those are attacked.
    clean = [r for r in recipes if r.kind == "clean"] or [get_attack("clean")]
    return clean + [r for r in recipes if r.kind != "clean"]


def _summary(correct: Tensor) -> dict[str, Any]:
    n = int(correct.numel())
    k = int(correct.sum())
    p = k / n
    return {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / n), "correct": k, "total": n}


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def check_data(x: Tensor, y: Tensor) -> None:
    """Images in [0, 1] of shape (N, ...) with N >= 1 integer labels; messages name the field."""
    if not torch.is_tensor(x) or not torch.is_tensor(y):
        raise ConfigError("x, y: expected tensors (images in [0, 1] and integer labels)")
    if x.dim() < 2 or y.dim() != 1:
        raise ConfigError(
            f"x, y: expected x of shape (N, ...) and y of shape (N,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"x, y: length mismatch, {x.shape[0]} inputs but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ConfigError("x: empty input, nothing to evaluate")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ConfigError(f"y: expected integer class labels, got dtype {y.dtype}")
    check_unit_range(x, "x")


def evaluate_robustness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    protocol: str | ThreatModel = "linf-0.1",
    attacks: Sequence[str] = ("clean", "pgd20", "cw20"),
    batch_size: int = 256,
    restarts: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    cumulative: bool = False,
    dataset_size: int | None = None,
    checks: bool = True,
    progress_file: str | Path | None = None,
    save_every: int = 1,
) -> dict[str, Any]:
    """Accuracy of ``model`` on (x, y) without attack and under each attack of a protocol.

    Every attack runs in eval mode on the points the model classifies correctly without attack (the
    others count as broken), so each attack's accuracy stands on its own; with ``cumulative=True`` an
    attack only runs on points that survived all earlier ones (cheaper, AutoAttack's way; each number
    is then "accuracy after this attack"). ``worst_case`` counts a point only if it survives every attack.

    ``restarts`` overrides the protocol's restarts for the gradient attacks (None keeps them).
    ``dataset_size``: size of the split x was drawn from, to record whether this is a subset.
    ``checks``: run AutoAttack-style sanity checks on the first batch (probability outputs, randomness,
    zero gradients); they emit :class:`RobustnessWarning`s, which are also listed under ``"warnings"``.
    Deterministic given ``seed``: every attack draws its random starts from a CPU generator seeded with it.

    ``progress_file``: where to save per-example progress (results so far and the generator's state)
    atomically every ``save_every`` batches. A run killed part-way and started again with the same
    settings, weights and data continues from that file and gives the same result as an uninterrupted
    one; a file saved for anything else is ignored. The caller removes it once the result is kept.

    Returns a JSON-able dict with ``settings``, ``attacks`` (per attack: accuracy, binomial stderr,
    correct, total), ``worst_case``, ``per_example`` (correct per attack, first attack that broke each
    point), ``warnings`` and ``timing`` (seconds; the only non-deterministic entry).
    """
    protocol_name, threat = resolve_protocol(protocol)
    if restarts is not None:
        threat = threat.replace(restarts=restarts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed: expected an integer, got {seed!r}")
    check_data(x, y)
    recipes = _resolve_attacks(attacks)
    if dataset_size is not None and (not isinstance(dataset_size, int) or dataset_size < x.shape[0]):
        raise ConfigError(f"dataset_size: must be an integer >= the {x.shape[0]} points given, got {dataset_size!r}")
    model_device = _model_device(model)
    run_device = torch.device(device) if device is not None else (model_device or x.device)
    if model_device is not None and model_device.type != run_device.type:
        raise ConfigError(f"device: the model is on {model_device} but device={run_device}; move the model first")
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
        raise ConfigError(f"save_every: must be an integer >= 1, got {save_every!r}")

    n = x.shape[0]
    y = y.long()
    names = [r.name for r in recipes]
    settings = {
        "protocol": protocol_name,
        "threat": threat.to_dict(),
        "attacks": names,
        "seed": seed,
        "batch_size": batch_size,
        "cumulative": cumulative,
        "device": run_device.type,  # kernels, and so borderline results, differ between devices
    }
    saved = _open_progress(progress_file, settings, model, x, y)
    correct: dict[str, Tensor] = {}
    timing: dict[str, float] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attack_mode(model, None, "eval"):
            if checks:
                _run_checks(model, x[:batch_size].to(run_device), y[:batch_size].to(run_device))
            resumed = _restore(saved, names, n, correct, timing)
            with _progress(progress) as bar:
                for recipe in recipes:
                    if recipe.name in correct:  # finished before the interruption
                        continue
                    start = time.perf_counter()
                    if recipe.kind == "clean":
                        todo = torch.arange(n)
                    else:
                        alive = correct["clean"].clone()
                        if cumulative:
                            for seen in correct.values():
                                alive &= seen
                        todo = alive.nonzero().flatten()
                    result = torch.zeros(n, dtype=torch.bool)
                    generator = torch.Generator().manual_seed(seed)
                    first, before = 0, 0.0
                    if resumed is not None and resumed["name"] == recipe.name:
                        result, first, before = resumed["result"], resumed["begin"], resumed["elapsed"]
                        generator.set_state(resumed["generator"])
                    task = None
                    if bar is not None:
                        task = bar.add_task(recipe.name, total=int(todo.numel()), completed=first)
                    for count, begin in enumerate(range(first, todo.numel(), batch_size), 1):
                        idx = todo[begin : begin + batch_size]
                        xb = x[idx.to(x.device)].to(run_device)
                        yb = y[idx.to(y.device)].to(run_device)
                        x_adv = recipe.run(model, xb, yb, threat, generator=generator, seed=seed, batch_size=batch_size)
                        with torch.no_grad():
                            result[idx] = (model(x_adv).argmax(dim=-1) == yb).cpu()
                        if bar is not None:
                            bar.advance(task, idx.numel())
                        if count % save_every == 0 and begin + batch_size < todo.numel():
                            current = {
                                "name": recipe.name,
                                "begin": begin + batch_size,
                                "result": pack_bits(result),
                                "generator": pack_generator(generator),
                                "elapsed": before + time.perf_counter() - start,
                            }
                            _save(saved, correct, timing, caught, current)
                    correct[recipe.name] = result
                    timing[recipe.name] = before + time.perf_counter() - start
                    _save(saved, correct, timing, caught, None)
    for w in caught:  # let the caller see every warning too, not only the report
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    recorded = _recorded(saved.state.get("warnings", []), caught)

    worst = torch.ones(n, dtype=torch.bool)
    for name in names:
        worst &= correct[name]
    first_broken: list[str | None] = [None] * n
    for name in reversed(names):  # the earliest attack that broke a point wins
        for i in (~correct[name]).nonzero().flatten().tolist():
            first_broken[i] = name
    return {
        "settings": {
            "protocol": protocol_name,
            "norm": threat.norm,
            "eps": threat.eps,
            "step_size": threat.step_size,
            "steps": threat.steps,
            "restarts": threat.restarts,
            "random_start": threat.random_start,
            "seed": seed,
            "n": n,
            "dataset_size": dataset_size,
            "subset": None if dataset_size is None else n < dataset_size,
            "batch_size": batch_size,
            "attacks": names,
            "attack_settings": {r.name: r.settings(threat) for r in recipes},
            "cumulative": cumulative,
            "device": str(run_device),
        },
        "attacks": {name: _summary(correct[name]) for name in names},
        "worst_case": _summary(worst),
        "per_example": {
            "correct": {name: correct[name].tolist() for name in names},
            "first_broken_by": first_broken,
        },
        "warnings": recorded,
        "timing": timing,
    }


def _open_progress(
    path: str | Path | None, settings: dict[str, Any], model: nn.Module, x: Tensor, y: Tensor
) -> ProgressFile:
    if path is None:
        return ProgressFile(None, "")
    key = fingerprint({"what": "robustness", **settings}, [*model_tensors("model", model), ("x", x), ("y", y)])
    return ProgressFile(path, key)


def _restore(
    saved: ProgressFile, names: list[str], n: int, correct: dict[str, Tensor], timing: dict[str, float]
) -> dict[str, Any] | None:
    """Fill ``correct``/``timing`` with finished attacks; return the interrupted one's state, if any."""
    state = saved.state
    if not state:
        return None
    try:
        done = {k: unpack_bits(state["done"][k], n) for k in names if k in state["done"]}
        times = {k: float(state["timing"][k]) for k in done}
        current = state.get("current")
        if current is not None:
            generator = torch.Generator()
            unpack_generator(generator, current["generator"])
            current = {
                "name": str(current["name"]),
                "begin": int(current["begin"]),
                "result": unpack_bits(current["result"], n),
                "generator": generator.get_state(),
                "elapsed": float(current["elapsed"]),
            }
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        warnings.warn(f"ignoring {saved.path}: its contents are damaged ({err}); starting over", stacklevel=3)
        saved.discard()
        return None
    correct.update(done)
    timing.update(times)
    return current


def _recorded(before: list[dict[str, str]], caught: list[warnings.WarningMessage]) -> list[dict[str, str]]:
    recorded = [dict(e) for e in before if isinstance(e, dict)]
    for w in caught:
        entry = {"category": w.category.__name__, "message": str(w.message)}
        if issubclass(w.category, RobustnessWarning) and entry not in recorded:
            recorded.append(entry)
    return recorded


def _save(
    saved: ProgressFile,
    correct: dict[str, Tensor],
    timing: dict[str, float],
    caught: list[warnings.WarningMessage],
    current: dict[str, Any] | None,
) -> None:
    if saved.path is None:
        return
    state = {
        "done": {k: pack_bits(v) for k, v in correct.items()},
        "timing": dict(timing),
        "current": current,
        "warnings": _recorded(saved.state.get("warnings", []), caught),
    }
    saved.save(state)


def _run_checks(model: nn.Module, x: Tensor, y: Tensor) -> None:
    with torch.no_grad():
        logits = model(x)
    check_output_is_logits(logits)
    check_deterministic(model, x)
    check_zero_gradients(model, x, y)


class _NoBar:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(enabled: bool):
    if not enabled:
        return _NoBar()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # stderr, so JSON written to stdout stays clean.
    return Progress(
        TextColumn("{task.description:>16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
