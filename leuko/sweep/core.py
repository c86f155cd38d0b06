"""`leuko sweep`: an Optuna study over model families and hyperparameters; a trial is a cross-validated fit.

    conf/sweep/*.yaml   search space (keys are config keys), objective, folds per trial, sampler, pruner
    worker process(es)  ask the study for a trial, turn its parameters into config overrides and run
                        leuko.training.cv.cross_validate on the first N folds, as an MLflow child run of the
                        sweep run; the validation score after every epoch goes to the study (pruning)
    `--workers N`       worker 0 is the command itself; it starts N-1 more (`leuko sweep --workers 1`)

A single-device trial runs inside its worker. A trial that uses several devices (DDP) runs as its own
process, `python -m leuko.sweep <trial dir>/trial.json`: Lightning starts the other ranks by re-running
the command line of the process that calls fit, which inside the sweep would start more sweeps, while
here it starts the other ranks of exactly this trial. Every rank reads the same trial.json, so all
train with the same parameters; only global rank 0 talks to the study, and it broadcasts its pruning
decision so that all ranks stop together. A trial process dies with its worker (PR_SET_PDEATHSIG).

Storage: a journal file (sweeps/<study>.journal) by default, safe for several processes on one machine
or on NFS; any database URL (sqlite:///..., postgresql://...) for a cluster. A worker killed mid-trial
leaves its trial RUNNING; with a database, Optuna's heartbeat fails it once it is stale (checked when
any worker starts a trial). A journal has no heartbeat, so leuko records the worker's host, pid and a
heartbeat time on each trial: before each trial and at the end of a sweep, a worker fails RUNNING
trials whose worker process is gone (same host) or whose heartbeat is older than the grace period
(any host). `leuko sweep --fail-stale` does the same on demand; `--grace 0` fails every RUNNING trial,
for when no worker is left.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState

from leuko.errors import LeukoError

OBJECTIVES = {
    "balanced_accuracy": "maximize",
    "macro_f1": "maximize",
    "accuracy": "maximize",
    "auroc": "maximize",
    "loss": "minimize",
}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "none": optuna.pruners.NopPruner,
}
SWEEP_KEYS = (
    "study",
    "storage",
    "config",
    "trials",
    "objective",
    "folds",
    "isolate",
    "sampler",
    "pruner",
    "heartbeat",
    "fixed",
    "space",
)
PARAM_KEYS = ("choices", "low", "high", "log", "step", "type", "when")
NET_KWARGS = "model.net_kwargs"  # a dict-typed config key: its entries are gathered into one JSON override
SPEC, RESULT, LOG = "trial.json", "result.json", "trial.log"
HOST = socket.gethostname()
# Trial user attributes that identify the worker process (journal recovery) and make a trial reproducible.
A_CONFIG, A_OVERRIDES, A_FOLDS = "leuko.config", "leuko.overrides", "leuko.folds"
A_HOST, A_PID, A_PID_START, A_HEARTBEAT = "leuko.host", "leuko.pid", "leuko.pid_start", "leuko.heartbeat"


class SweepConfigError(LeukoError, ValueError):
    """A sweep file that cannot be used; the message names the file, the key and the fix."""


class TrialFailed(RuntimeError):
    """The trial process ended without a result; the study records the trial as FAIL and goes on."""


# ---------------------------------------------------------------------------------------------- the sweep file
@dataclass(frozen=True)
class Param:
    key: str  # a config key, e.g. model.lr or data.augment.elastic
    kind: str  # categorical | int | float
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: dict = field(default_factory=dict)  # {other key: allowed values}: sampled only then

    def active(self, sampled: dict) -> bool:
        return all(sampled.get(key) in allowed for key, allowed in self.when.items())

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class SweepConfig:
    path: Path
    study: str
    storage: str | None
    config: list[str]
    trials: int
    objective: str
    folds: int
    isolate: str  # auto | always | never: a process per trial (auto: when a trial uses more than one device)
    sampler: dict
    pruner: dict
    heartbeat: dict
    fixed: dict
    space: dict[str, Param]

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    @property
    def monitor(self) -> str:
        return f"val/{self.objective}"

    def storage_url(self, override: str | None = None) -> str:
        return override or self.storage or f"sweeps/{self.study}.journal"


def load_sweep_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"{path}: sweep file not found; pass --space conf/sweep/default.yaml or another file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SweepConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise SweepConfigError(f"{path}: expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise SweepConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a sweep file has {', '.join(SWEEP_KEYS)}")

    def need(key: str, kind: type | tuple, default: Any = None) -> Any:
        value = raw.get(key, default)
        if value is None and default is None and key not in ("storage",):
            raise SweepConfigError(f"{path}: `{key}` is missing; see conf/sweep/default.yaml for an example")
        if value is not None and not isinstance(value, kind):
            raise SweepConfigError(f"{path}: `{key}: {value!r}` should be {getattr(kind, '__name__', kind)}")
        return value

    study = str(need("study", str))
    if not study.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SweepConfigError(
            f"{path}: `study: {study}` may hold only letters, digits, '-', '_' and '.' (it names files)"
        )
    config = need("config", (list, str))
    config = [config] if isinstance(config, str) else [str(c) for c in config]
    objective = need("objective", str, "balanced_accuracy")
    if objective not in OBJECTIVES:
        raise SweepConfigError(f"{path}: `objective: {objective}` is not one of {', '.join(OBJECTIVES)}")
    trials, folds = need("trials", int, 10), need("folds", int, 1)
    if trials < 0 or folds < 1:
        raise SweepConfigError(f"{path}: `trials` must be >= 0 and `folds` >= 1 (got {trials}, {folds})")
    isolate = str(need("isolate", (str, bool), "auto")).lower()
    isolate = {"true": "always", "false": "never"}.get(isolate, isolate)
    if isolate not in ("auto", "always", "never"):
        raise SweepConfigError(f"{path}: `isolate: {raw['isolate']}` must be auto, always or never")
    pruner = dict(need("pruner", dict, {"type": "median"}))
    if pruner.get("type", "median") not in PRUNERS:
        raise SweepConfigError(f"{path}: `pruner.type: {pruner['type']}` is not one of {', '.join(PRUNERS)}")
    heartbeat = {"interval": 60, "grace": 180, **need("heartbeat", dict, {})}
    if not 0 < heartbeat["interval"] < heartbeat["grace"]:
        raise SweepConfigError(
            f"{path}: `heartbeat: {heartbeat}` needs 0 < interval < grace (seconds), e.g. interval 60, grace 180"
        )
    fixed = need("fixed", dict, {})
    space_raw = need("space", dict)
    if not space_raw:
        raise SweepConfigError(
            f"{path}: `space` is empty; give at least one parameter, e.g. model.lr: {{low: 1e-4, high: 1e-2, log: true}}"
        )
    space: dict[str, Param] = {}
    for key, spec in space_raw.items():
        space[key] = _param(path, key, spec, space)
        if key in fixed:
            raise SweepConfigError(f"{path}: `{key}` is both in `fixed` and in `space`; keep it in one of them")
    storage = raw.get("storage")
    return SweepConfig(
        path=path,
        study=study,
        storage=None if storage is None else str(storage),
        config=config,
        trials=trials,
        objective=objective,
        folds=folds,
        isolate=isolate,
        sampler=dict(need("sampler", dict, {})),
        pruner=pruner,
        heartbeat=heartbeat,
        fixed=dict(fixed),
        space=space,
    )


def _param(path: Path, key: str, spec: Any, earlier: dict[str, Param]) -> Param:
    where = f"{path}: space.{key}"
    example = "{choices: [a, b]} or {low: 0.0001, high: 0.01, log: true}"
    if not isinstance(spec, dict):
        raise SweepConfigError(f"{where}: expected a mapping such as {example}, got {spec!r}")
    unknown = sorted(set(spec) - set(PARAM_KEYS))
    if unknown:
        raise SweepConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; use {', '.join(PARAM_KEYS)}")
    when = {}
    for other, allowed in (spec.get("when") or {}).items():
        if other not in earlier or earlier[other].kind != "categorical":
            raise SweepConfigError(
                f"{where}: `when` refers to {other!r}, which is not a categorical parameter listed above it in the space"
            )
        when[other] = tuple(allowed if isinstance(allowed, list) else [allowed])
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SweepConfigError(f"{where}: `choices` must be a non-empty list")
        return Param(key, "categorical", choices=tuple(choices), when=when)
    if "low" not in spec or "high" not in spec:
        raise SweepConfigError(f"{where}: give `choices`, or `low` and `high`: {example}")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise SweepConfigError(f"{where}: need numbers low < high, got low={low!r} high={high!r}")
    kind = spec.get("type") or ("int" if all(isinstance(v, int) for v in (low, high, spec.get("step", 1))) else "float")
    if kind not in ("int", "float"):
        raise SweepConfigError(f"{where}: `type: {kind}` must be int or float (categorical parameters use `choices`)")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise SweepConfigError(f"{where}: `log: true` needs low > 0, got low={low}")
    return Param(key, kind, low=low, high=high, log=log, step=spec.get("step"), when=when)


def sample(trial: optuna.Trial, space: dict[str, Param]) -> dict:
    params: dict = {}
    for param in space.values():
        if param.active(params):
            params[param.key] = param.suggest(trial)
    return params


def overrides_for(fixed: dict, params: dict) -> list[str]:
    """Config overrides for `leuko cv`/`leuko fit`: ["--model.lr", "0.001", ...].

    model.net_kwargs is one dict in the config; its sampled and fixed entries become one JSON value.
    """
    merged = {**fixed, **params}
    net_kwargs: dict = {}
    out: list[str] = []
    for key, value in merged.items():
        if key == NET_KWARGS and isinstance(value, dict):
            net_kwargs.update(value)
        elif key.startswith(NET_KWARGS + "."):
            net_kwargs[key[len(NET_KWARGS) + 1 :]] = value
        else:
            out += [f"--{key}", _format(value)]
    if net_kwargs:
        out += [f"--{NET_KWARGS}", json.dumps(net_kwargs, sort_keys=True)]
    return out


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


# ---------------------------------------------------------------------------------------------- storage and study
def open_storage(url: str, *, heartbeat: dict | None = None) -> optuna.storages.BaseStorage:
    """A database URL (contains ://) -> RDBStorage, with Optuna's heartbeat when given; else a journal file."""
    if "://" in url:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {}
        if heartbeat:
            kwargs = {"heartbeat_interval": int(heartbeat["interval"]), "grace_period": int(heartbeat["grace"])}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, **kwargs)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(url.removeprefix("journal:"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def is_journal(url: str) -> bool:
    return "://" not in url


def make_pruner(spec: dict) -> optuna.pruners.BasePruner:
    spec = dict(spec)
    cls = PRUNERS[spec.pop("type", "median")]
    try:
        return cls(**spec)
    except TypeError as exc:
        raise SweepConfigError(f"pruner {spec}: {exc}; see optuna.pruners.{cls.__name__} for its arguments") from exc


def open_study(
    cfg: SweepConfig, url: str, *, worker: int = 0, workers: int = 1, heartbeat: bool = False
) -> optuna.Study:
    storage = open_storage(url, heartbeat=cfg.heartbeat if heartbeat else None)
    sampler_args = {"n_startup_trials": 5, "multivariate": True, "group": True, "seed": 0, **cfg.sampler}
    study = optuna.create_study(study_name=cfg.study, storage=storage, direction=cfg.direction, load_if_exists=True)
    # A fixed seed would make every worker, and every resumed run, propose the same first trials.
    seed = sampler_args.pop("seed")
    if seed is not None:
        seed = int(seed) + 7919 * worker + len(study.get_trials(deepcopy=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=workers > 1, **sampler_args)
    study.pruner = make_pruner(cfg.pruner)
    return study


# ---------------------------------------------------------------------------------------------- stale trials
def fail_stale_trials(study: optuna.Study, *, grace: float | None) -> list[int]:
    """Fail RUNNING trials whose worker is gone: a dead pid on this host, or no heartbeat for `grace` s.

    Returns the numbers of the trials it failed. Trials started outside leuko (no worker attributes)
    are left alone unless grace is 0.
    """
    failed = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        reason = None
        if attrs.get(A_HOST) == HOST and attrs.get(A_PID) and not _alive(attrs[A_PID], attrs.get(A_PID_START)):
            reason = f"its worker (pid {attrs[A_PID]} on {HOST}) is gone"
        elif grace is not None and now - float(attrs.get(A_HEARTBEAT, 0 if grace == 0 else now)) > grace:
            reason = f"no heartbeat from its worker for more than {grace:g} s"
        if reason is None:
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "leuko.fail_reason", reason)
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        print(f"trial {trial.number} marked FAIL: {reason}", file=sys.stderr)
        failed.append(trial.number)
    return failed


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


# ---------------------------------------------------------------------------------------------- MLflow
class _Tracking:
    """The sweep run and the tags of its trial runs (all writes go through one MlflowClient)."""

    def __init__(self, uri: str, *, experiment: str | None = None, run_id: str | None = None):
        import mlflow

        self.uri = uri
        self.client = mlflow.MlflowClient(uri)
        if run_id is not None:
            self.experiment_id = self.client.get_run(run_id).info.experiment_id
        else:
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    def sweep_run(self, study: optuna.Study, cfg: SweepConfig, url: str, tags: dict) -> str:
        run_id = study.user_attrs.get("leuko.sweep_run_id")
        if run_id:
            try:
                run = self.client.get_run(run_id)
                if run.info.lifecycle_stage == "active":
                    self.client.update_run(run_id, status="RUNNING")
                    return run_id
            except Exception:  # the run lives in another tracking store: start a new one here
                pass
        tags = {**tags, "leuko.command": "sweep", "leuko.study": cfg.study, "leuko.storage": url}
        run = self.client.create_run(self.experiment_id, run_name=f"sweep-{cfg.study}", tags=tags)
        for key, value in {"study": cfg.study, "objective": cfg.objective, "folds_per_trial": cfg.folds}.items():
            self.client.log_param(run.info.run_id, key, value)
        study.set_user_attr("leuko.sweep_run_id", run.info.run_id)
        return run.info.run_id

    def trial_runs(self, sweep_run_id: str, number: int) -> list:
        query = f"tags.mlflow.parentRunId = '{sweep_run_id}' and tags.`leuko.trial` = '{number}'"
        return self.client.search_runs([self.experiment_id], query)

    def mark_trial(self, sweep_run_id: str, number: int, state: str) -> None:
        """Tag the trial's run (and its fold runs) with the trial's final state; fix up their status."""
        status = {"COMPLETE": None, "PRUNED": "KILLED", "FAIL": "FAILED"}[state]
        for run in self.trial_runs(sweep_run_id, number):
            runs = [run] + self.client.search_runs(
                [self.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
            )
            for r in runs:
                self.client.set_tag(r.info.run_id, "leuko.trial_state", state)
                if status and r.info.status in ("RUNNING", "FAILED", "SCHEDULED") and r.info.status != status:
                    self.client.set_terminated(r.info.run_id, status)


# ---------------------------------------------------------------------------------------------- the worker
@dataclass
class _Worker:
    cfg: SweepConfig
    url: str
    configs: list[str]
    overrides: list[str]
    out: Path
    sweep_run_id: str | None
    tracking: _Tracking | None
    index: int = 0
    workers: int = 1
    isolate: bool = False  # run each trial in its own process (needed for DDP)
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES for this worker's trial processes

    def say(self, text: str) -> None:
        prefix = f"[worker {self.index}] " if self.workers > 1 else ""
        print(prefix + text, flush=True)

    def __call__(self, trial: optuna.Trial) -> float:
        if is_journal(self.url):
            for number in fail_stale_trials(trial.study, grace=self.cfg.heartbeat["grace"]):
                self.mark(number, "FAIL")
        params = sample(trial, self.cfg.space)
        overrides = overrides_for(self.cfg.fixed, params) + self.overrides
        folds = list(range(self.cfg.folds))
        name = f"{self.cfg.study}-trial{trial.number:03d}"
        trial_dir = (self.out / self.cfg.study / name).resolve()
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / RESULT).unlink(missing_ok=True)
        (trial_dir / LOG).unlink(missing_ok=True)
        for key, value in {
            A_CONFIG: self.configs,
            A_OVERRIDES: overrides,
            A_FOLDS: folds,
            A_HOST: HOST,
            A_PID: os.getpid(),
            A_PID_START: _start_time(os.getpid()),
            A_HEARTBEAT: time.time(),
            "leuko.dir": str(trial_dir),
        }.items():
            trial.set_user_attr(key, value)
        spec = {
            "study": self.cfg.study,
            "storage": self.url if "://" in self.url else str(Path(self.url).resolve()),
            "trial_id": trial._trial_id,
            "number": trial.number,
            "objective": self.cfg.objective,
            "pruner": self.cfg.pruner,
            "config": self.configs,
            "overrides": overrides,
            "folds": folds,
            "name": name,
            "out": str(trial_dir.parent),
            "sweep_run_id": self.sweep_run_id,
            "tags": {"leuko.study": self.cfg.study, "leuko.trial": str(trial.number), "leuko.command": "sweep-trial"},
        }
        (trial_dir / SPEC).write_text(json.dumps(spec, indent=2) + "\n")
        self.say(f"trial {trial.number} started: {describe(params)}")
        start = time.time()
        try:
            result = self._execute(trial, spec, trial_dir)
        except BaseException:  # interrupted: Optuna records FAIL, and so does MLflow
            self.mark(trial.number, "FAIL")
            raise
        state = result["state"]
        self.mark(trial.number, state)
        took = f"{time.time() - start:.0f} s"
        if state == "COMPLETE":
            trial.set_user_attr("leuko.score_std", result["std"])
            trial.set_user_attr("leuko.training.cv", result["summary"])
            self.say(
                f"trial {trial.number} COMPLETE: {self.cfg.objective} {result['value']:.4f} +- {result['std']:.4f} ({took})"
            )
            return float(result["value"])
        if state == "PRUNED":
            self.say(f"trial {trial.number} PRUNED: {result.get('message', '')} ({took})")
            raise optuna.TrialPruned(result.get("message", ""))
        tail = "".join(_tail(trial_dir / LOG, 15))
        self.say(f"trial {trial.number} FAILED ({took}): {result.get('error')}; log: {trial_dir / LOG}\n{tail}")
        raise TrialFailed(f"{result.get('error')} (log: {trial_dir / LOG})")

    def _execute(self, trial: optuna.Trial, spec: dict, trial_dir: Path) -> dict:
        with _Heartbeat(trial, float(self.cfg.heartbeat["interval"])):
            if self.isolate:
                code = self._run(trial, trial_dir)
                result = _read_json(trial_dir / RESULT) or {
                    "state": "FAIL",
                    "error": f"the trial process ended with exit code {code} before writing {RESULT}",
                }
            else:
                with _output_to(trial_dir / LOG):
                    try:
                        result = execute_trial(spec, trial)
                    except (Exception, KeyboardInterrupt):
                        raise
                    except BaseException as exc:  # e.g. Lightning's SystemExit on SIGTERM: Optuna then fails the trial
                        raise KeyboardInterrupt(repr(exc)) from exc
        return result

    def _run(self, trial: optuna.Trial, trial_dir: Path) -> int:
        env = dict(os.environ)
        env["LEUKO_SWEEP_WORKER_PID"] = str(os.getpid())
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus
        if self.workers > 1 and "OMP_NUM_THREADS" not in env:  # workers share the cores
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.workers))
        with open(trial_dir / LOG, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "leuko.sweep", str(trial_dir / SPEC)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
            trial.set_user_attr("leuko.trial_pid", proc.pid)
            try:
                return proc.wait()
            except BaseException:
                _stop(proc)
                raise

    def mark(self, number: int, state: str) -> None:
        if self.tracking is not None and self.sweep_run_id:
            try:
                self.tracking.mark_trial(self.sweep_run_id, number, state)
            except Exception as exc:  # tracking is bookkeeping: never lose the trial over it
                self.say(f"warning: could not tag the MLflow run of trial {number}: {exc}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Heartbeat:
    """Writes the time into the trial every `interval` seconds while the trial runs (journal recovery)."""

    def __init__(self, trial: optuna.Trial, interval: float):
        self.trial, self.interval = trial, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="leuko-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.trial.set_user_attr(A_HEARTBEAT, time.time())
            except Exception:  # the trial finished meanwhile, or the storage hiccuped: try again next beat
                pass

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C code and logging
    handlers too) to path while an in-process trial runs: the sweep's console stays readable."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines(keepends=True)[-n:]
    except OSError:
        return []


def describe(params: dict) -> str:
    return " ".join(f"{_short(k)}={_round(v)}" for k, v in params.items())


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _round(value: Any) -> Any:
    return f"{value:.3g}" if isinstance(value, float) else value


def _raise_interrupt(signum, frame):  # SIGTERM (e.g. SLURM preemption) ends the trial as FAIL, cleanly
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------------------------------- the command
def run_sweep(
    space: str | Path,
    *,
    trials: int | None = None,
    workers: int = 1,
    configs: list[str] | None = None,
    overrides: list[str] | None = None,
    storage: str | None = None,
    out: str | Path = "sweeps",
    fail_stale: bool = False,
    grace: float | None = None,
    leaderboard_only: bool = False,
    worker_index: int = 0,
    sweep_run_id: str | None = None,
) -> pd.DataFrame | None:
    """Run `trials` new trials of the study (split over `workers` processes); return the leaderboard.

    Worker 0 is this process: it sets up the study and the MLflow sweep run, starts workers 1..N-1
    (`leuko sweep ... --workers 1`), runs its share, waits for them and prints the leaderboard.
    """
    cfg = load_sweep_config(space)
    url = cfg.storage_url(storage)
    configs = cfg.config + list(configs or [])
    overrides = list(overrides or [])
    trials = cfg.trials if trials is None else trials
    if trials < 0 or workers < 1:
        raise SweepConfigError(f"--trials {trials} --workers {workers}: need trials >= 0 and workers >= 1")
    out = Path(out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    n_workers = int(os.environ.get("LEUKO_SWEEP_WORKERS", workers))
    study = open_study(cfg, url, worker=worker_index, workers=n_workers, heartbeat=not is_journal(url))

    if worker_index > 0:  # an extra worker started by worker 0, which passes the tracking URI in the environment
        from leuko.tracking.runs import resolve_tracking_uri

        tracking = _Tracking(resolve_tracking_uri(), run_id=sweep_run_id) if sweep_run_id else None
        isolate = os.environ.get("LEUKO_SWEEP_ISOLATE") == "1"
        gpus = os.environ.get("LEUKO_SWEEP_GPUS")
        worker = _Worker(
            cfg, url, configs, overrides, out, sweep_run_id, tracking, worker_index, n_workers, isolate, gpus
        )
        study.optimize(worker, n_trials=trials, catch=(TrialFailed,), gc_after_trial=True)
        return None

    if leaderboard_only or fail_stale:
        if fail_stale:
            failed = _recover(study, url, cfg.heartbeat["grace"] if grace is None else grace)
            print(f"{len(failed)} stale trial(s) marked FAIL" + (f": {failed}" if failed else ""))
            run_id = study.user_attrs.get("leuko.sweep_run_id")
            tracking = _probe(configs, overrides).tracking if failed and run_id else None
            for number in failed if tracking else []:
                tracking.mark_trial(run_id, number, "FAIL")
        board = leaderboard(study, cfg)
        print_leaderboard(board, cfg)
        return board

    probe = _probe(configs, overrides, validate=cfg)
    tracking, multi_device = probe.tracking, probe.multi_device
    if multi_device and cfg.isolate == "never":
        raise SweepConfigError(f"{cfg.path}: `isolate: never` cannot run multi-device (DDP) trials; use auto")
    isolate = cfg.isolate == "always" or (cfg.isolate == "auto" and multi_device)
    gpus = _gpu_count() if workers > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ else 0
    if gpus > 1:
        isolate = True  # each worker's trials get their own GPUs through CUDA_VISIBLE_DEVICES
    if workers > 1 and not isolate and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))  # the workers share the cores
    sweep_run_id = tracking.sweep_run(study, cfg, url, probe.lineage) if tracking else None
    worker = _Worker(
        cfg,
        url,
        configs,
        overrides,
        out,
        sweep_run_id,
        tracking,
        0,
        workers,
        isolate,
        _gpu_share(0, workers, gpus) if gpus > 1 else None,
    )
    for number in _recover(study, url, cfg.heartbeat["grace"]):
        worker.mark(number, "FAIL")
    study.set_user_attr("leuko.objective", cfg.objective)
    study.set_user_attr("leuko.base_net", probe.net)
    if tracking:
        tracking.client.log_artifact(sweep_run_id, str(cfg.path))
    existing = len(study.get_trials(deepcopy=False))
    print(
        f"study {cfg.study} ({url}): {existing} earlier trial(s), {trials} new on {workers} worker(s); "
        f"objective {cfg.objective} over {cfg.folds} fold(s) per trial; trials run "
        + ("in their own processes" if isolate else "inside the workers"),
        flush=True,
    )
    shares = [trials // workers + (i < trials % workers) for i in range(workers)]
    env = dict(os.environ, LEUKO_SWEEP_WORKERS=str(workers), LEUKO_SWEEP_ISOLATE=str(int(isolate)))
    if workers > 1 and "OMP_NUM_THREADS" not in env:  # workers share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    if tracking:
        env["MLFLOW_TRACKING_URI"] = tracking.uri
    procs = []
    for i in range(1, workers):
        if shares[i] == 0:
            continue
        cmd = [
            sys.executable,
            "-m",
            "leuko.cli",
            "sweep",
            "--space",
            str(cfg.path),
            "--trials",
            str(shares[i]),
            "--workers",
            "1",
            "--storage",
            url,
            "--out",
            str(out),
            "--worker-index",
            str(i),
        ]
        cmd += [a for c in configs[len(cfg.config) :] for a in ("--config", c)]
        cmd += ["--sweep-run-id", sweep_run_id] if sweep_run_id else []
        worker_env = dict(env, LEUKO_SWEEP_GPUS=_gpu_share(i, workers, gpus)) if gpus > 1 else env
        procs.append(subprocess.Popen(cmd + overrides, stdin=subprocess.DEVNULL, env=worker_env))
    status = "FAILED"
    try:
        study.optimize(worker, n_trials=shares[0], catch=(TrialFailed,), gc_after_trial=True)
        for i, proc in enumerate(procs, start=1):
            code = proc.wait()
            if code != 0:
                print(
                    f"warning: worker {i} (pid {proc.pid}) ended with exit code {code}; "
                    f"the study keeps every trial that finished",
                    file=sys.stderr,
                )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        for proc in procs:
            _stop(proc)
        for number in _recover(study, url, cfg.heartbeat["grace"]):
            worker.mark(number, "FAIL")
        board = _finish(study, cfg, url, out, tracking, sweep_run_id, status, storage_given=storage is not None)
    return board


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpu_share(worker: int, workers: int, gpus: int) -> str:
    """The GPUs of one worker: a round-robin share, or one shared GPU when there are more workers."""
    if workers <= gpus:
        return ",".join(str(g) for g in range(gpus) if g % workers == worker)
    return str(worker % gpus)


def _finish(study, cfg: SweepConfig, url: str, out: Path, tracking, sweep_run_id, status: str, storage_given: bool):
    board = leaderboard(study, cfg)
    path = out / cfg.study / "leaderboard.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    board.to_csv(path, index=False)
    print_leaderboard(board, cfg)
    print(f"\nleaderboard: {path}")
    if tracking:
        _log_sweep(tracking, sweep_run_id, study, cfg, path, status)
        print(
            f"MLflow: run sweep-{cfg.study} ({sweep_run_id}) in {tracking.uri}, its trials nested below it;"
            f" open with `make mlflow-ui` or `mlflow ui --backend-store-uri {tracking.uri}`"
        )
    best = _best(study)
    if best is not None:
        repro = [
            "leuko",
            "cv",
            *[a for c in best.user_attrs[A_CONFIG] for a in ("--config", c)],
            "--folds",
            ",".join(map(str, best.user_attrs[A_FOLDS])),
            *best.user_attrs[A_OVERRIDES],
        ]
        print(f"best: trial {best.number}; the same cross-validation by hand:\n  {shlex.join(repro)}")
        print(f"next: leuko register --space {cfg.path}" + (f" --storage {url}" if storage_given else ""))
    return board


def _recover(study: optuna.Study, url: str, grace: float) -> list[int]:
    """Journal: leuko's worker check; database: Optuna's heartbeat. grace 0: every RUNNING trial, either way."""
    if is_journal(url) or grace == 0:
        return fail_stale_trials(study, grace=grace)
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return sorted({t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))} - before)


