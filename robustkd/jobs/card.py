"""``robustkd card``: what a teacher checkpoint is worth, in one JSON file beside it.

Clean, PGD-20 and CW-20 accuracy on the first ``n_examples`` test points, AutoAttack on the first
``n_autoattack`` of them, IBP and CROWN-IBP certified accuracy at the protocol's radius (when the architecture
can be bounded), the parameter count, the measured latency and the weights' SHA-256. Every number comes from
the jobs behind ``robustkd evaluate`` and ``robustkd certify``, whose JSON is kept beside the card as
``<name>.card.<part>.json`` (and resumes when a run is interrupted); the card is ``<name>.card.json``.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkd._version import __version__
from robustkd.attacks.threat import PRESETS, ThreatModel
from robustkd.certify._graph import UnsupportedModelError
from robustkd.checkpoint import FOREIGN_SUFFIXES
from robustkd.errors import CheckpointError, ConfigError, RobustKDError
from robustkd.io import atomic_write_json
from robustkd.jobs.certification import certify_checkpoints
from robustkd.jobs.chain import choose_dataset, load_models, weights_path
from robustkd.jobs.robustness import evaluate_checkpoint
from robustkd.models import count_parameters, is_boundable

CARD_FORMAT = "robustkd-card-v1"
ATTACKS = ("clean", "pgd20", "cw20")
VERIFIERS = ("ibp", "crown-ibp")
# Affordable on two CPU cores for the small models; a WRN-34-10 takes minutes per part on a CPU.
N_EXAMPLES = 200
N_AUTOATTACK = 50
BATCH_SIZE = 128
LATENCY_BATCHES = (1, 128)
LATENCY_REPEATS = 10
LATENCY_WARMUP = 2

# The usual Linf protocol of each dataset (the radius most papers report); the card uses it unless told.
DATASET_PROTOCOLS = {
    "mnist": "linf-0.3",
    "fashion-mnist": "linf-0.1",
    "cifar10": "linf-8/255",
    "cifar100": "linf-8/255",
    "svhn": "linf-8/255",
}


def card_path(checkpoint: str | Path) -> Path:
    """``<dir>/<name>.card.json`` beside the checkpoint's weights."""
    weights = weights_path(checkpoint)
    return weights.with_name(f"{weights.stem}.card.json")


def card_protocol(dataset: str | None, eps: float | str | ThreatModel | None = None) -> tuple[str, ThreatModel]:
    """(protocol name, threat model): ``eps`` as a radius, a preset or ``linf-<eps>`` name; else the dataset's."""
    if eps is None:
        if dataset not in DATASET_PROTOCOLS:
            known = ", ".join(sorted(DATASET_PROTOCOLS))
            raise ConfigError(f"eps: no default protocol for dataset {dataset!r} (known: {known}); pass --eps")
        eps = DATASET_PROTOCOLS[dataset]
    if isinstance(eps, ThreatModel | str):
        threat = ThreatModel.parse(eps, field="eps")
        return (eps if isinstance(eps, str) else threat.name), threat
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps <= 1:
        raise ConfigError(f"eps: must be a radius in (0, 1] or a protocol name such as linf-8/255, got {eps!r}")
    for name in PRESETS.names():  # a preset with this radius brings its attack budget
        if PRESETS.get(name).norm == "linf" and PRESETS.get(name).eps == eps:
            return name, PRESETS.get(name)
    name = ThreatModel("linf", float(eps)).name
    return name, ThreatModel.parse(name, field="eps")


