"""Dead-worker recovery: which RUNNING trials count as stale, on a journal file and on a database."""

from __future__ import annotations

import datetime
import os
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from helpers.sweep import write_base, write_space
from leuko.cli import main
from leuko.sweep.recovery import fail_stale_trials, recover, worker_attrs
from leuko.sweep.study import open_storage

HEARTBEAT = {"interval": 1, "grace": 3}


def _states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]


def _study(url: str) -> optuna.Study:
    storage = open_storage(url, heartbeat=HEARTBEAT if "://" in url else None)
    return optuna.create_study(study_name="s", storage=storage, load_if_exists=True)


def _running(study: optuna.Study, attrs: dict | None = None, *, age: float = 0.0) -> int:
    """A RUNNING trial started `age` seconds ago, with these user attributes; its id."""
    template = optuna.trial.create_trial(state=TrialState.RUNNING)
    template.datetime_start = datetime.datetime.now() - datetime.timedelta(seconds=age)
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    for key, value in (attrs or {}).items():
        study._storage.set_trial_user_attr(trial_id, key, value)
    return trial_id


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # exited and reaped: its pid is free
    return dead.pid


def _here(pid: int, heartbeat: float) -> dict:
    """Worker attributes of a process `pid` on this machine, as a worker writes them."""
    return {**worker_attrs(), "leuko.pid": pid, "leuko.pid_start": None, "leuko.heartbeat": heartbeat}


@pytest.fixture(params=["journal", "database"])
def url(request, tmp_path) -> str:
    return str(tmp_path / "s.journal") if request.param == "journal" else f"sqlite:///{tmp_path / 'optuna.db'}"


def test_fail_stale_trials_fails_dead_and_silent_workers_only(tmp_path):
    study = _study(str(tmp_path / "s.journal"))
    now = time.time()
    _running(study, _here(_dead_pid(), now))  # worker gone -> FAIL
    _running(study, _here(os.getpid(), now))  # alive -> RUNNING
    _running(study, {"leuko.host": "elsewhere", "leuko.pid": 1, "leuko.heartbeat": now - 600})  # silent -> FAIL
    _running(study, {"leuko.host": "elsewhere", "leuko.pid": 1, "leuko.heartbeat": now})  # beating -> RUNNING
    assert fail_stale_trials(study, grace=180) == [0, 2]
    assert _states(study) == ["FAIL", "RUNNING", "FAIL", "RUNNING"]
    assert "gone" in study.trials[0].user_attrs["leuko.fail_reason"]
    assert fail_stale_trials(study, grace=0) == [1, 3]  # the documented "no worker is left" recovery


def test_trial_killed_before_its_worker_attributes_fails_once_older_than_grace(tmp_path, url, capsys):
    """`leuko sweep --fail-stale --grace 600`: a RUNNING trial with no worker attributes counts from its start."""
    space = write_space(tmp_path, write_base(tmp_path, tmp_path / "prepared"), study="s")
    study = _study(url)
    _running(study, age=700)  # asked for, then its worker was killed before it wrote anything
    _running(study, age=5)  # just asked for: its worker is about to write its attributes
    assert main(["sweep", "--space", str(space), "--storage", url, "--fail-stale", "--grace", "600"]) == 0
    assert "1 stale trial(s) marked FAIL: [0]" in capsys.readouterr().out
    study = _study(url)
    assert _states(study) == ["FAIL", "RUNNING"]
    assert "started more than 600 s ago" in study.trials[0].user_attrs["leuko.fail_reason"]


def test_nodes_sharing_a_hostname_do_not_judge_each_others_pids(tmp_path, url):
    study = _study(url)
    now, dead = time.time(), _dead_pid()
    _running(study, {**_here(dead, now), "leuko.machine": "another-node"})  # same hostname, other node -> RUNNING
    old = {k: v for k, v in _here(dead, now).items() if k != "leuko.machine"}
    _running(study, old)  # written before workers named their machine: judged by its heartbeat -> RUNNING
    _running(study, {**old, "leuko.heartbeat": now - 600})  # ... and silent for 10 min -> FAIL
    _running(study, _here(dead, now))  # this machine, pid gone -> FAIL
    assert recover(study, url, 180) == [2, 3]
    assert _states(study) == ["RUNNING", "RUNNING", "FAIL", "FAIL"]
    assert "no heartbeat" in study.trials[2].user_attrs["leuko.fail_reason"]
    assert "is gone" in study.trials[3].user_attrs["leuko.fail_reason"]


def test_database_keeps_optunas_heartbeat_for_other_machines(tmp_path):
    """A trial of another machine whose Optuna heartbeat stopped is failed by Optuna (no leuko reason)."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = _study(url)
    trial_id = _running(study, {"leuko.host": "elsewhere", "leuko.pid": 1, "leuko.heartbeat": time.time()})
    study._storage.record_heartbeat(trial_id)
    assert recover(study, url, 180) == []  # both heartbeats fresh
    with sqlite3.connect(tmp_path / "optuna.db") as db:  # Optuna's heartbeat stopped an hour ago
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 hour')")
    assert recover(study, url, 180) == [0]
    assert "leuko.fail_reason" not in study.trials[0].user_attrs
