"""robustkd card: the teacher card's numbers against independent computations, its stated subsets, the parts it
skips with a reason, the command, and the card's section in the report."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import fmnist_meta
from test_report import OPTIONS, make_runs

import robustkd
from robustkd.attacks.threat import ThreatModel
from robustkd.checkpoint import load_model, save_checkpoint
from robustkd.cli import main
from robustkd.data import load_dataset
from robustkd.errors import CheckpointError, ConfigError
from robustkd.jobs.card import card_path, card_protocol, make_card
from robustkd.models import create_model

N, N_AA = 24, 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"), students=("kd",))


@pytest.fixture(scope="module")
def card(runs):
    return make_card(runs["teacher"] / "best", device="cpu", progress=False, n_examples=N, n_autoattack=N_AA)


def test_card_is_written_beside_the_checkpoint(card, runs):
    path = runs["teacher"] / "best.card.json"
    assert card["output"] == str(path) == str(card_path(runs["teacher"] / "best"))
    saved = json.loads(path.read_text())
    assert saved == {k: v for k, v in card.items() if k != "output"}
    for name, source in card["sources"].items():  # the JSON of every evaluation is kept beside it
        assert source == str(runs["teacher"] / f"best.card.{name}.json")
        assert json.loads(Path(source).read_text())


def test_identity_size_and_hash(card, runs):
    weights = runs["teacher"] / "best.safetensors"
    assert card["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # small_cnn width 2, hidden 8 on 1x28x28: conv 1->2 3x3, conv 2->4 3x3, FC 4*7*7->8, FC 8->10 (with biases)
    assert card["params"] == (2 * 9 + 2) + (4 * 2 * 9 + 4) + (4 * 7 * 7 * 8 + 8) + (8 * 10 + 10) == 1762
    assert (card["arch"], card["dataset"], card["input_shape"]) == ("small_cnn", "fashion-mnist", [1, 28, 28])


def test_accuracies_agree_with_the_model_and_each_other(card, runs):
    model = load_model(runs["teacher"] / "best")
    test = load_dataset("fashion-mnist").test
    x, y = test.images[:N].float() / 255, test.labels[:N]
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    acc = card["accuracy"]
    assert acc["clean"] == pytest.approx(clean)
    assert card["protocol"]["name"] == "linf-0.1" and card["protocol"]["eps"] == 0.1  # Fashion-MNIST's protocol
    # A certificate is a proof over the whole ball, an attack searches part of it: certified <= attacked <= clean.
    for method in ("ibp", "crown-ibp"):
        assert acc[f"certified_{method}"] <= min(acc["pgd20"], acc["cw20"]) <= acc["clean"]
    assert acc["certified_crown-ibp"] >= 0 and acc["clean"] > 0
    assert acc["autoattack"] <= card["autoattack"]["clean"]


def test_subsets_are_stated(card):
    assert card["robustness"]["n"] == N and card["robustness"]["subset"] is True
    assert card["robustness"]["n_total"] == 10_000
    assert card["autoattack"]["n"] == N_AA and card["autoattack"]["subset"] is True
    assert all(card["certified"][m]["n"] == N for m in ("ibp", "crown-ibp"))
    latency = card["latency"]
    assert latency["device"] == "cpu" and latency["batch_1_ms"] > 0 and latency["batch_128_ms"] > 0


def test_parts_that_cannot_run_are_skipped_with_the_reason(tmp_path):
    model = create_model("vit_tiny", num_classes=10, in_channels=1, input_size=28, dim=8, depth=1, heads=1)
    save_checkpoint(tmp_path / "vit" / "best", model, fmnist_meta("vit_tiny", {"dim": 8, "depth": 1, "heads": 1}))
    card = make_card(tmp_path / "vit" / "best", device="cpu", progress=False, n_examples=8, n_autoattack=0)
    for method in ("ibp", "crown-ibp"):
        assert "not boundable" in card["certified"][method]["skipped"]
        assert card["accuracy"][f"certified_{method}"] is None
    assert card["autoattack"] == {"skipped": "n_autoattack is 0"}
    assert set(card["sources"]) == {"robustness"}


def test_protocols():
    assert card_protocol("cifar10") == ("linf-8/255", ThreatModel.preset("linf-8/255"))
    assert card_protocol("mnist")[0] == "linf-0.3"
    assert card_protocol("fashion-mnist", 8 / 255)[0] == "linf-8/255"  # a radius with a preset takes its budget
    name, threat = card_protocol("fashion-mnist", 0.05)
    assert threat.eps == 0.05 and threat.norm == "linf" and ThreatModel.preset(name).eps == 0.05
    assert card_protocol("cifar10", "l2-0.5")[1].norm == "l2"
    with pytest.raises(ConfigError, match="^eps: no default protocol for dataset 'blobs'"):
        card_protocol("blobs")
    with pytest.raises(ConfigError, match="^eps: must be a radius"):
        card_protocol("mnist", 2.0)


def test_bad_inputs(tmp_path):
    foreign = tmp_path / "teacher.pt"
    torch.save({}, foreign)
    with pytest.raises(CheckpointError, match="import it first with robustkd import"):
        make_card(foreign)
    model = create_model("small_cnn", num_classes=10, in_channels=1, input_size=28, width=2, hidden=8)
    meta = {k: v for k, v in fmnist_meta("small_cnn", {"width": 2, "hidden": 8}).items() if k != "dataset"}
    save_checkpoint(tmp_path / "nodata" / "best", model, meta)
    with pytest.raises(ConfigError, match="does not name its dataset; pass --dataset"):
        make_card(tmp_path / "nodata" / "best", device="cpu")
    assert not list(tmp_path.glob("**/*.card*.json"))


def test_cli_card(runs, tmp_path, capsys):
    out = tmp_path / "teacher.card.json"
    argv = ["card", str(runs["teacher"] / "best"), "--n_examples", "8", "--n_autoattack", "2"]
    assert main([*argv, "--eps", "0.05", "--device", "cpu", "--out", str(out), "--progress", "false"]) == 0
    printed = capsys.readouterr().out
    card = json.loads(out.read_text())
    assert card["protocol"]["eps"] == 0.05 and card["robustness"]["n"] == 8 and card["autoattack"]["n"] == 2
    assert f"{card['params']:,} parameters" in printed and card["weights_sha256"] in printed
    assert "certified (crown-ibp)" in printed and "first 8 (a subset)" in printed and f"card: {out}" in printed
    assert (tmp_path / "teacher.card.robustness.json").is_file()
    assert main(["card", str(tmp_path / "teacher.pt")]) == 2
    assert "robustkd card reads robustkd checkpoints" in capsys.readouterr().err


def test_report_shows_the_card_and_the_compression(card, runs, tmp_path):
    result = robustkd.report([runs["kd"]], tmp_path / "report", device="cpu", progress=False, **OPTIONS)
    (section,) = result["teacher_cards"]
    assert section["source"] == card["output"] and section["params"] == card["params"]
    shown = {row["measure"]: row["accuracy"] for row in section["rows"]}
    assert shown["autoattack"] == card["accuracy"]["autoattack"]
    assert shown["certified (crown-ibp)"] == card["accuracy"]["certified_crown-ibp"]
    md = (tmp_path / "report" / "report.md").read_text()
    html = (tmp_path / "report" / "report.html").read_text()
    for page in (md, html):
        assert "Teacher card" in page and card["weights_sha256"] in page and "first 6 (a subset)" in page
        assert f"clean accuracy on them {card['autoattack']['clean']:.4f}" in page
    rows = {row["name"]: row for row in result["models"]}
    assert rows["kd"]["compression"] == rows["teacher"]["params"] / rows["kd"]["params"]
    assert rows["kd"]["latency_ratio"] == rows["teacher"]["latency_ms"] / rows["kd"]["latency_ms"]
