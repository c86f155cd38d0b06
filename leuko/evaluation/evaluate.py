"""`leuko evaluate`: from a CV's out-of-fold predictions (or a test set's predictions) to the clinical view.

Files in the output folder (stable names: a DVC stage lists them as outputs):

    metrics.json            flat numbers: cv/<metric>_mean|_std (from cv_summary.json), oof/<metric> (pooled
                            out-of-fold; oof_<sample type>/<metric> per sample type), recall/<class>,
                            ba/<class>/<bias|sd|loa_low|loa_high>
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
    calibration.json, reliability.png, coverage.csv/.png, review.json, decisions.json   see review, decision_rules
    metrics_ci.json, differentials_ci.csv   bootstrap 95% intervals (patients resampled for the pooled metrics,
                            cells within a sample for its differential): see leuko.evaluation.intervals

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

from leuko.data.prepared import load_prepared
from leuko.errors import LeukoError
from leuko.evaluation.agreement import (
    BLAND_ALTMAN,
    DIFFERENTIALS,
    bland_altman_plot,
    bland_altman_table,
    differentials,
    log_agreement,
    metric_part,
    reference_from_counts,
)
from leuko.evaluation.decision_rules import write_decisions
from leuko.evaluation.intervals import DIFFERENTIALS_CI, METRICS_CI, log_intervals, write_intervals
from leuko.evaluation.metrics import confusion, per_class_table, pooled_metrics, sample_type_metrics
from leuko.evaluation.review import CALIBRATION_OUTPUTS, calibrate_and_review
from leuko.training.predictions import PRED, PROB_PREFIX, classes_from_columns
from leuko.training.run_dir import EVAL, FOLD_PREFIX, OOF, RUN_ID, CheckpointError, read_run_id, read_summary

# DIFFERENTIALS and BLAND_ALTMAN (differentials.csv, bland_altman.csv) are named in leuko.evaluation.agreement,
# whose log_agreement logs those two tables under eval/ in MLflow.
METRICS_JSON = "metrics.json"
BLAND_ALTMAN_PLOT = "bland_altman.png"
BLAND_ALTMAN_BY_SAMPLE_TYPE = "bland_altman_by_sample_type.csv"  # only with more than one sample type
CONFUSION = "confusion.csv"
CONFUSION_PLOT = "confusion_matrix.png"
PER_CLASS = "per_class.csv"
LEARNING_CURVES = "learning_curves.csv"
OUTPUTS = (
    METRICS_JSON,
    DIFFERENTIALS,
    BLAND_ALTMAN,
    BLAND_ALTMAN_PLOT,
    CONFUSION,
    CONFUSION_PLOT,
    PER_CLASS,
    LEARNING_CURVES,
    METRICS_CI,
    DIFFERENTIALS_CI,
    *CALIBRATION_OUTPUTS,
)
CURVE_METRIC = "val/balanced_accuracy"
TEXT_COLUMNS = {"cell_id": str, "patient_id": str, "sample_type": str, "label": str, PRED: str}


class EvaluateError(LeukoError, ValueError):
    """A predictions file that cannot be evaluated; the message names the file and what it lacks."""


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
    path = cv_dir / OOF
    if not path.is_file():
        hint = "" if cv_dir.is_dir() else " (the folder does not exist)"
        raise FileNotFoundError(
            f"{path} not found{hint}; give --cv the output folder of `leuko cv` (runs/<name>), after the CV finished"
        )
    cells = pd.read_csv(path, dtype=TEXT_COLUMNS)
    return Predictions(_check_cells(cells, path), _classes(cells, path), path, cv_dir, read_summary(cv_dir))


def load_predictions(path: str | Path, prepared_dir: str | Path | None = None) -> Predictions:
    """A predictions CSV (`leuko predict`/`leuko test`: cell_id, pred_label, prob_<class>) with the cells'
    label, patient_id and sample_type taken from the prepared index when the CSV lacks them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions file not found")
    cells = pd.read_csv(path, dtype=TEXT_COLUMNS)
    needed = [c for c in ("label", "patient_id", "sample_type") if c not in cells.columns]
    if needed:
        if prepared_dir is None:
            raise EvaluateError(
                f"{path} lacks column(s) {', '.join(needed)}; pass --prepared (the prepared folder the cells "
                "came from) so they can be looked up by cell_id"
            )
        _, index, _ = load_prepared(prepared_dir)
        by_id = index.set_index(index["cell_id"].astype(str))
        absent = sorted(set(cells["cell_id"]) - set(by_id.index))
        if absent:
            raise EvaluateError(
                f"{len(absent)} predicted cell(s) are not in {prepared_dir} (e.g. {', '.join(absent[:3])})"
            )
        for column in needed:
            cells[column] = by_id.loc[cells["cell_id"], column].astype(str).to_numpy()
    return Predictions(_check_cells(cells, path), _classes(cells, path), path)


