"""Foreign checkpoints: each source's forward pass re-stated here (following its own code, not robustkd's
models), random weights and BatchNorm statistics saved in its naming, imported with and without an
architecture, and the logits compared; plus the refusals (hostile, unknown, mismatched, truncated files)."""

from __future__ import annotations

import importlib
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustkd
from robustkd.checkpoint import load_model, read_meta
from robustkd.cli import main
from robustkd.errors import CheckpointError, ConfigError, RegistryError
from robustkd.models import create_model, foreign

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2471, 0.2435, 0.2616]


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)


# --- TRADES' / RobustBench's / Carmon et al.'s WideResNet (models/wideresnet.py) --------------------------------
class WRNBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = _bn(cin), _conv(cin, cout, 3, stride)
        self.bn2, self.conv2 = _bn(cout), _conv(cout, cout, 3)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        if self.equal:
            out = F.relu(self.bn1(x))
        else:  # the input itself is replaced by its pre-activation, which the shortcut then reads
            x = F.relu(self.bn1(x))
            out = x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return (x if self.equal else self.convShortcut(x)) + out


class WRNStage(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[WRNBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x):
        return self.layer(x)


class SourceWRN(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int = 10, sub_block1: bool = False) -> None:
        super().__init__()
        n, c = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = _conv(3, 16, 3)
        self.block1 = WRNStage(n, c[0], c[1], 1)
        if sub_block1:  # built, saved, never called
            self.sub_block1 = WRNStage(n, c[0], c[1], 1)
        self.block2, self.block3 = WRNStage(n, c[1], c[2], 2), WRNStage(n, c[2], c[3], 2)
        self.bn1, self.fc, self.channels = _bn(c[3]), nn.Linear(c[3], num_classes), c[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.channels))


