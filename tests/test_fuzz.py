"""Property-based fuzzing: configs (dicts, YAML files, CLI overrides) and threat models never fail with
anything but the documented error, and what they accept satisfies the documented invariants."""

from __future__ import annotations

import dataclasses
import math
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robustkd.attacks import ThreatModel
from robustkd.config import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    ValidateConfig,
    from_dict,
    load_config,
    validate,
)
from robustkd.errors import ConfigError, RobustKDError
from robustkd.evaluate import resolve_protocol

SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "method": MethodConfig,
    "optim": OptimConfig,
    "validate": ValidateConfig,
}
TOP = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["linf-0.1", "linf-5", "pgd10", "pgd0", "1e-3", "nan", "../x", "a/b", "..", "sgd", "cosine"]),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner), max_leaves=6
)


def _section(cls: type) -> st.SearchStrategy:
    names = [f.name for f in dataclasses.fields(cls)]
    keys = st.one_of(st.sampled_from(names), st.sampled_from(names), st.text(max_size=8))
    return st.dictionaries(keys, values, max_size=4)


configs = st.fixed_dictionaries(
    {},
    optional={
        **{name: values for name in TOP},
        **{name: st.one_of(_section(cls), values) for name, cls in SECTIONS.items()},
        "unknown_key": values,
    },
)


def _check_accepted(cfg: TrainConfig) -> None:
    """What validate lets through is safe to run: the invariants the engine relies on."""
    assert isinstance(cfg.epochs, int) and cfg.epochs >= 1
    assert isinstance(cfg.name, str) and Path(cfg.name).name == cfg.name and cfg.name not in ("", ".", "..")
    assert "/" not in cfg.name and "\\" not in cfg.name and "\0" not in cfg.name
    assert math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0
    assert cfg.data.batch_size >= 1 and cfg.data.eval_batch_size >= 1
    assert 0 <= cfg.data.val_fraction < 1
    assert isinstance(cfg.optim.betas, tuple) and len(cfg.optim.betas) == 2
    assert all(isinstance(m, float) for m in cfg.optim.milestones)
    assert isinstance(cfg.method.args, dict) and isinstance(cfg.model.args, dict)
    if cfg.validate.attack is not None:
        assert ThreatModel.parse(cfg.validate.protocol).eps <= 1


@given(raw=configs)
@settings(max_examples=250, deadline=None)
def test_config_dicts_raise_only_config_errors(raw):
    try:
        cfg = validate(from_dict(raw))
    except ConfigError:
        return
    _check_accepted(cfg)


@given(raw=configs)
@settings(max_examples=100, deadline=None)
def test_python_built_configs_are_type_checked_too(raw):
    # A TrainConfig made in Python skips from_dict; validate must still refuse wrong types cleanly.
    top = {k: v for k, v in raw.items() if k in TOP}
    try:
        cfg = validate(TrainConfig(**top))
    except ConfigError:
        return
    _check_accepted(cfg)


yaml_text = st.one_of(
    st.text(max_size=80),
    st.lists(
        st.tuples(
            st.sampled_from([*TOP, "optim", "data", "bogus", "- item", "? key"]),
            st.sampled_from(
                [
                    "3",
                    "-1",
                    "1e-3",
                    ".nan",
                    "[1, 2]",
                    "{lr: 0.1}",
                    "{lr: abc}",
                    "!!python/object/apply:os.system ['true']",
                    "!!python/name:os.system",
                    "!!binary aGVsbG8=",
                    "&a [*a]",
                    "*undefined",
                    "'unterminated",
                    "\t",
                    "null",
                    "../../etc",
                ]
            ),
        ),
        max_size=5,
    ).map(lambda rows: "\n".join(f"{k}: {v}" for k, v in rows)),
)


