"""robustkd.evaluate.evaluate_robustness on a tiny model trained on synthetic blobs."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from robustkd.attacks import ProbabilityOutputWarning, RandomizedModelWarning, ThreatModel
from robustkd.errors import ConfigError
from robustkd.evaluate import evaluate_robustness

PROTOCOL = ThreatModel("linf", eps=0.08, step_size=0.01, steps=10)


@pytest.fixture(scope="module")
def setup():
    """Four classes of noisy 1x4x4 images around fixed prototypes, and an MLP that separates them."""
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(4, 1, 4, 4, generator=g)
    y = torch.randint(0, 4, (600,), generator=g)
    x = (protos[y] + 0.15 * torch.randn(600, 1, 4, 4, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    # Plain gradient descent by hand: torch.optim's first step pays a multi-second lazy import.
    for _ in range(200):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[:500]), y[:500]), model.parameters())
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= 0.5 * g
    model.eval()
    return model, x[500:], y[500:]


def run(model, x, y, **kwargs):
    kwargs.setdefault("protocol", PROTOCOL)
    kwargs.setdefault("progress", False)
    return evaluate_robustness(model, x, y, **kwargs)


def test_report_structure_and_invariants(setup):
    model, x, y = setup
    out = run(model, x, y, attacks=("pgd10", "cw10"), batch_size=32, dataset_size=1000)
    json.dumps(out)  # JSON-able as is
    assert out["settings"]["attacks"] == ["clean", "pgd10", "cw10"]  # clean is put first
    assert out["settings"]["subset"] is True and out["settings"]["n"] == 100
    assert out["settings"]["eps"] == 0.08 and out["settings"]["attack_settings"]["cw10"]["kappa"] == 50.0
    acc = {k: v["accuracy"] for k, v in out["attacks"].items()}
    assert acc["clean"] > 0.6 and acc["pgd10"] < acc["clean"]
    assert all(acc[k] <= acc["clean"] for k in acc)
    assert out["worst_case"]["accuracy"] <= min(acc.values())
    per = out["per_example"]
    for name, flags in per["correct"].items():
        assert len(flags) == 100 and sum(flags) == out["attacks"][name]["correct"]
        assert all(c <= clean for c, clean in zip(flags, per["correct"]["clean"]))
    survivors = [all(per["correct"][k][i] for k in acc) for i in range(100)]
    assert sum(survivors) == out["worst_case"]["correct"]
    for i, first in enumerate(per["first_broken_by"]):
        if survivors[i]:
            assert first is None
        else:
            assert not per["correct"][first][i]
            earlier = out["settings"]["attacks"][: out["settings"]["attacks"].index(first)]
            assert all(per["correct"][k][i] for k in earlier)
    p, n = acc["pgd10"], 100
    assert out["attacks"]["pgd10"]["stderr"] == pytest.approx((p * (1 - p) / n) ** 0.5)


def test_deterministic_given_seed(setup):
    model, x, y = setup
    a = run(model, x, y, attacks=("clean", "pgd10"), seed=3)
    b = run(model, x, y, attacks=("clean", "pgd10"), seed=3)
    a.pop("timing"), b.pop("timing")
    assert a == b


def test_more_steps_or_restarts_never_raise_robust_accuracy(setup):
    model, x, y = setup
    base = run(model, x, y, attacks=("clean", "pgd5"), seed=1)
    longer = run(model, x, y, attacks=("clean", "pgd20"), seed=1)
    restarted = run(model, x, y, attacks=("clean", "pgd5"), restarts=3, seed=1)
    broken = [not c for c in base["per_example"]["correct"]["pgd5"]]
    for other, name in [(longer, "pgd20"), (restarted, "pgd5")]:
        assert other["attacks"][name]["accuracy"] <= base["attacks"]["pgd5"]["accuracy"]
        # Same starts, best-iterate tracking: whatever the short run broke stays broken.
        assert all(not c for c, b in zip(other["per_example"]["correct"][name], broken) if b)
    assert restarted["settings"]["restarts"] == 3


def test_cumulative_mode_is_nonincreasing(setup):
    model, x, y = setup
    out = run(model, x, y, attacks=("clean", "pgd3", "cw10", "pgd10"), cumulative=True)
    accs = [out["attacks"][k]["accuracy"] for k in out["settings"]["attacks"]]
    assert accs == sorted(accs, reverse=True)
    assert out["worst_case"]["accuracy"] == accs[-1]


def test_model_state_restored(setup):
    model, x, y = setup
    model.train()
    try:
        run(model, x[:20], y[:20], attacks=("clean", "pgd3"))
        assert model.training
        assert all(p.requires_grad and p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_autoattack_in_evaluation(setup):
    pytest.importorskip("pyautoattack")
    model, x, y = setup
    # At a large eps APGD-CE breaks everything, so the later AutoAttack stages are skipped: fast.
    out = run(model, x[:20], y[:20], protocol=PROTOCOL.replace(eps=0.5), attacks=("clean", "pgd10", "autoattack"))
    assert out["attacks"]["autoattack"]["accuracy"] <= out["attacks"]["pgd10"]["accuracy"] + 1e-9
    assert out["attacks"]["autoattack"]["accuracy"] <= out["attacks"]["clean"]["accuracy"]
    assert out["settings"]["attack_settings"]["autoattack"]["version"] == "standard"


def test_checks_are_recorded_as_warnings(setup):
    _, x, y = setup
    probs = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Softmax(dim=1))
    with pytest.warns(ProbabilityOutputWarning):
        out = run(probs, x[:10], y[:10], attacks=("clean",))
    assert [w["category"] for w in out["warnings"]] == ["ProbabilityOutputWarning"]

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 4)

        def forward(self, x):
            return self.lin(x.flatten(1)) + torch.randn(x.shape[0], 4)

    with pytest.warns(RandomizedModelWarning):
        out = run(Noisy(), x[:10], y[:10], attacks=("clean",))
    assert "RandomizedModelWarning" in [w["category"] for w in out["warnings"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(setup[0], x[:10], y[:10], attacks=("clean",), checks=False)["warnings"] == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attacks": ("clean", "pgd2O")}, r"^attacks: .*pgd<k>"),
        ({"attacks": ("clean", "autoatack")}, r"^attacks: .*'autoattack'"),
        ({"attacks": ()}, r"^attacks: empty"),
        ({"attacks": "pgd20"}, r"^attacks:"),
        ({"attacks": ("pgd3", "pgd3")}, r"^attacks: pgd3 listed more than once"),
        ({"protocol": "linf-0.11x"}, r"^protocol: .*linf-0\.1"),
        ({"protocol": 0.1}, r"^protocol:"),
        ({"y": torch.zeros(5, dtype=torch.long)}, r"^x, y: length mismatch"),
        ({"x": torch.rand(10, 1, 4, 4) + 1.0}, r"^x: inputs must be images in \[0, 1\]"),
        ({"x": torch.rand(0, 1, 4, 4), "y": torch.zeros(0, dtype=torch.long)}, r"^x: empty"),
        ({"batch_size": 0}, r"^batch_size:"),
        ({"batch_size": 2.5}, r"^batch_size:"),
        ({"restarts": 0}, r"^restarts:"),
        ({"y": torch.zeros(10)}, r"^y:"),
        ({"dataset_size": 5}, r"^dataset_size:"),
    ],
)
def test_rejects_bad_input(setup, kwargs, match):
    model, x, y = setup
    args = {"x": x[:10], "y": y[:10]}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        run(model, args.pop("x"), args.pop("y"), **args)


def test_presets_by_name(setup):
    model, x, y = setup
    out = run(model, x[:10], y[:10], protocol="linf-0.1", attacks=("clean", "pgd2"))
    assert out["settings"]["protocol"] == "linf-0.1" and out["settings"]["step_size"] == 0.01
    assert out["settings"]["attack_settings"]["pgd2"]["steps"] == 2


def test_progress_bar_runs(setup, capsys, monkeypatch):
    import robustkd.runtime

    model, x, y = setup
    monkeypatch.setattr(robustkd.runtime, "interactive", lambda: True)  # draw it, as on a terminal
    run(model, x[:10], y[:10], attacks=("clean", "pgd2"), progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "pgd2" in err  # the bar goes to stderr, stdout stays clean for JSON
    monkeypatch.undo()  # off a terminal (pytest's capture) no bar is drawn at all
    run(model, x[:10], y[:10], attacks=("clean", "pgd2"), progress=True)
    assert capsys.readouterr() == ("", "")