# --- RobustBench's PreActResNet-18 (architectures/resnet.py): PreActBlock (Wong2020Fast), PreActBlockV2 (Rice L2)
class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, v2: bool) -> None:
        super().__init__()
        self.v2 = v2
        self.bn1, self.conv1 = _bn(cin), _conv(cin, cout, 3, stride)
        self.bn2, self.conv2 = _bn(cout), _conv(cout, cout, 3)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        if hasattr(self, "shortcut"):
            shortcut = self.shortcut(out if self.v2 else x)
        else:
            shortcut = x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class SourcePreAct(nn.Module):
    def __init__(self, v2: bool, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.v2 = v2
        self.conv1 = _conv(3, width, 3)
        cin, layers = width, []
        for i, stride in enumerate((1, 2, 2, 2)):
            blocks = [PreActBlock(cin, width * 2**i, stride, v2), PreActBlock(width * 2**i, width * 2**i, 1, v2)]
            layers.append(nn.Sequential(*blocks))
            cin = width * 2**i
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        if v2:  # bn_before_fc
            self.bn = _bn(cin)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        if self.v2:
            out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


# --- ARD's / RSLAD's ResNet-18 (models/resnet.py) ---------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, cout, 3, stride), _bn(cout)
        self.conv2, self.bn2 = _conv(cout, cout, 3), _bn(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class SourceResNet18(nn.Module):
    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(3, width, 3), _bn(width)
        cin, layers = width, []
        for i, stride in enumerate((1, 2, 2, 2)):
            layers.append(
                nn.Sequential(BasicBlock(cin, width * 2**i, stride), BasicBlock(width * 2**i, width * 2**i, 1))
            )
            cin = width * 2**i
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.avg_pool2d(self.layer4(self.layer3(self.layer2(self.layer1(out)))), 4)
        return self.linear(out.view(out.size(0), -1))


# --- ARD's / RSLAD's MobileNetV2 (models/mobilenetv2.py) --------------------------------------------------------
class MBBlock(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride, planes = stride, expansion * cin
        self.conv1, self.bn1 = _conv(cin, planes, 1), _bn(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride, groups=planes), _bn(planes)
        self.conv3, self.bn3 = _conv(planes, cout, 1), _bn(cout)
        self.shortcut = nn.Sequential()
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, 1, 0, bias=False), _bn(cout))

    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class SourceMobileNetV2(nn.Module):
    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(3, 32, 3), _bn(32)
        blocks, cin = [], 32
        for expansion, cout, n, stride in self.CFG:
            for s in [stride] + [1] * (n - 1):
                blocks.append(MBBlock(cin, cout, expansion, s))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.conv2, self.bn2, self.linear = _conv(320, 1280, 1), _bn(1280), nn.Linear(1280, num_classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        out = F.avg_pool2d(F.relu(self.bn2(self.conv2(out))), 4)
        return self.linear(out.view(out.size(0), -1))


# --- the cases: (source model, what it must be recognised as, how its file is wrapped) -----------------------------
SOURCES = {
    # name: (builder, arch, arch_args, wrap)
    "trades_wrn": (lambda: SourceWRN(16, 2, sub_block1=True), "wrn", {"depth": 16, "width": 2}, "plain"),
    "carmon_wrn": (lambda: SourceWRN(10, 2, sub_block1=True), "wrn", {"depth": 10, "width": 2}, "state_dict_module"),
    "robustbench_wrn": (lambda: SourceWRN(10, 1), "wrn", {"depth": 10, "width": 1}, "plain"),
    "wong2020fast": (lambda: SourcePreAct(False, 8), "preact_resnet18", {"width": 8, "variant": "fast"}, "plain"),
    "rice2020_l2": (lambda: SourcePreAct(True, 8), "preact_resnet18", {"width": 8, "variant": "standard"}, "plain"),
    "rslad_resnet18": (lambda: SourceResNet18(8), "resnet18", {"width": 8}, "module"),
    "ard_resnet18": (lambda: SourceResNet18(8), "resnet18", {"width": 8}, "net_optimizer"),
    "ard_mobilenetv2": (
        lambda: SourceMobileNetV2(),
        "mobilenet_v2",
        {"width_mult": 1.0, "variant": "cifar"},
        "model_state_dict",
    ),
}


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics far from their defaults, so every tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.6 + 0.8 * torch.rand(c, generator=g))
                module.bias.copy_(0.2 * torch.randn(c, generator=g))
                module.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                module.running_var.copy_(0.5 + torch.rand(c, generator=g))
                module.num_batches_tracked.fill_(7)
            elif isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
        # Deep random nets reach logits of 1e4 or more, where float32 rounding alone is 1e-3: scale the
        # classifier so the logits are about 5 and a 1e-4 tolerance is meaningful.
        if not any(p.is_meta for p in model.parameters()):
            logits = model.eval()(torch.rand(4, 3, 32, 32, generator=g))
            head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
            head.weight.mul_(5 / logits.abs().max())
            head.bias.mul_(5 / logits.abs().max())
    return model.eval()


def _save(state: dict, path: Path, wrap: str) -> Path:
    if wrap in ("module", "state_dict_module"):  # nn.DataParallel
        state = {f"module.{k}": v for k, v in state.items()}
    if wrap in ("state_dict", "state_dict_module"):
        state = {"state_dict": state, "epoch": 3}
    elif wrap == "model_state_dict":
        state = {"model_state_dict": state, "best_acc": 0.5}
    elif wrap == "net_optimizer":  # ARD: {'net', 'epoch', 'optimizer'}; the optimizer state holds plain numbers
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
        state = {"net": state, "epoch": 199, "optimizer": optimizer.state_dict()}
    torch.save(state, path)
    return path


def _source(name: str, tmp_path: Path, seed: int = 0) -> tuple[nn.Module, Path]:
    builder, _, _, wrap = SOURCES[name]
    model = _randomise(builder(), seed)
    suffix = ".t7" if wrap == "net_optimizer" else ".pt"
    return model, _save(model.state_dict(), tmp_path / f"{name}{suffix}", wrap)


def _logits_match(source: nn.Module, ours: nn.Module, mean=None, std=None) -> float:
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    normalised = x if mean is None else (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected, got = source(normalised), ours(x)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero vectors
    return (expected - got).abs().max().item()


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("named", [False, True], ids=["recognised", "with_arch"])
def test_imported_model_computes_the_source_function(tmp_path, name, named):
    source, path = _source(name, tmp_path)
    _, arch, args, _ = SOURCES[name]
    kwargs = {"arch": arch, "arch_args": args} if named else {}
    checkpoint = robustkd.import_model(path, dataset="cifar10", out_dir=tmp_path / "out", card=False, **kwargs)
    assert checkpoint == tmp_path / "out" / "best"
    meta = read_meta(checkpoint)
    assert (meta["arch"], meta["arch_args"]) == (arch, args)
    assert meta["num_classes"] == 10 and meta["input_shape"] == [3, 32, 32] and meta["dataset"] == "cifar10"
    assert meta["imported_from"]["normalisation"] == "none"
    ours = robustkd.load_model(checkpoint)
    assert _logits_match(source, ours) <= 1e-4
    # The same file loads directly too, recognised (no arch) or checked (arch).
    direct = load_model(path, **({"arch": arch, **args} if named else {}))
    assert _logits_match(source, direct) <= 1e-4


def test_unused_tensors_are_dropped_and_reported(tmp_path):
    _, path = _source("trades_wrn", tmp_path)
    state = torch.load(path, weights_only=True)
    found = foreign.recognise(state, str(path))
    assert found.unused and all(k.startswith("sub_block1.") for k in found.unused)
    assert len(found.unused) == len([k for k in state if k.startswith("sub_block1.")]) > 0
    assert "sub_block1.*" in found.describe() and "wrn (depth=16, width=2)" in found.describe()


def test_the_fast_variant_is_needed(tmp_path):
    """Wong2020Fast's weights in a PreActBlockV2 layout (shortcut after BN-ReLU) give other logits: the match
    above holds because the fast variant reads the raw input, not by chance."""
    source, path = _source("wong2020fast", tmp_path)
    ours = robustkd.load_model(robustkd.import_model(path, dataset="cifar10", out_dir=tmp_path / "o", card=False))
    assert _logits_match(source, ours) <= 1e-4
    for block in source.modules():
        if isinstance(block, PreActBlock):
            block.v2 = True
    assert _logits_match(source, ours) > 1e-2


def test_file_normalisation_is_used_and_given_normalisation_goes_into_the_model(tmp_path):
    source, _ = _source("wong2020fast", tmp_path)
    # RobustBench's models keep mu/sigma as buffers; a file that has them brings its own normalisation.
    state = {**source.state_dict(), "mu": torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)}
    state["sigma"] = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.save(state, tmp_path / "with_mu.pt")
    ckpt = robustkd.import_model(tmp_path / "with_mu.pt", dataset="cifar10", out_dir=tmp_path / "a", card=False)
    assert read_meta(ckpt)["imported_from"]["normalisation"] == "file"
    assert _logits_match(source, robustkd.load_model(ckpt), CIFAR10_MEAN, CIFAR10_STD) <= 1e-4
    # Wong2020Fast's own file has none: the user passes them.
    _, path = _source("wong2020fast", tmp_path)
    ckpt = robustkd.import_model(
        path, dataset="cifar10", out_dir=tmp_path / "b", mean=CIFAR10_MEAN, std=CIFAR10_STD, card=False
    )
    assert read_meta(ckpt)["mean"] == pytest.approx(CIFAR10_MEAN)
    assert _logits_match(source, robustkd.load_model(ckpt), CIFAR10_MEAN, CIFAR10_STD) <= 1e-4
    with pytest.raises(CheckpointError, match="carries its own normalisation"):
        robustkd.import_model(tmp_path / "with_mu.pt", dataset="cifar10", out_dir=tmp_path / "c", mean=[0.5], std=[0.5])
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "depth, width, sub_block1, label",
    [(34, 10, True, "TRADES / Zhang2019Theoretically"), (28, 10, True, "Carmon2019Unlabeled"), (34, 20, False, "Rice")],
)
def test_full_size_wideresnets_are_recognised_from_shapes_alone(depth, width, sub_block1, label):
    with torch.device("meta"):
        state = SourceWRN(depth, width, sub_block1=sub_block1).state_dict()
    found = foreign.recognise(state, label)
    assert (found.arch, found.arch_args, found.num_classes) == ("wrn", {"depth": depth, "width": width}, 10)
    assert bool(found.unused) == sub_block1


