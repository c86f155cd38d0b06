"""Cells for review: an uncertainty per cell, and the threshold above which a cell goes to a person.

Uncertainty: the predictive entropy H(p) = -sum_k p_k ln p_k (nats: 0 for a one-hot p, ln K for a uniform
one) of the temperature-scaled probabilities (leuko.evaluation.calibration). Which probabilities: those of
one net per cell. `leuko evaluate` scores a CV's out-of-fold cells, each by its own fold's net; `leuko
predict` scores cells with the registered net, divided by the model's temperature (plus its class biases).
Neither averages a fold ensemble or test-time augmentations, so a threshold chosen on the one holds for the
other.

Threshold: on held-out predictions (out-of-fold, or validation), cells are retained when their uncertainty
is <= the threshold and flagged for review otherwise. The threshold is the one with the largest coverage
(share of cells retained) whose retained cells reach the target accuracy (default 0.99). Chosen on a few
hundred cells, the accuracy it promises is optimistic by about its sampling error; with none of the cells
reaching the target even alone, the threshold is None and every cell is flagged.

`leuko evaluate` writes coverage.csv (one row per distinct uncertainty: threshold, n_retained, coverage,
accuracy), coverage.png, and review.json ({"uncertainty", "target_accuracy", "threshold", "coverage",
"accuracy", "n_cells", "fitted_on"}, the dict the registered model also stores).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.evaluation.agreement import percentages
from leuko.evaluation.calibration import CALIBRATION_JSON, RELIABILITY_PLOT, label_indices, write_calibration

TARGET_ACCURACY = 0.99
UNCERTAINTY = "uncertainty"
REVIEW = "review"
UNCERTAINTY_KIND = "entropy"  # what UNCERTAINTY holds: predictive entropy in nats
COVERAGE_CSV = "coverage.csv"
COVERAGE_PLOT = "coverage.png"
REVIEW_JSON = "review.json"
RETAINED_PREFIX = "retained_"  # per-sample differential of the cells not flagged (no "pred_" in it: a filter on
# "pred_" still finds only the differential of every cell)
# What calibrate_and_review writes, in `leuko evaluate`'s output folder
CALIBRATION_OUTPUTS = (CALIBRATION_JSON, RELIABILITY_PLOT, COVERAGE_CSV, COVERAGE_PLOT, REVIEW_JSON)


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """(N, K) probabilities -> (N,) entropy in nats (0 * log 0 counts as 0)."""
    probs = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, probs * np.log(probs), 0.0)
    return np.maximum(-terms.sum(axis=1), 0.0)  # rounding can leave -1e-17 for a one-hot row


def coverage_curve(uncertainty: np.ndarray, correct: np.ndarray) -> pd.DataFrame:
    """One row per distinct uncertainty t (ascending): threshold t, n_retained, coverage, accuracy of the
    cells with uncertainty <= t. Cells with equal uncertainty are retained or flagged together."""
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    order = np.argsort(uncertainty, kind="stable")
    u, hits = uncertainty[order], np.asarray(correct, dtype=float)[order]
    retained = np.arange(1, len(u) + 1)
    accuracy = np.cumsum(hits) / retained
    last = np.r_[u[1:] != u[:-1], True] if len(u) else np.zeros(0, dtype=bool)  # the end of each group of ties
    return pd.DataFrame(
        {
            "threshold": u[last],
            "n_retained": retained[last],
            "coverage": retained[last] / max(len(u), 1),
            "accuracy": accuracy[last],
        }
    )


def choose_threshold(
    uncertainty: np.ndarray, correct: np.ndarray, target: float = TARGET_ACCURACY, fitted_on: str = ""
) -> dict:
    """The review settings (see the module docstring) for cells with these uncertainties and correctness."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target accuracy {target}: give a share of cells in (0, 1], e.g. 0.99")
    curve = coverage_curve(uncertainty, correct)
    reached = curve[curve["accuracy"] >= target]
    best = reached.iloc[-1] if len(reached) else None  # the curve is ordered by coverage
    return {
        "uncertainty": UNCERTAINTY_KIND,
        "target_accuracy": float(target),
        "threshold": None if best is None else float(best["threshold"]),
        "coverage": 0.0 if best is None else float(best["coverage"]),
        "accuracy": None if best is None else float(best["accuracy"]),
        "n_cells": len(np.asarray(correct)),
        "fitted_on": fitted_on,
    }


