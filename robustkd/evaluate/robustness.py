"""Robustness evaluation: clean and adversarial accuracy under a protocol, per attack and worst case."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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
from robustkd.evaluate.state import pack_bits, pack_generator, settings_match, unpack_bits, unpack_generator
from robustkd.runtime import progress_bar

SETTINGS_CHANGED = "ignoring the saved progress: it was saved for other settings, weights or data; starting over"


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


def resolve_attacks(attacks: Sequence[str]) -> list[AttackRecipe]:
    """The attack recipes named, checked, the clean pass first; a ConfigError names the field."""
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
    state: dict[str, Any] | None = None,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
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

    Resuming: ``on_batch(state)`` gets a JSON-able state (results so far, the generator's state) every
    ``save_every`` batches and after each attack; given back as ``state`` (same settings, weights, data) it
    continues the run to the same result; other or damaged states are ignored with a warning.

    Returns a JSON-able dict with ``settings``, ``attacks`` (per attack: accuracy, binomial stderr,
    correct, total), ``worst_case``, ``per_example`` (correct per attack, first attack that broke each
    point), ``warnings`` and ``timing`` (seconds; the only non-deterministic entry).
    """
    protocol_name, threat = resolve_protocol(protocol)
    if restarts is not None:
        threat = threat.replace(restarts=restarts)
    run_device = check_run([("model", model)], x, y, batch_size, seed, device, dataset_size, save_every)
    recipes = resolve_attacks(attacks)
    settings = _settings(protocol_name, threat, recipes, seed, batch_size, cumulative, run_device)
    run = _Run(model, x, y.long(), threat, seed, batch_size, run_device, settings, on_batch, save_every)
    with recording_warnings() as caught, attack_mode(model, None, "eval"):
        run.caught = caught
        if checks:
            _run_checks(model, x[:batch_size].to(run_device), y[:batch_size].to(run_device))
        resumed = run.restore(state or {})
        with progress_bar(progress) as bar:
            for recipe in recipes:
                if recipe.name not in run.correct:  # else finished before the interruption
                    run.attack(recipe, cumulative, resumed if _resumes(resumed, recipe) else None, bar)
    return _result(run, protocol_name, recipes, dataset_size, cumulative)


def _settings(
    protocol_name: str,
    threat: ThreatModel,
    recipes: list[AttackRecipe],
    seed: int,
    batch_size: int,
    cumulative: bool,
    run_device: torch.device,
) -> dict[str, Any]:
    """What a saved state must have been made with to be continued."""
    return {
        "protocol": protocol_name,
        "threat": threat.to_dict(),
        "attacks": [r.name for r in recipes],
        "seed": seed,
        "batch_size": batch_size,
        "cumulative": cumulative,
        "device": run_device.type,  # kernels, and so borderline results, differ between devices
    }


