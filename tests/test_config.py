import pytest
import torch
import yaml

from robustkd.attacks import ThreatModel
from robustkd.config import TrainConfig, from_dict, to_dict, validate
from robustkd.engine.optim import build_optimizer, learning_rate
from robustkd.errors import ConfigError


def test_round_trip_through_dict():
    cfg = from_dict({"name": "x", "optim": {"lr": 0.2}, "data": {"batch_size": 7}})
    assert cfg.optim.lr == 0.2 and cfg.data.batch_size == 7 and cfg.optim.momentum == 0.9
    assert from_dict(to_dict(cfg)) == cfg


def test_unknown_key_names_field_and_suggests():
    with pytest.raises(ConfigError, match=r"optim.lrr: unknown option; did you mean 'lr'"):
        from_dict({"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"^epoch: unknown option; did you mean 'epochs'"):
        from_dict({"epoch": 3})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": -3}, "epochs"),
        ({"name": "../escape"}, "name"),
        ({"name": "a/b"}, "name"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction"),
        ({"data": {"batch_size": 0}}, "data.batch_size"),
        ({"optim": {"lr": -1.0}}, "optim.lr"),
        ({"optim": {"lr": float("nan")}}, "optim.lr"),
        ({"optim": {"name": "lion"}}, "optim.name"),
        ({"optim": {"schedule": "step"}}, "optim.schedule"),
        ({"validate": {"select": "robust"}}, "validate.select"),
        ({"validate": {"attack": "pgd10"}}, "validate.protocol"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        # Values that overflow (or vanish) as the optimiser's float32 scalars, or no run could mean.
        ({"optim": {"lr": 1e300}}, "optim.lr"),
        ({"optim": {"lr": 1e300, "name": "adam"}}, "optim.lr"),
        ({"optim": {"lr": 1e38, "name": "adam"}}, "optim.lr"),
        ({"optim": {"lr": 1e-300}}, "optim.lr"),
        ({"optim": {"weight_decay": 1e300}}, "optim.weight_decay"),
        ({"optim": {"grad_clip": 1e300}}, "optim.grad_clip"),
        ({"optim": {"grad_clip": 1e-300}}, "optim.grad_clip"),
        ({"optim": {"warmup_epochs": 1e300}}, "optim.warmup_epochs"),
        ({"optim": {"milestones": [1e300]}}, "optim.milestones"),
        ({"epochs": 10**30}, "epochs"),
        ({"log_every": 2**63}, "log_every"),
        ({"data": {"batch_size": 10**30}}, "data.batch_size"),
        ({"data": {"eval_batch_size": 2**31}}, "data.eval_batch_size"),
        ({"data": {"train_subset": 10**30}}, "data.train_subset"),
        ({"data": {"test_subset": 10**30}}, "data.test_subset"),
        ({"validate": {"max_examples": 10**30}}, "validate.max_examples"),
    ],
)
def test_validate_names_the_bad_field(change, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        validate(from_dict(change))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_largest_accepted_optimiser_numbers_step_without_overflow(name):
    cfg = validate(from_dict({"optim": {"name": name, "lr": 1e6, "weight_decay": 1e6, "betas": [0.999999, 0.5]}}))
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = build_optimizer([param], cfg.optim)
    for _ in range(3):
        param.grad = torch.ones(3)
        optimizer.step()  # may reach inf (the nonfinite guard's business), never an overflow error


def test_yaml_tags_never_construct_objects(tmp_path):
    from robustkd.cli import _parse, _train_parser

    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError):
        _parse(_train_parser("robustkd train", "", ""), ["--config", str(cfg)])
    assert not marker.exists()
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(cfg.read_text())


def test_learning_rate_schedules():
    cfg = TrainConfig().optim
    cfg.lr = 0.1
    cfg.schedule = "multistep"
    cfg.milestones = [2, 3]
    # 10 steps per epoch: epoch 0-1 -> 0.1, epoch 2 -> 0.01, epoch 3+ -> 0.001
    assert learning_rate(cfg, 19, 10, 5) == pytest.approx(0.1)
    assert learning_rate(cfg, 20, 10, 5) == pytest.approx(0.01)
    assert learning_rate(cfg, 35, 10, 5) == pytest.approx(0.001)
    cfg.schedule = "cosine"
    assert learning_rate(cfg, 0, 10, 5) == pytest.approx(0.1)
    assert learning_rate(cfg, 25, 10, 5) == pytest.approx(0.05)
    cfg.warmup_epochs = 1
    assert learning_rate(cfg, 4, 10, 5) == pytest.approx(0.05)
    assert learning_rate(cfg, 10, 10, 5) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("protocol", "saved"),
    [
        ("linf-0.1", "linf-0.1"),
        ("linf-8/255", "linf-8/255"),
        ("linf-4/255", "linf-4/255"),
        ("linf-0.05", "linf-0.05"),
        ("l2-0.5", "l2-0.5"),
        ({"eps": 0.2, "steps": 7}, {"norm": "linf", "eps": 0.2, "step_size": None, "steps": 7, "restarts": 1,
                                    "random_start": "uniform"}),
        (ThreatModel("l2", 2.0), "l2-2"),
    ],
)  # fmt: skip
def test_validation_protocol_is_read_once_and_written_back_readably(protocol, saved):
    cfg = validate(from_dict({"validate": {"attack": "pgd10", "protocol": protocol}}))
    assert cfg.validate.protocol == ThreatModel.parse(protocol)
    raw = to_dict(cfg)
    assert raw["validate"]["protocol"] == saved
    assert from_dict(yaml.safe_load(yaml.safe_dump(raw))) == cfg  # config.yaml reads back to the same run


def test_validation_protocol_set_in_python_is_parsed_by_validate():
    cfg = TrainConfig()
    cfg.validate.protocol = "linf-0.1"
    assert validate(cfg).validate.protocol == ThreatModel.preset("linf-0.1")
    cfg.validate.protocol = {"norm": "linf", "eps": 0.1, "epz": 1}
    with pytest.raises(ConfigError, match="^validate.protocol: unknown field 'epz'"):
        validate(cfg)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("linf-5", "eps: .* above 1"),
        ("linf-0.l", "unknown threat-model preset"),
        (3, "expected a protocol name"),
        ({1: "linf"}, "expected a protocol name or a mapping of field names"),
        ({"eps": -1}, "eps: must be >= 0"),
    ],
)
def test_validation_protocol_nonsense_names_the_field(value, message):
    with pytest.raises(ConfigError, match=f"^validate.protocol: {message}"):
        from_dict({"validate": {"protocol": value}})


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--validate.protocol", "linf-0.1"], ThreatModel.preset("linf-0.1")),
        (["--validate.protocol", "{norm: l2, eps: 0.5, steps: 3}"], ThreatModel("l2", 0.5, steps=3)),
    ],
)
def test_validation_protocol_from_the_command_line(argv, expected):
    from robustkd.cli import _parse, _train_parser

    raw = _parse(_train_parser("robustkd train", "", ""), argv).as_dict()
    raw.pop("config", None)
    raw.pop("__path__", None)
    assert validate(from_dict(raw)).validate.protocol == expected