def test_full_size_preact_resnet_mobilenet_and_resnet_are_recognised():
    with torch.device("meta"):
        wong, rice = SourcePreAct(False).state_dict(), SourcePreAct(True, num_classes=100).state_dict()
        resnet, mobile = SourceResNet18().state_dict(), SourceMobileNetV2().state_dict()
    assert foreign.recognise(wong, "w").arch_args == {"width": 64, "variant": "fast"}
    assert foreign.recognise(rice, "r").num_classes == 100
    assert foreign.recognise(resnet, "r").arch_args == {"width": 64}
    assert len(mobile) == 344  # the source's count, against 314 for our paper MobileNetV2
    assert len(create_model("mobilenet_v2").net.state_dict()) == 314
    assert foreign.recognise(mobile, "m").arch_args == {"width_mult": 1.0, "variant": "cifar"}


@pytest.mark.parametrize("arch, variant", [("preact_resnet18", "fast"), ("mobilenet_v2", "cifar")])
def test_new_variants_build_and_keep_their_contracts(arch, variant):
    model = create_model(arch, variant=variant, num_classes=7).eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert torch.autograd.grad(out.sum(), x)[0].abs().sum() > 0
    if arch == "preact_resnet18":  # still only modules the bound propagators know
        from robustkd.models import is_boundable

        assert is_boundable(model)
    with pytest.raises(ConfigError, match="variant must be one of"):
        create_model(arch, variant="nope")