@contextmanager
def recording_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning (the result lists the robustness ones), then pass each on to the caller too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def check_run(
    models: Sequence[tuple[str, nn.Module]],
    x: Tensor,
    y: Tensor,
    batch_size: int,
    seed: int,
    device: torch.device | str | None,
    dataset_size: int | None,
    save_every: int,
) -> torch.device:
    """Refuse nonsense before any work; returns the device the attacks run on (by default the first model's).

    ``models`` are (name, model) pairs; the names go into the messages.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed: expected an integer, got {seed!r}")
    check_data(x, y)
    if dataset_size is not None and (
        isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < x.shape[0]
    ):
        raise ConfigError(f"dataset_size: must be an integer >= the {x.shape[0]} points given, got {dataset_size!r}")
    devices = [(name, _model_device(model)) for name, model in models]
    known = [d for _, d in devices if d is not None]
    run_device = torch.device(device) if device is not None else (known[0] if known else x.device)
    for name, model_device in devices:
        if model_device is not None and model_device.type != run_device.type:
            raise ConfigError(f"device: the {name} is on {model_device} but device={run_device}; move it first")
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
        raise ConfigError(f"save_every: must be an integer >= 1, got {save_every!r}")
    return run_device


def _resumes(resumed: dict[str, Any] | None, recipe: AttackRecipe) -> bool:
    return resumed is not None and resumed["name"] == recipe.name


@dataclass
class _Run:
    """One robustness evaluation: the attacks' results so far, and how to hand them out for a resume."""

    model: nn.Module
    x: Tensor
    y: Tensor
    threat: ThreatModel
    seed: int
    batch_size: int
    device: torch.device
    settings: dict[str, Any]
    on_batch: Callable[[dict[str, Any]], None] | None
    save_every: int
    correct: dict[str, Tensor] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    earlier_warnings: list[dict[str, str]] = field(default_factory=list)
    caught: list[warnings.WarningMessage] = field(default_factory=list)

    def restore(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """Take the finished attacks from a saved state; return the interrupted one's, if any."""
        if not state:
            return None
        if not settings_match(state, self.settings):
            warnings.warn(SETTINGS_CHANGED, stacklevel=4)
            return None
        try:
            done, times, current = _unpack_state(state, self.settings["attacks"], self.x.shape[0])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            warnings.warn(f"ignoring the saved progress: its contents are damaged ({err}); starting over", stacklevel=4)
            return None
        self.correct.update(done)
        self.timing.update(times)
        self.earlier_warnings = [dict(e) for e in state.get("warnings", []) if isinstance(e, dict)]
        return current

    def attack(self, recipe: AttackRecipe, cumulative: bool, resumed: dict[str, Any] | None, bar: Any) -> None:
        """Run one attack on the points it concerns, batch by batch, from where a resumed run stopped."""
        start = time.perf_counter()
        todo = self._todo(recipe, cumulative)
        result = torch.zeros(self.x.shape[0], dtype=torch.bool)
        generator = torch.Generator().manual_seed(self.seed)
        first, before = 0, 0.0
        if resumed is not None:
            result, first, before = resumed["result"], resumed["begin"], resumed["elapsed"]
            generator.set_state(resumed["generator"])
        task = None if bar is None else bar.add_task(recipe.name, total=int(todo.numel()), completed=first)
        for count, begin in enumerate(range(first, todo.numel(), self.batch_size), 1):
            idx = todo[begin : begin + self.batch_size]
            result[idx] = self._batch(recipe, idx, generator)
            if bar is not None:
                bar.advance(task, idx.numel())
            if count % self.save_every == 0 and begin + self.batch_size < todo.numel():
                current = {
                    "name": recipe.name,
                    "begin": begin + self.batch_size,
                    "result": pack_bits(result),
                    "generator": pack_generator(generator),
                    "elapsed": before + time.perf_counter() - start,
                }
                self.hand_out(current)
        self.correct[recipe.name] = result
        self.timing[recipe.name] = before + time.perf_counter() - start
        self.hand_out(None)

    def _todo(self, recipe: AttackRecipe, cumulative: bool) -> Tensor:
        if recipe.kind == "clean":
            return torch.arange(self.x.shape[0])
        alive = self.correct["clean"].clone()
        if cumulative:
            for seen in self.correct.values():
                alive &= seen
        return alive.nonzero().flatten()

    def _batch(self, recipe: AttackRecipe, idx: Tensor, generator: torch.Generator) -> Tensor:
        xb = self.x[idx.to(self.x.device)].to(self.device)
        yb = self.y[idx.to(self.y.device)].to(self.device)
        x_adv = recipe.run(
            self.model, xb, yb, self.threat, generator=generator, seed=self.seed, batch_size=self.batch_size
        )
        with torch.no_grad():
            return (self.model(x_adv).argmax(dim=-1) == yb).cpu()

    def recorded(self) -> list[dict[str, str]]:
        return _recorded(self.earlier_warnings, self.caught)

    def hand_out(self, current: dict[str, Any] | None) -> None:
        if self.on_batch is None:
            return
        self.on_batch(
            {
                "settings": self.settings,
                "done": {k: pack_bits(v) for k, v in self.correct.items()},
                "timing": dict(self.timing),
                "current": current,
                "warnings": self.recorded(),
            }
        )


def _unpack_state(
    state: dict[str, Any], names: list[str], n: int
) -> tuple[dict[str, Tensor], dict[str, float], dict[str, Any] | None]:
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
    return done, times, current


def _result(
    run: _Run, protocol_name: str, recipes: list[AttackRecipe], dataset_size: int | None, cumulative: bool
) -> dict[str, Any]:
    n, threat, names, correct = run.x.shape[0], run.threat, run.settings["attacks"], run.correct
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
            "seed": run.seed,
            "n": n,
            "dataset_size": dataset_size,
            "subset": None if dataset_size is None else n < dataset_size,
            "batch_size": run.batch_size,
            "attacks": names,
            "attack_settings": {r.name: r.settings(threat) for r in recipes},
            "cumulative": cumulative,
            "device": str(run.device),
        },
        "attacks": {name: _summary(correct[name]) for name in names},
        "worst_case": _summary(worst),
        "per_example": {
            "correct": {name: correct[name].tolist() for name in names},
            "first_broken_by": first_broken,
        },
        "warnings": run.recorded(),
        "timing": run.timing,
    }


def _recorded(before: list[dict[str, str]], caught: list[warnings.WarningMessage]) -> list[dict[str, str]]:
    recorded = [dict(e) for e in before if isinstance(e, dict)]
    for w in caught:
        entry = {"category": w.category.__name__, "message": str(w.message)}
        if issubclass(w.category, RobustnessWarning) and entry not in recorded:
            recorded.append(entry)
    return recorded


def _run_checks(model: nn.Module, x: Tensor, y: Tensor) -> None:
    with torch.no_grad():
        logits = model(x)
    check_output_is_logits(logits)
    check_deterministic(model, x)
    check_zero_gradients(model, x, y)
