"""Adversarial training (pgd_at, trades): golden outer losses and gradients, the attack mode, the attack itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FAST_ARGS,
    INFO,
    LABELS,
    S_LOGITS,
    T_LOGITS,
    ForwardCounter,
    ce_cf,
    grad_of,
    kl_cf,
    logits64,
    softmax_cf,
    tiny_pair,
)

from robustkd.attacks import perturb
from robustkd.methods import build_method
from robustkd.methods.pgd_at import pgd_at_loss
from robustkd.methods.trades import trades_loss

# ---------------------------------------------------------------------------------------------------
# Golden outer losses.


@pytest.mark.parametrize("beta", [6.0, 1.0, 0.0])
def test_trades_loss_golden_both_sides_carry_gradient(beta: float) -> None:
    zc, za, y = logits64(S_LOGITS), logits64(T_LOGITS), torch.tensor(LABELS)

    def closed(zc_: torch.Tensor, za_: torch.Tensor) -> torch.Tensor:
        return ce_cf(zc_, y) + beta * kl_cf(softmax_cf(zc_), softmax_cf(za_), "batchmean")

    loss, terms = trades_loss(zc, za, y, beta)
    torch.testing.assert_close(loss, closed(zc, za), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["ce"], ce_cf(zc, y))
    g_code = grad_of(lambda a, b: trades_loss(a, b, y, beta)[0], zc, za)
    g_cf = grad_of(closed, zc, za)
    for got, want in zip(g_code, g_cf):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if beta:
        # Not detached: the clean logits' gradient differs from the CE gradient alone.
        (g_ce,) = grad_of(lambda a: ce_cf(a, y), zc)
        assert (g_code[0] - g_ce).abs().max() > 1e-3


def test_pgd_at_loss_golden() -> None:
    za, y = logits64(S_LOGITS), torch.tensor(LABELS)
    torch.testing.assert_close(pgd_at_loss(za, y), ce_cf(za, y))
    torch.testing.assert_close(grad_of(lambda z: pgd_at_loss(z, y), za)[0], grad_of(lambda z: ce_cf(z, y), za)[0])


def test_pgd_at_train_mode_attack_updates_batchnorm_each_step() -> None:
    student, _, batch = tiny_pair()
    method = build_method("pgd_at", {**FAST_ARGS["pgd_at"], "attack_mode": "train"})
    before = int(student.bn.num_batches_tracked)
    method(student, None, batch, INFO)
    assert int(student.bn.num_batches_tracked) - before == method.threat.steps + 1
    assert student.training


def test_pgd_at_raises_the_loss_over_clean_training() -> None:
    student, _, batch = tiny_pair()
    student.eval()  # no BatchNorm drift between the two forwards being compared
    out = build_method("pgd_at", {"threat": {"eps": 0.2, "step_size": 0.05, "steps": 10}})(student, None, batch, INFO)
    assert out.logits is None
    assert out.loss.item() > F.cross_entropy(student(batch.x), batch.y).item()


@pytest.mark.parametrize("name", ["pgd_at", "trades"])
def test_training_attack_is_the_last_iterate_of_the_full_pgd_search(name: str) -> None:
    """The flat training loop gives, bit for bit, what the evaluation search gives without early stop or tracking."""
    student, _, batch = tiny_pair()
    student.eval()  # no BatchNorm drift between the two runs
    method = build_method(name, FAST_ARGS[name])
    count = ForwardCounter(student)
    torch.manual_seed(3)
    method(student, None, batch, INFO)
    x_adv = count.inputs[-1]  # the outer forward sees x'
    with torch.no_grad():
        reference = F.softmax(student(batch.x), dim=1) if name == "trades" else None
    torch.manual_seed(3)
    objective = "kl" if name == "trades" else "ce"
    want = perturb(
        student, batch.x, batch.y, method.threat, objective, reference=reference, early_stop=False, track_best=False
    ).x_adv
    assert torch.equal(x_adv, want)
