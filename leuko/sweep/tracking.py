"""MLflow bookkeeping of a sweep: one sweep run per study, the trials' runs nested below it.

A trial is an MLflow child run of the sweep run (cross_validate logs it, its fold runs below it);
when the study settles a trial, its runs get the tag leuko.trial_state and a matching status
(PRUNED -> KILLED, FAIL -> FAILED). At the end the sweep run gets the leaderboard, the trial counts
and the best trial. Resuming a study resumes its sweep run (the study remembers its id).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import optuna

from leuko.sweep.space import SweepConfig
from leuko.sweep.study import A_OVERRIDES, S_SWEEP_RUN_ID, best_trial


class SweepTracking:
    """The sweep run and the tags of its trial runs (all writes go through one MlflowClient)."""

    def __init__(self, uri: str, *, experiment: str | None = None, run_id: str | None = None):
        # heavy imports here: `leuko sweep --leaderboard` and `--fail-stale` need no MLflow
        import mlflow

        from leuko.tracking.runs import experiment_id

        self.uri = uri
        self.client = mlflow.MlflowClient(uri)
        if run_id is not None:
            self.experiment_id = self.client.get_run(run_id).info.experiment_id
        else:
            self.experiment_id = experiment_id(self.client, experiment)

    def sweep_run(self, study: optuna.Study, cfg: SweepConfig, url: str, tags: dict) -> str:
        from mlflow.entities import Param  # heavy import here, as in __init__

        from leuko.tracking.runs import log_batch

        run_id = study.user_attrs.get(S_SWEEP_RUN_ID)
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
        params = {"study": cfg.study, "objective": cfg.objective, "folds_per_trial": cfg.folds}
        log_batch(self.client, run.info.run_id, params=[Param(key, str(value)) for key, value in params.items()])
        study.set_user_attr(S_SWEEP_RUN_ID, run.info.run_id)
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

    def log_sweep(self, run_id: str, study: optuna.Study, cfg: SweepConfig, board_path: Path, status: str) -> None:
        """The end of a sweep: the leaderboard, trials per state, the best trial; the run's final status."""
        from mlflow.entities import Metric  # heavy import here, as in __init__

        from leuko.tracking.runs import log_batch

        self.client.log_artifact(run_id, str(board_path))
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        now = int(time.time() * 1000)
        metrics = {f"trials_{s.lower()}": states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
        best = best_trial(study)
        if best is not None:
            metrics[f"best_{cfg.objective}"] = float(best.value)
        log_batch(self.client, run_id, metrics=[Metric(key, value, now, 0) for key, value in metrics.items()])
        if best is not None:
            self.client.set_tag(run_id, "leuko.best_trial", str(best.number))
            self.client.set_tag(run_id, "leuko.best_overrides", shlex.join(best.user_attrs[A_OVERRIDES])[:5000])
        self.client.set_terminated(run_id, status)
