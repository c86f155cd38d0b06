"""The `leuko` parser: every command with its help and examples, and a `--help` that imports nothing heavy."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from leuko.cli.app import build_parser, main
from leuko.cli.deploy import predict_model_parser, wants_model
from leuko.cli.training import LIGHTNING_COMMANDS
from leuko.data.optics import DEFAULT_CLASSES
from leuko.params import COMMAND_SECTIONS

COMMANDS = {
    "phantoms",
    "folds",
    "prepare",
    "import-medmnist",
    "features",
    "cv",
    "sweep",
    "register",
    "lineage",
    "evaluate",
    "baselines",
    "report",
    "export",
    "explain",
    *LIGHTNING_COMMANDS,
}
HEAVY = ("torch", "lightning", "mlflow", "optuna", "pandas", "numpy", "yaml")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_command_is_listed():
    assert set(subcommands()) == COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS - set(LIGHTNING_COMMANDS)))
def test_each_command_has_help_examples_and_params_where_params_yaml_has_its_section(name):
    parser = subcommands()[name]
    text = parser.format_help()
    assert parser.description
    assert "examples:\n  leuko " in text
    assert ("--params FILE" in text) == (name in COMMAND_SECTIONS)


def test_default_classes_come_from_the_class_list():
    args = subcommands()["prepare"].parse_args(["--manifest", "m.csv", "--out", "p"])
    assert tuple(args.classes.split(",")) == DEFAULT_CLASSES


def test_predict_with_a_registered_model_has_its_own_parser():
    assert wants_model(["--model", "models:/leuko@champion", "--input", "x"])
    assert not wants_model(["--config", "c.yaml", "--model", "conf/model/vit3d_tiny.yaml"])
    assert "examples:\n  leuko predict --model" in predict_model_parser().format_help()


def test_no_command_prints_the_help(capsys):
    assert main([]) == 0
    assert "typical workflow:" in capsys.readouterr().out


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from leuko.cli.app import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]", done.stdout


def test_python_dash_m_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "leuko.cli", "sweep", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--leaderboard" in done.stdout


def test_predict_help_alone_shows_the_registered_model_predict(capsys):
    with pytest.raises(SystemExit) as done:
        main(["predict", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--workers" in out and "LightningCLI" in out