# --- refusals: one line naming the file and what to do, nothing run, nothing written -----------------------------
class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, dict, str]]:
    """name: (file, import options, what the message says)."""
    marker = tmp_path / "created_by_pickle"
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"state_dict": _Payload(marker)}, handle, protocol=2)
    torch.save({"weights": [1, 2, 3]}, tmp_path / "not_tensors.pt")
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "unknown.pt")
    source, good = _source("rslad_resnet18", tmp_path)
    blob = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    hundred = _randomise(SourceResNet18(8, num_classes=100), 0)
    torch.save(hundred.state_dict(), tmp_path / "hundred.pt")
    state = source.state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(16, 8, 5, 5)
    torch.save(state, tmp_path / "reshaped.pt")
    return {
        "hostile": (tmp_path / "evil.pt", {}, "holds more than tensors"),
        "not_tensors": (tmp_path / "not_tensors.pt", {}, "is not a state dict"),
        "unknown_keys": (tmp_path / "unknown.pt", {}, "match no known checkpoint format"),
        "truncated": (tmp_path / "truncated.pt", {}, "download or copy it again"),
        "wrong_classes": (tmp_path / "hundred.pt", {}, "has 100 output classes but dataset cifar10 has 10"),
        "wrong_shapes": (
            tmp_path / "reshaped.pt",
            {},
            "wrong shapes layer2.0.conv1.weight: file (16, 8, 5, 5) vs model (16, 8, 3, 3)",
        ),
        "wrong_arch": (good, {"arch": "wrn"}, "without --arch/--arch_args it imports as resnet18 (width=8)"),
        "wrong_args": (good, {"arch": "resnet18", "arch_args": {"width": 16}}, "does not fit resnet18 (width=16)"),
        "unknown_arch": (good, {"arch": "resnet19"}, "unknown model 'resnet19'"),
        "ours_already": (tmp_path / "ours.safetensors", {}, "is a robustkd checkpoint already"),
    }


BAD = [
    "hostile",
    "not_tensors",
    "unknown_keys",
    "truncated",
    "wrong_classes",
    "wrong_shapes",
    "wrong_arch",
    "wrong_args",
    "unknown_arch",
    "ours_already",
]


@pytest.mark.parametrize("bad", BAD)
def test_bad_files_are_refused_with_one_line_and_nothing_written(tmp_path, bad, capsys):
    path, options, says = _bad_files(tmp_path)[bad]
    out = tmp_path / "out"
    with pytest.raises((CheckpointError, RegistryError, ConfigError)) as err:
        robustkd.import_model(path, dataset="cifar10", out_dir=out, card=False, **options)
    assert says in str(err.value) and "\n" not in str(err.value)
    assert str(path) in str(err.value) or bad == "unknown_arch"
    argv = ["import", str(path), "--dataset", "cifar10", "--out_dir", str(out), "--card", "false"]
    if "arch" in options:
        argv += ["--arch", options["arch"]]
    if "arch_args" in options:
        argv += ["--arch_args", json.dumps(options["arch_args"])]
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    assert says in stderr and stderr.count("\n") == 1
    assert not out.exists() and not (tmp_path / "created_by_pickle").exists()


