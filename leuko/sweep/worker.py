"""One worker of a sweep: ask the study for a trial, run it (in this process or its own), report the outcome.

`leuko sweep --workers N`: worker 0 is the command itself; it starts N-1 more (`leuko sweep --workers 1
--worker-index i`), and each runs Worker as its Optuna objective. A trial runs inside its worker, with
the worker's console sent to the trial's log, or, when isolated (DDP, or a GPU share per worker), as a
child process `python -m leuko.sweep <trial dir>/trial.json` that dies with its worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from leuko.sweep.recovery import Heartbeat, fail_stale_trials, worker_attrs
from leuko.sweep.space import SweepConfig, describe, overrides_for, sample
from leuko.sweep.study import A_CONFIG, A_CV, A_DIR, A_FOLDS, A_OVERRIDES, A_SCORE_STD, A_TRIAL_PID
from leuko.sweep.tracking import SweepTracking
from leuko.sweep.trial import LOG, RESULT, SPEC, execute_trial


class TrialFailed(RuntimeError):
    """The trial process ended without a result; the study records the trial as FAIL and goes on."""


@dataclass
class Worker:
    cfg: SweepConfig
    url: str
    configs: list[str]
    overrides: list[str]
    out: Path
    sweep_run_id: str | None
    tracking: SweepTracking | None
    index: int = 0
    workers: int = 1
    isolate: bool = False  # run each trial in its own process (needed for DDP)
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES for this worker's trial processes
    deadline: float | None = None  # Unix time when the sweep's budget is spent: trials stop after that epoch

    def say(self, text: str) -> None:
        prefix = f"[worker {self.index}] " if self.workers > 1 else ""
        print(prefix + text, flush=True)

    def __call__(self, trial: optuna.Trial) -> float:
        # Name this worker on the trial first: until then only the trial's start time tells it is alive.
        for key, value in worker_attrs().items():
            trial.set_user_attr(key, value)
        for number in fail_stale_trials(trial.study, grace=self.cfg.heartbeat["grace"]):
            self.mark(number, "FAIL")
        params = sample(trial, self.cfg.space)
        spec, trial_dir = self._prepare(trial, params)
        self.say(f"trial {trial.number} started: {describe(params)}")
        start = time.time()
        try:
            result = self._execute(trial, spec, trial_dir)
        except BaseException:  # interrupted: Optuna records FAIL, and so does MLflow
            self.mark(trial.number, "FAIL")
            raise
        self.mark(trial.number, result["state"])
        return self._outcome(trial, result, trial_dir, took=f"{time.time() - start:.0f} s")

    def _prepare(self, trial: optuna.Trial, params: dict) -> tuple[dict, Path]:
        """Record the trial on the study and write its trial.json; returns (spec, trial folder)."""
        overrides = overrides_for(self.cfg.fixed, params) + self.overrides
        folds = list(range(self.cfg.folds))
        name = f"{self.cfg.study}-trial{trial.number:03d}"
        trial_dir = (self.out / self.cfg.study / name).resolve()
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / RESULT).unlink(missing_ok=True)
        (trial_dir / LOG).unlink(missing_ok=True)
        attrs = {A_CONFIG: self.configs, A_OVERRIDES: overrides, A_FOLDS: folds, A_DIR: str(trial_dir)}
        for key, value in attrs.items():
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
            "deadline": self.deadline,
            "tags": {"leuko.study": self.cfg.study, "leuko.trial": str(trial.number), "leuko.command": "sweep-trial"},
        }
        (trial_dir / SPEC).write_text(json.dumps(spec, indent=2) + "\n")
        return spec, trial_dir

    def _execute(self, trial: optuna.Trial, spec: dict, trial_dir: Path) -> dict:
        with Heartbeat(trial, float(self.cfg.heartbeat["interval"])):
            if self.isolate:
                code = self._run(trial, trial_dir)
                result = _read_json(trial_dir / RESULT) or {
                    "state": "FAIL",
                    "error": f"the trial process ended with exit code {code} before writing {RESULT}",
                }
            else:
                with output_to(trial_dir / LOG):
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
            trial.set_user_attr(A_TRIAL_PID, proc.pid)
            try:
                return proc.wait()
            except BaseException:
                stop_process(proc)
                raise

    def _outcome(self, trial: optuna.Trial, result: dict, trial_dir: Path, took: str) -> float:
        """The trial's score for the study; PRUNED and FAIL raise, as Optuna expects."""
        state = result["state"]
        if state == "COMPLETE":
            trial.set_user_attr(A_SCORE_STD, result["std"])
            trial.set_user_attr(A_CV, result["summary"])
            self.say(
                f"trial {trial.number} COMPLETE: {self.cfg.objective} {result['value']:.4f} +- {result['std']:.4f}"
                f" ({took})"
            )
            return float(result["value"])
        if state == "PRUNED":
            self.say(f"trial {trial.number} PRUNED: {result.get('message', '')} ({took})")
            raise optuna.TrialPruned(result.get("message", ""))
        tail = "".join(_tail(trial_dir / LOG, 15))
        self.say(f"trial {trial.number} FAILED ({took}): {result.get('error')}; log: {trial_dir / LOG}\n{tail}")
        raise TrialFailed(f"{result.get('error')} (log: {trial_dir / LOG})")

    def mark(self, number: int, state: str) -> None:
        if self.tracking is not None and self.sweep_run_id:
            try:
                self.tracking.mark_trial(self.sweep_run_id, number, state)
            except Exception as exc:  # tracking is bookkeeping: never lose the trial over it
                self.say(f"warning: could not tag the MLflow run of trial {number}: {exc}")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gpu_count() -> int:
    import torch  # heavy import here: only a multi-worker sweep asks

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_share(worker: int, workers: int, gpus: int) -> str:
    """The GPUs of one worker: a round-robin share, or one shared GPU when there are more workers."""
    if workers <= gpus:
        return ",".join(str(g) for g in range(gpus) if g % workers == worker)
    return str(worker % gpus)


@contextlib.contextmanager
def output_to(path: Path):
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
