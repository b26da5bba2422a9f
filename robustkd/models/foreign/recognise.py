"""Recognise a foreign state dict: its format, the robustkd architecture and arguments, its tensors renamed.

Everything is decided from key names and tensor shapes; the expected shapes come from building the model on
the meta device, so nothing is allocated before the file is known to fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from robustkd.errors import CheckpointError, ConfigError
from robustkd.models._factory import model_options, model_shapes
from robustkd.models.foreign.formats import FORMATS, Format, Shapes

# RobustBench's models keep their input normalisation as these buffers, shaped (1, C, 1, 1).
NORMALISATION_KEYS = ("mu", "sigma")


@dataclass(frozen=True)
class Recognised:
    """What a foreign state dict was recognised as, with its tensors in robustkd's naming (without ``net.``)."""

    format: str
    summary: str
    arch: str
    arch_args: dict[str, Any]
    num_classes: int
    in_channels: int
    state: dict[str, torch.Tensor]
    unused: tuple[str, ...] = ()  # keys the source's forward pass never reads, dropped
    mean: tuple[float, ...] | None = None  # from the file's mu/sigma, when it has them
    std: tuple[float, ...] | None = None

    def describe(self) -> str:
        """One line for the user: format, architecture, arguments, classes, dropped tensors, normalisation."""
        text = (
            f"{self.summary} [format {self.format}] -> arch {self.arch} ({_show(self.arch_args)}), "
            f"{self.num_classes} classes, {self.in_channels} input channels"
        )
        if self.unused:
            prefixes = sorted({key.split(".", 1)[0] for key in self.unused})
            text += f"; {len(self.unused)} unused tensors dropped ({', '.join(p + '.*' for p in prefixes)})"
        if self.mean is not None:
            text += f"; mean/std from the file: {list(self.mean)} / {list(self.std or ())}"
        return text


def _show(args: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items()) or "default options"


def list_formats() -> list[str]:
    """The names of the foreign formats robustkd recognises."""
    return FORMATS.names()


def recognise(
    state: Mapping[str, torch.Tensor],
    source: str,
    *,
    arch: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
) -> Recognised:
    """Recognise ``state`` (a plain state dict, wrappers and ``module.`` prefixes already removed).

    With ``arch`` (and ``arch_args``) the recognised layout is checked against that architecture instead of
    the format's own. Raises ``CheckpointError`` (one line naming ``source``) when no format fits, when the
    shapes do not fit the architecture, or when several formats fit (listing them).
    """
    state, mean, std = _split_normalisation(state, source)
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    names = [n for n in FORMATS if _looks_like(FORMATS.get(n), shapes)]
    if not names:
        known = "; ".join(FORMATS.get(n).summary for n in FORMATS)
        raise CheckpointError(
            f"{source}: its {len(shapes)} tensor names ({_few(sorted(shapes), 3)}) match no known checkpoint format "
            f"(known: {known}); load the weights into your own nn.Module and pass it wrapped with robustkd.wrap"
        )
    found, failed = [], []
    for name in names:
        result, problems = _candidate(name, state, shapes, arch, dict(arch_args or {}))
        if result is not None:
            found.append(result)
        else:
            failed.append((name, problems))
    if len(found) > 1:
        listed = "; ".join(f"{r.summary} -> {r.arch} ({_show(r.arch_args)})" for r in found)
        raise CheckpointError(f"{source} fits several formats: {listed}; name one with --arch and --arch_args")
    if not found:
        name, problems = min(failed, key=lambda item: len(item[1]))
        hint = _as_recognised(state, source) if arch is not None or arch_args else ""
        raise CheckpointError(f"{source} looks like a {FORMATS.get(name).summary} checkpoint but {problems[0]}{hint}")
    return dataclasses.replace(found[0], mean=mean, std=std)


def _as_recognised(state: Mapping[str, torch.Tensor], source: str) -> str:
    """What the file is without the caller's architecture, as a hint after a mismatch ("" if nothing fits)."""
    try:
        found = recognise(state, source)
    except CheckpointError:
        return ""
    return f"; without --arch/--arch_args it imports as {found.arch} ({_show(found.arch_args)})"


def _looks_like(fmt: Format, shapes: Shapes) -> bool:
    return all(k in shapes for k in fmt.signature) and not any(k in shapes for k in fmt.excludes)


