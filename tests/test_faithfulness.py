"""robustkd.evaluate.evaluate_faithfulness: closed-form linear pairs, invariants, monotonicity and validation."""

from __future__ import annotations

import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import fmnist_meta, fmnist_model
from torch import nn

from robustkd.attacks import ProbabilityOutputWarning, make_objective
from robustkd.errors import ConfigError
from robustkd.evaluate import evaluate_faithfulness
from robustkd.jobs import chain, evaluate_faithfulness_checkpoints


def run(teacher, student, x, y, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("steps", 10)
    kwargs.setdefault("restarts", 2)
    return evaluate_faithfulness(teacher, student, x, y, **kwargs)


def linear(weight, bias) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return layer.eval()


# ---------------------------------------------------------------------------------------------------
# Report layout and invariants


def test_report_structure_and_counts(pair):
    teacher, student, x, y = pair
    out = run(teacher, student, x, y, eps=[0.1, 0.05], rho=(0.01, 0.1), batch_size=16, dataset_size=100)
    json.dumps(out)
    s = out["settings"]
    assert s["eps"] == [0.05, 0.1] and s["alpha"] == pytest.approx([2.5 * 0.05 / 10, 2.5 * 0.1 / 10])
    assert s["subset"] is True and s["n"] == 60 and "Lamb" in s["definitions"]
    assert s["disagreement_searches"] == ["student_flip", "teacher_flip", "mismatch"]
    assert s["gap_surrogates"] == ["prob", "log"]
    per = out["per_example"]
    in_p = per["teacher_correct"]
    assert in_p == (teacher(x).argmax(1) == y).tolist() and sum(in_p) == out["clean"]["teacher_correct"] == 54
    both = [a and b for a, b in zip(in_p, per["student_correct"])]
    for block, ex in zip(out["results"], per["eps"]):
        assert block["eps"] == ex["eps"]
        p = block["teacher_correct"]
        assert p["n"] == 54 and p["share_of_points"] == 0.9 and block["both_correct"]["n"] == sum(both)
        for key in ("disagreement", "gap_under", "gap_over"):
            assert len(ex[key]) == 60
            assert all((v is None) == (not keep) for v, keep in zip(ex[key], in_p))
        found = [bool(v) for v in ex["disagreement"] if v is not None]
        dis = p["disagreement"]
        assert dis["count"] == sum(found) and dis["total"] == 54
        assert dis["stderr"] == pytest.approx(math.sqrt(dis["rate"] * (1 - dis["rate"]) / 54))
        assert sum(block["found_by"].values()) == dis["count"]
        under = [v for v in ex["gap_under"] if v is not None]
        over = [v for v in ex["gap_over"] if v is not None]
        two = [max(a, b) for a, b in zip(under, over)]
        assert p["gap_under"]["max"] == pytest.approx(max(under)) and p["gap_two_sided"]["mean"] == pytest.approx(
            np.mean(two)
        )
        assert p["gap_under"]["q50"] == pytest.approx(np.quantile(under, 0.5))
        assert p["gap_under"]["above"]["0.1"]["count"] == sum(v > 0.1 for v in under)
        faithful = sum(not d and u <= 0.1 for d, u in zip(found, under))
        assert p["faithful"]["0.1"]["count"] == faithful
        # The clean point is in the ball: searched gaps never fall below the clean gap.
        clean = [g for g, keep in zip(per["gap_clean"], in_p) if keep]
        assert all(u >= c - 1e-7 and o >= -c - 1e-7 for u, o, c in zip(under, over, clean))
    # A student wrong at a teacher-correct point disagrees with the teacher there already.
    assert out["results"][0]["found_by"]["clean"] == sum(a and not b for a, b in zip(in_p, per["student_correct"]))
    assert set(out["timing"]) >= {"clean", "disagreement@0.05", "gap@0.1", "total"}


def test_deterministic_given_seed(pair):
    teacher, student, x, y = pair
    a = run(teacher, student, x, y, eps=0.1, seed=3)
    b = run(teacher, student, x, y, eps=0.1, seed=3)
    a.pop("timing"), b.pop("timing")
    assert a == b


def test_identical_networks_never_disagree_and_have_no_gap(pair):
    teacher, _, x, y = pair
    for student in (teacher, copy.deepcopy(teacher)):
        out = run(teacher, student, x, y, eps=[0.0, 0.1, 0.3], separate_confidence=True)
        for block, ex in zip(out["results"], out["per_example"]["eps"]):
            p = block["teacher_correct"]
            assert p["disagreement"]["count"] == 0 and p["faithful"]["0.05"]["rate"] == 1.0
            for key in ("gap_under", "gap_over"):
                assert all(v is None or abs(v) <= 1e-6 for v in ex[key])
            assert all(a == b for a, b in zip(ex["teacher_min_conf"], ex["student_min_conf"]))
            assert max(abs(p["gap_two_sided"]["max"]), abs(p["gap_two_sided"]["min"])) <= 1e-6
            assert p["separate_confidence"]["difference"]["max"] == 0.0


def test_points_stay_in_the_ball_and_the_box():
    # Pixels at 0 and 1 and a large radius make the box clip on every search.
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(40, 1, 3, 3, generator=g) > 0.5).float()
    x[:10] = torch.rand(10, 1, 3, 3, generator=g)
    teacher = nn.Sequential(nn.Flatten(), linear(torch.randn(3, 9, generator=g), torch.zeros(3)))
    student = nn.Sequential(nn.Flatten(), linear(torch.randn(3, 9, generator=g), torch.zeros(3)))
    with torch.no_grad():
        y = teacher(x).argmax(1)
    for norm, radii in (("linf", [0.05, 0.4]), ("l2", [0.3, 1.5])):
        seen: dict[str, int] = {}

        def hook(search, eps, index, x_clean, x_adv, norm=norm, seen=seen):
            assert torch.equal(x_clean, x[index])
            delta = (x_adv - x_clean).flatten(1)
            dist = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
            assert bool((dist <= eps + 1e-6).all()), (search, eps, dist.max().item())
            assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
            seen[search] = seen.get(search, 0) + int(index.numel())

        run(teacher, student, x, y, eps=radii, norm=norm, separate_confidence=True, witness_hook=hook, batch_size=16)
        assert set(seen) >= {
            "student_flip",
            "gap_under_prob",
            "gap_under_log",
            "gap_over_prob",
            "gap_over_log",
            "teacher_min_conf",
            "student_min_conf",
        }


