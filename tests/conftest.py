import copy
import os

import pytest
import torch
from torch import nn

# Each xdist worker gets one thread: two workers on two cores beat two threads fighting over them.
torch.set_num_threads(int(os.environ.get("ROBUSTKD_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def toy(monkeypatch):
    """Every dataset name loads test_engine's learnable 1x16x16 toy data."""
    from test_engine import _toy_dataset

    import robustkd.data

    monkeypatch.setattr(robustkd.data, "load_dataset", lambda name, root=None, **kw: _toy_dataset())


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
    """A dm_small teacher trained one epoch on the toy data, once per test module: its best checkpoint."""
    from test_engine import train_toy_teacher

    return train_toy_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def pair():
    """A small MLP teacher and a noisy copy as student (mostly agreeing, so searches have work to do); 60 points,
    the first 6 relabelled so the teacher is wrong there (P is a proper subset)."""
    g = torch.Generator().manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.8)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.25)
    x = torch.rand(60, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    y[:6] = (y[:6] + 1) % 4  # some teacher-wrong points: P is a proper subset
    return teacher.eval(), student.eval(), x, y


# --- methods
# Shared by the method tests (test_adversarial_training, test_distillation, test_certified_training,
# test_method_interface): closed forms in float64, tiny networks, a one-step batch and forward counters.

from pathlib import Path  # noqa: E402

import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from robustkd.methods import Batch, StepInfo  # noqa: E402

INFO = StepInfo(epoch=0, step=0, epochs=1, steps_per_epoch=1)
# Small attack budgets keep every step test well under a second.
FAST_ARGS = {
    "pgd_at": {"threat": {"eps": 0.1, "step_size": 0.05, "steps": 3}},
    "trades": {"threat": {"eps": 0.1, "step_size": 0.05, "steps": 3}},
    "kd": {},
    "kdiga": {},
    "advfunmatch": {"threat": {"eps": 0.1, "step_size": 0.05, "steps": 3}},
}

# ---------------------------------------------------------------------------------------------------
# Closed forms, written out with exp/log sums (no F.kl_div, no log_softmax), in float64.

S_LOGITS = [[1.0, -0.5, 0.3, 2.0], [0.2, 0.1, -1.2, 0.4], [-2.0, 3.0, 0.5, 0.0]]
T_LOGITS = [[0.5, 0.0, 1.5, 1.0], [2.0, -1.0, 0.0, 0.3], [0.1, 2.5, 0.2, -0.7]]
LABELS = [3, 0, 1]


def logits64(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softmax_cf(z: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    e = torch.exp(z / tau)
    return e / e.sum(dim=1, keepdim=True)


def kl_cf(p: torch.Tensor, q: torch.Tensor, reduction: str) -> torch.Tensor:
    """Σ_c p_c (log p_c − log q_c), reduced: batchmean = /B, sum, mean_over_classes = /(B·C)."""
    total = (p * (torch.log(p) - torch.log(q))).sum()
    b, c = p.shape
    return {"batchmean": total / b, "sum": total, "mean_over_classes": total / (b * c)}[reduction]


def ce_cf(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = softmax_cf(z)
    return -torch.log(p[torch.arange(len(y)), y]).mean()


def grad_of(fn, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    return torch.autograd.grad(fn(*leaves), leaves)


# ---------------------------------------------------------------------------------------------------
# Tiny networks for whole steps.


class TinyConvBN(nn.Module):
    """Conv-BN-ReLU-Linear on 1×8×8: BatchNorm makes the model mode matter."""

    def __init__(self, classes: int = 4, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(width, momentum=None)  # cumulative average: counts train forwards
        self.fc = nn.Linear(width * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


class TinyMLP(nn.Module):
    """A teacher of another architecture."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny_pair() -> tuple[nn.Module, nn.Module, Batch]:
    torch.manual_seed(0)
    student = TinyConvBN().train()
    teacher = TinyMLP().eval().requires_grad_(False)
    x = torch.rand(8, 1, 8, 8)
    y = torch.randint(0, 4, (8,))
    return student, teacher, Batch(x, y)


class ForwardCounter:
    """Counts forwards of a module (and keeps their inputs, for identity checks)."""

    def __init__(self, module: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.handle = module.register_forward_pre_hook(lambda _m, args: self.inputs.append(args[0]))

    @property
    def calls(self) -> int:
        return len(self.inputs)


REPO = Path(__file__).resolve().parents[1]
# Training configs; configs/compare holds comparisons (robustkd compare), tested by tests/test_compare.py.
SHIPPED_CONFIGS = sorted(
    p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml") if "compare" not in p.parent.parts
)


def configs_of(*methods: str) -> list[str]:
    """The shipped configs (paths relative to the repository) that train one of ``methods``."""
    return [path for path in SHIPPED_CONFIGS if yaml.safe_load((REPO / path).read_text())["method"]["name"] in methods]


def shipped_config(path: str):
    """A shipped config (path relative to the repository), validated, and its method built: ``(cfg, method)``.

    Every shipped config starts with a comment line saying what it reproduces."""
    from robustkd.config import from_dict, validate
    from robustkd.methods import build_method

    text = (REPO / path).read_text()
    assert text.startswith("#"), "the first line says what the config reproduces"
    cfg = validate(from_dict(yaml.safe_load(text)))
    return cfg, build_method(cfg.method.name, cfg.method.args)


# --- checkpoints: an untrained Fashion-MNIST network and the sidecar robustkd writes for it
FMNIST_MEAN, FMNIST_STD = [0.286], [0.353]


def fmnist_model(arch: str = "dm_small", num_classes: int = 10, **args) -> nn.Module:
    """An untrained network for 28x28 greyscale images, its normalisation inside."""
    from robustkd.models import create_model

    return create_model(
        arch, num_classes=num_classes, in_channels=1, input_size=28, mean=FMNIST_MEAN, std=FMNIST_STD, **args
    )


def fmnist_meta(arch: str = "dm_small", arch_args: dict | None = None, **extra) -> dict:
    """The checkpoint sidecar of such a network (``extra`` adds or replaces keys: method, config, mean, ...)."""
    meta = {"arch": arch, "arch_args": dict(arch_args or {}), "num_classes": 10, "input_shape": [1, 28, 28]}
    return {**meta, "mean": FMNIST_MEAN, "std": FMNIST_STD, "dataset": "fashion-mnist", **extra}


# --- host synchronisation: every way of reading a tensor back to the host made to raise
class HostSync(AssertionError):
    """A call that reads a device value back to the host (a device synchronisation on an accelerator)."""


def _has_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


@pytest.fixture
def no_host_sync(monkeypatch):
    """Make every way of reading a tensor back to the host raise HostSync (undo with monkeypatch.undo())."""

    def refuse(what):
        def call(*args, **kwargs):
            raise HostSync(what)

        return call

    for name in ("item", "tolist", "numpy", "nonzero", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
    monkeypatch.setattr(torch, "nonzero", refuse("torch.nonzero"))
    get, put = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def getitem(self, index):
        if _has_mask(index):
            raise HostSync("boolean-mask indexing")
        return get(self, index)

    def setitem(self, index, value):
        if _has_mask(index):
            raise HostSync("boolean-mask assignment")
        return put(self, index, value)

    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    monkeypatch.setattr(torch.Tensor, "__setitem__", setitem)
