"""Adapter to the reference AutoAttack (PyPI ``pyautoattack``), with robustkd's hygiene around it.

What the adapter adds to the library call:
* the model runs in eval mode with frozen parameters (FAB calls ``.backward()``, which would otherwise
  fill parameter ``.grad``); both are restored afterwards;
* the targeted attacks' target count is lowered for fewer than 10 classes, and attacks that cannot
  run (targeted DLR needs 4 classes, DLR 3) are dropped with a warning;
* the library reseeds torch's global generator; it runs inside ``torch.random.fork_rng`` so the
  caller's random stream is untouched;
* the library reports its checks to the ``auto-attack`` logger (printed text nobody can catch); they
  become :class:`AutoAttackWarning` warnings;
* its dynamic-defence check installs ``sys.settrace(None)``, which would switch off a debugger or
  coverage; the previous trace function is put back.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from robustkd.attacks.checks import AutoAttackWarning
from robustkd.attacks.engine import check_unit_range
from robustkd.attacks.pgd import attack_mode
from robustkd.errors import ConfigError, RobustKDError

VERSIONS = ("standard", "rand")
INSTALL_HINT = "pip install --no-deps pyautoattack==0.2.0"


def _import_autoattack():
    try:
        from pyautoattack import AutoAttack
    except ImportError as err:
        raise RobustKDError(
            f"AutoAttack needs the optional package 'pyautoattack' ({err}). Install it with: {INSTALL_HINT} "
            "(--no-deps: it declares no dependencies robustkd lacks, and must not pull torchvision)"
        ) from None
    return AutoAttack


class _ToWarnings(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        warnings.warn(AutoAttackWarning(f"AutoAttack: {record.getMessage()}"), stacklevel=2)


@contextmanager
def _library_hygiene(device: torch.device) -> Iterator[None]:
    logger = logging.getLogger("auto-attack")
    handler = _ToWarnings(level=logging.WARNING)
    old_propagate, old_trace = logger.propagate, sys.gettrace()
    logger.addHandler(handler)
    logger.propagate = False
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if (device.type == "cuda") else []
    )
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate
        sys.settrace(old_trace)


def _reset_dynamic_check_counter() -> None:
    # pyautoattack's check_dynamic counts calls in a module-level dict that it never resets, so after
    # one hit every later evaluation in the process would warn. Reset it; tolerate its absence.
    try:
        from pyautoattack import checks
    except ImportError:  # pragma: no cover - the import above already succeeded
        return
    counter = getattr(checks, "funcs", None)
    if isinstance(counter, dict):
        for key in counter:
            counter[key] = 0


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for p in model.parameters():
        return p.device
    return fallback


def _plan(version: str, n_classes: int, image: bool) -> tuple[list[str], int, list[str]]:
    """Attacks to run, the target count of the targeted ones, and what was dropped (and why)."""
    targets = min(9, n_classes - 1)
    if version == "standard":
        wanted = ["apgd-ce", "apgd-t", "fab-t", "square"]
        # Targeted DLR ranks the 3rd and 4th largest logits: it needs at least 4 classes.
        dropped = [f"apgd-t (needs 4 classes, the model has {n_classes})"] if n_classes < 4 else []
        if not image:  # Square samples square windows of an image: it needs (C, H, W) inputs
            dropped.append("square (needs (N, C, H, W) image inputs)")
    else:
        wanted = ["apgd-ce", "apgd-dlr"]
        # DLR divides by the gap to the 3rd largest logit.
        dropped = [f"apgd-dlr (needs 3 classes, the model has {n_classes})"] if n_classes < 3 else []
    names = {d.split(" ")[0] for d in dropped}
    return [a for a in wanted if a not in names], targets, dropped


def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    n_classes: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Run AutoAttack (``standard``: APGD-CE, APGD-T, FAB-T, Square; ``rand``: APGD-CE/DLR with EOT).

    Returns x_adv, on the device of ``x``: points the attacks broke are replaced, the others keep x.
    ``n_classes`` is read from one forward when None; ``device`` (where batches run) defaults to the
    model's. Deterministic given ``seed``.
    """
    if version not in VERSIONS:
        raise ConfigError(f"version: expected one of {', '.join(VERSIONS)}, got {version!r}")
    norm_key = {"linf": "Linf", "l2": "L2"}.get(str(norm).lower())
    if norm_key is None:
        raise ConfigError(f"norm: AutoAttack supports linf and l2, got {norm!r}")
    if not (isinstance(eps, int | float) and 0 <= eps < float("inf")):
        raise ConfigError(f"eps: expected a finite number >= 0, got {eps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    check_unit_range(x)
    if y.shape != (x.shape[0],):
        raise ConfigError(f"y: expected labels of shape ({x.shape[0]},), got {tuple(y.shape)}")
    if x.shape[0] == 0 or eps == 0:
        return x.detach().clone()
    AutoAttack = _import_autoattack()
    run_device = torch.device(device) if device is not None else _model_device(model, x.device)

    with attack_mode(model, None, "eval"), _library_hygiene(run_device):
        if n_classes is None:
            with torch.no_grad():
                n_classes = int(model(x[:1].to(run_device)).shape[-1])
        if n_classes < 2:
            raise ConfigError(f"n_classes: need at least 2 classes, got {n_classes}")
        attacks, targets, dropped = _plan(version, n_classes, x.dim() == 4)
        if dropped:
            warnings.warn(
                AutoAttackWarning(f"AutoAttack {version}: left out {'; '.join(dropped)}"),
                stacklevel=2,
            )
        adversary = AutoAttack(model, norm=norm_key, eps=float(eps), version=version, seed=seed, device=run_device)
        adversary.attacks_to_run = attacks
        adversary.apgd_targeted.n_target_classes = targets
        adversary.fab.n_target_classes = targets
        _reset_dynamic_check_counter()
        x_adv, _ = adversary.run_standard_evaluation(x.detach(), y.detach().long(), batch_size=batch_size)
    return x_adv.detach()
