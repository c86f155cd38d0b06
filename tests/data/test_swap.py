"""The output swap of prepare: at every instant the old or the new output exists; leftovers are recovered."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import leuko.data.swap as swap
from helpers.cells import write_cohort
from leuko.data.prepare import prepare
from leuko.data.prepared import PrepareError, load_prepared

KILLER = Path(__file__).resolve().parents[1] / "helpers" / "kill_in_swap.py"


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _cohort(tmp_path, n_cells):
    return write_cohort(tmp_path / "raw", n_cells)


@pytest.mark.parametrize("mode", ["renames", "exchange"])
def test_a_kill_inside_the_swap_leaves_an_output_and_the_next_run_cleans_up(tmp_path, mode):
    prepare(_cohort(tmp_path, 4), tmp_path / "prep", shape=(8, 8, 8), progress=False)
    manifest = _cohort(tmp_path, 6)  # changed inputs: the next prepare replaces the output
    run = subprocess.run([sys.executable, str(KILLER), mode, str(manifest), str(tmp_path / "prep")], check=False)
    if run.returncode == 3:
        pytest.skip("this file system cannot exchange two folders atomically")
    assert run.returncode == -signal.SIGKILL

    # the old or the new output is on disk, complete
    outputs = [tmp_path / "prep"] if (tmp_path / "prep").exists() else []
    outputs += [tmp_path / name for name in _hidden(tmp_path) if ".old-" in name]
    assert len(outputs) == 1 and load_prepared(outputs[0])[0].shape[0] in (4, 6)
    assert _hidden(tmp_path)  # and the dead run's folders are still there
    if not (tmp_path / "prep").exists():
        with pytest.raises(PrepareError, match=r"folder not found.*interrupted .*\.prep\.old-\d+.*rerun `leuko prep"):
            load_prepared(tmp_path / "prep")

    with pytest.warns(UserWarning, match="interrupted"):
        result = prepare(manifest, tmp_path / "prep", shape=(8, 8, 8), progress=False)
    assert result.n_cells == 6 and load_prepared(tmp_path / "prep")[0].shape[0] == 6
    assert _hidden(tmp_path) == []


def test_leftovers_of_a_running_prepare_are_left_alone(tmp_path):
    manifest = _cohort(tmp_path, 2)
    alive = subprocess.Popen(["sleep", "60"])
    try:
        busy = tmp_path / f".prep.tmp-{alive.pid}"
        busy.mkdir()
        prepare(manifest, tmp_path / "prep", shape=(8, 8, 8), progress=False)
        assert busy.is_dir()
    finally:
        alive.kill()
        alive.wait()
    dead = alive.pid  # now gone: its leftovers are stale
    with pytest.warns(UserWarning, match=rf"removed \.prep\.tmp-{dead}, left by an interrupted run"):
        prepare(_cohort(tmp_path, 3), tmp_path / "prep", shape=(8, 8, 8), progress=False)
    assert _hidden(tmp_path) == []


def test_an_error_inside_the_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    prepare(_cohort(tmp_path, 4), tmp_path / "prep", shape=(8, 8, 8), progress=False)
    monkeypatch.setattr(swap, "_exchange", lambda a, b: False)
    rename, calls = os.rename, []

    def failing_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk on fire")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_second_rename)
    with pytest.raises(OSError, match="disk on fire"):
        prepare(_cohort(tmp_path, 6), tmp_path / "prep", shape=(8, 8, 8), progress=False)
    assert load_prepared(tmp_path / "prep")[0].shape[0] == 4
    assert _hidden(tmp_path) == []