@given(text=yaml_text)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_yaml_config_files_raise_only_config_errors(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = validate(load_config(path))
    except ConfigError:
        return
    _check_accepted(cfg)


def test_yaml_tags_are_refused_by_the_loader(tmp_path):
    marker = tmp_path / "made-by-yaml"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML, or uses a tag"):
        load_config(path)
    assert not marker.exists()
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


@pytest.fixture(scope="module")
def train_parser():
    from robustkd.cli import _train_parser

    return _train_parser("robustkd train", "", "")


override_values = st.one_of(
    st.text(alphabet=string.printable, max_size=10),
    st.sampled_from(["0", "-5", "1e400", "nan", "true", "null", "[1,2]", "{a: 1}", "../up", "linf-9"]),
)


@given(key=st.sampled_from(["epochs", "name", "optim.lr", "optim.betas", "data.batch_size", "seed", "resume",
                            "validate.protocol", "method.args", "optim.milestones", "data.val_fraction"]),
       value=override_values)  # fmt: skip
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_cli_overrides_raise_only_config_errors(train_parser, key, value):
    from robustkd.cli import _parse

    try:
        args = _parse(train_parser, [f"--{key}", value])
        raw = args.as_dict()
        raw.pop("config", None)
        raw.pop("__path__", None)
        cfg = validate(from_dict(raw))
    except ConfigError:
        return
    _check_accepted(cfg)


# --- ThreatModel and protocols ------------------------------------------------------------------------

anything = st.one_of(scalars, st.lists(scalars, max_size=2), st.dictionaries(st.text(max_size=3), scalars, max_size=2))
fields = st.sampled_from(["norm", "eps", "step_size", "steps", "restarts", "random_start", "alpha", "bogus"])


@given(name=st.one_of(st.text(max_size=12), anything, st.from_regex(r"(linf|l2|LINF)-[0-9./]{1,8}", fullmatch=True)),
       overrides=st.dictionaries(fields, anything, max_size=3))  # fmt: skip
@settings(max_examples=400, deadline=None)
def test_threat_presets_and_overrides_raise_only_robustkd_errors(name, overrides):
    try:
        t = ThreatModel.preset(name, **overrides)
    except RobustKDError:
        return
    assert t.norm in ("linf", "l2") and math.isfinite(t.eps) and t.eps >= 0
    assert t.steps >= 1 and t.restarts >= 1 and math.isfinite(t.alpha) and t.alpha >= 0
    assert t.norm != "linf" or t.eps <= 1


@given(changes=st.dictionaries(fields, anything, max_size=4))
@settings(max_examples=300, deadline=None)
def test_threat_replace_raises_only_config_errors(changes):
    try:
        t = ThreatModel().replace(**changes)
    except ConfigError:
        return
    assert t == ThreatModel(t.norm, t.eps, t.step_size, t.steps, t.restarts, t.random_start)


@given(
    value=st.one_of(
        st.text(max_size=12), anything, st.dictionaries(fields, anything, max_size=3), st.builds(ThreatModel)
    )
)
@settings(max_examples=300, deadline=None)
def test_threat_parse_raises_only_config_errors_naming_the_field(value):
    try:
        t = ThreatModel.parse(value, field="validate.protocol")
    except ConfigError as err:
        assert str(err).startswith("validate.protocol: ")
        return
    assert isinstance(t, ThreatModel) and t.eps >= 0 and (t.norm != "linf" or t.eps <= 1)


@given(
    norm=st.sampled_from(["linf", "l2"]),
    eps=st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
)
@settings(max_examples=300, deadline=None)
def test_threat_name_parses_back_to_the_same_ball(norm, eps):
    if norm == "linf":
        eps = min(eps, 1.0)
    t = ThreatModel(norm, eps, step_size=None)
    back = ThreatModel.parse(t.name)
    assert (back.norm, back.eps) == (t.norm, t.eps)


@given(protocol=st.one_of(st.text(max_size=12), anything, st.from_regex(r"(linf|l2)-[0-9./]{1,6}", fullmatch=True)))
@settings(max_examples=300, deadline=None)
def test_protocol_names_raise_only_config_errors(protocol):
    try:
        name, threat = resolve_protocol(protocol)
    except ConfigError:
        return
    assert isinstance(threat, ThreatModel) and name == protocol
