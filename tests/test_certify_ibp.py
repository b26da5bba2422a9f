"""Native IBP's no-autograd pass (boxes in centre/width form overwritten in place by their last reader, |W|
cached per layer, channels-last maps, a paired single-channel convolution, ReLU moved after max pooling, a
Normalize folded into an unpadded convolution) against an independent interval propagation written out module
by module, and against itself with autograd on (nothing overwritten, no Normalize folded, default layout)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkd.certify import get_verifier, input_box, interval_bounds, margin_spec
from robustkd.models.layers import Normalize, Residual


def _reference_ibp(module: nn.Module, lower: torch.Tensor, upper: torch.Tensor):
    """Interval propagation straight from the definitions: centre through the map, radius through |map|."""
    if isinstance(module, nn.Sequential):
        for child in module:
            lower, upper = _reference_ibp(child, lower, upper)
        return lower, upper
    if isinstance(module, Residual):
        bl, bu = _reference_ibp(module.body, lower, upper)
        sl, su = _reference_ibp(module.shortcut, lower, upper)
        return bl + sl, bu + su
    if isinstance(module, (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity)):
        return module(lower.clone()), module(upper.clone())
    mid, rad = (upper + lower) / 2, (upper - lower) / 2
    if isinstance(module, nn.Linear):
        mid, rad = F.linear(mid, module.weight, module.bias), F.linear(rad, module.weight.abs())
    elif isinstance(module, nn.Conv2d):
        conv = module._conv_forward
        mid, rad = conv(mid, module.weight, module.bias), conv(rad, module.weight.abs(), None)
    elif isinstance(module, nn.BatchNorm2d):
        scale = module.weight / torch.sqrt(module.running_var + module.eps)
        shift = module.bias - module.running_mean * scale
        mid, rad = mid * scale[:, None, None] + shift[:, None, None], rad * scale.abs()[:, None, None]
    elif isinstance(module, Normalize):
        mid, rad = (mid - module.mean) / module.std, rad / module.std
    else:
        raise AssertionError(type(module))
    return mid - rad, mid + rad


def _single_channel_net() -> nn.Module:
    """A greyscale input (the paired convolution), BN with negative scales, an identity-shortcut residual
    (a box read twice), max pooling, flatten of channels-last maps, a final linear layer folded into C."""
    torch.manual_seed(0)
    net = nn.Sequential(
        Normalize([0.3], [0.4]),
        nn.Conv2d(1, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )
    with torch.no_grad():
        bn = net[2]
        bn.running_mean.uniform_(-0.3, 0.3), bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5), bn.bias.uniform_(-0.3, 0.3)
    return net.eval()


def _inputs(batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(batch, 1, 12, 12, generator=generator), torch.randint(0, 5, (batch,), generator=generator)


def _reference_margins(net, x, y, eps):
    lower, upper = _reference_ibp(net, *input_box(x, eps))
    C = margin_spec(y, 5, dtype=x.dtype)
    mid, rad = (upper + lower) / 2, (upper - lower) / 2
    centre, radius = torch.einsum("bsk,bk->bs", C, mid), torch.einsum("bsk,bk->bs", C.abs(), rad)
    return centre - radius, centre + radius


@pytest.mark.parametrize("eps", (0.0, 0.02, 0.1))
def test_the_reusing_pass_matches_the_definitions(eps):
    net, (x, _) = _single_channel_net(), _inputs()
    with torch.no_grad():
        lower, upper = interval_bounds(net, x, eps)  # no spec: the output box itself
        ref_lower, ref_upper = _reference_ibp(net, *input_box(x, eps))
    torch.testing.assert_close(lower, ref_lower, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(upper, ref_upper, atol=1e-5, rtol=1e-5)
    assert (lower <= upper).all()


def test_spec_bounds_agree_with_and_without_autograd_and_hold_on_samples():
    net, (x, y) = _single_channel_net(), _inputs()
    C = margin_spec(y, 5, dtype=x.dtype)
    with torch.no_grad():
        reused = interval_bounds(net, x, 0.05, C=C)
    kept_all = interval_bounds(net, x, 0.05, C=C)  # autograd on: fresh tensors, every box kept
    state = get_verifier("ibp").state(net, *input_box(x, 0.05))  # the keep-every-box state CROWN builds on
    for other in (kept_all, state.ibp_spec(C)):
        torch.testing.assert_close(reused[0], other[0].detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(reused[1], other[1].detach(), atol=1e-5, rtol=0)
    points = (x + 0.05 * (2 * torch.rand(200, *x.shape) - 1)).clamp(0, 1)
    with torch.no_grad():
        margins = torch.einsum("bsk,nbk->nbs", C, net(points.flatten(0, 1)).view(200, len(x), 5))
    assert (margins >= reused[0] - 1e-5).all() and (margins <= reused[1] + 1e-5).all()


def test_the_callers_input_box_is_not_overwritten():
    net, (x, _) = _single_channel_net(), _inputs()
    x_lower, x_upper = input_box(x, 0.1)
    saved = x_lower.clone(), x_upper.clone()
    with torch.no_grad():
        get_verifier("ibp").bounds(net, x_lower, x_upper)
        flat = nn.Sequential(nn.Flatten(), nn.Linear(144, 8), nn.ReLU(), nn.Linear(8, 3))  # flatten: a view
        get_verifier("ibp").bounds(flat, x_lower, x_upper)
    assert torch.equal(x_lower, saved[0]) and torch.equal(x_upper, saved[1])


def test_cached_weights_follow_in_place_updates():
    net, (x, _) = _single_channel_net(), _inputs()
    with torch.no_grad():
        interval_bounds(net, x, 0.05)  # fills the per-layer cache
        for p in net.parameters():
            p.mul_(-0.7)  # in place, as an optimiser step does
        after = interval_bounds(net, x, 0.05)
        fresh = _reference_ibp(net, *input_box(x, 0.05))
    torch.testing.assert_close(after[0], fresh[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[1], fresh[1], atol=1e-5, rtol=1e-5)


def test_margin_bounds_match_the_definitions():
    net, (x, y) = _single_channel_net(), _inputs()
    with torch.no_grad():
        ours = interval_bounds(net, x, 0.03, C=margin_spec(y, 5, dtype=x.dtype))
    # The final Linear layer is folded into the spec, which is tighter than bounding the logits first.
    ref_lower, ref_upper = _reference_margins(net, x, y, 0.03)
    assert (ours[0] >= ref_lower - 1e-5).all() and (ours[1] <= ref_upper + 1e-5).all()


def _nets() -> dict[str, nn.Module]:
    """Networks that take each shortcut of the no-autograd pass: a Normalize folded into an unpadded
    convolution (one and three channels), kept before a padded or grouped one, a ReLU moved after the max
    pooling that reads it, a greyscale input read by the paired convolution without a copy."""
    torch.manual_seed(3)
    nets = {
        "rgb_fold_relu_pool": nn.Sequential(
            Normalize([0.4, 0.5, 0.6], [0.2, 0.25, 0.3]),
            nn.Conv2d(3, 4, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 8),
            nn.ReLU(),
            nn.Linear(8, 5),
        ),
        "grey_padded_no_fold": nn.Sequential(
            Normalize([0.3], [0.4]),
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 5),
        ),
        "grouped_no_fold": nn.Sequential(
            Normalize([0.1, 0.9], [0.5, 2.0]),
            nn.Conv2d(2, 4, 3, groups=2),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 5),
        ),
    }
    return {name: net.eval() for name, net in nets.items()}


@pytest.mark.parametrize("name", ["rgb_fold_relu_pool", "grey_padded_no_fold", "grouped_no_fold"])
def test_every_shortcut_of_the_pass_matches_the_definitions(name):
    net = _nets()[name]
    channels = net[1].in_channels
    generator = torch.Generator().manual_seed(4)
    x = torch.rand(5, channels, 12, 12, generator=generator)
    y = torch.randint(0, 5, (5,), generator=generator)
    C = margin_spec(y, 5, dtype=x.dtype)
    with torch.no_grad():
        logits = interval_bounds(net, x, 0.03)
        margins = interval_bounds(net, x, 0.03, C=C)
        reference = _reference_ibp(net, *input_box(x, 0.03))
    for ours, ref in zip(logits, reference):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    with_grad = interval_bounds(net, x, 0.03, C=C)  # autograd on: nothing in place, nothing folded, NCHW
    for ours, ref in zip(margins, with_grad):
        torch.testing.assert_close(ours, ref.detach(), atol=1e-5, rtol=1e-5)
    points = (x + 0.03 * (2 * torch.rand(100, *x.shape, generator=generator) - 1)).clamp(0, 1)
    with torch.no_grad():
        sampled = torch.einsum("bsk,nbk->nbs", C, net(points.flatten(0, 1)).view(100, len(x), 5))
    assert (sampled >= margins[0] - 1e-5).all() and (sampled <= margins[1] + 1e-5).all()


def test_a_folded_normalize_follows_in_place_updates_of_its_buffers():
    net = _nets()["rgb_fold_relu_pool"]
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        interval_bounds(net, x, 0.02)  # caches the folded weights
        net[0].mean.add_(0.1)
        net[0].std.mul_(1.5)
        after = interval_bounds(net, x, 0.02)
        reference = _reference_ibp(net, *input_box(x, 0.02))
    for ours, ref in zip(after, reference):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_spec", [False, True])
def test_a_final_linear_reading_flattened_channels_last_maps(with_spec):
    """The final Linear layer reads the flattened maps: kept for the spec (in NCHW order), or computed by the
    pass itself with its columns reordered (no spec)."""
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 10 * 10, 4)).eval()
    generator = torch.Generator().manual_seed(7)
    x = torch.rand(4, 2, 12, 12, generator=generator)
    y = torch.randint(0, 4, (4,), generator=generator)
    C = margin_spec(y, 4, dtype=x.dtype) if with_spec else None
    with torch.no_grad():
        ours = interval_bounds(net, x, 0.05, C=C)
        lower, upper = _reference_ibp(net[:3], *input_box(x, 0.05))  # the boxes up to the final layer's input
        ref = _reference_ibp(net, *input_box(x, 0.05))
    if with_spec:  # the final layer folded into C: at least as tight as bounding the logits first
        centre = torch.einsum("bsk,bk->bs", C, (ref[0] + ref[1]) / 2)
        radius = torch.einsum("bsk,bk->bs", C.abs(), (ref[1] - ref[0]) / 2)
        assert (ours[0] >= centre - radius - 1e-5).all() and (ours[1] <= centre + radius + 1e-5).all()
        folded = C @ net[3].weight
        mid, rad = (upper + lower) / 2, (upper - lower) / 2
        exact = torch.einsum("bsi,bi->bs", folded, mid) + C @ net[3].bias
        spread = torch.einsum("bsi,bi->bs", folded.abs(), rad)
        torch.testing.assert_close(ours[0], exact - spread, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[1], exact + spread, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[1], ref[1], atol=1e-5, rtol=1e-5)