def _classes(cells: pd.DataFrame, path: Path) -> list[str]:
    classes = classes_from_columns(cells.columns)
    if not classes:
        raise EvaluateError(f"{path}: no {PROB_PREFIX}<class> columns, so the class list is unknown")
    return classes


def _check_cells(cells: pd.DataFrame, path: Path) -> pd.DataFrame:
    missing = [c for c in ("cell_id", "patient_id", "sample_type", "label", PRED) if c not in cells.columns]
    if missing:
        raise EvaluateError(f"{path}: lacks column(s) {', '.join(missing)} (has {', '.join(cells.columns)})")
    if len(cells) == 0:
        raise EvaluateError(f"{path}: no predictions (only a header)")
    return cells


# ---------------------------------------------------------------------------------------------- numbers
def metrics_json(pred: Predictions, pooled: dict, per_class: pd.DataFrame, ba: pd.DataFrame) -> dict[str, float]:
    """The flat dictionary written to metrics.json (finite numbers only, so every DVC and JSON tool reads it)."""
    out: dict[str, float] = {}
    for key, stats in sorted(pred.summary.items()):
        out[f"cv/{key}_mean"] = stats["mean"]
        out[f"cv/{key}_std"] = stats["std"]
    out.update({f"oof/{k}": v for k, v in pooled.items()} | sample_type_metrics(pred.cells, pred.classes))
    out.update({f"recall/{c}": r for c, r in zip(per_class["class"], per_class["recall"])})
    for row in ba.to_dict("records"):
        for stat in ("bias", "sd", "loa_low", "loa_high"):
            out[f"ba/{metric_part(row['class'])}/{stat}"] = row[stat]
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


# ---------------------------------------------------------------------------------------------- MLflow
def tracking_client(cv_dir: Path | None, uri: str | None = None):
    """An MlflowClient for the store a CV logged to, or None when there is none to read.

    The URI: MLFLOW_TRACKING_URI, then `uri`, then the CV's config (tracking.uri), then the default SQLite
    file; a SQLite file that does not exist means nothing was logged (and is not created here)."""
    # heavy imports here: mlflow and leuko.tracking.runs (Lightning) take seconds to load
    import mlflow

    from leuko.tracking.runs import resolve_tracking_uri

    if uri is None and cv_dir is not None:
        # heavy import here: baselines loads scikit-learn and scikit-image
        from leuko.evaluation.baselines import cv_config

        uri = (cv_config(cv_dir).get("tracking") or {}).get("uri")
    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    return mlflow.MlflowClient(uri)


def cv_run_id(cv_dir: Path, client) -> str | None:
    """The CV's parent run: from runs/<name>/mlflow_run_id, else the newest cv run named after the folder."""
    recorded = read_run_id(cv_dir)
    if recorded:
        return recorded
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
            curves[f"{FOLD_PREFIX}{fold}"] = pd.Series(values)
    if not curves:
        return pd.DataFrame(columns=["epoch", "mean"])
    table = pd.DataFrame(curves).sort_index()
    table["mean"] = table.mean(axis=1)
    return table.rename_axis("epoch").reset_index()


def _fold_sort_key(fold: str):
    return (0, int(fold), "") if str(fold).isdigit() else (1, 0, str(fold))


def log_evaluation(client, run_id: str, out_dir: Path, *, diffs, ba, metrics: dict[str, float]) -> None:
    """Artifacts under eval/ and the metrics of metrics.json except cv/* (the CV logged those itself)."""
    # heavy imports here: mlflow and leuko.tracking.runs (Lightning) take seconds to load
    from mlflow.entities import Metric

    from leuko.tracking.runs import log_batch

    plot = out_dir / BLAND_ALTMAN_PLOT
    log_agreement(client, run_id, diffs=diffs, table=ba, plot=plot if plot.is_file() else None, artifact_path=EVAL)
    for name in sorted(p.name for p in out_dir.iterdir() if p.is_file()):
        if name not in (DIFFERENTIALS, BLAND_ALTMAN, BLAND_ALTMAN_PLOT):
            client.log_artifact(run_id, str(out_dir / name), EVAL)
    now = int(time.time() * 1000)
    log_batch(
        client, run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if not k.startswith(("cv/", "ba/"))]
    )


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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    diffs, ba = write_agreement(pred, out_dir, counts)
    per_class, pooled = write_confusion(pred, out_dir)
    client, run_id = _mlflow_run(pred, tracking_uri, run_id, log_to_mlflow)
    curves = pd.DataFrame(columns=["epoch", "mean"])
    if client is not None and run_id is not None:
        curves = learning_curves(client, run_id)
    curves.to_csv(out_dir / LEARNING_CURVES, index=False)
    if curves.empty:
        log("learning curves: no fold runs with a validation history in MLflow; learning_curves.csv has only a header")
    embedding = _embedding(pred, out_dir, umap=umap, fold=umap_fold, cells=umap_cells)
    metrics = metrics_json(pred, pooled, per_class, ba) | calibrate_and_review(pred, out_dir)
    metrics |= write_decisions(pred, out_dir, counts)  # leuko.evaluation.decision_rules: the two label rules
    (out_dir / METRICS_JSON).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    intervals, _ = write_intervals(pred.cells, pred.classes, diffs, out_dir)

    if client is not None and run_id is not None:
        log_evaluation(client, run_id, out_dir, diffs=diffs, ba=ba, metrics=metrics)
        log_intervals(client, run_id, intervals)
        if embedding is not None and embedding["run_id"]:
            for path in embedding["paths"]:
                client.log_artifact(embedding["run_id"], str(path), "embedding")
        log(f"logged to MLflow run {run_id} ({client.tracking_uri})")
    elif log_to_mlflow and pred.cv_dir is not None and (pred.cv_dir / RUN_ID).is_file():
        from leuko.tracking.runs import resolve_tracking_uri  # heavy import (Lightning): only for this message

        log(
            f"{pred.cv_dir / RUN_ID} names an MLflow run, but it is not in {resolve_tracking_uri(tracking_uri)}: "
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
        "intervals": intervals,
    }


