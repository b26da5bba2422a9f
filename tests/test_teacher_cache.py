"""The teacher cache: per-example teacher outputs computed once per run give the uncached run's results."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import INFO, ForwardCounter, tiny_pair
from test_engine import _cfg

import robustkd
import robustkd.engine.loop as loop
from robustkd.checkpoint import load_model
from robustkd.config import validate
from robustkd.data import Split
from robustkd.engine.teacher_cache import TeacherCache, cache_bytes
from robustkd.errors import ConfigError
from robustkd.methods import Batch, build_method

CACHED = ["kd", "kdiga", "ard", "rslad"]
# Two PGD steps keep the attack methods' runs short; the cache is about the teacher, not the attack.
FAST = {"ard": {"threat": {"steps": 2}}, "rslad": {"threat": {"steps": 2}}}


def _split(x: torch.Tensor, y: torch.Tensor) -> Split:
    return Split((x * 255).round().to(torch.uint8), y)


def test_lookup_gives_the_teacher_logits_and_the_batch_mean_input_gradient() -> None:
    _, teacher, batch = tiny_pair()
    split = _split(batch.x, batch.y)
    cache = TeacherCache.build(teacher, split, ("logits", "input_grad"), batch_size=3)  # built in 3 uneven pieces
    index = torch.tensor([5, 0, 2])
    x = split.images[index].float() / 255
    rows = cache.lookup(index)
    # Re-stated apart from the cache: one batch of 3, CE averaged over it, its gradient by autograd.
    leaf = x.clone().requires_grad_(True)
    logits = teacher(leaf)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, split.labels[index]), leaf)
    torch.testing.assert_close(rows["logits"], logits.detach())
    torch.testing.assert_close(rows["input_grad"], grad)
    assert cache_bytes(split, 4, ("logits", "input_grad")) == 4 * 8 * (4 + 64)


@pytest.mark.parametrize("name", CACHED)
def test_a_step_with_cached_teacher_outputs_equals_the_uncached_step(name: str) -> None:
    student, teacher, batch = tiny_pair()
    method = build_method(name, FAST.get(name, {}))
    split = _split(batch.x, batch.y)
    x = split.images.float() / 255  # the pixels the cache was built from
    index = torch.arange(len(x))
    cache = TeacherCache.build(teacher, split, method.clean_teacher(), batch_size=5)
    grads = []
    counter = ForwardCounter(teacher)
    for rows in ({}, cache.lookup(index)):
        model = copy.deepcopy(student)
        torch.manual_seed(1)  # the same attack start for both
        before = counter.calls
        out = method(model, teacher, Batch(x, split.labels, index, rows), INFO)
        out.loss.backward()
        grads.append([p.grad for p in model.parameters()])
        assert (counter.calls - before == 0) == bool(rows)  # cached: the teacher is not run at all
    for cached, uncached in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-6)


def test_the_cache_declarations() -> None:
    assert build_method("kd").clean_teacher() == ("logits",)
    assert build_method("kdiga").clean_teacher() == ("logits", "input_grad")
    assert build_method("ard", {"alpha": 0.0}).clean_teacher() == ()  # no teacher term at all
    assert build_method("pgd_at").clean_teacher() == ()


def test_the_key_sees_a_changed_teacher_or_split() -> None:
    _, teacher, batch = tiny_pair()
    split = _split(batch.x, batch.y)
    names = ("logits",)
    cache = TeacherCache.build(teacher, split, names, batch_size=8)
    assert cache.valid(teacher, split, names, None)
    assert not cache.valid(teacher, split, ("logits", "input_grad"), None)
    assert not cache.valid(teacher, split, names, torch.bfloat16)
    assert not cache.valid(teacher, _split(batch.x, batch.y), names, None)  # another split, same values
    teacher.load_state_dict(teacher.state_dict())  # written in place: the version counters move
    assert not cache.valid(teacher, split, names, None)


# --- through the engine


def _distill(tmp_path, teacher, name, mode, **over):
    method = {"name": name, "args": FAST.get(name, {})}
    return robustkd.train(_cfg(tmp_path / mode, teacher=teacher, method=method, teacher_cache=mode, **over))


def _counted_teacher(monkeypatch) -> list[ForwardCounter]:
    counters = []

    def freeze(model):
        counters.append(ForwardCounter(model))
        return real(model)

    real = loop.freeze
    monkeypatch.setattr(loop, "freeze", freeze)
    return counters


@pytest.mark.parametrize("name", CACHED)
def test_a_cached_run_ends_with_the_uncached_weights(tmp_path, toy, toy_teacher, monkeypatch, name):
    counters = _counted_teacher(monkeypatch)
    uncached = _distill(tmp_path, toy_teacher, name, "never")
    cached = _distill(tmp_path, toy_teacher, name, "always")
    # 2 epochs of 6 steps; one probe forward when loaded, then a step each (never) or one cache pass (always).
    assert [c.calls for c in counters] == [1 + 12, 1 + 1]
    a, b = load_model(uncached.run_dir / "last").state_dict(), load_model(cached.run_dir / "last").state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert [r["val/acc"] for r in cached.history] == [r["val/acc"] for r in uncached.history]


def test_auto_caches_without_augmentation_only(tmp_path, toy, toy_teacher, monkeypatch):
    counters = _counted_teacher(monkeypatch)
    _distill(tmp_path / "plain", toy_teacher, "kd", "auto")
    _distill(tmp_path / "crop", toy_teacher, "kd", "auto", data={"augment": "crop"})
    assert [c.calls for c in counters] == [1 + 1, 1 + 12]


def test_always_is_refused_where_augmentation_changes_the_teacher_input(tmp_path, toy, toy_teacher):
    with pytest.raises(ConfigError, match=r"^teacher_cache: always, but data.augment 'crop' changes") as info:
        _distill(tmp_path, toy_teacher, "kd", "always", data={"augment": "crop"})
    assert "\n" not in str(info.value)


def test_always_is_refused_for_a_method_without_clean_teacher_outputs(tmp_path, toy):
    with pytest.raises(ConfigError, match=r"^teacher_cache: always, but method 'standard' uses no teacher output"):
        robustkd.train(_cfg(tmp_path, teacher_cache="always"))


def test_an_unknown_setting_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^teacher_cache: must be one of auto, always, never, got 'on'"):
        validate(_cfg(tmp_path, teacher_cache="on"))
