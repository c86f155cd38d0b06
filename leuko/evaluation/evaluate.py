"""`leuko evaluate`: from a CV's out-of-fold predictions (or a test set's predictions) to the clinical view.

Files in the output folder (stable names: a DVC stage lists them as outputs):

    metrics.json            flat numbers: cv/<metric>_mean|_std (from cv_summary.json), oof/<metric> (pooled
                            out-of-fold), recall/<class>, ba/<class>/<bias|sd|loa_low|loa_high>
    differentials.csv       per sample (patient_id, sample_type): n_cells, ref_<class> %, pred_<class> %
    bland_altman.csv        per class: bias, sd, loa_low, loa_high, n (predicted - reference, % points)
    bland_altman_by_sample_type.csv   the same per sample type, when there is more than one
    bland_altman.png        one panel per class
    confusion.csv           one row per cell: actual, predicted (for `dvc plots`' confusion template)
    confusion_matrix.png
    per_class.csv           class, support, recall, precision, f1 (pooled out-of-fold)
    learning_curves.csv     epoch, fold_<f> ..., mean: validation balanced accuracy per epoch, from the fold
                            runs in MLflow; only the header when MLflow has no history for them
    umap_class.png, umap_patient.png, umap.csv   (unless umap=False) see leuko.evaluation.embedding

Everything is logged to the CV's MLflow parent run (artifacts under eval/, metrics as in metrics.json but cv/*,
which the CV logged itself); the UMAP also goes to the run of the fold whose model it shows.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

OUTPUTS = (
    "metrics.json",
    "differentials.csv",
    "bland_altman.csv",
    "bland_altman.png",
    "confusion.csv",
    "confusion_matrix.png",
    "per_class.csv",
    "learning_curves.csv",
)
CURVE_METRIC = "val/balanced_accuracy"


@dataclass
class Predictions:
    """Cells with label, pred_label, prob_<class>, patient_id and sample_type; where they came from."""

    cells: pd.DataFrame
    classes: list[str]
    source: Path
    cv_dir: Path | None = None
    summary: dict = field(default_factory=dict)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- inputs
def load_cv(cv_dir: str | Path) -> Predictions:
    """oof_predictions.csv and cv_summary.json of a `leuko cv` output folder."""
    cv_dir = Path(cv_dir)
    path = cv_dir / "oof_predictions.csv"
    if not path.is_file():
        hint = "" if cv_dir.is_dir() else " (the folder does not exist)"
        raise FileNotFoundError(
            f"{path} not found{hint}; give --cv the output folder of `leuko cv` (runs/<name>), after the CV finished"
        )
    cells = pd.read_csv(
        path, dtype={"cell_id": str, "patient_id": str, "sample_type": str, "label": str, "pred_label": str}
    )
    summary_path = cv_dir / "cv_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return Predictions(_check_cells(cells, path), _classes(cells, path), path, cv_dir, summary)


def load_predictions(path: str | Path, prepared_dir: str | Path | None = None) -> Predictions:
    """A predictions CSV (`leuko predict`/`leuko test`: cell_id, pred_label, prob_<class>) with the cells'
    label, patient_id and sample_type taken from the prepared index when the CSV lacks them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions file not found")
    cells = pd.read_csv(
        path, dtype={"cell_id": str, "patient_id": str, "sample_type": str, "label": str, "pred_label": str}
    )
    needed = [c for c in ("label", "patient_id", "sample_type") if c not in cells.columns]
    if needed:
        if prepared_dir is None:
            raise ValueError(
                f"{path} lacks column(s) {', '.join(needed)}; pass --prepared (the prepared folder the cells "
                "came from) so they can be looked up by cell_id"
            )
        from leuko.data.prepare import load_prepared

        _, index, _ = load_prepared(prepared_dir)
        by_id = index.set_index(index["cell_id"].astype(str))
        absent = sorted(set(cells["cell_id"]) - set(by_id.index))
        if absent:
            raise ValueError(
                f"{len(absent)} predicted cell(s) are not in {prepared_dir} (e.g. {', '.join(absent[:3])})"
            )
        for column in needed:
            cells[column] = by_id.loc[cells["cell_id"], column].astype(str).to_numpy()
    return Predictions(_check_cells(cells, path), _classes(cells, path), path)


