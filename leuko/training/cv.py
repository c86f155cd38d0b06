"""`leuko cv`: patient-grouped cross-validation with a parent MLflow run and one child run per fold.

Writes runs/<name>/ as leuko.training.run_dir describes it: a fold_<k>/ folder per fold, the per-fold
metrics, their mean and std, the out-of-fold predictions and the parent run's id.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

from leuko.data.folds import SplitError, fold_names
from leuko.evaluation.metrics import confusion, mean_std
from leuko.tracking.figures import log_confusion
from leuko.tracking.lineage import lineage_tags
from leuko.tracking.runs import DEFAULT_EXPERIMENT, config_params, experiment_id, log_batch, resolve_tracking_uri
from leuko.training import run_dir
from leuko.training.cli import LeukoCLI
from leuko.training.predictions import PRED, predictions_frame

CV_NAME = "LEUKO_CV_NAME"  # the folder rank zero claimed, for the DDP ranks Lightning starts


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _cli(configs: list[str], overrides: list[str], extra: list[str], **kwargs) -> LeukoCLI:
    args = [a for c in configs for a in ("--config", c)] + list(overrides) + extra
    return LeukoCLI(args=args, run=False, **kwargs)


def cross_validate(
    *,
    config: list[str],
    overrides: list[str] | None = None,
    folds: list[int] | None = None,
    name: str | None = None,
    out: str | Path = "runs",
    trial_callbacks: list | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    replace: bool = False,
) -> dict:
    """Train every requested fold; return {"metrics": per-fold frame, "summary": {metric: {"mean", "std"}}, ...}.

    The CV gets its own MLflow run (a child of `parent_run_id` when given, e.g. a sweep), and each fold
    a child run under it. `trial_callbacks` are added to every fold's Trainer (e.g. Optuna pruning).
    The output folder is out/<name>, or out/cv-<time> (-2, ...) without a name; one that already holds a
    CV is refused unless `replace` (see leuko.training.run_dir.claim_cv_folder).
    """
    overrides = list(overrides or [])
    provisional = run_dir.fold_dir(Path(out) / (name or "cv"), 0)  # the probe only reads the config and data
    probe = _cli(config, overrides, ["--trainer.default_root_dir", str(provisional)])
    folds = _check_folds(folds, fold_names(probe.datamodule.splits))
    out_dir = _claim_folder(out, name, folds[0], replace)
    name = out_dir.name
    client, parent_id = _start_parent_run(probe, name, out_dir, parent_run_id, extra_tags)
    seed = probe.config.get("seed_everything")
    del probe

    rows, oof, classes = [], [], []
    status = "FAILED"
    try:
        for f in folds:
            print(f"\n=== {name}: fold {f} ({folds.index(f) + 1}/{len(folds)}) ===", file=sys.stderr)
            root = run_dir.fold_dir(out_dir, f)
            fold_args = ["--data.fold", str(f), "--trainer.default_root_dir", str(root)]
            fold_args += ["--tracking.run_name", f"{name}/{root.name}"]  # e.g. cv-.../fold_0
            fold_args += fold_seed_args(seed, f)
            cli = _cli(config, overrides, fold_args, parent_run_id=parent_id, extra_tags={"leuko.fold": str(f)})
            row, predictions = _fit_fold(cli, f, trial_callbacks)
            rows.append(row)
            oof.append(predictions)
            classes = cli.model.class_names
        status = "FINISHED"
    except BaseException as exc:
        from optuna import TrialPruned  # loaded only when a fold fails: Optuna takes a second to import

        # A sweep's pruner stopping an unpromising trial is a decision, not a failure.
        if isinstance(exc, TrialPruned):
            status = "KILLED"
        raise
    finally:
        result = _summarise(rows, oof, out_dir, probe_classes=classes)
        if client is not None and parent_id is not None:
            _log_parent(client, parent_id, result, out_dir, status)
    return result


def fold_seed_args(seed: int | bool | None, fold: int) -> list[str]:
    """["--seed_everything", seed + fold] for a fixed integer seed: each fold model starts from its own weights.

    Fold 0 keeps the seed itself, so it trains exactly as `leuko fit --data.fold 0` (and a sweep's one-fold
    trial) does. The fold ensemble that `leuko register --ensemble` ships gains from members that do not share
    their initialisation: on VesselMNIST3D its test AUROC rose from 0.860 to 0.876 (mean of 3 seeds) and its
    balanced accuracy from 0.568 to 0.653 (README, "Results"). A random seed (true or null) is left to
    Lightning, which draws one per fold anyway.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        return []
    return ["--seed_everything", str(seed + fold)]


def _check_folds(folds: list[int] | None, available: list[str]) -> list[int]:
    """The requested folds (all when None), each one of the splits' folds."""
    folds = [int(f) for f in available] if folds is None else folds
    unknown = [f for f in folds if str(f) not in available]
    if unknown:
        raise SplitError(f"--folds {unknown}: the splits have folds {available}")
    return folds


def _claim_folder(out: str | Path, name: str | None, first_fold: int, replace: bool) -> Path:
    """Rank zero claims the CV's folder; the other ranks, which Lightning starts with rank zero's
    environment, use the folder it claimed."""
    if not is_rank_zero():
        return Path(out) / (name or os.environ.get(CV_NAME) or time.strftime("cv-%Y%m%d-%H%M%S"))
    folder = run_dir.claim_cv_folder(out, name, first_fold, replace=replace)
    os.environ[CV_NAME] = folder.name
    return folder