def test_ambiguity_lists_the_candidates(tmp_path, monkeypatch):
    """Two formats that both fit are refused with both named (here: the same format registered twice)."""
    from robustkd.models.foreign import formats
    from robustkd.registry import Registry

    twice: Registry = Registry("checkpoint format")
    for name in formats.FORMATS:
        twice.add(name, formats.FORMATS.get(name))
    twice.add("resnet-again", formats.FORMATS.get("cifar-resnet"))
    monkeypatch.setattr(importlib.import_module("robustkd.models.foreign.recognise"), "FORMATS", twice)
    _, path = _source("rslad_resnet18", tmp_path)
    with pytest.raises(CheckpointError, match=r"fits several formats: .*resnet18 \(width=8\).*resnet18 \(width=8\)"):
        robustkd.import_model(path, dataset="cifar10", out_dir=tmp_path / "out", card=False)
    assert not (tmp_path / "out").exists()


def test_cli_prints_what_was_recognised_and_the_result_loads(tmp_path):
    source, path = _source("wong2020fast", tmp_path)
    out = tmp_path / "wong"
    argv = ["import", str(path), "--dataset", "cifar10", "--out_dir", str(out), "--card", "false"]
    argv += ["--mean", json.dumps(CIFAR10_MEAN), "--std", json.dumps(CIFAR10_STD)]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "robustkd", *argv], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "PreActResNet-18 (RobustBench)" in result.stdout
    assert "arch preact_resnet18 (width=8, variant='fast')" in result.stdout
    assert _logits_match(source, robustkd.load_model(out / "best"), CIFAR10_MEAN, CIFAR10_STD) <= 1e-4


def test_cli_checks_a_named_architecture(tmp_path, capsys):
    source, path = _source("trades_wrn", tmp_path)
    argv = ["import", str(path), "--arch", "wrn", "--arch_args", '{"depth": 16, "width": 2}']
    assert main([*argv, "--dataset", "cifar10", "--out_dir", str(tmp_path / "t"), "--card", "false"]) == 0
    assert "wrn (depth=16, width=2)" in capsys.readouterr().out
    assert _logits_match(source, robustkd.load_model(tmp_path / "t" / "best")) <= 1e-4


def test_card_is_made_when_asked(tmp_path, monkeypatch):
    import types

    calls = []
    module = types.ModuleType("robustkd.jobs.card")
    module.make_card = lambda checkpoint, *, dataset=None, **_: calls.append((Path(checkpoint), dataset)) or {}
    monkeypatch.setitem(sys.modules, "robustkd.jobs.card", module)
    _, path = _source("ard_resnet18", tmp_path)
    checkpoint = robustkd.import_model(path, dataset="cifar10", out_dir=tmp_path / "out")
    assert calls == [(checkpoint, "cifar10")]


def test_cli_shows_the_card_after_what_was_recognised(tmp_path, monkeypatch, capsys):
    import types

    made = types.ModuleType("robustkd.jobs.card")
    made.make_card = lambda checkpoint, *, dataset=None, **_: {"output": f"{checkpoint}.card.json", "dataset": dataset}
    shown = types.ModuleType("robustkd.cli.card")
    shown.render_card = lambda card: f"CARD on {card['dataset']}"
    monkeypatch.setitem(sys.modules, "robustkd.jobs.card", made)
    monkeypatch.setitem(sys.modules, "robustkd.cli.card", shown)
    _, path = _source("rslad_resnet18", tmp_path)
    assert main(["import", str(path), "--dataset", "cifar10", "--out_dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert out.index("ResNet-18 (ARD, RSLAD, RobustBench)") < out.index("CARD on cifar10")
    assert f"teacher card: {tmp_path / 'r' / 'best'}.card.json" in out