def _split_normalisation(
    state: Mapping[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], tuple[float, ...] | None, tuple[float, ...] | None]:
    """Take RobustBench's ``mu``/``sigma`` buffers out of the state dict, as per-channel tuples."""
    rest = {k: v for k, v in state.items() if k not in NORMALISATION_KEYS}
    if not any(k in state for k in NORMALISATION_KEYS):
        return rest, None, None
    if not all(k in state for k in NORMALISATION_KEYS):
        raise CheckpointError(f"{source} has only one of the buffers mu and sigma; re-save it with both or neither")
    mu, sigma = state["mu"].double().flatten(), state["sigma"].double().flatten()
    if mu.numel() != sigma.numel() or not torch.isfinite(mu).all() or not (sigma > 0).all():
        raise CheckpointError(
            f"{source}: its mu/sigma buffers are not a valid normalisation ({mu.tolist()}, {sigma.tolist()})"
        )
    return rest, tuple(mu.tolist()), tuple(sigma.tolist())


def _candidate(
    name: str, state: Mapping[str, torch.Tensor], shapes: Shapes, arch: str | None, given: dict[str, Any]
) -> tuple[Recognised | None, list[str]]:
    """The format ``name`` applied to the state dict, or the reasons it does not fit."""
    fmt = FORMATS.get(name)
    try:
        inferred = fmt.infer(shapes)
    except (KeyError, IndexError, ZeroDivisionError) as err:
        return None, [f"its shapes cannot be read ({type(err).__name__}: {err})"]
    num_classes, in_channels = inferred.pop("num_classes"), inferred.pop("in_channels")
    target = arch or fmt.arch
    accepted = model_options(target)  # raises with close matches for an unknown name
    args = {k: v for k, v in {**inferred, **given}.items() if k in accepted}
    pairs = fmt.modules(shapes, args)
    renamed, unused, unmapped = _rename(state, fmt, dict(pairs))
    described = f"{target} ({_show(args)}) with {num_classes} classes"
    try:
        expected = model_shapes(target, num_classes=num_classes, in_channels=in_channels, **args)
    except ConfigError as err:
        return None, [f"it does not describe a valid {described}: {err}"]
    expected = {k[len("net.") :]: v for k, v in expected.items() if k.startswith("net.")}
    for key in expected:  # files from PyTorch < 0.4.1 have no BatchNorm batch counters; eval never reads them
        if key.endswith("num_batches_tracked") and key not in renamed:
            renamed[key] = torch.zeros((), dtype=torch.long)
    problems = _mismatches(expected, renamed, unmapped, {ours: theirs for theirs, ours in pairs})
    if problems:
        return None, [f"does not fit {described}: {'; '.join(problems)}"]
    recognised = Recognised(name, fmt.summary, target, args, num_classes, in_channels, renamed, tuple(unused))
    return recognised, []


def _rename(
    state: Mapping[str, torch.Tensor], fmt: Format, modules: Mapping[str, str]
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(tensors in our naming, unused keys dropped, keys with no counterpart)."""
    renamed, unused, unmapped = {}, [], []
    for key, value in state.items():
        if key.startswith(fmt.unused):
            unused.append(key)
            continue
        module, _, tensor = key.rpartition(".")
        if module in modules:
            renamed[f"{modules[module]}.{tensor}"] = value
        else:
            unmapped.append(key)
    return renamed, unused, unmapped


def _mismatches(
    expected: Shapes, renamed: Mapping[str, torch.Tensor], unmapped: list[str], inverse: Mapping[str, str]
) -> list[str]:
    """Missing, unexpected and wrongly shaped tensors, named as the file names them where it can."""

    def theirs(key: str) -> str:
        module, _, tensor = key.rpartition(".")
        return f"{inverse[module]}.{tensor}" if module in inverse else f"{key} (robustkd's name)"

    missing = sorted(theirs(k) for k in set(expected) - set(renamed))
    unexpected = sorted(unmapped + [theirs(k) for k in renamed if k not in expected])
    shapes = [
        f"{theirs(k)}: file {tuple(renamed[k].shape)} vs model {tuple(shape)}"
        for k, shape in expected.items()
        if k in renamed and tuple(renamed[k].shape) != tuple(shape)
    ]
    problems = []
    for what, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", shapes)):
        if items:
            problems.append(f"{what} {_few(items, 3)}")
    return problems


def _few(items: list[str], n: int) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def formats_of(state: Mapping[str, Any]) -> list[str]:
    """The formats whose identifying keys ``state`` has (it may still not fit them)."""
    shapes = {key: () for key in state}
    return [name for name in FORMATS if _looks_like(FORMATS.get(name), shapes)]