def flags(uncertainty: np.ndarray, threshold: float | None) -> np.ndarray:
    """(N,) True for a cell to review: uncertainty above the threshold (every cell when it is None)."""
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    if threshold is None:
        return np.ones(len(uncertainty), dtype=bool)
    return uncertainty > threshold


def review_differential(cells: pd.DataFrame, classes: Sequence[str], groups: list[str], pred: str) -> pd.DataFrame:
    """Per group that occurs: n_review (cells flagged) and retained_<class>, the percentages among the
    cells not flagged (NaN where every cell of the group is flagged). cells: groups, pred and REVIEW columns."""
    keys = cells[groups].astype(str).reset_index(drop=True)
    flagged = cells[REVIEW].astype(bool).reset_index(drop=True)
    table = flagged.groupby([keys[g] for g in groups], sort=True).sum().astype(int).rename("n_review").to_frame()
    kept = ~flagged
    if kept.any():
        labels = cells[pred].reset_index(drop=True)[kept].reset_index(drop=True)
        retained = percentages(labels, keys[kept].reset_index(drop=True), list(classes), RETAINED_PREFIX)
        table = table.join(retained)
    for c in classes:
        if f"{RETAINED_PREFIX}{c}" not in table.columns:
            table[f"{RETAINED_PREFIX}{c}"] = np.nan
    table.columns.name = None
    return table


def write_review(
    correct: np.ndarray, probs: np.ndarray, out_dir: Path, *, target: float = TARGET_ACCURACY, fitted_on: str = ""
) -> dict:
    """coverage.csv, coverage.png and review.json in out_dir for cells with these (calibrated) probabilities;
    returns review.json's dict."""
    uncertainty = predictive_entropy(probs)
    curve = coverage_curve(uncertainty, correct)
    curve.to_csv(Path(out_dir) / COVERAGE_CSV, index=False)
    settings = choose_threshold(uncertainty, correct, target, fitted_on)
    (Path(out_dir) / REVIEW_JSON).write_text(json.dumps(settings, indent=2) + "\n")
    coverage_figure(curve, settings, Path(out_dir) / COVERAGE_PLOT)
    return settings


def calibrate_and_review(pred, out_dir: Path) -> dict[str, float]:
    """CALIBRATION_OUTPUTS in out_dir for pred (leuko.evaluation.evaluate.Predictions: cells with labels,
    classes, source); returns their headline numbers, flat: calibration/temperature, calibration/ece_*,
    review/threshold, review/coverage, review/accuracy (the last two when some cells reach the target)."""
    cells, classes, fitted_on = pred.cells, pred.classes, str(pred.source)
    calibration, scaled = write_calibration(cells, classes, out_dir, fitted_on)
    correct = scaled.argmax(axis=1) == label_indices(cells, classes)
    review = write_review(correct, scaled, out_dir, fitted_on=f"{fitted_on}, scaled by T")
    numbers = {f"calibration/{k}": v for k, v in calibration.items() if k.startswith(("ece_", "temperature"))}
    numbers.update({f"review/{k}": review[k] for k in ("threshold", "coverage", "accuracy")})
    return {k: float(v) for k, v in numbers.items() if v is not None}


def coverage_figure(curve: pd.DataFrame, settings: dict, path: Path) -> None:
    """Accuracy of the retained cells against coverage, the target as a line and the chosen point marked."""
    # heavy imports here: matplotlib takes half a second to load
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.plot(curve["coverage"], curve["accuracy"], color="C0", lw=1.5, drawstyle="steps-post", label="retained cells")
    target = settings["target_accuracy"]
    ax.axhline(target, color="C3", lw=1, ls="--", label=f"target {target:.0%}")
    if settings["threshold"] is not None:
        ax.plot(
            [settings["coverage"]],
            [settings["accuracy"]],
            "o",
            color="C3",
            label=f"chosen: {settings['coverage']:.0%} retained (entropy <= {settings['threshold']:.3g})",
        )
    else:
        ax.plot([], [], " ", label=f"no share of cells reaches {target:.0%}: every cell is flagged")
    low = min(float(curve["accuracy"].min()) if len(curve) else 0.0, target) - 0.02
    ax.set_xlim(0, 1.01)
    ax.set_ylim(max(low, 0.0), 1.005)
    ax.set_xlabel("coverage (share of cells retained, the most certain first)")
    ax.set_ylabel("accuracy of the retained cells")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(color="0.92")
    fig.savefig(path, dpi=110)
