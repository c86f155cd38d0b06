"""`leuko cv`: patient-grouped cross-validation with a parent MLflow run and one child run per fold."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.data.folds import fold_names

# Metrics reported per fold and summarised as mean and standard deviation across folds.
CV_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "loss")


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _cli(configs: list[str], overrides: list[str], extra: list[str], **kwargs):
    from leuko.training.cli import LeukoCLI

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
) -> dict:
    """Train every requested fold; return {"metrics": per-fold frame, "summary": {metric: (mean, std)}, ...}.

    The CV gets its own MLflow run (a child of `parent_run_id` when given, e.g. a sweep), and each fold
    a child run under it. `trial_callbacks` are added to every fold's Trainer (e.g. Optuna pruning).
    """
    import mlflow

    from leuko.tracking.runs import DEFAULT_EXPERIMENT, lineage_tags, resolve_tracking_uri

    overrides = list(overrides or [])
    name = name or time.strftime("cv-%Y%m%d-%H%M%S")
    out_dir = Path(out) / name
    probe = _cli(config, overrides, ["--trainer.default_root_dir", str(out_dir / "fold_0")])
    available = fold_names(probe.datamodule.splits)
    folds = [int(f) for f in available] if folds is None else folds
    unknown = [f for f in folds if str(f) not in available]
    if unknown:
        raise ValueError(f"--folds {unknown}: the splits have folds {available}")
    cfg = probe.config
    tracking = cfg["tracking"]
    client = mlflow.MlflowClient(resolve_tracking_uri(tracking.uri)) if tracking.enabled else None
    parent_id = None
    if client is not None and is_rank_zero():
        experiment = tracking.experiment or DEFAULT_EXPERIMENT
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        tags = {**lineage_tags(cfg["data"]["prepared_dir"]), "leuko.command": "cv", "mlflow.runName": name}
        tags.update(extra_tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        parent_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        # `leuko evaluate`, `baselines` and `report` find the CV's run through this file.
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "mlflow_run_id").write_text(parent_id + "\n")
        client.log_text(parent_id, probe.parser.dump(cfg, skip_none=False), "config.yaml")
        _log_params(client, parent_id, cfg)
    del probe

    rows, oof = [], []
    status = "FAILED"
    try:
        for f in folds:
            print(f"\n=== {name}: fold {f} ({folds.index(f) + 1}/{len(folds)}) ===", file=sys.stderr)
            extra = [
                "--data.fold",
                str(f),
                "--trainer.default_root_dir",
                str(out_dir / f"fold_{f}"),
                "--tracking.run_name",
                f"{name}/fold_{f}",
            ]
            cli = _cli(config, overrides, extra, parent_run_id=parent_id, extra_tags={"leuko.fold": str(f)})
            if trial_callbacks:
                cli.trainer.callbacks.extend(trial_callbacks)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            ckpt = (
                "best" if cli.trainer.checkpoint_callback and cli.trainer.checkpoint_callback.best_model_path else None
            )
            metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, verbose=False)[0]
            rows.append({"fold": f, **{k.removeprefix("val/"): float(v) for k, v in metrics.items()}})
            cli.datamodule.hparams.predict_split = "val"
            preds = cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
            oof.append(_fold_predictions(preds, cli.datamodule, cli.model.class_names, f))
            if hasattr(cli.trainer.logger, "run_id") and cli.trainer.is_global_zero:
                from leuko.tracking.runs import log_confusion

                matrix = cli.model.last_confusion.get("val")
                if matrix is not None:
                    log_confusion(
                        cli.trainer.logger, matrix.numpy(), cli.model.class_names, "confusion_matrix_val_best"
                    )
        status = "FINISHED"
    except BaseException as exc:
        from optuna import TrialPruned

        # A sweep's pruner stopping an unpromising trial is a decision, not a failure.
        if isinstance(exc, TrialPruned):
            status = "KILLED"
        raise
    finally:
        result = _summarise(rows, oof, out_dir, probe_classes=cli.model.class_names if rows else [])
        if client is not None and parent_id is not None:
            _log_parent(client, parent_id, result, out_dir, status)
    return result


def _log_params(client, run_id: str, cfg) -> None:
    from mlflow.entities import Param

    from leuko.tracking.runs import config_params

    params = [Param(k, v) for k, v in config_params(cfg.as_dict()).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])


def _fold_predictions(preds, datamodule, class_names: list[str], fold: int) -> pd.DataFrame:
    from leuko.training.predictions import predictions_frame

    frame = predictions_frame(preds or [], class_names)
    index = datamodule.index.set_index("cell_id")
    frame["label"] = index.loc[frame["cell_id"], "label"].to_numpy()
    frame["patient_id"] = index.loc[frame["cell_id"], "patient_id"].to_numpy()
    frame["sample_type"] = index.loc[frame["cell_id"], "sample_type"].to_numpy()
    frame["fold"] = fold
    front = ["cell_id", "patient_id", "sample_type", "fold", "label", "pred_label"]
    return frame[front + [c for c in frame.columns if c not in front]]


def _summarise(rows: list[dict], oof: list[pd.DataFrame], out_dir: Path, probe_classes: list[str]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = pd.DataFrame(rows)
    summary = {}
    for column in metrics.columns:
        if column == "fold":
            continue
        values = metrics[column].to_numpy(dtype=float)
        summary[column] = {
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        }
    predictions = pd.concat(oof, ignore_index=True) if oof else pd.DataFrame()
    if is_rank_zero() and rows:
        metrics.to_csv(out_dir / "cv_metrics.csv", index=False)
        predictions.to_csv(out_dir / "oof_predictions.csv", index=False)
        (out_dir / "cv_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        print(f"\n{'metric':<28} {'mean':>8} {'std':>8}   ({len(rows)} folds)", file=sys.stderr)
        for key in sorted(summary):
            print(f"{key:<28} {summary[key]['mean']:>8.4f} {summary[key]['std']:>8.4f}", file=sys.stderr)
        print(f"out-of-fold predictions: {out_dir / 'oof_predictions.csv'}", file=sys.stderr)
    return {
        "metrics": metrics,
        "summary": summary,
        "predictions": predictions,
        "out_dir": out_dir,
        "classes": probe_classes,
    }


def _log_parent(client, run_id: str, result: dict, out_dir: Path, status: str) -> None:
    for key, stats in result["summary"].items():
        client.log_metric(run_id, f"cv/{key}_mean", stats["mean"])
        client.log_metric(run_id, f"cv/{key}_std", stats["std"])
    for file in ("cv_metrics.csv", "oof_predictions.csv", "cv_summary.json"):
        if (out_dir / file).is_file():
            client.log_artifact(run_id, str(out_dir / file))
    predictions = result["predictions"]
    if len(predictions) and result["classes"]:
        import matplotlib.pyplot as plt

        from leuko.tracking.runs import confusion_figure

        classes = result["classes"]
        lookup = {c: i for i, c in enumerate(classes)}
        matrix = np.zeros((len(classes), len(classes)), dtype=int)
        for true, pred in zip(predictions["label"], predictions["pred_label"]):
            matrix[lookup[true], lookup[pred]] += 1
        fig = confusion_figure(matrix, classes, "out-of-fold confusion matrix")
        client.log_figure(run_id, fig, "confusion_matrix_oof.png")
        plt.close(fig)
    client.set_terminated(run_id, status)
