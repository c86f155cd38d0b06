"""The Optuna storage and study of a sweep, and the names of what leuko records on them.

Storage: a journal file (sweeps/<study>.journal) by default, safe for several processes on one machine
or on NFS; any database URL (sqlite:///..., postgresql://...) for a cluster, where Optuna's heartbeat
finds trials whose worker died, besides leuko's own check (leuko.sweep.recovery).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

from leuko.sweep.space import PRUNERS, SweepConfig, SweepConfigError

# Trial user attributes that make a trial reproducible (`leuko register` reads them back) ...
A_CONFIG, A_OVERRIDES, A_FOLDS = "leuko.config", "leuko.overrides", "leuko.folds"
A_CV, A_SCORE_STD, A_DIR = "leuko.cv", "leuko.score_std", "leuko.dir"  # cross_validate's summary; trial folder
# ... and that identify the worker process (dead-worker recovery, leuko.sweep.recovery).
A_HOST, A_MACHINE, A_PID, A_PID_START = "leuko.host", "leuko.machine", "leuko.pid", "leuko.pid_start"
A_HEARTBEAT = "leuko.heartbeat"
A_FAIL_REASON, A_TRIAL_PID = "leuko.fail_reason", "leuko.trial_pid"
# Study user attributes.
S_SWEEP_RUN_ID, S_OBJECTIVE, S_BASE_NET = "leuko.sweep_run_id", "leuko.objective", "leuko.base_net"


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


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None
