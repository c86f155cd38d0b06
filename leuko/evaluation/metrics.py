"""The numbers every evaluation shares: confusion counts, the accuracy / balanced accuracy / macro-F1 trio, the
per-class and pooled metrics of a prediction table, and the mean and sample standard deviation across folds.

Cross-validation (leuko.training.cv), `leuko evaluate` and `leuko baselines` all count and score through here, so
a number in cv_summary.json, eval/metrics.json and the baselines table means the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from leuko.training.predictions import PRED, prob_columns

SCORES = ("balanced_accuracy", "accuracy", "macro_f1")  # the keys of scores(), in table order


def confusion(cells: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """(K, K) counts, rows the true class (`label`), columns the predicted one (`pred_label`).

    Every label and prediction must be one of `classes` (a KeyError names the first that is not).
    """
    lookup = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    for true, pred in zip(cells["label"], cells[PRED]):
        matrix[lookup[true], lookup[pred]] += 1
    return matrix


def scores(y_true: Sequence, y_pred: Sequence) -> dict[str, float]:
    """Balanced accuracy (mean per-class recall), accuracy and macro F1 (a class never predicted scores 0)."""
    # heavy import here: sklearn.metrics takes about a second to load, which callers of confusion/mean_std skip
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    return {
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def per_class_table(matrix: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """class, support, recall, precision, f1 from a confusion matrix; NaN recall (precision) for a class with no
    cells (no predictions)."""
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
    # heavy import here: sklearn.metrics takes about a second to load, which callers of confusion/mean_std skip
    from sklearn.metrics import roc_auc_score

    y, pred = cells["label"].astype(str), cells[PRED].astype(str)
    out = scores(y, pred)
    probs = cells[prob_columns(classes)].to_numpy(dtype=float)
    # Macro one-vs-rest AUROC over the classes that have cells (and cells of other classes), as torchmetrics.
    aucs = [
        roc_auc_score((y == c).to_numpy(), probs[:, i]) for i, c in enumerate(classes) if 0 < (y == c).sum() < len(y)
    ]
    if aucs:
        out["auroc"] = float(np.mean(aucs))
    return out


def sample_type_metrics(cells: pd.DataFrame, classes: list[str]) -> dict[str, float]:
    """pooled_metrics per sample type as {"oof_<type>/<metric>": value}, when the cells come from more than one
    (BALF and blood, as the HHGM study reports them); {} otherwise."""
    if "sample_type" not in cells or cells["sample_type"].nunique() < 2:
        return {}
    out = {}
    for sample_type, group in cells.groupby("sample_type"):
        name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(sample_type))
        out.update({f"oof_{name}/{k}": v for k, v in pooled_metrics(group, classes).items()})
    return out


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "std"} of per-fold values; std is the sample standard deviation (ddof=1), 0.0 for a single value."""
    values = np.asarray(values, dtype=float)
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
    }
