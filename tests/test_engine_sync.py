"""The training loop reads nothing back from the device inside an epoch except at its log points."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_engine import _cfg

import robustkd.engine.loop as loop
from robustkd.config import validate
from robustkd.engine.distributed import Dist
from robustkd.methods import build_method


def _run(tmp_path, **over) -> loop._Run:
    cfg = validate(_cfg(tmp_path, **over))
    method = build_method(cfg.method.name, cfg.method.args)
    return loop._setup(cfg, method, Dist(torch.device("cpu")), tmp_path / "run", False, cfg.data.batch_size)


@pytest.mark.parametrize(
    "over",
    [
        {"nonfinite": "stop", "optim": {"grad_clip": 1.0}},
        # Not Adam: it reads its step count with .item(), a host tensor even on a GPU (no device read).
        {"nonfinite": "skip", "optim": {"nesterov": True}},
        {"method": {"name": "kd"}, "teacher_cache": "always"},
        {"method": {"name": "kdiga"}, "teacher_cache": "always"},
        {"method": {"name": "kdiga"}, "teacher_cache": "never", "nonfinite": "skip"},
    ],
    ids=["stop-clip", "skip-nesterov", "kd-cached", "kdiga-cached", "kdiga-skip"],
)
def test_an_epoch_reads_the_device_only_at_its_log_points(tmp_path, toy, toy_teacher, request, monkeypatch, over):
    # 180 training examples in batches of 32: 6 steps an epoch; log every 2 steps = 3 log points, plus the end.
    run = _run(tmp_path, log_every=2, teacher=toy_teacher if "method" in over else None, **over)
    reads = []
    real_read, real_tolist = loop._read, torch.Tensor.tolist

    def counted(values):
        reads.append(values.shape)
        monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)  # the one allowed read, let through
        try:
            return real_read(values)
        finally:
            monkeypatch.setattr(torch.Tensor, "tolist", refused)

    request.getfixturevalue("no_host_sync")  # from here every other read raises HostSync
    refused = torch.Tensor.tolist
    monkeypatch.setattr(loop, "_read", counted)
    rows = [loop._train_epoch(run, epoch, loop._Progress(False)) for epoch in range(2)]
    monkeypatch.undo()
    assert run.steps_per_epoch == 6
    assert len(reads) == 2 * (math.ceil(6 / 2) + 1)
    assert all(math.isfinite(row["train/loss"]) for row in rows)


def _skip_run(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> SimpleNamespace:
    cfg = SimpleNamespace(nonfinite="skip", optim=SimpleNamespace(grad_clip=None))
    return SimpleNamespace(cfg=cfg, optimizer=optimizer, model=model)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_skipped_step_changes_no_weight_and_no_optimiser_state(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        "adam": lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.01),
    }[name]
    skipped, plain = make(model.parameters()), None
    x = torch.randn(4, 3)
    run = _skip_run(skipped, model)
    false, true = torch.tensor(False), torch.tensor(True)
    # A first step skipped (the optimiser has no state yet), then a good step: what a fresh optimiser's first is.
    start = {k: v.clone() for k, v in model.state_dict().items()}
    loop._optimise(run, model(x).sum() * float("nan"), false)
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    loop._optimise(run, model(x).pow(2).sum(), true)
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(start)
    plain = make(twin.parameters())
    plain.zero_grad()
    twin(x).pow(2).sum().backward()
    plain.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A later step skipped: parameters and every state tensor (momentum, moments, Adam's step count) unchanged.
    state = {(i, k): v.clone() for i, p in enumerate(model.parameters()) for k, v in skipped.state[p].items()}
    params = [p.detach().clone() for p in model.parameters()]
    loop._optimise(run, model(x).sum() * float("inf"), false)
    for i, p in enumerate(model.parameters()):
        assert torch.equal(p, params[i])
        for k, v in skipped.state[p].items():
            assert torch.equal(v, state[(i, k)]), (name, k)
