"""One trial: a cross-validated fit that reports to the study; the trial process `python -m leuko.sweep`.

A single-device trial runs inside its worker (execute_trial). A trial that uses several devices (DDP)
runs as its own process, `python -m leuko.sweep <trial dir>/trial.json` (run_trial): Lightning starts
the other ranks by re-running the command line of the process that calls fit, which inside the sweep
would start more sweeps, while here it starts the other ranks of exactly this trial. Every rank reads
the same trial.json, so all train with the same parameters; only global rank 0 talks to the study, and
it broadcasts its pruning decision so that all ranks stop together. A trial process dies with its
worker (PR_SET_PDEATHSIG).

The trial folder, sweeps/<study>/<study>-trialNNN/:
    trial.json      what to run (written by the worker): study, storage, trial id, config, overrides, folds
    result.json     {"state": COMPLETE|PRUNED|FAIL, ...}, written by rank 0 of a trial process
    trial.log       the trial's console output
    ranks/rankR.json  what each rank trained with
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import optuna

from leuko.sweep.study import make_pruner, open_storage

SPEC, RESULT, LOG = "trial.json", "result.json", "trial.log"


def cv_command(configs: list[str], folds: list[int], overrides: list[str]) -> list[str]:
    """The `leuko cv` command line that repeats a trial's cross-validation by hand."""
    return [
        "leuko",
        "cv",
        *[a for c in configs for a in ("--config", c)],
        "--folds",
        ",".join(map(str, folds)),
        *overrides,
    ]


def trial_pruning(trial: optuna.Trial | None, monitor: str, deadline: float | None = None):
    """optuna-integration's Lightning pruning callback, adapted to a cross-validated, possibly DDP trial.

    - Steps count epochs across the trial's folds (fold position * max_epochs + epoch), so a trial's
      later folds keep reporting, and step s means the same amount of training in every trial.
    - Only during fit: the validate() cross_validate runs after fit must not report again.
    - deadline (Unix time): the sweep's wall-time budget; the first epoch that ends after it prunes the
      trial ("budget spent"), so a sweep overruns its budget by at most one epoch.
    - DDP: global rank 0 holds the trial (the other ranks get None), reports and decides; the
      decision is broadcast and every rank raises TrialPruned at the same point, so no rank waits
      in a collective for one that left. Any storage works (the callback's own DDP mode needs a
      database and a check_pruned() call after fit).
    """
    # heavy imports here: Lightning and torch load only in the processes that train
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
            prune, why = False, "pruned"
            if trainer.is_global_zero and self._trial is not None:
                score = trainer.callback_metrics.get(self.monitor)
                if score is None:
                    warnings.warn(
                        f"{self.monitor} was not logged, so the trial cannot be pruned; check the objective",
                        stacklevel=2,
                    )
                else:
                    self._trial.report(float(score), step=step)
                    prune = self._trial.should_prune()
                if deadline is not None and time.time() > deadline and not prune:
                    prune, why = True, "the sweep's budget is spent"
            if self.is_ddp_backend:
                prune = trainer.strategy.broadcast(prune)
            if prune:
                raise optuna.TrialPruned(
                    f"{why} at step {step} (fold {self.fold_position + 1}, epoch {pl_module.current_epoch})"
                )

    return _TrialPruning()


def execute_trial(spec: dict, trial: optuna.Trial | None) -> dict:
    """Cross-validate one trial; {"state": COMPLETE|PRUNED|FAIL, ...}. trial is None on DDP ranks other than 0."""
    from leuko.training.cv import cross_validate  # heavy import here: torch and Lightning load only to train

    repro = cv_command(spec["config"], spec["folds"], spec["overrides"])
    print(f"trial {spec['number']} of study {spec['study']}; the same fit by hand:\n  {shlex.join(repro)}", flush=True)
    try:
        cv = cross_validate(
            config=spec["config"],
            overrides=spec["overrides"],
            folds=spec["folds"],
            name=spec["name"],
            out=spec["out"],
            trial_callbacks=[trial_pruning(trial, f"val/{spec['objective']}", spec.get("deadline"))],
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
    from leuko.training.cv import is_rank_zero  # heavy import here: torch and Lightning load only to train

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
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    worker = os.environ.get("LEUKO_SWEEP_WORKER_PID")
    if "LOCAL_RANK" not in os.environ and worker and os.getppid() != int(worker):
        os._exit(1)  # the worker died before the request took effect
