"""End to end on Fashion-MNIST: adversarial training buys robustness, and distillation keeps it or not.

Setting (stated once for every test here): dm_small models, 3 epochs on a stratified 10 000-image
subset of the training split, SGD lr 0.05 cosine; the PGD-AT teacher trains against 10 steps of 0.02
at Linf eps 0.1. Robustness is PGD-20 (step 0.01, uniform start) at eps 0.1 on the first 500 test
points. ROBUSTKD_E2E_SEED picks the seed (default 0); docs/RESULTS.md lists the numbers per seed.
"""

import os

import pytest

import robustkd
from robustkd.certify import certified_accuracy
from robustkd.config import from_dict
from robustkd.evaluate import evaluate_robustness
from robustkd.jobs import load_test_points

pytestmark = pytest.mark.slow

SUBSET, EPOCHS, N_TEST = 10_000, 3, 500
SEED = int(os.environ.get("ROBUSTKD_E2E_SEED", "0"))
ATTACK = {"threat": {"eps": 0.1, "step_size": 0.02, "steps": 10}}


def _train(out, name, method, teacher=None):
    cfg = from_dict(
        {
            "name": name,
            "out_dir": str(out),
            "seed": SEED,
            "epochs": EPOCHS,
            "progress": False,
            "tensorboard": False,
            "data": {"dataset": "fashion-mnist", "train_subset": SUBSET, "batch_size": 128},
            "model": {"arch": "dm_small"},
            "method": method,
            "optim": {"lr": 0.05, "grad_clip": 5.0},
            "teacher": teacher,
        }
    )
    return robustkd.train(cfg).run_dir / "best"


@pytest.fixture(scope="module")
def points():
    x, y, _, _ = load_test_points({"dataset": "fashion-mnist"}, N_TEST)
    return x, y


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("fmnist_e2e")


@pytest.fixture(scope="module")
def teacher(runs):
    return _train(runs, "teacher", {"name": "pgd_at", "args": ATTACK})


def _robustness(path, points):
    x, y = points
    out = evaluate_robustness(
        robustkd.load_model(path), x, y, protocol="linf-0.1", attacks=("clean", "pgd20"), progress=False, seed=SEED
    )
    acc = {k: v["accuracy"] for k, v in out["attacks"].items()}
    assert acc["pgd20"] <= acc["clean"]
    return acc


def test_pgd_at_teacher_is_30_points_more_robust_than_standard(runs, teacher, points):
    standard = _robustness(_train(runs, "standard", {"name": "standard"}), points)
    robust = _robustness(teacher, points)
    print({"standard": standard, "pgd_at": robust})
    assert standard["clean"] >= 0.80, standard
    assert robust["pgd20"] - standard["pgd20"] >= 0.30, (standard, robust)
    # Robust, yet no certificate at its own eps: every teacher-student certificate from it would be vacuous,
    # which is why the certified experiments (test_e2e_faithful.py) start from an IBP-trained teacher.
    x, y = points
    certified = certified_accuracy(robustkd.load_model(teacher), x, y, 0.1, "best")
    print({"pgd_at_certified_accuracy": certified})
    assert certified <= 0.02


def test_kd_loses_robustness_that_kdiga_and_advfunmatch_keep(runs, teacher, points):
    teacher_path = str(teacher)
    kd = _robustness(_train(runs, "kd", {"name": "kd"}, teacher_path), points)
    kdiga = _robustness(
        _train(
            runs,
            "kdiga",
            {"name": "kdiga", "args": {"gamma": 3.0, "grad_norm": "l2_squared_per_example"}},
            teacher_path,
        ),
        points,
    )
    afm = _robustness(_train(runs, "advfunmatch", {"name": "advfunmatch", "args": ATTACK}, teacher_path), points)
    print({"kd": kd, "kdiga": kdiga, "advfunmatch": afm})
    # Measured margins: kdiga 13 points, advfunmatch 17 (docs/RESULTS.md); the thresholds leave room for noise.
    assert kdiga["pgd20"] - kd["pgd20"] >= 0.08, (kd, kdiga)
    assert afm["pgd20"] - kd["pgd20"] >= 0.10, (kd, afm)
    assert min(kd["clean"], kdiga["clean"], afm["clean"]) >= 0.70