# ---------------------------------------------------------------------------------------------------
# Closed-form linear pairs


def _margin_range(w: np.ndarray, c: float, x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """min and max of w.x' + c over Ball_inf(x, eps) ∩ [0, 1]^d (coordinate-wise: the box is separable)."""
    up, down = np.minimum(x + eps, 1.0), np.maximum(x - eps, 0.0)
    hi = np.where(w > 0, up, down) @ w + c
    lo = np.where(w > 0, down, up) @ w + c
    return lo, hi


def test_disagreement_found_exactly_where_it_exists():
    """Teacher margin m(x) = w.x + c; the student is the teacher with its class-1 bias raised by delta.

    T predicts 1 iff m > 0, S iff m > -delta, so they disagree at x' iff -delta < m(x') <= 0, and such an x'
    exists in the ball iff lo <= 0 and hi > -delta, with [lo, hi] the margin's range over the ball.
    """
    d, delta, eps = 6, 1.0, 0.15
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(2, d, generator=g).double()
    teacher = linear(weight, [0.0, -0.8])
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.bias[1] += delta
    w = (teacher.weight[1] - teacher.weight[0]).detach().double().numpy()
    c = float((teacher.bias[1] - teacher.bias[0]).detach())
    x = torch.rand(400, d, generator=g)
    lo, hi = _margin_range(w, c, x.double().numpy(), eps)
    # Keep points away from the two boundaries of the criterion (argmax ties, float rounding).
    keep = (np.abs(lo) > 0.03) & (np.abs(hi + delta) > 0.03)
    x, lo, hi = x[torch.from_numpy(keep)], lo[keep], hi[keep]
    exists = (lo <= 0) & (hi > -delta)
    y = torch.randint(0, 2, (x.shape[0],), generator=g)
    in_p = (teacher(x).argmax(1) == y).numpy()
    assert 20 < (exists & in_p).sum() < in_p.sum() - 20  # both outcomes are well represented

    def found(**kwargs):
        out = run(teacher, student, x, y, eps=eps, steps=20, restarts=1, **kwargs)
        flags = out["per_example"]["eps"][0]["disagreement"]
        assert all((v is None) == (not p) for v, p in zip(flags, in_p))
        return np.array([bool(v) for v in flags])

    np.testing.assert_array_equal(found()[in_p], exists[in_p])
    # KL(f_T || f_S) peaks inside (-delta, 0) for a bias shift, so the untargeted search alone is exact too.
    np.testing.assert_array_equal(found(disagreement_searches=["mismatch"], gap_surrogates=[])[in_p], exists[in_p])
    # The margin objectives are constant for a shared-weight pair (zero gradient): alone they find the clean
    # disagreements and those their random starts land on, never one that does not exist.
    clean = (teacher(x).argmax(1) != student(x).argmax(1)).numpy()
    only_student = found(disagreement_searches=["student_flip"], gap_surrogates=[])
    assert not (only_student & ~exists).any() and not (clean & in_p & ~only_student).any()
    assert only_student[in_p].sum() < exists[in_p].sum()


def _sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


def test_gap_search_reaches_the_closed_form_maximum():
    """1-D pair: z_T = (0, a x + c), z_S = (0, a x + c + delta) with delta < 0 (an under-confident student).

    For y = 1 the gap is g(u) = sigmoid(u) - sigmoid(u + delta), u = a x' + c, unimodal with its peak where
    sigmoid'(u) = sigmoid'(u + delta), i.e. u* = -delta / 2. So G_under = g(clip(u*, [u_lo, u_hi])) and
    G_over = -min(g(u_lo), g(u_hi)); for y = 0 the two swap roles (the gap is -g).
    """
    a, c, delta, eps = 8.0, -2.0, -2.0, 0.1
    teacher = linear([[0.0], [a]], [0.0, c])
    student = linear([[0.0], [a]], [0.0, c + delta])
    x = torch.cat([torch.linspace(0.28, 1.0, 25), torch.linspace(0.0, 0.2, 8)])[:, None]
    y = (x[:, 0] > 0.25).long()  # the teacher is right everywhere: its boundary is at x = 0.25
    xs = x[:, 0].double().numpy()
    u_lo = a * np.maximum(xs - eps, 0) + c
    u_hi = a * np.minimum(xs + eps, 1) + c
    g_peak = _sigmoid(np.clip(-delta / 2, u_lo, u_hi)) - _sigmoid(np.clip(-delta / 2, u_lo, u_hi) + delta)
    g_min = np.minimum(_sigmoid(u_lo) - _sigmoid(u_lo + delta), _sigmoid(u_hi) - _sigmoid(u_hi + delta))
    pos = y.numpy() == 1
    want_under = np.where(pos, g_peak, -g_min)
    want_over = np.where(pos, -g_min, g_peak)

    out = run(teacher, student, x, y, eps=eps, steps=50, restarts=2)
    ex = out["per_example"]["eps"][0]
    got_under, got_over = np.array(ex["gap_under"]), np.array(ex["gap_over"])
    # Where the peak lies inside the ball, -g has two local maxima (the ball's two ends) and an attack may
    # settle on the lower one; elsewhere every objective here is monotone over the ball and the answer exact.
    peak_inside = (u_lo < -delta / 2) & (-delta / 2 < u_hi)
    unimodal_under = np.where(pos, True, ~peak_inside)
    unimodal_over = np.where(pos, ~peak_inside, True)
    assert unimodal_under.all() and unimodal_over.sum() > 20 and peak_inside.sum() >= 2
    np.testing.assert_allclose(got_under[unimodal_under], want_under[unimodal_under], atol=1e-3)
    np.testing.assert_allclose(got_over[unimodal_over], want_over[unimodal_over], atol=1e-3)
    assert (got_under <= want_under + 1e-6).all() and (got_over <= want_over + 1e-6).all()
    assert out["results"][0]["teacher_correct"]["gap_two_sided"]["max"] == pytest.approx(
        np.maximum(want_under, want_over).max(), abs=1e-3
    )
    # The log-ratio surrogate alone is pulled to the ball's edge (log f_T - log f_S is monotone in u), so it
    # misses interior peaks; kept alongside the plain gap, it costs nothing.
    log_only = run(teacher, student, x, y, eps=eps, steps=50, restarts=2, gap_surrogates=["log"])
    got = np.array(log_only["per_example"]["eps"][0]["gap_under"])
    assert (got <= want_under + 1e-6).all() and (got < want_under - 1e-2).any()


def test_teacher_flip_objective_is_the_mirror():
    g = torch.Generator().manual_seed(3)
    zs, zt, y = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    mirror = make_objective("disagreement", flip="teacher")
    s, t = zs.double().numpy(), zt.double().numpy()
    expected = [max((t[i, j] - t[i, y[i]]) - (s[i, j] - s[i, y[i]]) for j in range(5) if j != y[i]) for i in range(6)]
    np.testing.assert_allclose(mirror.value(zs, y, teacher_logits=zt).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(
        mirror.value(zs, y, teacher_logits=zt), make_objective("disagreement").value(zt, y, teacher_logits=zs)
    )
    with pytest.raises(ConfigError, match="flip"):
        make_objective("disagreement", flip="both")


# ---------------------------------------------------------------------------------------------------
# Monotonicity


def _per_point(out, k=0):
    ex = out["per_example"]["eps"][k]
    keep = [v is not None for v in ex["disagreement"]]
    pick = lambda key: np.array([v for v, m in zip(ex[key], keep) if m], dtype=float)  # noqa: E731
    return pick("disagreement").astype(bool), pick("gap_under"), pick("gap_over")


def test_more_restarts_never_report_less_point_by_point(pair):
    teacher, student, x, y = pair
    weak = run(teacher, student, x, y, eps=[0.03, 0.08], restarts=1, steps=6)
    strong = run(teacher, student, x, y, eps=[0.03, 0.08], restarts=3, steps=6)
    for k in range(2):
        d1, u1, o1 = _per_point(weak, k)
        d2, u2, o2 = _per_point(strong, k)
        assert not (d1 & ~d2).any()
        assert (u2 >= u1 - 1e-6).all() and (o2 >= o1 - 1e-6).all()


def test_more_steps_at_a_fixed_step_size_never_report_less_point_by_point(pair):
    # With the step size fixed, a longer run repeats the shorter one's iterates and adds more. (Under the default
    # rule 2.5 * eps / steps the step size, hence every trajectory, changes with the steps: no such guarantee.)
    teacher, student, x, y = pair
    runs = [run(teacher, student, x, y, eps=0.08, step_size=0.01, steps=s, restarts=2) for s in (3, 9, 27)]
    points = [_per_point(r) for r in runs]
    for (d1, u1, o1), (d2, u2, o2) in itertools.pairwise(points):
        assert not (d1 & ~d2).any()
        assert (u2 >= u1 - 1e-6).all() and (o2 >= o1 - 1e-6).all()
    counts = [r["results"][0]["teacher_correct"]["disagreement"]["count"] for r in runs]
    assert counts[-1] > counts[0]


def test_eps_sweep_is_monotone_point_by_point(pair):
    teacher, student, x, y = pair
    out = run(teacher, student, x, y, eps=[0.1, 0.0, 0.02, 0.05])
    assert out["settings"]["eps"] == [0.0, 0.02, 0.05, 0.1]
    prev = None
    for k in range(4):
        cur = _per_point(out, k)
        if prev is not None:
            assert not (prev[0] & ~cur[0]).any()
            assert (cur[1] >= prev[1]).all() and (cur[2] >= prev[2]).all()
        prev = cur
    rates = [b["teacher_correct"]["disagreement"]["rate"] for b in out["results"]]
    assert rates == sorted(rates) and rates[-1] > rates[0]
    # eps = 0 is the clean point: nothing is searched.
    clean = [g for g, m in zip(out["per_example"]["gap_clean"], out["per_example"]["teacher_correct"]) if m]
    np.testing.assert_allclose(_per_point(out, 0)[1], clean)


# ---------------------------------------------------------------------------------------------------
# Edge cases, warnings, validation


def test_no_teacher_correct_points_gives_empty_statistics(pair):
    teacher, student, x, _ = pair
    wrong = (teacher(x).argmax(1) + 1) % 4
    out = run(teacher, student, x, wrong, eps=0.1)
    p = out["results"][0]["teacher_correct"]
    assert p["n"] == 0 and p["disagreement"]["rate"] is None and p["gap_under"]["max"] is None
    json.dumps(out)


def test_probability_outputs_are_warned_and_recorded(pair):
    teacher, student, x, y = pair
    probs = nn.Sequential(student, nn.Softmax(dim=-1))
    with pytest.warns(ProbabilityOutputWarning):
        out = run(teacher, probs, x[:8], y[:8], eps=0.05, steps=2, restarts=1)
    assert out["warnings"][0]["category"] == "ProbabilityOutputWarning"


def test_modes_and_grad_flags_restored(pair):
    teacher, student, x, y = pair
    student = copy.deepcopy(student).train()
    run(teacher, student, x[:8], y[:8], eps=0.05, steps=2, restarts=1)
    assert student.training and not teacher.training
    assert all(p.requires_grad and p.grad is None for p in student.parameters())


@pytest.mark.parametrize(
    "change, field",
    [
        ({"student": nn.Sequential(nn.Flatten(), nn.Linear(16, 3))}, "student"),
        ({"teacher": "not a model"}, "teacher"),
        ({"x": torch.full((4, 1, 4, 4), 2.0)}, "x"),
        ({"x": torch.rand(0, 1, 4, 4), "y": torch.zeros(0, dtype=torch.long)}, "x"),
        ({"y": torch.zeros(5, dtype=torch.long)}, "x, y"),
        ({"y": torch.zeros(4)}, "y"),
        ({"y": torch.full((4,), 7)}, "y"),
        ({"eps": -0.1}, "eps"),
        ({"eps": [0.1, -0.2]}, "eps"),
        ({"eps": []}, "eps"),
        ({"eps": [0.1, 0.1]}, "eps"),
        ({"batch_size": 0}, "batch_size"),
        ({"steps": 0}, "steps"),
        ({"restarts": 0}, "restarts"),
        ({"step_size": 0.5}, "step_size"),
        ({"rho": [0.1, -1]}, "rho"),
        ({"norm": "l1"}, "norm"),
        ({"disagreement_searches": ["flip"]}, "disagreement_searches"),
        ({"gap_surrogates": "log"}, "gap_surrogates"),
        ({"seed": 1.5}, "seed"),
        ({"dataset_size": 2}, "dataset_size"),
    ],
)
def test_validation_errors_name_the_field(pair, change, field):
    teacher, student, x, y = pair
    args = {"teacher": teacher, "student": student, "x": x[:4], "y": y[:4], **change}
    with pytest.raises(ConfigError, match=f"^{field}:"):
        run(args.pop("teacher"), args.pop("student"), args.pop("x"), args.pop("y"), **args)


def test_checkpoints_are_evaluated_on_the_student_test_split(tmp_path, monkeypatch):
    from robustkd.checkpoint import save_checkpoint

    torch.manual_seed(0)
    for name in ("teacher", "student"):
        save_checkpoint(tmp_path / name / "best", fmnist_model(), fmnist_meta(method=name))
    asked = {}

    def fake_points(meta, n_examples, data_root=None):
        asked.update(meta=meta, n=n_examples)
        g = torch.Generator().manual_seed(0)
        return (
            torch.rand(n_examples, 1, 28, 28, generator=g),
            torch.randint(0, 10, (n_examples,), generator=g),
            50,
            "fake",
        )

    monkeypatch.setattr(chain, "load_test_points", fake_points)
    out = evaluate_faithfulness_checkpoints(
        tmp_path / "teacher",
        tmp_path / "student",
        eps=[0.05, 0.1],
        n_examples=12,
        steps=2,
        restarts=1,
        device="cpu",
        progress=False,
    )
    assert asked["n"] == 12 and asked["meta"]["dataset"] == "fashion-mnist"
    written = tmp_path / "student" / "faithful_best_linf-0.05_0.1.json"
    assert out["output"] == str(written) and written.is_file()
    saved = json.loads(written.read_text())
    assert saved["models"]["teacher"]["method"] == "teacher" and saved["models"]["student"]["arch"] == "dm_small"
    assert saved["data"] == {"dataset": "fashion-mnist", "source": "fake", "split": "test"}
    assert saved["settings"]["subset"] is True and saved["settings"]["n"] == 12
    other = tmp_path / "elsewhere.json"
    evaluate_faithfulness_checkpoints(
        tmp_path / "teacher",
        tmp_path / "student",
        eps=0.1,
        n_examples=4,
        steps=1,
        restarts=1,
        device="cpu",
        progress=False,
        out=other,
    )
    assert other.is_file()
    # A teacher and a student trained on different datasets need an explicit choice of test split.
    save_checkpoint(tmp_path / "cifar_teacher" / "best", fmnist_model(), fmnist_meta(dataset="cifar10"))
    with pytest.raises(ConfigError, match="^dataset:"):
        evaluate_faithfulness_checkpoints(
            tmp_path / "cifar_teacher", tmp_path / "student", device="cpu", progress=False
        )
