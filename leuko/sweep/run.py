"""`leuko sweep`: set up the study and the sweep run, start the workers, run worker 0's share, finish.

    conf/sweep/*.yaml   search space (keys are config keys), objective, folds per trial, sampler, pruner
    worker process(es)  ask the study for a trial, turn its parameters into config overrides and run
                        leuko.training.cv.cross_validate on the first N folds, as an MLflow child run of the
                        sweep run; the validation score after every epoch goes to the study (pruning)
    `--workers N`       worker 0 is the command itself; it starts N-1 more (`leuko sweep --workers 1`)

Worker 0 checks the base config once with one point of the space, so that a bad key fails before any
trial starts, and decides where trials run: inside the workers, or in their own processes when a trial
uses several devices (DDP) or each worker gets its own share of the GPUs. At the end it writes
sweeps/<study>/leaderboard.csv, prints the leaderboard and the `leuko cv` command that repeats the best.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd

from leuko.sweep.leaderboard import leaderboard, print_heldout, print_leaderboard
from leuko.sweep.recovery import recover
from leuko.sweep.space import (
    NET_KWARGS,
    SweepConfig,
    SweepConfigError,
    first_point,
    load_sweep_config,
    overrides_for,
    parse_budget,
)
from leuko.sweep.study import (
    A_CONFIG,
    A_FOLDS,
    A_OVERRIDES,
    S_BASE_NET,
    S_OBJECTIVE,
    S_SWEEP_RUN_ID,
    best_trial,
    is_journal,
    open_study,
)
from leuko.sweep.tracking import SweepTracking
from leuko.sweep.trial import cv_command
from leuko.sweep.worker import TrialFailed, Worker, gpu_count, gpu_share, output_to, stop_process


def run_sweep(
    space: str | Path,
    *,
    trials: int | None = None,
    budget: str | float | None = None,
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
    """Run new trials of the study (split over `workers` processes) until `trials` ran or the wall-time
    `budget` (seconds, or "10m"; default the sweep file's) is spent; return the leaderboard.

    Worker 0 is this process: it sets up the study and the MLflow sweep run, starts workers 1..N-1
    (`leuko sweep ... --workers 1`), runs its share, waits for them and prints the leaderboard.
    A trial still running when the budget is spent stops after its current epoch (PRUNED).
    """
    cfg = load_sweep_config(space)
    url = cfg.storage_url(storage)
    configs = cfg.config + list(configs or [])
    overrides = list(overrides or [])
    budget_s = parse_budget(budget) if budget is not None else cfg.budget
    trials = cfg.trials if trials is None else trials  # None: as many as the budget allows
    if (trials is not None and trials < 0) or workers < 1:
        raise SweepConfigError(f"--trials {trials} --workers {workers}: need trials >= 0 and workers >= 1")
    if trials is None and budget_s is None:
        raise SweepConfigError("give --trials N or a wall-time --budget (e.g. 10m), or set one in the sweep file")
    out = Path(out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    n_workers = int(os.environ.get("LEUKO_SWEEP_WORKERS", workers))
    study = open_study(cfg, url, worker=worker_index, workers=n_workers, heartbeat=not is_journal(url))

    if worker_index > 0:
        worker = _extra_worker(cfg, url, configs, overrides, out, worker_index, n_workers, sweep_run_id)
        timeout = None if worker.deadline is None else max(worker.deadline - time.time(), 0.0)
        study.optimize(worker, n_trials=trials, timeout=timeout, catch=(TrialFailed,), gc_after_trial=True)
        return None
    if leaderboard_only or fail_stale:
        return _report(study, cfg, url, configs, overrides, fail_stale=fail_stale, grace=grace)
    deadline = None if budget_s is None else time.time() + budget_s
    return _sweep(
        study, cfg, url, configs, overrides, out, trials, workers, deadline, storage_given=storage is not None
    )


DEADLINE = "LEUKO_SWEEP_DEADLINE"  # the sweep's end (Unix time), for the workers worker 0 starts


def _raise_interrupt(signum, frame):  # SIGTERM (e.g. SLURM preemption) ends the trial as FAIL, cleanly
    raise KeyboardInterrupt(f"signal {signum}")


def _extra_worker(
    cfg: SweepConfig,
    url: str,
    configs: list[str],
    overrides: list[str],
    out: Path,
    index: int,
    workers: int,
    run_id: str | None,
) -> Worker:
    """Worker `index` > 0, started by worker 0, which passes the tracking URI and its device plan in the environment."""
    from leuko.tracking.runs import resolve_tracking_uri  # heavy import here: leuko.tracking.runs loads Lightning

    tracking = SweepTracking(resolve_tracking_uri(), run_id=run_id) if run_id else None
    isolate = os.environ.get("LEUKO_SWEEP_ISOLATE") == "1"
    gpus = os.environ.get("LEUKO_SWEEP_GPUS")
    deadline = float(os.environ[DEADLINE]) if os.environ.get(DEADLINE) else None
    return Worker(cfg, url, configs, overrides, out, run_id, tracking, index, workers, isolate, gpus, deadline)


def _report(
    study: optuna.Study,
    cfg: SweepConfig,
    url: str,
    configs: list[str],
    overrides: list[str],
    *,
    fail_stale: bool,
    grace: float | None,
) -> pd.DataFrame:
    """`--leaderboard` and `--fail-stale`: no trial runs."""
    if fail_stale:
        failed = recover(study, url, cfg.heartbeat["grace"] if grace is None else grace)
        print(f"{len(failed)} stale trial(s) marked FAIL" + (f": {failed}" if failed else ""))
        run_id = study.user_attrs.get(S_SWEEP_RUN_ID)
        tracking = _probe(configs, overrides).tracking if failed and run_id else None
        for number in failed if tracking else []:
            tracking.mark_trial(run_id, number, "FAIL")
    board = leaderboard(study, cfg)
    print_leaderboard(board, cfg)
    return board


def _sweep(
    study: optuna.Study,
    cfg: SweepConfig,
    url: str,
    configs: list[str],
    overrides: list[str],
    out: Path,
    trials: int | None,
    workers: int,
    deadline: float | None,
    *,
    storage_given: bool,
) -> pd.DataFrame:
    """Worker 0: check the config, open the sweep run, start workers 1..N-1, run its share, finish."""
    probe = _probe(configs, overrides, validate=cfg)
    tracking = probe.tracking
    isolate, gpus = _devices(cfg, probe.multi_device, workers)
    sweep_run_id = tracking.sweep_run(study, cfg, url, probe.lineage) if tracking else None
    share = gpu_share(0, workers, gpus) if gpus > 1 else None
    worker = Worker(cfg, url, configs, overrides, out, sweep_run_id, tracking, 0, workers, isolate, share, deadline)
    if cfg.start_from_config and not study.get_trials(deepcopy=False):
        study.enqueue_trial(probe.point, skip_if_exists=True)  # the base recipe first: the sweep can only improve it
    for number in recover(study, url, cfg.heartbeat["grace"]):
        worker.mark(number, "FAIL")
    study.set_user_attr(S_OBJECTIVE, cfg.objective)
    study.set_user_attr(S_BASE_NET, probe.net)
    if tracking:
        tracking.client.log_artifact(sweep_run_id, str(cfg.path))
    existing = len(study.get_trials(deepcopy=False, states=_FINISHED))
    budget = "" if deadline is None else f" within {(deadline - time.time()) / 60:.1f} min"
    new = "new trials" if trials is None else f"{trials} new"
    print(
        f"study {cfg.study} ({url}): {existing} earlier trial(s), {new}{budget} on {workers} worker(s); "
        f"objective {cfg.objective} over {cfg.folds} fold(s) per trial; trials run "
        + ("in their own processes" if isolate else "inside the workers"),
        flush=True,
    )
    shares = (
        [None] * workers if trials is None else [trials // workers + (i < trials % workers) for i in range(workers)]
    )
    procs = _start_workers(worker, shares, gpus)
    status = "FAILED"
    timeout = None if deadline is None else max(deadline - time.time(), 0.0)
    try:
        study.optimize(worker, n_trials=shares[0], timeout=timeout, catch=(TrialFailed,), gc_after_trial=True)
        for i, proc in procs:
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
        for _, proc in procs:
            stop_process(proc)
        for number in recover(study, url, cfg.heartbeat["grace"]):
            worker.mark(number, "FAIL")
        board = _finish(study, cfg, url, out, tracking, sweep_run_id, status, storage_given=storage_given)
    if cfg.baselines:
        print_heldout(cfg, probe.data, out / cfg.study)
    return board


def _devices(cfg: SweepConfig, multi_device: bool, workers: int) -> tuple[bool, int]:
    """(whether trials run in their own processes, the GPUs to share out among the workers: 0 or 1 for none)."""
    if multi_device and cfg.isolate == "never":
        raise SweepConfigError(f"{cfg.path}: `isolate: never` cannot run multi-device (DDP) trials; use auto")
    isolate = cfg.isolate == "always" or (cfg.isolate == "auto" and multi_device)
    gpus = gpu_count() if workers > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ else 0
    if gpus > 1:
        isolate = True  # each worker's trials get their own GPUs through CUDA_VISIBLE_DEVICES
    if workers > 1 and not isolate and "OMP_NUM_THREADS" not in os.environ:
        import torch  # heavy import here: only in-process trials on several workers need it

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))  # the workers share the cores
    return isolate, gpus


_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def _start_workers(worker: Worker, shares: list[int | None], gpus: int) -> list[tuple[int, subprocess.Popen]]:
    """Start workers 1..N-1 with worker 0's settings, each on its share of the trials: [(index, process)]."""
    cfg, workers = worker.cfg, worker.workers
    env = dict(os.environ, LEUKO_SWEEP_WORKERS=str(workers), LEUKO_SWEEP_ISOLATE=str(int(worker.isolate)))
    if workers > 1 and "OMP_NUM_THREADS" not in env:  # workers share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    if worker.tracking:
        env["MLFLOW_TRACKING_URI"] = worker.tracking.uri
    if worker.deadline is not None:
        env[DEADLINE] = repr(worker.deadline)
    procs = []
    for i in range(1, workers):
        if shares[i] == 0:
            continue
        cmd = [sys.executable, "-m", "leuko.cli", "sweep", "--space", str(cfg.path)]
        # no --trials: as many as fit before the deadline the worker reads from the environment
        cmd += ["--trials", str(shares[i])] if shares[i] is not None else []
        cmd += ["--workers", "1", "--storage", worker.url, "--out", str(worker.out), "--worker-index", str(i)]
        cmd += [a for c in worker.configs[len(cfg.config) :] for a in ("--config", c)]
        cmd += ["--sweep-run-id", worker.sweep_run_id] if worker.sweep_run_id else []
        worker_env = dict(env, LEUKO_SWEEP_GPUS=gpu_share(i, workers, gpus)) if gpus > 1 else env
        procs.append((i, subprocess.Popen(cmd + worker.overrides, stdin=subprocess.DEVNULL, env=worker_env)))
    return procs


def _finish(
    study: optuna.Study,
    cfg: SweepConfig,
    url: str,
    out: Path,
    tracking: SweepTracking | None,
    sweep_run_id: str | None,
    status: str,
    storage_given: bool,
) -> pd.DataFrame:
    board = leaderboard(study, cfg)
    path = out / cfg.study / "leaderboard.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    board.to_csv(path, index=False)
    print_leaderboard(board, cfg)
    print(f"\nleaderboard: {path}")
    if tracking:
        tracking.log_sweep(sweep_run_id, study, cfg, path, status)
        print(
            f"MLflow: run sweep-{cfg.study} ({sweep_run_id}) in {tracking.uri}, its trials nested below it;"
            f" open with `make mlflow-ui` or `mlflow ui --backend-store-uri {tracking.uri}`"
        )
    best = best_trial(study)
    if best is not None:
        repro = cv_command(best.user_attrs[A_CONFIG], best.user_attrs[A_FOLDS], best.user_attrs[A_OVERRIDES])
        print(f"best: trial {best.number}; the same cross-validation by hand:\n  {shlex.join(repro)}")
        print(f"next: leuko register --space {cfg.path}" + (f" --storage {url}" if storage_given else ""))
    return board


@dataclass
class _Probe:
    """What the base config says: where MLflow runs go, the data's lineage, and the fit's devices."""

    tracking: SweepTracking | None
    lineage: dict
    multi_device: bool
    net: str
    point: dict  # the base config's own point of the space (start_from_config)
    data: dict  # prepared_dir, k, test_fraction, seed: where the held-out test patients are


def _probe(configs: list[str], overrides: list[str], validate: SweepConfig | None = None) -> _Probe:
    """Instantiate the base config once; with validate, with one point of the space, so that a key
    that is not a config key fails before any trial starts."""
    # heavy imports here: the config system loads Lightning and the nets
    from leuko.evaluation.heldout import split_settings
    from leuko.tracking.lineage import lineage_tags
    from leuko.tracking.runs import DEFAULT_EXPERIMENT, resolve_tracking_uri
    from leuko.training.cli import LeukoCLI

    extra = overrides_for(validate.fixed, first_point(validate.space)) if validate is not None else []
    args = [a for c in configs for a in ("--config", c)] + extra + list(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        chatter = Path(tmp) / "probe.log"
        try:
            with output_to(chatter), warnings.catch_warnings():
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
    data = split_settings(probe.config["data"])
    point = {}
    if validate is not None and validate.start_from_config:  # parsed only: the base config without the probe's point
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = probe.parser.parse_args([a for c in configs for a in ("--config", c)] + list(overrides))
        point = config_point(base, validate.space)
    if not tracking.enabled:
        return _Probe(None, {}, multi, net, point, data)
    tags = lineage_tags(probe.config["data"]["prepared_dir"]) if validate else {}
    client = SweepTracking(resolve_tracking_uri(tracking.uri), experiment=tracking.experiment or DEFAULT_EXPERIMENT)
    return _Probe(client, tags, multi, net, point, data)


def config_point(config, space: dict) -> dict:
    """The values a config gives the space's keys, where they lie in the space (others are left to the sampler)."""
    point: dict = {}
    for key, param in space.items():
        if not param.active(point):
            continue
        if key.startswith(NET_KWARGS + "."):
            value = (config.get(NET_KWARGS) or {}).get(key[len(NET_KWARGS) + 1 :])
        else:
            value = config.get(key)
        if param.kind == "categorical":
            if value in param.choices:
                point[key] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and param.low <= value <= param.high:
            point[key] = int(value) if param.kind == "int" else float(value)
    return point


def _multi_device(trainer) -> bool:
    """Whether a fit with this trainer config may start more processes (DDP and friends)."""
    strategy = str(trainer.get("strategy") or "auto").lower()
    devices = trainer.get("devices", "auto")
    single = devices in (1, "1") or (isinstance(devices, list) and len(devices) == 1)
    return (
        not single or int(trainer.get("num_nodes") or 1) > 1 or any(s in strategy for s in ("ddp", "fsdp", "deepspeed"))
    )