def _start_parent_run(probe, name: str, out_dir: Path, parent_run_id: str | None, extra_tags: dict | None):
    """(client, run id) of the CV's MLflow run, created on rank zero when tracking is on; (None, None) otherwise."""
    # heavy imports here: mlflow loads in seconds, and only a tracked CV needs it
    import mlflow
    from mlflow.entities import Param

    cfg = probe.config
    tracking = cfg["tracking"]
    if not tracking.enabled or not is_rank_zero():
        return None, None
    client = mlflow.MlflowClient(resolve_tracking_uri(tracking.uri))
    exp_id = experiment_id(client, tracking.experiment or DEFAULT_EXPERIMENT)
    tags = {**lineage_tags(cfg["data"]["prepared_dir"]), "leuko.command": "cv", "mlflow.runName": name}
    tags.update(extra_tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    parent_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    # `leuko evaluate`, `baselines` and `report` find the CV's run through this file.
    run_dir.write_run_id(out_dir, parent_id)
    client.log_text(parent_id, probe.parser.dump(cfg, skip_none=False), run_dir.CONFIG)
    log_batch(client, parent_id, params=[Param(k, v) for k, v in config_params(cfg.as_dict()).items()])
    return client, parent_id


def _fit_fold(cli, fold: int, trial_callbacks: list | None) -> tuple[dict, pd.DataFrame]:
    """Fit one fold, then validate and predict its validation cells with the best checkpoint: (metrics row, OOF)."""
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    if trial_callbacks:
        trainer.callbacks.extend(trial_callbacks)
    trainer.fit(model, datamodule=datamodule)
    # the best checkpoint by its path: "best" would make Lightning warn that there are two ModelCheckpoints
    ckpt = (trainer.checkpoint_callback.best_model_path or None) if trainer.checkpoint_callback else None
    metrics = trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0]
    row = {"fold": fold, **{k.removeprefix("val/"): float(v) for k, v in metrics.items()}}
    # epochs trained up to the best checkpoint (1-based): what a refit of this config needs
    row["best_epoch"] = int(run_dir.load_checkpoint(ckpt)["epoch"]) + 1 if ckpt else trainer.current_epoch
    datamodule.hparams.predict_split = "val"
    preds = trainer.predict(model, datamodule=datamodule)  # the validate above left the best weights in the model
    if hasattr(trainer.logger, "run_id") and trainer.is_global_zero:
        matrix = model.last_confusion.get("val")
        if matrix is not None:
            logger = trainer.logger
            log_confusion(
                logger.experiment, logger.run_id, matrix.numpy(), model.class_names, "confusion_matrix_val_best"
            )
    return row, _fold_predictions(preds, datamodule, model.class_names, fold)


def _fold_predictions(preds, datamodule, class_names: list[str], fold: int) -> pd.DataFrame:
    frame = predictions_frame(preds or [], class_names)
    index = datamodule.index.set_index("cell_id")
    frame["label"] = index.loc[frame["cell_id"], "label"].to_numpy()
    frame["patient_id"] = index.loc[frame["cell_id"], "patient_id"].to_numpy()
    frame["sample_type"] = index.loc[frame["cell_id"], "sample_type"].to_numpy()
    frame["fold"] = fold
    front = ["cell_id", "patient_id", "sample_type", "fold", "label", PRED]
    return frame[front + [c for c in frame.columns if c not in front]]


def _summarise(rows: list[dict], oof: list[pd.DataFrame], out_dir: Path, probe_classes: list[str]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = pd.DataFrame(rows)
    summary = {
        column: mean_std(metrics[column].to_numpy(dtype=float)) for column in metrics.columns if column != "fold"
    }
    predictions = pd.concat(oof, ignore_index=True) if oof else pd.DataFrame()
    if is_rank_zero() and rows:
        metrics.to_csv(out_dir / run_dir.FOLD_METRICS, index=False)
        predictions.to_csv(out_dir / run_dir.OOF, index=False)
        (out_dir / run_dir.SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        print(f"\n{'metric':<28} {'mean':>8} {'std':>8}   ({len(rows)} folds)", file=sys.stderr)
        for key in sorted(summary):
            print(f"{key:<28} {summary[key]['mean']:>8.4f} {summary[key]['std']:>8.4f}", file=sys.stderr)
        print(f"out-of-fold predictions: {out_dir / run_dir.OOF}", file=sys.stderr)
    return {
        "metrics": metrics,
        "summary": summary,
        "predictions": predictions,
        "out_dir": out_dir,
        "classes": probe_classes,
    }


def _log_parent(client, run_id: str, result: dict, out_dir: Path, status: str) -> None:
    from mlflow.entities import Metric  # heavy import here, as in _start_parent_run

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"cv/{key}_{stat}", stats[stat], now, 0)
        for key, stats in result["summary"].items()
        for stat in ("mean", "std")
    ]
    log_batch(client, run_id, metrics=metrics)
    for file in (run_dir.FOLD_METRICS, run_dir.OOF, run_dir.SUMMARY):
        if (out_dir / file).is_file():
            client.log_artifact(run_id, str(out_dir / file))
    predictions, classes = result["predictions"], result["classes"]
    if len(predictions) and classes:
        matrix = confusion(predictions, classes)
        log_confusion(client, run_id, matrix, classes, "confusion_matrix_oof", "out-of-fold confusion matrix")
    client.set_terminated(run_id, status)