@dataclass
class _Probe:
    """What the base config says: where MLflow runs go, the data's lineage, and the fit's devices."""

    tracking: _Tracking | None
    lineage: dict
    multi_device: bool
    net: str


def _probe(configs: list[str], overrides: list[str], validate: SweepConfig | None = None) -> _Probe:
    """Instantiate the base config once; with validate, with one point of the space, so that a key
    that is not a config key fails before any trial starts."""
    from leuko.tracking.runs import DEFAULT_EXPERIMENT, lineage_tags, resolve_tracking_uri
    from leuko.training.cli import LeukoCLI

    extra: list[str] = []
    if validate is not None:
        first: dict = {}
        for param in validate.space.values():
            if param.active(first):
                first[param.key] = param.choices[0] if param.kind == "categorical" else param.low
        extra = overrides_for(validate.fixed, first)
    args = [a for c in configs for a in ("--config", c)] + extra + list(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        chatter = Path(tmp) / "probe.log"
        try:
            with _output_to(chatter), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                probe = LeukoCLI(args=args + ["--trainer.logger", "false"], run=False)
        except (SystemExit, TypeError, ValueError) as exc:  # on SystemExit jsonargparse wrote the bad key
            print(chatter.read_text()[-3000:], file=sys.stderr)
            where = f"{validate.path} (space, fixed, config) or the extra overrides" if validate else "the config"
            detail = "the message above names the key" if isinstance(exc, SystemExit) else str(exc)
            raise SweepConfigError(f"a trial's config would be invalid ({detail}); check {where}") from exc
    tracking = probe.config["tracking"]
    multi = _multi_device(probe.config["trainer"])
    net = probe.config["model"]["net"]
    if not tracking.enabled:
        return _Probe(None, {}, multi, net)
    tags = lineage_tags(probe.config["data"]["prepared_dir"]) if validate else {}
    client = _Tracking(resolve_tracking_uri(tracking.uri), experiment=tracking.experiment or DEFAULT_EXPERIMENT)
    return _Probe(client, tags, multi, net)


def _multi_device(trainer) -> bool:
    """Whether a fit with this trainer config may start more processes (DDP and friends)."""
    strategy = str(trainer.get("strategy") or "auto").lower()
    devices = trainer.get("devices", "auto")
    single = devices in (1, "1") or (isinstance(devices, list) and len(devices) == 1)
    return (
        not single or int(trainer.get("num_nodes") or 1) > 1 or any(s in strategy for s in ("ddp", "fsdp", "deepspeed"))
    )


def _log_sweep(
    tracking: _Tracking, run_id: str, study: optuna.Study, cfg: SweepConfig, board_path: Path, status: str
) -> None:
    client = tracking.client
    client.log_artifact(run_id, str(board_path))
    counts = pd.Series([t.state.name for t in study.get_trials(deepcopy=False)]).value_counts()
    for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING"):
        client.log_metric(run_id, f"trials_{state.lower()}", int(counts.get(state, 0)))
    best = _best(study)
    if best is not None:
        client.log_metric(run_id, f"best_{cfg.objective}", float(best.value))
        client.set_tag(run_id, "leuko.best_trial", str(best.number))
        client.set_tag(run_id, "leuko.best_overrides", shlex.join(best.user_attrs[A_OVERRIDES])[:5000])
    client.set_terminated(run_id, status)


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None


# ---------------------------------------------------------------------------------------------- leaderboard
def leaderboard(study: optuna.Study, cfg: SweepConfig) -> pd.DataFrame:
    """One row per trial, best first: trial, state, model, each sampled parameter, score, std, duration."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        net = t.params.get("model.net", cfg.fixed.get("model.net", study.user_attrs.get("leuko.base_net")))
        row = {"trial": t.number, "state": t.state.name, "model": net}
        row.update({k: t.params.get(k) for k in cfg.space if k != "model.net"})
        row[cfg.objective] = t.value if t.state == TrialState.COMPLETE else None
        row["std"] = t.user_attrs.get("leuko.score_std")
        row["folds"] = len(t.user_attrs.get(A_FOLDS, []))
        if t.intermediate_values:
            step = max(t.intermediate_values)
            row["last_step"], row["last_value"] = step, t.intermediate_values[step]
        else:
            row["last_step"], row["last_value"] = None, None
        row["duration_s"] = round(t.duration.total_seconds(), 1) if t.duration else None
        rows.append(row)
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    # COMPLETE trials by score, then PRUNED ones by how far they got and their last score, then the rest.
    order = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}
    sign = -1.0 if cfg.direction == "maximize" else 1.0

    def rank(r) -> tuple:
        score = r[cfg.objective] if pd.notna(r[cfg.objective]) else r["last_value"]
        step = r["last_step"] if r["state"] == "PRUNED" and pd.notna(r["last_step"]) else 0
        return (order.get(r["state"], 5), -step, sign * score if pd.notna(score) else math.inf, r["trial"])

    return board.iloc[sorted(range(len(board)), key=lambda i: rank(board.iloc[i]))].reset_index(drop=True)


def print_leaderboard(board: pd.DataFrame, cfg: SweepConfig, limit: int = 20) -> None:
    if board.empty:
        print("no trials yet")
        return
    shown = board.head(limit).copy()
    score = []
    for _, r in shown.iterrows():
        if pd.notna(r[cfg.objective]):
            spread = f"±{r['std']:.3f}" if r["folds"] > 1 and pd.notna(r["std"]) else ""  # no spread from one fold
            score.append(f"{r[cfg.objective]:.3f}{spread}")
        elif pd.notna(r["last_value"]):
            score.append(f"({r['last_value']:.3f} @ step {int(r['last_step'])})")
        else:
            score.append("-")
    table = pd.DataFrame({"trial": shown["trial"], "model": shown["model"]})
    for key in cfg.space:
        if key != "model.net":
            table[_short(key)] = [_round(v) if pd.notna(v) else "-" for v in shown[key]]
    table[f"cv {cfg.objective}"] = score
    table["state"] = shown["state"]
    table["time"] = [f"{v:.0f} s" if pd.notna(v) else "-" for v in shown["duration_s"]]
    print(
        f"\nleaderboard of study {cfg.study} ({len(board)} trials; cross-validated score as mean±std over folds;"
        " pruned trials show their last reported score)"
    )
    print(table.to_string(index=False))
    if len(board) > limit:
        print(f"... {len(board) - limit} more in leaderboard.csv")


# ---------------------------------------------------------------------------------------------- the trial process
def trial_pruning(trial: optuna.Trial | None, monitor: str):
    """optuna-integration's Lightning pruning callback, adapted to a cross-validated, possibly DDP trial.

    - Steps count epochs across the trial's folds (fold position * max_epochs + epoch), so a trial's
      later folds keep reporting, and step s means the same amount of training in every trial.
    - Only during fit: the validate() cross_validate runs after fit must not report again.
    - DDP: global rank 0 holds the trial (the other ranks get None), reports and decides; the
      decision is broadcast and every rank raises TrialPruned at the same point, so no rank waits
      in a collective for one that left. Any storage works (the callback's own DDP mode needs a
      database and a check_pruned() call after fit).
    """
    from lightning.pytorch.trainer.states import TrainerFn
    from optuna_integration import PyTorchLightningPruningCallback

    class _TrialPruning(PyTorchLightningPruningCallback):
        def __init__(self) -> None:
            super().__init__(trial, monitor)
            self.fold_position = -1

        def on_fit_start(self, trainer, pl_module) -> None:
            self.fold_position += 1
            self.is_ddp_backend = trainer.world_size > 1

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
                return
            epochs = max(trainer.max_epochs or 1, 1)
            step = self.fold_position * epochs + pl_module.current_epoch
            prune = False
            if trainer.is_global_zero and self._trial is not None:
                score = trainer.callback_metrics.get(self.monitor)
                if score is None:
                    warnings.warn(f"{self.monitor} was not logged, so the trial cannot be pruned; check the objective")
                else:
                    self._trial.report(float(score), step=step)
                    prune = self._trial.should_prune()
            if self.is_ddp_backend:
                prune = trainer.strategy.broadcast(prune)
            if prune:
                raise optuna.TrialPruned(
                    f"pruned at step {step} (fold {self.fold_position + 1}, epoch {pl_module.current_epoch})"
                )

    return _TrialPruning()


def execute_trial(spec: dict, trial: optuna.Trial | None) -> dict:
    """Cross-validate one trial; {"state": COMPLETE|PRUNED|FAIL, ...}. trial is None on DDP ranks other than 0."""
    from leuko.training.cv import cross_validate

    repro = [
        "leuko",
        "cv",
        *[a for c in spec["config"] for a in ("--config", c)],
        "--folds",
        ",".join(map(str, spec["folds"])),
        *spec["overrides"],
    ]
    print(f"trial {spec['number']} of study {spec['study']}; the same fit by hand:\n  {shlex.join(repro)}", flush=True)
    try:
        cv = cross_validate(
            config=spec["config"],
            overrides=spec["overrides"],
            folds=spec["folds"],
            name=spec["name"],
            out=spec["out"],
            trial_callbacks=[trial_pruning(trial, f"val/{spec['objective']}")],
            parent_run_id=spec["sweep_run_id"],
            extra_tags=spec["tags"],
        )
        stats = cv["summary"][spec["objective"]]
        return {"state": "COMPLETE", "value": stats["mean"], "std": stats["std"], "summary": cv["summary"]}
    except optuna.TrialPruned as exc:
        return {"state": "PRUNED", "message": str(exc)}
    except Exception as exc:
        traceback.print_exc()
        return {"state": "FAIL", "error": f"{type(exc).__name__}: {exc}"}


def run_trial(spec_path: str | Path) -> int:
    """Entry of a trial process (and of its other DDP ranks): execute_trial, then rank 0 writes result.json."""
    spec_path = Path(spec_path)
    spec = json.loads(spec_path.read_text())
    trial_dir = spec_path.parent
    _die_with_parent()
    from leuko.training.cv import is_rank_zero

    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    # What each rank trained with: the same trial.json, so the same parameters.
    (trial_dir / "ranks").mkdir(exist_ok=True)
    (trial_dir / "ranks" / f"rank{rank}.json").write_text(
        json.dumps({"rank": rank, "pid": os.getpid(), "overrides": spec["overrides"], "config": spec["config"]}) + "\n"
    )
    trial = None
    if is_rank_zero():
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(
            study_name=spec["study"], storage=open_storage(spec["storage"]), pruner=make_pruner(spec["pruner"])
        )
        trial = optuna.trial.Trial(study, spec["trial_id"])
    result = execute_trial(spec, trial)
    if is_rank_zero():
        tmp = trial_dir / (RESULT + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, trial_dir / RESULT)
    return 1 if result["state"] == "FAIL" else 0


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the worker, or DDP rank 0) dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    worker = os.environ.get("LEUKO_SWEEP_WORKER_PID")
    if "LOCAL_RANK" not in os.environ and worker and os.getppid() != int(worker):
        os._exit(1)  # the worker died before the request took effect
