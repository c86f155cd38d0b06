"""The cluster path on a real PostgreSQL server on loopback: a sweep's study stored there, with a worker killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from helpers.postgres import postgres_server
from helpers.sweep import env_with, write_base, write_space
from leuko.sweep.study import open_storage

pytestmark = pytest.mark.slow

# Trials of 40 epochs (an epoch of the tiny cohort takes about 0.1 s, so several seconds per trial,
# against about a second with the usual 2): a worker is seen mid-trial long enough to be killed there.
EPOCHS = 40


def _kill_one_worker_mid_trial(proc: subprocess.Popen, storage, deadline: float) -> int:
    """SIGKILL a worker other than the command itself once its trial has trained an epoch; its trial's number."""
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        try:
            trials = optuna.load_study(study_name="pg", storage=storage).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            continue
        for t in trials:
            pid = t.user_attrs.get("leuko.pid")
            if pid and pid != proc.pid and t.intermediate_values:  # reported an epoch: training
                os.kill(pid, signal.SIGKILL)  # a worker process of this test's own sweep
                return t.number
    raise AssertionError("no worker trial was seen running")


def test_sweep_on_postgres_with_three_workers_and_one_killed(tmp_path, tiny_prepared):
    base = write_base(tmp_path, tiny_prepared, max_epochs=EPOCHS)
    # Optuna's heartbeat would notice the killed worker only after a minute: leuko's own check of the
    # workers on this machine must fail its trial before the sweep ends.
    space = write_space(
        tmp_path,
        base,
        study="pg",
        fixed={"tracking.enabled": False, "trainer.logger": False},
        heartbeat={"interval": 10, "grace": 60},
    )
    with postgres_server() as url:
        storage = open_storage(url)  # creates the tables before the sweep's workers look for them
        cmd = [sys.executable, "-m", "leuko.cli", "sweep", "--space", str(space), "--trials", "6"]
        cmd += ["--workers", "3", "--storage", url]
        with open(tmp_path / "sweep.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env_with())
            try:
                killed = _kill_one_worker_mid_trial(proc, storage, time.time() + 120)
                code = proc.wait(timeout=300)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        output = (tmp_path / "sweep.log").read_text()
        assert code == 0, output[-3000:]
        trials = {t.number: t for t in optuna.load_study(study_name="pg", storage=storage).get_trials()}
    states = {n: t.state.name for n, t in trials.items()}
    assert states[killed] == "FAIL", (states, output[-3000:])
    assert "is gone" in trials[killed].user_attrs["leuko.fail_reason"]  # leuko's check, not the heartbeat
    assert "RUNNING" not in states.values(), states  # nothing is left hanging
    # 2 trials per worker: the killed worker's second one never starts; the other two workers finish theirs.
    by_worker = {int(n): int(w) for w, n in re.findall(r"\[worker (\d)\] trial (\d+) started", output)}
    dead = by_worker[killed]
    assert sorted(states) == sorted(by_worker) and len(states) == 5, (states, output[-3000:])
    assert all(states[n] == "COMPLETE" for n, w in by_worker.items() if w != dead), (states, output[-3000:])
    assert sorted(w for w in by_worker.values() if w != dead) == [w for w in (0, 0, 1, 1, 2, 2) if w != dead]
    assert re.findall(r"worker (\d) \(pid \d+\) ended with exit code (-?\d+)", output) == [(str(dead), "-9")]
