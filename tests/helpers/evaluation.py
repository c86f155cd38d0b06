"""A `leuko cv` output folder (and its MLflow runs) made without training, for the evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.training.predictions import PRED, prob_columns
from leuko.training.run_dir import CONFIG, FOLD_METRICS, OOF, SUMMARY, fold_dir, write_run_id

CLASSES = ["neutrophil", "eosinophil", "lymphocyte", "monocyte"]


def fake_cv(
    root: Path,
    *,
    name: str = "fake",
    n_patients: int = 6,
    cells_per_patient: int = 20,
    folds: int = 3,
    error: float = 0.3,
    seed: int = 0,
    tracking_uri: str | None = None,
    experiment: str = "eval-tests",
    epochs: int = 3,
) -> Path:
    """runs/<name>/{oof_predictions.csv, cv_metrics.csv, cv_summary.json, fold_0/config.yaml} as `leuko cv`
    writes them; with tracking_uri also a parent run with one child per fold carrying learning curves logged
    the way Lightning logs them (and the extra validate of the best checkpoint), plus mlflow_run_id."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score

    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        mix = rng.dirichlet(np.ones(len(CLASSES)) * 2)
        for i, label in enumerate(rng.choice(CLASSES, size=cells_per_patient, p=mix)):
            pred = rng.choice(CLASSES) if rng.random() < error else label
            logits = rng.normal(0, 0.3, len(CLASSES))
            logits[CLASSES.index(pred)] += 2.0
            probs = np.exp(logits) / np.exp(logits).sum()
            rows.append(
                {
                    "cell_id": f"P{p}_C{i:03d}",
                    "patient_id": f"P{p}",
                    "sample_type": ["BALF", "blood"][p % 2],
                    "fold": p % folds,
                    "label": label,
                    PRED: CLASSES[int(np.argmax(probs))],
                    **{column: float(v) for column, v in zip(prob_columns(CLASSES), probs)},
                }
            )
    oof = pd.DataFrame(rows)
    out = Path(root) / name
    out.mkdir(parents=True)
    oof.to_csv(out / OOF, index=False)
    metric_rows = []
    for f, part in oof.groupby("fold"):
        recall = recall_score(part["label"], part[PRED], labels=CLASSES, average=None, zero_division=0)
        metric_rows.append(
            {
                "fold": f,
                "accuracy": accuracy_score(part["label"], part[PRED]),
                "balanced_accuracy": balanced_accuracy_score(part["label"], part[PRED]),
                "macro_f1": f1_score(part["label"], part[PRED], average="macro"),
                "auroc": 0.8 + 0.01 * f,
                "loss": 1.0 - 0.1 * f,
                **{f"recall_{c}": r for c, r in zip(CLASSES, recall)},
            }
        )
    metrics = pd.DataFrame(metric_rows)
    metrics.to_csv(out / FOLD_METRICS, index=False)
    summary = {
        c: {"mean": float(metrics[c].mean()), "std": float(metrics[c].std(ddof=1))}
        for c in metrics.columns
        if c != "fold"
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    fold_dir(out, 0).mkdir()
    (fold_dir(out, 0) / CONFIG).write_text(
        f"model:\n  net: fishnet3d_tiny\ndata:\n  prepared_dir: {Path(root) / 'no_prepared'}\n  k: {folds}\n"
        f"tracking:\n  uri: {tracking_uri or 'null'}\n"
    )
    if tracking_uri:
        _log_runs(out, tracking_uri, experiment, name, summary, folds, epochs)
    return out


def _log_runs(out: Path, uri: str, experiment: str, name: str, summary: dict, folds: int, epochs: int) -> None:
    import mlflow

    from leuko.tracking.runs import experiment_id

    client = mlflow.MlflowClient(uri)
    exp_id = experiment_id(client, experiment)
    parent = client.create_run(exp_id, run_name=name, tags={"leuko.command": "cv"}).info.run_id
    for key, stats in summary.items():
        client.log_metric(parent, f"cv/{key}_mean", stats["mean"])
        client.log_metric(parent, f"cv/{key}_std", stats["std"])
    for name in (FOLD_METRICS, OOF, SUMMARY):  # as leuko.training.cv logs them
        client.log_artifact(parent, str(out / name))
    client.log_text(parent, (fold_dir(out, 0) / CONFIG).read_text(), CONFIG)
    steps_per_epoch = 10
    for f in range(folds):
        child = client.create_run(
            exp_id, run_name=f"{name}/fold_{f}", tags={"mlflow.parentRunId": parent, "leuko.fold": str(f)}
        ).info.run_id
        for e in range(epochs):
            step = (e + 1) * steps_per_epoch - 1
            client.log_metric(child, "epoch", e, step=step - 3)  # a training step inside the epoch
            client.log_metric(child, "epoch", e, step=step)
            client.log_metric(child, "val/balanced_accuracy", curve_value(f, e), step=step)
            client.log_metric(child, "train/balanced_accuracy", 0.5, step=step)
        # the CV's validate of the best checkpoint: one step later, epoch == max_epochs, no train metric
        client.log_metric(child, "epoch", epochs, step=epochs * steps_per_epoch)
        client.log_metric(child, "val/balanced_accuracy", 0.99, step=epochs * steps_per_epoch)
        client.set_terminated(child)
    client.set_terminated(parent)
    write_run_id(out, parent)


def curve_value(fold: int, epoch: int) -> float:
    return 0.3 + 0.1 * epoch + 0.01 * fold
