"""Dead-worker recovery: fail the RUNNING trials whose worker process is gone.

A worker killed mid-trial leaves its trial RUNNING. leuko records on each trial the worker's host,
machine (boot and pid namespace: cluster nodes can share a hostname), pid and process start time, and
a heartbeat time that the worker renews while the trial runs (worker_attrs, Heartbeat). Before each
trial and at the end of a sweep, a worker fails RUNNING trials
    - whose worker process is gone: same host and machine only, so right away;
    - whose heartbeat is older than the grace period: any host;
    - that carry no worker attributes and started longer ago than the grace period (the worker was
      killed between asking for the trial and writing them).
This holds for every storage. On a database, Optuna's own heartbeat fails trials whose worker went
silent as well (checked when any worker starts a trial). Trials written before workers named their
machine are judged by their heartbeat only. `leuko sweep --fail-stale` does the same on demand;
`--grace 0` fails every RUNNING trial, for when no worker is left.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from leuko.sweep.study import A_FAIL_REASON, A_HEARTBEAT, A_HOST, A_MACHINE, A_PID, A_PID_START, is_journal


def _machine() -> str:
    """What tells this kernel and pid namespace apart from any other, so that a pid means one process.

    The boot id is random per kernel boot (/etc/machine-id is not: nodes cloned from one image share
    it); the pid namespace tells containers on one kernel apart. Without /proc: the machine id, else
    the network card's address (uuid.getnode, random per process when there is none: then no other
    process judges this one's pid, and its trials are judged by their heartbeat)."""
    try:
        kernel = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        try:
            kernel = Path("/etc/machine-id").read_text().strip()
        except OSError:
            kernel = ""
    with contextlib.suppress(OSError):
        kernel += " " + os.readlink("/proc/self/ns/pid")  # e.g. pid:[4026531836]
    return kernel.strip() or f"node {uuid.getnode():012x}"


HOST = socket.gethostname()
MACHINE = _machine()


def worker_attrs() -> dict:
    """The trial user attributes that name this worker process and its first heartbeat."""
    pid = os.getpid()
    return {A_HOST: HOST, A_MACHINE: MACHINE, A_PID: pid, A_PID_START: _start_time(pid), A_HEARTBEAT: time.time()}


def recover(study: optuna.Study, url: str, grace: float) -> list[int]:
    """leuko's check (fail_stale_trials) on any storage; on a database Optuna's heartbeat check too.

    Returns the numbers of the trials failed. grace 0: every RUNNING trial."""
    failed = fail_stale_trials(study, grace=grace)
    if is_journal(url) or grace == 0:
        return failed
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return sorted(set(failed) | (after - before))


def fail_stale_trials(study: optuna.Study, *, grace: float | None) -> list[int]:
    """Fail RUNNING trials whose worker is gone: a dead pid on this machine, or no sign of life for `grace` s.

    Returns the numbers of the trials it failed. The sign of life is the heartbeat attribute, or for a
    trial without one (killed before its worker wrote it, or started outside leuko) its start time.
    grace None: dead pids only.
    """
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = stale_reason(trial, grace)
        if reason is None:
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, A_FAIL_REASON, reason)
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        print(f"trial {trial.number} marked FAIL: {reason}", file=sys.stderr)
        failed.append(trial.number)
    return failed


def stale_reason(trial: FrozenTrial, grace: float | None) -> str | None:
    """Why a RUNNING trial counts as stale, or None while its worker may still be at work."""
    attrs = trial.user_attrs
    pid = attrs.get(A_PID)
    here = attrs.get(A_HOST) == HOST and attrs.get(A_MACHINE) == MACHINE
    if here and pid and not _alive(pid, attrs.get(A_PID_START)):
        return f"its worker (pid {pid} on {HOST}) is gone"
    if grace is None:
        return None
    if A_HEARTBEAT in attrs:
        if grace == 0 or time.time() - float(attrs[A_HEARTBEAT]) > grace:
            return f"no heartbeat from its worker for more than {grace:g} s"
        return None
    started = trial.datetime_start
    age = (datetime.datetime.now() - started).total_seconds() if started is not None else 0.0
    if grace == 0 or age > grace:
        return f"no worker attributes, and it started more than {grace:g} s ago"
    return None


def _start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, start: int | None = None) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):  # exited, not yet reaped by its parent
            return False
    except OSError:
        pass
    now = _start_time(int(pid))
    return start is None or now is None or now == start


class Heartbeat:
    """Writes the time into the trial every `interval` seconds while the trial runs (leuko's heartbeat)."""

    def __init__(self, trial: optuna.Trial, interval: float):
        self.trial, self.interval = trial, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="leuko-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            # The trial may have finished meanwhile, or the storage hiccuped: try again next beat.
            with contextlib.suppress(Exception):
                self.trial.set_user_attr(A_HEARTBEAT, time.time())

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
