"""End to end on Fashion-MNIST: adversarial training buys real robustness at eps 0.1."""

import pytest

import robustkd
from robustkd.config import from_dict
from robustkd.evaluate import evaluate_robustness
from robustkd.evaluate.checkpoint_eval import load_test_points

pytestmark = pytest.mark.slow

# 3 epochs on a 10 000-image stratified subset of the training split; dm_small; evaluated on the first
# 500 test points with PGD-20 (step 0.01, uniform start) at Linf eps 0.1.
SUBSET, EPOCHS, N_TEST = 10_000, 3, 500


def _train(tmp_path, name, method):
    cfg = from_dict(
        {
            "name": name,
            "out_dir": str(tmp_path),
            "epochs": EPOCHS,
            "progress": False,
            "tensorboard": False,
            "data": {"dataset": "fashion-mnist", "train_subset": SUBSET, "batch_size": 128},
            "model": {"arch": "dm_small"},
            "method": method,
            "optim": {"lr": 0.05},
        }
    )
    return robustkd.train(cfg)


def test_pgd_at_teacher_is_30_points_more_robust_than_standard(tmp_path):
    standard = _train(tmp_path, "standard", {"name": "standard"})
    at = _train(
        tmp_path,
        "pgd_at",
        {"name": "pgd_at", "args": {"eps": 0.1, "step_size": 0.02, "steps": 10}},
    )
    x, y, _, _ = load_test_points({"dataset": "fashion-mnist"}, N_TEST)
    results = {}
    for name, run in (("standard", standard), ("pgd_at", at)):
        model = robustkd.load_model(run.run_dir / "best")
        out = evaluate_robustness(model, x, y, protocol="linf-0.1", attacks=("clean", "pgd20"), progress=False)
        results[name] = {k: v["accuracy"] for k, v in out["attacks"].items()}
        assert results[name]["pgd20"] <= results[name]["clean"]
    print(results)
    assert results["standard"]["clean"] >= 0.80, results
    assert results["pgd_at"]["pgd20"] - results["standard"]["pgd20"] >= 0.30, results
