"""The command line: help, listing, errors as one line with exit status 2, evaluate / certify / report on
checkpoints, from flags or a ``--config`` file; one flag spelling, old spellings still accepted."""

import json
import re

import pytest
import yaml
from conftest import fmnist_meta, fmnist_model

from robustkd.attacks import ATTACKS, PRESETS
from robustkd.certify import VERIFIERS
from robustkd.checkpoint import save_checkpoint
from robustkd.cli import COMMANDS, main
from robustkd.cli.parsing import SHARED_RENAMED, options, parse, respell
from robustkd.methods import METHODS

META = fmnist_meta()


def _model():
    return fmnist_model()


def _save(path, config=None, model=None):
    """A tiny untrained dm_small checkpoint on Fashion-MNIST at ``path`` (a new network unless ``model``)."""
    model = _model() if model is None else model
    meta = META if config is None else {**META, "method": "kd", "config": config}
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A teacher and a student (the same network) whose checkpoint names the teacher, as distill writes it."""
    root, model = tmp_path_factory.mktemp("pair"), _model()
    teacher = _save(root / "t" / "best", model=model)
    _save(root / "s" / "best", {"teacher": str(teacher), "teacher_arch": None}, model=model)
    return root / "t", root / "s"


def _config(path, **values):
    path.write_text(yaml.safe_dump({k: str(v) if hasattr(v, "is_file") else v for k, v in values.items()}))
    return str(path)


@pytest.mark.parametrize(
    "command", ["train", "distill", "evaluate", "certify", "quickstart", "list", "report", "export"]
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if command in ("train", "distill", "evaluate", "certify"):
        assert "examples:" in out


def test_top_level_help(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main([]) == 2


@pytest.mark.parametrize(
    ("what", "expected"),
    [("models", "dm_small"), ("datasets", "fashion-mnist"), ("methods", "advfunmatch"), ("protocols", "linf-0.1")],
)
def test_list(what, expected, capsys):
    assert main(["list", what]) == 0
    assert expected in capsys.readouterr().out.split()


def test_bad_override_is_one_line_with_suggestion(capsys):
    assert main(["train", "--optim.lrr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean --optim.lr" in err and "Traceback" not in err


def test_bad_value_names_the_field(tmp_path, capsys):
    assert main(["train", "--epochs", "0", "--out_dir", str(tmp_path)]) == 2
    assert "epochs: must be >= 1" in capsys.readouterr().err


def test_distill_requires_teacher(tmp_path, capsys):
    assert main(["distill", "--out_dir", str(tmp_path)]) == 2
    assert "--teacher" in capsys.readouterr().err


def test_unknown_method_suggests(tmp_path, capsys):
    assert main(["train", "--method.name", "pgdat", "--out_dir", str(tmp_path)]) == 2
    assert "did you mean 'pgd_at'" in capsys.readouterr().err


def test_evaluate_a_checkpoint_on_a_subset(tmp_path, capsys):
    _save(tmp_path / "best")
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--model", str(tmp_path / "best"), "--n_examples", "16", "--attacks", "clean,pgd5"]
    assert main([*argv, "--out", str(out), "--progress", "false"]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["subset"] is True and result["settings"]["n"] == 16
    assert result["attacks"]["pgd5"]["accuracy"] <= result["attacks"]["clean"]["accuracy"]
    assert "a subset of the test set" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(tmp_path / "best"), "--attacks", "pgd", "--n_examples", "4"]) == 2


def test_certify_pair_and_single_model(tmp_path, capsys):
    model = _model()
    _save(tmp_path / "t" / "best", model=model)
    _save(tmp_path / "s" / "best", model=model)
    out = tmp_path / "cert.json"
    argv = ["certify", "--student", str(tmp_path / "s"), "--teacher", str(tmp_path / "t"), "--eps", "0"]
    assert main([*argv, "--n_examples", "20", "--out", str(out), "--progress", "false"]) == 0
    result = json.loads(out.read_text())
    # The same network at eps 0: every teacher-correct point is certified to agree, with a zero gap.
    assert result["teacher_correct"]["agreement_certified"] in (None, 1.0)
    assert result["subset"] is True and result["n"] == 20
    assert "certified agreement" in capsys.readouterr().out
    assert (
        main(["certify", "--student", str(tmp_path / "s"), "--eps", "0.1", "--n_examples", "8", "--progress", "false"])
        == 0
    )
    assert (tmp_path / "s" / "cert_best_ibp_0.1.json").is_file()
    assert main(["certify", "--student", str(tmp_path / "s"), "--eps", "0.1", "--method", "crown_ibp"]) == 2
    assert "did you mean 'crown-ibp'" in capsys.readouterr().err


# --- --config on every command; the command line wins ------------------------------------------------------


def test_evaluate_from_a_config_file(tmp_path, capsys):
    out = tmp_path / "eval.json"
    cfg = _config(tmp_path / "evaluate.yaml", model=_save(tmp_path / "best"), protocol="linf-0.1",
                  attacks=["clean", "pgd2"], n_examples=8, out=out, progress=False)  # fmt: skip
    assert main(["evaluate", "--config", cfg]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["n"] == 8 and set(result["attacks"]) == {"clean", "pgd2"}
    # A flag overrides the file's value, before or after --config.
    assert main(["evaluate", "--n_examples", "4", "--config", cfg]) == 0
    assert json.loads(out.read_text())["settings"]["n"] == 4
    assert main(["evaluate", "--config", cfg, "--attacks", "clean", "--n_examples", "6"]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["n"] == 6 and set(result["attacks"]) == {"clean"}
    assert "deprecated" not in capsys.readouterr().err


def test_certify_from_a_config_file(tmp_path, pair):
    teacher, student = pair
    out = tmp_path / "cert.json"
    cfg = _config(tmp_path / "certify.yaml", student=student, teacher=teacher, eps=0, method="ibp",
                  n_examples=10, out=out, progress=False)  # fmt: skip
    assert main(["certify", "--config", cfg]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 10 and result["teacher_correct"]["agreement_certified"] in (None, 1.0)
    assert main(["certify", "--config", cfg, "--n_examples", "6"]) == 0
    assert json.loads(out.read_text())["n"] == 6


def test_report_from_a_config_file(tmp_path, pair):
    _, student = pair
    out = tmp_path / "report"
    cfg = _config(tmp_path / "report.yaml", runs=[str(student)], out=out, eps=0.1, eps_sweep=[0.05],
                  attacks=["clean", "pgd2"], n_examples=8, faith_steps=1, faith_restarts=1, certify_method="ibp",
                  batch_size=8, max_gap=0.5, device="cpu", progress=False)  # fmt: skip
    assert main(["report", "--config", cfg]) == 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["settings"]["n_examples"] == 8 and saved["settings"]["attacks"] == ["clean", "pgd2"]
    assert saved["thresholds"]["max_gap"] == 0.5
    assert main(["report", "--config", cfg, "--max_gap", "none", "--n_examples", "6"]) == 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["settings"]["n_examples"] == 6 and saved["thresholds"]["max_gap"] is None


def test_unknown_config_key_is_refused_with_a_suggestion(tmp_path, capsys):
    cfg = _config(tmp_path / "evaluate.yaml", model="runs/x/best", n_exmples=10)
    assert main(["evaluate", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:2: unknown option 'n_exmples'; did you mean 'n_examples'?" in err and "Traceback" not in err
    cfg = _config(tmp_path / "train.yaml", optim={"lrr": 0.1})
    assert main(["train", "--config", cfg]) == 2
    assert f"{cfg}:2: unknown option 'optim.lrr'; did you mean 'optim.lr'" in capsys.readouterr().err


def _typo_file(path, key: str) -> str:
    """A config file whose first key sits on line 3, written nested when the key is dotted."""
    *groups, leaf = key.split(".")
    lines = ["# a run", "", *("  " * depth + f"{group}:" for depth, group in enumerate(groups))]
    path.write_text("\n".join([*lines, "  " * len(groups) + f"{leaf}: 1"]) + "\n")
    return str(path)


@pytest.mark.parametrize("command", [name for name in COMMANDS.names() if name != "list"])
def test_a_config_key_typo_names_file_line_and_the_option(command, tmp_path, capsys):
    """Every command's --config: a key one letter short of an option is refused at its line, with the option."""
    from robustkd.cli.configfile import file_keys

    keys = file_keys(COMMANDS.get(command).build("p"))
    option = max(sorted(keys), key=lambda k: (k.count("."), len(k)))  # dotted where the command has nested keys
    typo = option[:-1]
    cfg = _typo_file(tmp_path / "run.yaml", typo)
    line = 3 + typo.count(".")
    assert main([command, "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:{line}: unknown option {typo!r}; did you mean {option!r}" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_the_issues_yaml_typo(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: quick\nseed: 0\nepoch: 5\n")
    assert main(["train", "--config", str(cfg), "--out_dir", str(tmp_path / "runs")]) == 2
    assert f"{cfg}:3: unknown option 'epoch'; did you mean 'epochs'?" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_mapping_value_is_not_taken_for_keys(tmp_path, capsys):
    """validate.protocol and method.args take mappings as values: their keys are not options of the parser."""
    from robustkd.cli.configfile import check_config_file

    cfg = tmp_path / "run.yaml"
    cfg.write_text("validate:\n  protocol: {eps: 0.1}\nmethod:\n  name: pgd_at\n  args:\n    threat: {eps: 0.1}\n")
    check_config_file(str(cfg), COMMANDS.get("train").build("p"))


def test_a_method_option_typo_in_a_file_names_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: x\nmethod:\n  name: pgd_at\n  args:\n    thret: {eps: 0.1}\n")
    argv = ["train", "--config", str(cfg), "--out_dir", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:5: method.args.thret: method 'pgd_at' has no option 'thret'; did you mean 'threat'?" in err
    # A value given on the command line has no file line to point at.
    cfg.write_text("name: x\noptim:\n  lr: 0.1\n")
    assert main(["train", "--config", str(cfg), "--out_dir", str(tmp_path / "runs"), "--optim.lr", "-2"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: must be" in err and str(cfg) not in err
    cfg.write_text("name: x\noptim:\n  lr: -1\n")
    assert main(["train", "--config", str(cfg), "--out_dir", str(tmp_path / "runs")]) == 2
    assert f"{cfg}:3: optim.lr: must be" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["model: [runs/x\n", "model: x\n  bad: indent\n", "- a list\n"])
def test_bad_config_file_is_one_line_naming_the_file(tmp_path, capsys, text):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(text)
    for command in ("evaluate", "train"):
        assert main([command, "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert f"--config {cfg}: " in err and err.count("\n") == 1 and "Traceback" not in err
    assert main(["certify", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: cannot read it" in capsys.readouterr().err


# --- one flag spelling ---------------------------------------------------------------------------------------


def _help(command, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def test_every_command_takes_config(capsys):
    for command in COMMANDS.names():
        assert "--config CONFIG" in _help(command, capsys), command


@pytest.mark.parametrize("command", COMMANDS.names())
def test_help_shows_one_spelling(command, capsys):
    shown = set(re.findall(r"(?<![\w-])--[A-Za-z][\w.-]*", _help(command, capsys)))
    assert shown, command
    assert not [flag for flag in shown if "-" in flag[2:]], f"{command}: dashed options in --help"


# Every option spelled otherwise before the one spelling, by command.
OLD_SPELLINGS = {
    "evaluate": {"--n-examples": "--n_examples", "--batch-size": "--batch_size", "--data-root": "--data.root"},
    "certify": {"--n-examples": "--n_examples", "--batch-size": "--batch_size", "--data-root": "--data.root"},
    "report": {"--eps-sweep": "--eps_sweep", "--n-examples": "--n_examples", "--certify-method": "--certify_method",
               "--faith-steps": "--faith_steps", "--faith-restarts": "--faith_restarts", "--batch-size": "--batch_size",
               "--max-clean-drop": "--max_clean_drop", "--max-robust-drop": "--max_robust_drop",
               "--max-disagreement": "--max_disagreement", "--max-gap": "--max_gap",
               "--min-certified-agreement": "--min_certified_agreement",
               "--max-certified-gap": "--max_certified_gap", "--data-root": "--data.root",
               "--fail-unsafe": "--fail_unsafe"},
    "export": {"--test-subset": "--n_examples", "--batch-size": "--batch_size",
               "--logit-tolerance": "--logit_tolerance", "--calibration-tolerance": "--calibration_tolerance",
               "--data-root": "--data.root"},
    "quickstart": {"--train-subset": "--train_subset", "--n-eval": "--n_eval"},
    "train": {"--out-dir": "--out_dir", "--teacher-arch": "--teacher_arch", "--data.batch-size": "--data.batch_size"},
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(OLD_SPELLINGS))
def test_old_spellings_are_renamed_with_a_notice(command, capsys):
    entry = COMMANDS.get(command)
    parser = entry.build(f"robustkd {command}")
    known = options(parser)
    for old, new in OLD_SPELLINGS[command].items():
        assert new in known
        assert respell([old, "1"], known, entry.renamed, parser.prog) == [new, "1"]
        assert respell([f"{old}=1"], known, entry.renamed, parser.prog) == [f"{new}=1"]
        assert capsys.readouterr().err == f"robustkd {command}: {old} is deprecated; use {new}\n" * 2
    # The one spelling passes unchanged and silently; so do values and everything after '--'.
    assert respell(["--n_examples", "-1", "--", "--n-examples"], {"--n_examples"}, {}, "p") == [
        "--n_examples", "-1", "--", "--n-examples"
    ]  # fmt: skip
    assert capsys.readouterr().err == ""


def test_old_spellings_still_work(tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--model", str(_save(tmp_path / "best")), "--attacks", "clean", "--n-examples", "5"]
    assert main([*argv, "--batch-size", "4", "--data-root", str(tmp_path / "none"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--n-examples is deprecated; use --n_examples" in err and "--data-root is deprecated; use --data.root" in err
    assert str(tmp_path / "none") in err  # the data root reached the job
    assert main([*argv, "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["settings"]["n"] == 5


def test_no_prefix_matching(tmp_path, capsys):
    assert main(["train", "--epoch", "1", "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --epoch 1" in err and "did you mean --epochs" in err
    assert main(["evaluate", "--model", "x", "--n_ex", "3"]) == 2
    assert "did you mean --n_examples" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was trained


def _listed(help_text: str, option: str) -> list[str]:
    """The names after 'one of:' / 'from:' in the help of ``option``."""
    flat = " ".join(help_text.split())
    match = re.search(rf"{re.escape(option)} [A-Z_]+ .*?(?:[Oo]ne of|from): (.+?)\.? \(", flat)
    assert match, f"no list in the help of {option}"
    return match.group(1).split(", ")


def test_help_lists_are_the_registries(capsys):
    assert _listed(_help("certify", capsys), "--method") == VERIFIERS.names()
    report = _help("report", capsys)
    assert _listed(report, "--certify_method") == VERIFIERS.names()
    assert _listed(report, "--attacks") == ATTACKS.names()
    evaluate = _help("evaluate", capsys)
    assert _listed(evaluate, "--attacks") == ATTACKS.names()
    assert _listed(evaluate, "--protocol") == PRESETS.names()
    train = _help("train", capsys)
    assert _listed(train, "--validate.protocol") == PRESETS.names()
    assert _listed(train, "--method.name") == METHODS.names()


def test_commands_come_from_the_table(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS.names())
    assert main(["evalute"]) == 2
    assert "did you mean 'evaluate'" in capsys.readouterr().err


def test_a_dotted_method_override_changes_one_field_of_the_files_mapping(tmp_path):
    from robustkd.cli import COMMANDS, parse
    from robustkd.cli.train import _method_args
    from robustkd.methods import build_method

    path = tmp_path / "run.yaml"
    path.write_text("method:\n  name: pgd_at\n  args:\n    threat: {eps: 0.1, step_size: 0.01, steps: 10}\n")
    command = COMMANDS.get("train")
    argv = ["--config", str(path), "--method.args.threat.eps", "0.05", "--method.args.attack_mode", "train"]
    args = parse(command.build("robustkd train"), argv, command.renamed).as_dict()
    merged = _method_args([str(path)], args["method"]["args"])
    assert merged == {"threat": {"eps": 0.05, "step_size": 0.01, "steps": 10}, "attack_mode": "train"}
    method = build_method("pgd_at", merged)
    assert (method.threat.eps, method.threat.step_size, method.threat.steps) == (0.05, 0.01, 10)


@pytest.mark.parametrize("command", COMMANDS.names())
def test_progress_is_spelled_as_train_spells_it(command, capsys):
    entry = COMMANDS.get(command)
    parser = entry.build(f"robustkd {command}")
    if "--progress" not in options(parser):
        pytest.skip(f"{command} shows no progress")
    (action,) = [a for a in parser._actions if "--progress" in a.option_strings]
    assert action.default is True
    for old in ("--no_progress", "--no-progress"):
        argv = respell([old, "--out", "x"], options(parser), {**SHARED_RENAMED, **entry.renamed}, parser.prog)
        assert argv == ["--progress", "false", "--out", "x"]
        assert capsys.readouterr().err == f"robustkd {command}: {old} is deprecated; use --progress false\n"


@pytest.mark.parametrize("command", COMMANDS.names())
def test_no_command_takes_an_abbreviated_option(command, tmp_path):
    """Every option one letter short is refused, on the command line and as a key of a config file."""
    from robustkd.cli.configfile import file_keys
    from robustkd.errors import ConfigError

    entry = COMMANDS.get(command)
    parser = entry.build(f"robustkd {command}")
    known = options(parser) | set(entry.renamed) | set(SHARED_RENAMED)
    for key in sorted(file_keys(parser) & {o[2:] for o in options(parser)}):
        short = f"--{key[:-1]}"
        if short in known or short.replace("-", "_") in known or short == "--":
            continue
        with pytest.raises(ConfigError, match=f"unrecognized arguments: {re.escape(short)}(?![\\w.])"):
            parse(parser, [short, "1"], entry.renamed)
        cfg = _typo_file(tmp_path / "run.yaml", key[:-1])
        with pytest.raises(ConfigError, match=f"unknown option '{re.escape(key[:-1])}'"):
            parse(parser, ["--config", cfg], entry.renamed)


def test_a_foreign_state_dict_is_refused_with_what_to_do(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"")
    for argv, typed in [
        (["evaluate", "--model", str(foreign)], "--model"),
        (["certify", "--student", str(tmp_path / "s"), "--teacher", str(foreign), "--eps", "0.1"], "--teacher"),
        (["export", str(foreign), "--onnx", str(tmp_path / "m.onnx")], "CKPT"),
        (["report", str(tmp_path / "s"), "--teacher", str(foreign)], "--teacher"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{typed} {foreign}: robustkd {argv[0]} reads robustkd checkpoints" in err
        assert "load_model(" in err and "--teacher_arch" not in err and err.count("\n") == 1


def test_a_missing_option_is_named_as_it_is_typed(capsys):
    assert main(["certify"]) == 2
    assert "the following arguments are required: --student, --eps" in capsys.readouterr().err


def test_the_dataset_of_a_job_can_be_chosen(tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--model", str(_save(tmp_path / "best")), "--attacks", "clean", "--n_examples", "4"]
    assert main([*argv, "--data.dataset", "fashion-mnist", "--out", str(out), "--progress", "false"]) == 0
    assert json.loads(out.read_text())["settings"]["n"] == 4
    root = tmp_path / "empty"
    root.mkdir()
    assert main([*argv, "--data.dataset", "mnist", "--data.root", str(root), "--progress", "false"]) == 2
    assert "mnist (IDX files) not found" in capsys.readouterr().err  # the choice reached the job


def test_certify_and_evaluate_print_readable_summaries(pair, tmp_path, capsys):
    """Labelled lines with three or four decimals; the full structures stay in the JSON file."""
    teacher, student = pair
    out = tmp_path / "cert.json"
    argv = ["certify", "--student", str(student), "--teacher", str(teacher), "--eps", "0.05", "--n_examples", "12"]
    assert main([*argv, "--out", str(out), "--progress", "false"]) == 0
    text = capsys.readouterr().out
    assert "{" not in text and not re.search(r"\d\.\d{5,}", text), text
    assert re.search(r"^\s+student\s+\d\.\d{3}\s+\d\.\d{3}$", text, re.M) and "certified gap bound" in text
    assert "median" in json.dumps(json.loads(out.read_text())["teacher_correct"]["gap_upper"])
    argv = ["evaluate", "--model", str(student), "--attacks", "clean,pgd2", "--n_examples", "8"]
    assert main([*argv, "--out", str(tmp_path / "eval.json"), "--progress", "false"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^\s+worst case\s+\d\.\d{4}\s+\d\.\d{4}\s+\d+ / 8$", text, re.M), text
    assert not set(text) & set("┃│━┡└"), text


def test_a_key_typo_inside_a_threat_mapping_names_the_line(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: x\nvalidate:\n  protocol: {eps: 0.1, stepz: 2}\n")
    assert main(["train", "--config", str(cfg), "--out_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:3: validate.protocol.stepz: unknown option; did you mean 'steps'" in err
    assert err.count("\n") == 1 and "Union" not in err


@pytest.mark.parametrize(
    ("name", "argv", "hint"),
    [
        ("train", ["--config", "x.yaml"], "--resume true"),
        ("evaluate", ["runs/x"], "run the same command again"),
        ("export", ["runs/x"], "nothing was written"),
    ],
)
def test_ctrl_c_says_how_to_continue_as_each_command_can(name, argv, hint, monkeypatch, capsys):
    # Only train and distill take --resume; evaluate continues from its progress file; export writes atomically.
    import dataclasses

    from robustkd.cli import COMMANDS

    def interrupted(ns):
        raise KeyboardInterrupt

    original = COMMANDS.get(name)
    monkeypatch.setitem(COMMANDS._entries, name, dataclasses.replace(original, run=interrupted))
    monkeypatch.setattr("robustkd.cli.parse", lambda *a, **k: object())
    assert main([name, *argv]) == 130
    err = capsys.readouterr().err
    assert f"robustkd {name}: interrupted;" in err and hint in err
    assert ("--resume" in err) == (name == "train")
