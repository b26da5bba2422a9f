"""Architecture registry: every registered model builds, maps images to logits, and keeps the contracts
others rely on (Normalize first, only boundable layers in the CNNs/ResNets, option checking)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from torch import nn

from robustkd.errors import ConfigError, RegistryError
from robustkd.models import (
    BOUNDABLE_TYPES,
    MODELS,
    Normalize,
    Residual,
    count_parameters,
    create_model,
    list_models,
    model_info,
    model_options,
    model_shapes,
)

ARCHS = list_models(exclude="timm/*")

# The full-size WRNs take seconds to build and run; their structure is the same at depth 10, width 1.
SMALL_OPTIONS = {name: {"depth": 10, "width": 1} for name in ("wrn", "wrn_34_10", "wrn_28_10")}

# Pinned here, apart from layers.BOUNDABLE_TYPES: adding a module type to a bounded architecture must
# be a deliberate change in both places (and in robustkd.certify).
ALLOWED = {
    nn.Sequential,
    Normalize,
    Residual,
    nn.Conv2d,
    nn.Linear,
    nn.ReLU,
    nn.Flatten,
    nn.BatchNorm2d,
    nn.BatchNorm1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.MaxPool2d,
    nn.Identity,
}
MUST_BE_BOUNDABLE = {
    "dm_small",
    "dm_medium",
    "dm_large",
    "small_cnn",
    "resnet18",
    "preact_resnet18",
    "wrn",
    "wrn_34_10",
    "wrn_28_10",
}


def build(arch: str, **kwargs) -> nn.Module:
    return create_model(arch, **SMALL_OPTIONS.get(arch, {}), **kwargs)


def test_registry_lists_the_expected_architectures():
    expected = MUST_BE_BOUNDABLE | {"mobilenet_v2", "vit_tiny"}
    assert expected <= set(ARCHS)
    assert list_models("wrn*") == ["wrn", "wrn_28_10", "wrn_34_10"]
    assert list_models("timm/*") == []  # timm models are built on request, never listed


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_maps_images_to_logits(arch, channels, size):
    num_classes = 7 if size == 28 else 10
    model = build(arch, num_classes=num_classes, in_channels=channels, input_size=size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_is_deterministic_and_input_gradients_flow(arch):
    model = build(arch).eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    first = model(x)
    (grad,) = torch.autograd.grad(first.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(model(x), first.detach())


@pytest.mark.parametrize("arch", ARCHS)
def test_metadata(arch):
    info = model_info(arch)
    assert info.name == arch
    assert info.summary and info.input_sizes
    assert set(model_options(arch)).isdisjoint({"num_classes", "in_channels", "input_size"})


@pytest.mark.parametrize("arch", sorted(MUST_BE_BOUNDABLE))
def test_bounded_architectures_use_only_allowed_modules(arch):
    assert model_info(arch).boundable
    model = build(arch)
    # Exact types: a subclass could override forward and make a bound unsound.
    extra = {type(m).__name__ for m in model.modules() if type(m) not in ALLOWED}
    assert not extra, f"{arch} uses module types the bound propagators do not know: {sorted(extra)}"


def test_boundable_types_match_the_pinned_list():
    assert set(BOUNDABLE_TYPES) == ALLOWED


@pytest.mark.parametrize("arch", [a for a in ARCHS if model_info(a).boundable])
def test_activation_after_a_residual_sum_is_a_separate_module(arch):
    for module in build(arch).modules():
        if isinstance(module, Residual):
            assert isinstance(module.body, nn.Sequential)
            assert not isinstance(module.body[-1], nn.ReLU)


def test_normalize_is_the_first_layer():
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    model = create_model("small_cnn", mean=mean, std=std)
    assert [name for name, _ in model.named_children()] == ["normalize", "net"]
    assert isinstance(model[0], Normalize)
    x = torch.rand(2, 3, 32, 32)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), expected)


def test_normalize_defaults_to_identity_and_broadcasts_one_value():
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(create_model("dm_small").normalize(x), x)
    model = create_model("dm_small", mean=[0.5], std=[0.5])
    assert model.normalize.mean.flatten().tolist() == [0.5] * 3
    torch.testing.assert_close(model.normalize(x), (x - 0.5) / 0.5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mean": [0.1, 0.2]}, "mean"),
        ({"std": [1.0, 0.0, 1.0]}, "std"),
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 2.5}, "in_channels"),
        ({"mean": [float("nan")]}, "mean"),
        ({"std": [float("inf")]}, "std"),
    ],
)
def test_bad_common_arguments_raise_config_error(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        create_model("small_cnn", **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_shapes_are_the_built_models(arch):
    shapes = model_shapes(arch, in_channels=1, input_size=28, **SMALL_OPTIONS.get(arch, {}))
    built = build(arch, in_channels=1, input_size=28).state_dict()
    assert shapes == {key: tuple(value.shape) for key, value in built.items()}


@pytest.mark.parametrize(
    ("arch", "options", "match"),
    [
        ("small_cnn", {"width": 10_000_000}, r"option width=10000000 is over 100,000"),
        ("small_cnn", {"width": 20_000}, r"with width=20000 would hold 7,528,\d+,\d+ parameters"),
        ("vit_tiny", {"depth": 100_000_000}, r"option depth=100000000 is over 1,000"),
        ("mobilenet_v2", {"width_mult": 1e300}, r"cannot be built with width_mult=1e\+300"),
        ("dm_large", {"linear_size": 99_999}, r"with linear_size=99999 would hold 3,2"),
    ],
)
def test_absurd_options_are_refused_before_allocating(monkeypatch, arch, options, match):
    def no_real_tensors(*args, **kwargs):
        raise AssertionError("a real tensor was allocated")

    # Every parameter starts as torch.empty: on the meta device that costs nothing, elsewhere it is refused here.
    real_empty = torch.empty
    monkeypatch.setattr(
        torch,
        "empty",
        lambda *a, **k: real_empty(*a, **k) if torch.get_default_device().type == "meta" else no_real_tensors(),
    )
    with pytest.raises(ConfigError, match=rf"^model '{arch}'.*{match}"):
        create_model(arch, **options)


def test_normalize_refuses_non_finite_statistics():
    with pytest.raises(ValueError, match="finite"):
        Normalize([float("nan")], [1.0])
    with pytest.raises(ValueError, match="finite"):
        Normalize([0.0], [float("inf")])


def test_none_options_are_dropped():
    default = count_parameters(create_model("small_cnn"))
    assert count_parameters(create_model("small_cnn", width=None, hidden=None, mean=None, std=None)) == default
    assert count_parameters(create_model("small_cnn", hidden=64)) != default


def test_unknown_option_names_the_arch_its_options_and_a_close_match():
    with pytest.raises(ConfigError) as err:
        create_model("wrn", depht=10)
    message = str(err.value)
    assert "'wrn'" in message and "'depht'" in message
    assert "did you mean 'depth'" in message
    assert "depth, width" in message


def test_unknown_arch_suggests_close_matches():
    with pytest.raises(RegistryError, match="did you mean 'resnet18'"):
        create_model("resnet_18")
    with pytest.raises(RegistryError):
        model_info("nope")


def test_duplicate_registration_is_refused():
    with pytest.raises(RegistryError, match="already registered"):
        MODELS.add("resnet18", lambda **_: nn.Identity())


def test_options_are_validated():
    with pytest.raises(ConfigError, match="6n\\+4"):
        create_model("wrn", depth=12)
    with pytest.raises(ConfigError, match="patch_size"):
        create_model("vit_tiny", input_size=30)
    with pytest.raises(ConfigError, match="too small"):
        create_model("dm_medium", input_size=8)


@pytest.mark.parametrize(
    "arch, kwargs, expected",
    [
        # By hand: 3*16*16+16, 16*32*16+32, (32*12*12)*100+100, 100*10+10.
        ("dm_small", {}, 784 + 8224 + 460900 + 1010),
        # 28x28, one channel: feature maps 13 then 10.
        ("dm_small", {"in_channels": 1, "input_size": 28}, 272 + 8224 + 320100 + 1010),
        ("dm_small", {"input_size": 28, "padding": 1}, 784 + 8224 + (32 * 13 * 13) * 100 + 100 + 1010),
    ],
)
def test_exact_parameter_counts(arch, kwargs, expected):
    assert count_parameters(create_model(arch, **kwargs)) == expected


@pytest.mark.parametrize(
    "arch, expected, rel",
    [
        ("resnet18", 11.17e6, 2e-3),  # the CIFAR ResNet-18 of the robustness literature
        ("preact_resnet18", 11.17e6, 2e-3),
        ("mobilenet_v2", 2.25e6, 0.03),  # 2.2-2.3M depending on the port
        ("vit_tiny", 2.69e6, 0.01),
    ],
)
def test_parameter_counts(arch, expected, rel):
    assert count_parameters(create_model(arch)) == pytest.approx(expected, rel=rel)


def test_wrn_34_10_has_46_2m_parameters():
    assert count_parameters(create_model("wrn_34_10")) == pytest.approx(46.16e6, rel=1e-3)


def test_count_parameters_trainable_only():
    model = create_model("dm_small")
    model.net[0].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 784


# timm imports torchvision at load time, so `pytest.importorskip("timm")` would skip even when timm is
# installed; look for the package instead and let robustkd do the import.
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")


@pytest.fixture
def restore_torchvision():
    before = {name for name in sys.modules if name.split(".")[0] == "torchvision"}
    yield
    for name in [n for n in sys.modules if n.split(".")[0] == "torchvision" and n not in before]:
        del sys.modules[name]


@needs_timm
@pytest.mark.usefixtures("restore_torchvision")
def test_timm_models_build_offline(tmp_path):
    from safetensors.torch import save_file

    model = create_model("timm/resnet18", num_classes=7, in_channels=1, input_size=28).eval()
    assert isinstance(model[0], Normalize)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 7)
    assert not model_info("timm/resnet18").boundable

    weights = tmp_path / "resnet18.safetensors"
    save_file(model.net.state_dict(), weights)
    loaded = create_model("timm/resnet18", num_classes=7, in_channels=1, pretrained_file=str(weights))
    for key, value in model.net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[key], value), key

    with pytest.raises(ConfigError, match="pretrained_file"):
        create_model("timm/resnet18", pretrained=True)
    with pytest.raises(RegistryError, match="timm/resnet18"):
        create_model("timm/resnet81")
    with pytest.raises(ConfigError, match="timm/resnet18"):
        create_model("timm/resnet18", no_such_option=1)


def test_vit_attention_equals_the_fused_kernel_and_is_twice_differentiable():
    import torch.nn.functional as F

    from robustkd.models.vit import SelfAttention

    torch.manual_seed(0)
    attention = SelfAttention(dim=8, heads=2).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    q, k, v = attention.qkv(x).view(3, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    fused = attention.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(attention(x), fused, rtol=1e-12, atol=1e-12)
    # KDIGA differentiates the input gradient again: the fused CPU kernel raises here.
    assert torch.autograd.gradgradcheck(attention, (x,))


def test_kdiga_trains_a_vit_student():
    from robustkd.methods import Batch, StepInfo, build_method

    torch.manual_seed(0)
    student = create_model("vit_tiny", in_channels=1, input_size=28, dim=12, depth=1, heads=2)
    teacher = create_model("dm_small", in_channels=1, input_size=28).eval().requires_grad_(False)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    out = build_method("kdiga", {"gamma": 10.0})(student, teacher, Batch(x, y), StepInfo(0, 0, 1, 1))
    out.loss.backward()
    grads = {name: p.grad for name, p in student.named_parameters() if "qkv" in name}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("stride, padding, size", [(1, 0, 7), (1, 1, 8), (2, 0, 8), (2, 1, 7), (2, 1, 8)])
def test_depthwise_conv_derivatives_equal_the_native_ones(stride, padding, size):
    import torch.nn.functional as F

    from robustkd.models.layers import _DepthwiseConv

    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)

    def ours(x, w):
        return _DepthwiseConv.apply(x, w, (stride, stride), (padding, padding), (1, 1))

    def native(x, w):
        return F.conv2d(x, w, None, stride, padding, 1, 3)

    torch.testing.assert_close(ours(x, w), native(x, w), rtol=0, atol=0)
    assert torch.autograd.gradcheck(ours, (x, w))
    assert torch.autograd.gradgradcheck(ours, (x, w))
    # The input-gradient penalty's gradient, as KDIGA takes it, against the native double backward.
    second = []
    for fn in (ours, native):
        (gx,) = torch.autograd.grad(fn(x, w).pow(2).sum(), x, create_graph=True)
        second.append(torch.autograd.grad(gx.pow(2).sum(), (x, w)))
    for a, b in zip(*second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _convolutions_in_double_backward(conv: nn.Module) -> int:
    from torch.profiler import profile

    x = torch.rand(2, 64, 8, 8, requires_grad=True)
    (gx,) = torch.autograd.grad(conv(x).pow(2).sum(), x, create_graph=True)
    with profile() as prof:
        gx.pow(2).sum().backward()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")


def test_depthwise_double_backward_does_not_loop_over_channels():
    from robustkd.models.layers import DepthwiseConv2d

    ours = DepthwiseConv2d(64, 3, padding=1)
    native = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
    # PyTorch's grouped double backward runs one convolution per channel; ours a fixed handful.
    assert _convolutions_in_double_backward(native) >= 64
    assert _convolutions_in_double_backward(ours) <= 4


def test_mobilenet_kdiga_gradients_and_checkpoints_are_unchanged_by_the_depthwise_layer():
    import copy

    from robustkd.methods import Batch, StepInfo, build_method
    from robustkd.models.layers import DepthwiseConv2d

    torch.manual_seed(0)
    ours = create_model("mobilenet_v2", input_size=32, width_mult=0.25)
    native = copy.deepcopy(ours)
    swapped = 0
    for module in native.modules():
        if isinstance(module, DepthwiseConv2d):
            module.__class__ = nn.Conv2d
            swapped += 1
    assert swapped == 17  # every inverted-residual block's depthwise convolution
    assert ours.state_dict().keys() == native.state_dict().keys()
    teacher = create_model("dm_small", input_size=32).eval().requires_grad_(False)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    method = build_method("kdiga", {"gamma": 10.0, "grad_norm": "l2_squared_per_example"})
    grads = []
    for model in (ours, native):  # float64, so that summation order cannot hide a difference
        model, t64 = copy.deepcopy(model).double(), copy.deepcopy(teacher).double()
        method(model, t64, Batch(x.double(), y), StepInfo(0, 0, 1, 1)).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    # bf16 autocast keeps the native layer (a custom backward would meet mixed dtypes).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        method(ours, teacher, Batch(x, y), StepInfo(0, 0, 1, 1)).loss.backward()