def write_agreement(pred: Predictions, out_dir: Path, counts: str | Path | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(differentials, Bland-Altman table): differentials.csv, bland_altman*.csv and bland_altman.png."""
    cells, classes = pred.cells, pred.classes
    reference = reference_from_counts(counts, classes) if counts else None
    diffs = differentials(cells, classes, reference=reference)
    diffs.to_csv(out_dir / DIFFERENTIALS, index=False)
    ba = bland_altman_table(diffs, classes)
    ba.to_csv(out_dir / BLAND_ALTMAN, index=False)
    if diffs["sample_type"].nunique() > 1:
        bland_altman_table(diffs, classes, by="sample_type").to_csv(out_dir / BLAND_ALTMAN_BY_SAMPLE_TYPE, index=False)
    reference_name = f"manual counts ({Path(counts).name})" if counts else "manifest labels"
    bland_altman_plot(
        diffs,
        classes,
        out_dir / BLAND_ALTMAN_PLOT,
        title=f"Bland-Altman: predicted vs {reference_name}, {len(diffs)} samples",
    )
    return diffs, ba


def write_confusion(pred: Predictions, out_dir: Path) -> tuple[pd.DataFrame, dict[str, float]]:
    """(per-class table, pooled metrics): confusion.csv, confusion_matrix.png and per_class.csv."""
    # heavy imports here: matplotlib takes half a second to load
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leuko.tracking.figures import confusion_figure

    cells, classes = pred.cells, pred.classes
    matrix = confusion(cells, classes)
    pd.DataFrame({"actual": cells["label"], "predicted": cells[PRED]}).to_csv(out_dir / CONFUSION, index=False)
    what = "out-of-fold" if pred.cv_dir is not None else pred.source.name
    fig = confusion_figure(matrix, classes, f"{what} confusion matrix ({len(cells)} cells)")
    fig.savefig(out_dir / CONFUSION_PLOT, dpi=120)
    plt.close(fig)
    per_class = per_class_table(matrix, classes)
    per_class.to_csv(out_dir / PER_CLASS, index=False)
    return per_class, pooled_metrics(cells, classes)


def _mlflow_run(pred: Predictions, tracking_uri: str | None, run_id: str | None, log_to_mlflow: bool):
    """(client, run id) to log to, each None when there is nothing to log to."""
    client = tracking_client(pred.cv_dir, tracking_uri) if log_to_mlflow else None
    if client is not None and run_id is None and pred.cv_dir is not None:
        run_id = cv_run_id(pred.cv_dir, client)
    if run_id is not None and client is not None:
        try:
            client.get_run(run_id)
        except Exception as exc:
            # stacklevel=3: the warning points at the caller of evaluate()
            warnings.warn(f"MLflow run {run_id} not found in {client.tracking_uri} ({exc}); not logging", stacklevel=3)
            run_id = None
    return client, run_id


def _embedding(pred: Predictions, out_dir: Path, *, umap: bool, fold: str | None, cells: str) -> dict | None:
    """The UMAP of a CV fold (leuko.evaluation.embedding), or None when not asked for or not possible."""
    if not umap or pred.cv_dir is None:
        return None
    # heavy imports here: the embedding loads torch, Lightning and umap
    from leuko.evaluation.embedding import embed_cv_fold

    try:
        return embed_cv_fold(pred.cv_dir, out_dir, fold=fold, cells=cells)
    except ValueError as exc:
        if fold is not None or isinstance(exc, CheckpointError):
            raise  # asked for, or a checkpoint refused for safety: an error, not a missing picture
        log(f"UMAP skipped: {exc}")
        return None