def latency_ms(
    model: nn.Module, input_shape: list[int], batch_size: int, device: torch.device, repeats: int = LATENCY_REPEATS
) -> float:
    """Median wall time of one eval-mode forward of a batch, in milliseconds, after two warm-up passes."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, *input_shape, generator=generator).to(device)
    times = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(repeats + LATENCY_WARMUP):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= LATENCY_WARMUP:
                    times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return 1000 * statistics.median(times)


def measure_latency(model: nn.Module, input_shape: list[int], device: torch.device) -> dict[str, Any]:
    """Latency at batch 1 and 128, with what it was measured on."""
    out: dict[str, Any] = {"device": str(device), "statistic": f"median of {LATENCY_REPEATS} forwards"}
    if device.type == "cpu":
        out["threads"] = torch.get_num_threads()
    for batch in LATENCY_BATCHES:
        out[f"batch_{batch}_ms"] = latency_ms(model, input_shape, batch, device)
    return out


def make_card(
    checkpoint: str | Path,
    *,
    dataset: str | None = None,
    data_root: str | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    n_examples: int | None = N_EXAMPLES,
    n_autoattack: int | None = N_AUTOATTACK,
    eps: float | str | ThreatModel | None = None,
    batch_size: int = BATCH_SIZE,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """The card of a checkpoint: written atomically to ``<dir>/<name>.card.json`` (or ``out``) and returned.

    ``dataset`` overrides the one the checkpoint names; ``eps`` (a radius or a protocol name) the dataset's
    usual protocol (:data:`DATASET_PROTOCOLS`). ``n_examples`` / ``n_autoattack``: the first N test points of
    the attacks and certificates / of AutoAttack (None: all). Parts that cannot run (AutoAttack without its
    package, certificates of an architecture no bound handles) are recorded as skipped, with the reason.
    The JSON of each evaluation stays beside the card (``<card>.<part>.json``, listed under ``sources``).
    """
    if Path(checkpoint).suffix in FOREIGN_SUFFIXES:
        raise CheckpointError(f"{checkpoint}: a bare state dict has no card; import it first with robustkd import")
    models = load_models(checkpoint, device=device or "auto")
    chosen = choose_dataset(models.meta, {}, dataset)
    if not chosen:
        raise ConfigError(f"dataset: {checkpoint} does not name its dataset; pass --dataset")
    protocol, threat = card_protocol(chosen, eps)
    weights = weights_path(checkpoint)
    out = Path(out) if out is not None else card_path(checkpoint)
    part = _Parts(checkpoint, out, chosen, data_root, models.device, progress is not False, batch_size)
    card: dict[str, Any] = {"format": CARD_FORMAT, "checkpoint": str(weights.with_suffix(""))}
    card.update(_identity(models.meta, weights, models.student, chosen))
    card["protocol"] = {"name": protocol, **threat.to_dict()}
    card["robustness"] = part.robustness(protocol, n_examples)
    card["autoattack"] = part.autoattack(protocol, n_autoattack)
    card["certified"] = {m: part.certified(m, threat, n_examples, is_boundable(models.student)) for m in VERIFIERS}
    card["accuracy"] = _accuracies(card)
    card["latency"] = measure_latency(models.student, list(models.meta["input_shape"]), models.device)
    card["sources"] = part.sources
    card["robustkd_version"] = __version__
    atomic_write_json(out, card)
    card["output"] = str(out)
    return card


def _identity(meta: dict[str, Any], weights: Path, model: nn.Module, dataset: str) -> dict[str, Any]:
    sha = meta.get("weights_sha256") or hashlib.sha256(weights.read_bytes()).hexdigest()
    keys = ("arch", "arch_args", "method", "num_classes", "input_shape")
    out = {"weights_sha256": sha, **{k: meta.get(k) for k in keys}, "dataset": dataset}
    out["params"] = count_parameters(model)
    return out


def _accuracies(card: dict[str, Any]) -> dict[str, float | None]:
    """One line of numbers: each attack's accuracy, AutoAttack's and each certificate's (None when skipped)."""
    out = {name: block["accuracy"] for name, block in card["robustness"]["attacks"].items()}
    out["autoattack"] = card["autoattack"].get("accuracy")
    for method, block in card["certified"].items():
        out[f"certified_{method}"] = block.get("accuracy")
    return out


class _Parts:
    """The card's evaluations, each one a job whose JSON lands beside the card."""

    def __init__(
        self,
        checkpoint: str | Path,
        card: Path,
        dataset: str,
        data_root: str | None,
        device: torch.device,
        progress: bool,
        batch_size: int,
    ) -> None:
        self.checkpoint, self.card, self.dataset, self.data_root = checkpoint, card, dataset, data_root
        self.device, self.progress, self.batch_size = str(device), progress, batch_size
        self.sources: dict[str, str] = {}

    def _out(self, name: str) -> Path:
        path = self.card.with_name(f"{self.card.name.removesuffix('.json')}.{name}.json")
        self.sources[name] = str(path)
        return path

    def _common(self, n: int | None, name: str) -> dict[str, Any]:
        options = {"n_examples": n, "batch_size": self.batch_size, "device": self.device}
        options.update(data_root=self.data_root, dataset=self.dataset, progress=self.progress)
        return {**options, "out": self._out(name)}

    def robustness(self, protocol: str, n: int | None) -> dict[str, Any]:
        result = evaluate_checkpoint(
            self.checkpoint, protocol=protocol, attacks=ATTACKS, **self._common(n, "robustness")
        )
        return _robustness_block(result)

    def autoattack(self, protocol: str, n: int | None) -> dict[str, Any]:
        if n == 0:
            return {"skipped": "n_autoattack is 0"}
        try:
            options = self._common(n, "autoattack")
            result = evaluate_checkpoint(self.checkpoint, protocol=protocol, attacks=("clean", "autoattack"), **options)
        except RobustKDError as err:
            if "pyautoattack" not in str(err):
                raise
            self.sources.pop("autoattack")
            return {"skipped": str(err)}
        block = _robustness_block(result)
        accuracy = {
            k: block["attacks"][name]["accuracy"] for k, name in (("accuracy", "autoattack"), ("clean", "clean"))
        }
        return {**accuracy, "n": block["n"], "subset": block["subset"], "version": "standard"}

    def certified(self, method: str, threat: ThreatModel, n: int | None, boundable: bool) -> dict[str, Any]:
        if threat.norm != "linf":
            return {"skipped": f"certificates are over the Linf ball; the protocol is {threat.norm}"}
        if not boundable:
            return {"skipped": "the architecture is not boundable (layers outside robustkd.models.BOUNDABLE_TYPES)"}
        try:
            result = certify_checkpoints(self.checkpoint, eps=threat, method=method, **self._common(n, method))
        except UnsupportedModelError as err:
            self.sources.pop(method)
            return {"skipped": f"not certifiable ({err})"}
        out = {"accuracy": result["certified_accuracy"], "clean": result["clean_accuracy"], "eps": result["eps"]}
        return {**out, "n": result["n"], "subset": result["subset"]}


def _robustness_block(result: dict[str, Any]) -> dict[str, Any]:
    settings = result["settings"]
    keys = ("accuracy", "stderr", "correct", "total")
    attacks = {name: {k: block[k] for k in keys} for name, block in result["attacks"].items()}
    out = {"attacks": attacks, "worst_case": result["worst_case"]["accuracy"], "n": settings["n"]}
    out.update(n_total=settings["dataset_size"], subset=settings["subset"], seed=settings["seed"])
    out.update(attack_settings=settings["attack_settings"], warnings=result.get("warnings", []))
    return out