def _classes(cells: pd.DataFrame, path: Path) -> list[str]:
    classes = [c.removeprefix("prob_") for c in cells.columns if c.startswith("prob_")]
    if not classes:
        raise ValueError(f"{path}: no prob_<class> columns, so the class list is unknown")
    return classes


def _check_cells(cells: pd.DataFrame, path: Path) -> pd.DataFrame:
    missing = [c for c in ("cell_id", "patient_id", "sample_type", "label", "pred_label") if c not in cells.columns]
    if missing:
        raise ValueError(f"{path}: lacks column(s) {', '.join(missing)} (has {', '.join(cells.columns)})")
    if len(cells) == 0:
        raise ValueError(f"{path}: no predictions (only a header)")
    return cells


# ---------------------------------------------------------------------------------------------- numbers
def confusion(cells: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """(K, K) counts, rows the true class, columns the predicted one."""
    lookup = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    for true, pred in zip(cells["label"], cells["pred_label"]):
        matrix[lookup[true], lookup[pred]] += 1
    return matrix


def per_class_table(matrix: np.ndarray, classes: list[str]) -> pd.DataFrame:
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    tp = np.diag(matrix).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        f1 = np.where(recall + precision > 0, 2 * recall * precision / (recall + precision), 0.0)
    return pd.DataFrame({"class": classes, "support": support, "recall": recall, "precision": precision, "f1": f1})


def pooled_metrics(cells: pd.DataFrame, classes: list[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1 and macro one-vs-rest AUROC over all cells at once."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    y, pred = cells["label"].astype(str), cells["pred_label"].astype(str)
    out = {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
    }
    probs = cells[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    # Macro one-vs-rest AUROC over the classes that have cells (and cells of other classes), as torchmetrics.
    aucs = [
        roc_auc_score((y == c).to_numpy(), probs[:, i]) for i, c in enumerate(classes) if 0 < (y == c).sum() < len(y)
    ]
    if aucs:
        out["auroc"] = float(np.mean(aucs))
    return out


def metrics_json(pred: Predictions, pooled: dict, per_class: pd.DataFrame, ba: pd.DataFrame) -> dict[str, float]:
    """The flat dictionary written to metrics.json (finite numbers only, so every DVC and JSON tool reads it)."""
    out: dict[str, float] = {}
    for key, stats in sorted(pred.summary.items()):
        out[f"cv/{key}_mean"] = stats["mean"]
        out[f"cv/{key}_std"] = stats["std"]
    out.update({f"oof/{k}": v for k, v in pooled.items()})
    out.update({f"recall/{c}": r for c, r in zip(per_class["class"], per_class["recall"])})
    for row in ba.to_dict("records"):
        for stat in ("bias", "sd", "loa_low", "loa_high"):
            out[f"ba/{_metric_part(row['class'])}/{stat}"] = row[stat]
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def _metric_part(name) -> str:
    from leuko.evaluation.agreement import _metric_part as part

    return part(name)


# ---------------------------------------------------------------------------------------------- MLflow
def tracking_client(cv_dir: Path | None, uri: str | None = None):
    """An MlflowClient for the store a CV logged to, or None when there is none to read.

    The URI: MLFLOW_TRACKING_URI, then `uri`, then the CV's config (tracking.uri), then the default SQLite
    file; a SQLite file that does not exist means nothing was logged (and is not created here)."""
    import mlflow

    from leuko.tracking.runs import resolve_tracking_uri

    if uri is None and cv_dir is not None:
        from leuko.evaluation.baselines import cv_config

        uri = (cv_config(cv_dir).get("tracking") or {}).get("uri")
    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    return mlflow.MlflowClient(uri)


def cv_run_id(cv_dir: Path, client) -> str | None:
    """The CV's parent run: from runs/<name>/mlflow_run_id, else the newest cv run named after the folder."""
    marker = cv_dir / "mlflow_run_id"
    if marker.is_file() and marker.read_text().strip():
        return marker.read_text().strip()
    if client is None:
        return None
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(
        experiments,
        filter_string=f"tags.`mlflow.runName` = '{cv_dir.name}' and tags.`leuko.command` = 'cv'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def learning_curves(client, parent_run_id: str, metric: str = CURVE_METRIC) -> pd.DataFrame:
    """epoch, fold_<f> ..., mean: `metric` per epoch of each fold run under the parent.

    Lightning logs with step = global step and logs `epoch` alongside. The CV's validate of the best
    checkpoint logs once more after training (as epoch max_epochs); that value is not part of the curve."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    curves = {}
    for run in sorted(runs, key=lambda r: _fold_sort_key(r.data.tags.get("leuko.fold", r.info.run_name or ""))):
        fold = run.data.tags.get("leuko.fold")
        if fold is None:
            continue
        history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: (m.step, m.timestamp))
        epoch_at = {}
        for m in sorted(client.get_metric_history(run.info.run_id, "epoch"), key=lambda m: (m.step, m.timestamp)):
            epoch_at.setdefault(m.step, int(m.value))
        # Training epochs also log train/<metric> at their end; the validate of the best checkpoint does not.
        trained = {m.step for m in client.get_metric_history(run.info.run_id, metric.replace("val/", "train/", 1))}
        by_step: dict[int, float] = {}
        for m in history:
            if not trained or m.step in trained:
                by_step.setdefault(m.step, m.value)
        values = {epoch_at.get(step, i): value for i, (step, value) in enumerate(sorted(by_step.items()))}
        if values:
            curves[f"fold_{fold}"] = pd.Series(values)
    if not curves:
        return pd.DataFrame(columns=["epoch", "mean"])
    table = pd.DataFrame(curves).sort_index()
    table["mean"] = table.mean(axis=1)
    return table.rename_axis("epoch").reset_index()


def _fold_sort_key(fold: str):
    return (0, int(fold), "") if str(fold).isdigit() else (1, 0, str(fold))


def log_evaluation(client, run_id: str, out_dir: Path, *, diffs, ba, metrics: dict[str, float]) -> None:
    """Artifacts under eval/ and the metrics of metrics.json except cv/* (the CV logged those itself)."""
    from mlflow.entities import Metric

    from leuko.evaluation.agreement import log_agreement

    plot = out_dir / "bland_altman.png"
    log_agreement(client, run_id, diffs=diffs, table=ba, plot=plot if plot.is_file() else None, artifact_path="eval")
    for name in sorted(p.name for p in out_dir.iterdir() if p.is_file()):
        if name not in ("differentials.csv", "bland_altman.csv", "bland_altman.png"):
            client.log_artifact(run_id, str(out_dir / name), "eval")
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, 0) for k, v in metrics.items() if not k.startswith(("cv/", "ba/"))]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i : i + 500])


# ---------------------------------------------------------------------------------------------- all of it
def evaluate(
    pred: Predictions,
    out_dir: str | Path,
    *,
    counts: str | Path | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    umap: bool = True,
    umap_fold: str | None = None,
    umap_cells: str = "val",
    log_to_mlflow: bool = True,
) -> dict:
    """Write every file of the module docstring into out_dir and log them; return a summary dict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leuko.evaluation.agreement import (
        bland_altman_plot,
        bland_altman_table,
        differentials,
        reference_from_counts,
    )
    from leuko.tracking.runs import confusion_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells, classes = pred.cells, pred.classes
    reference = reference_from_counts(counts, classes) if counts else None
    diffs = differentials(cells, classes, reference=reference)
    diffs.to_csv(out_dir / "differentials.csv", index=False)
    ba = bland_altman_table(diffs, classes)
    ba.to_csv(out_dir / "bland_altman.csv", index=False)
    if diffs["sample_type"].nunique() > 1:
        bland_altman_table(diffs, classes, by="sample_type").to_csv(
            out_dir / "bland_altman_by_sample_type.csv", index=False
        )
    reference_name = f"manual counts ({Path(counts).name})" if counts else "manifest labels"
    bland_altman_plot(
        diffs,
        classes,
        out_dir / "bland_altman.png",
        title=f"Bland-Altman: predicted vs {reference_name}, {len(diffs)} samples",
    )

    matrix = confusion(cells, classes)
    pd.DataFrame({"actual": cells["label"], "predicted": cells["pred_label"]}).to_csv(
        out_dir / "confusion.csv", index=False
    )
    what = "out-of-fold" if pred.cv_dir is not None else pred.source.name
    fig = confusion_figure(matrix, classes, f"{what} confusion matrix ({len(cells)} cells)")
    fig.savefig(out_dir / "confusion_matrix.png", dpi=120)
    plt.close(fig)
    per_class = per_class_table(matrix, classes)
    per_class.to_csv(out_dir / "per_class.csv", index=False)
    pooled = pooled_metrics(cells, classes)

    client = tracking_client(pred.cv_dir, tracking_uri) if log_to_mlflow else None
    if client is not None and run_id is None and pred.cv_dir is not None:
        run_id = cv_run_id(pred.cv_dir, client)
    if run_id is not None and client is not None:
        try:
            client.get_run(run_id)
        except Exception as exc:
            warnings.warn(f"MLflow run {run_id} not found in {client.tracking_uri} ({exc}); not logging", stacklevel=2)
            run_id = None
    curves = pd.DataFrame(columns=["epoch", "mean"])
    if client is not None and run_id is not None:
        curves = learning_curves(client, run_id)
    curves.to_csv(out_dir / "learning_curves.csv", index=False)
    if curves.empty:
        log("learning curves: no fold runs with a validation history in MLflow; learning_curves.csv has only a header")

    embedding = None
    if umap and pred.cv_dir is not None:
        from leuko.evaluation.embedding import embed_cv_fold

        try:
            embedding = embed_cv_fold(pred.cv_dir, out_dir, fold=umap_fold, cells=umap_cells)
        except ValueError as exc:
            if umap_fold is not None:
                raise
            log(f"UMAP skipped: {exc}")

    metrics = metrics_json(pred, pooled, per_class, ba)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    if client is not None and run_id is not None:
        log_evaluation(client, run_id, out_dir, diffs=diffs, ba=ba, metrics=metrics)
        if embedding is not None and embedding["run_id"]:
            for path in embedding["paths"]:
                client.log_artifact(embedding["run_id"], str(path), "embedding")
        log(f"logged to MLflow run {run_id} ({client.tracking_uri})")
    elif log_to_mlflow and pred.cv_dir is not None and (pred.cv_dir / "mlflow_run_id").is_file():
        from leuko.tracking.runs import resolve_tracking_uri

        log(
            f"{pred.cv_dir / 'mlflow_run_id'} names an MLflow run, but it is not in {resolve_tracking_uri(tracking_uri)}: "
            "wrote files only. Run from the folder the CV ran in, or set MLFLOW_TRACKING_URI / --tracking-uri"
        )
    elif log_to_mlflow:
        log("no MLflow run found for these predictions: wrote files only")
    return {
        "out_dir": out_dir,
        "metrics": metrics,
        "ba": ba,
        "diffs": diffs,
        "per_class": per_class,
        "run_id": run_id,
        "embedding": embedding,
        "curves": curves,
    }
