"""The top-level Python API: robustkd.train / distill / load_model / evaluate / certify."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import robustkd
from robustkd.models import Normalize


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(Normalize([0.5], [0.5]), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_evaluate_and_certify_are_callable_packages():
    model = _tiny()
    x, y = torch.rand(12, 1, 4, 4), torch.randint(0, 3, (12,))
    direct = robustkd.evaluate.evaluate_robustness(
        model, x, y, protocol="linf-0.1", attacks=("clean", "pgd5"), progress=False
    )
    called = robustkd.evaluate(model, x, y, protocol="linf-0.1", attacks=("clean", "pgd5"), progress=False)
    assert called["attacks"] == direct["attacks"]
    cert = robustkd.certify(model, model, x, y, 0.01, method="ibp", progress=False)
    assert cert == robustkd.certify.certify(model, model, x, y, 0.01, method="ibp", progress=False)
    assert callable(robustkd.certify.interval_bounds)


def test_import_is_light():
    code = "import sys, robustkd; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("no/such/config.yaml", "no/such/config.yaml"),
        ("{bad: [yaml", "YAML"),
        ("!!python/object/apply:os.system ['true']", "tag"),
        ("[1, 2]", "mapping"),
    ],
)
def test_train_config_errors_are_config_errors(tmp_path, config, message):
    from robustkd.errors import ConfigError

    path = config
    if not config.startswith("no/"):
        path = tmp_path / "c.yaml"
        path.write_text(config)
    with pytest.raises(ConfigError, match=message):
        robustkd.train(str(path))
