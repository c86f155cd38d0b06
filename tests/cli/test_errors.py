"""The error guard of the `leuko` command: an input error (LeukoError, a missing file) is one line, anything
else is a fault that keeps its traceback and asks to be reported."""

from __future__ import annotations

import pytest

from leuko.cli.app import main
from leuko.cli.command import UsageError
from leuko.errors import LeukoError

HINT = "unexpected error (a fault in leuko or a library; the traceback is above); please report it"


@pytest.fixture
def lineage_raises(monkeypatch):
    """Make `leuko lineage`'s work function raise the given exception."""
    monkeypatch.delenv("LEUKO_DEBUG", raising=False)

    def arm(exc: BaseException) -> None:
        def resolve(target, tracking_uri=None):
            raise exc

        monkeypatch.setattr("leuko.tracking.lineage.resolve", resolve)

    return arm


def test_a_leuko_error_is_one_line_without_traceback(lineage_raises, capsys):
    lineage_raises(LeukoError("models:/x@y: no such model; register one with `leuko register`"))
    assert main(["lineage", "models:/x@y"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "leuko lineage: error: models:/x@y: no such model; register one with `leuko register`"
    assert "Traceback" not in err and "unexpected error" not in err
    assert "LEUKO_DEBUG=1" in err


def test_a_usage_error_exits_2_without_the_debug_hint(lineage_raises, capsys):
    lineage_raises(UsageError("give --cv or --predictions"))
    assert main(["lineage", "models:/x@y"]) == 2
    assert capsys.readouterr().err == "leuko lineage: error: give --cv or --predictions\n"


def test_a_missing_file_is_an_input_error(lineage_raises, capsys):
    lineage_raises(FileNotFoundError("runs/nope/oof_predictions.csv not found"))
    assert main(["lineage", "models:/x@y"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("leuko lineage: error: runs/nope/oof_predictions.csv not found\n")
    assert "Traceback" not in err


@pytest.mark.parametrize("exc", [KeyError("net"), ValueError("operands could not be broadcast together")])
def test_an_unexpected_exception_keeps_its_traceback_and_asks_for_a_report(lineage_raises, capsys, exc):
    lineage_raises(exc)
    assert main(["lineage", "models:/x@y"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert f"{type(exc).__name__}: " in err and "in resolve" in err  # the traceback reaches the raise
    assert err.rstrip().splitlines()[-1].startswith(f"leuko lineage: {HINT}")
    assert "leuko lineage: error:" not in err


def test_leuko_debug_shows_the_traceback_of_an_input_error(lineage_raises, capsys, monkeypatch):
    monkeypatch.setenv("LEUKO_DEBUG", "1")
    lineage_raises(LeukoError("bad input"))
    assert main(["lineage", "models:/x@y"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1] == "leuko lineage: error: bad input"


def test_interrupts_and_exits_are_not_caught(lineage_raises):
    lineage_raises(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        main(["lineage", "models:/x@y"])


def test_a_bad_run_folder_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LEUKO_DEBUG", raising=False)
    assert main(["report", "--run", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        f"leuko report: error: {tmp_path}: no cv_summary.json; give --run the output folder of `leuko cv` "
        "or an MLflow run id"
    )
    assert "Traceback" not in err
