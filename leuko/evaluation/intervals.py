"""Bootstrap 95% confidence intervals (scipy.stats.bootstrap) for the numbers a lab acts on.

The unit of resampling is what varies independently:

    pooled metrics        balanced accuracy, accuracy, macro F1, macro one-vs-rest AUROC and per-class recall of
                          a prediction table: the PATIENT. Cells of one patient share a donor, a preparation and
                          an acquisition, so they are not independent; resampling cells would understate the
                          spread. A resample draws patients with replacement and pools their cells (a patient
                          drawn twice counts twice).
    differentials         each pred_<class> percentage of one sample: the CELL within that sample.
    Bland-Altman          bias and limits of agreement per class: the SAMPLE (one row of the differentials).

Percentile intervals from N_RESAMPLES resamples drawn with a fixed seed, so the same inputs give the same
bounds. A resample in which a number is undefined (a class with no cells among the drawn patients) is left
out of that number's interval. Fewer than two units: no interval (None in JSON, empty in CSV).

Files (`leuko evaluate` writes them beside metrics.json):

    metrics_ci.json       {metric: {"estimate", "ci_low", "ci_high"}}; metric names as in metrics.json
                          (oof/<metric>, recall/<class>, ba/<class>/<bias|loa_low|loa_high>)
    differentials_ci.csv  patient_id, sample_type, class, n_cells, estimate, ci_low, ci_high (percent)

MLflow gets <metric>_ci_low and <metric>_ci_high (ci_metrics) for every finite bound.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.evaluation.agreement import LOA_SDS, SAMPLE_KEYS, metric_part
from leuko.training.predictions import PRED, prob_columns

CONFIDENCE = 0.95
N_RESAMPLES = 1000  # percentile bounds settle to about 0.01 of a metric by then; a CV's CIs take about a second
SEED = 0
METHOD = "percentile"  # BCa needs a jackknife and fails on degenerate bootstrap distributions (a perfect fold)
METRICS_CI = "metrics_ci.json"
DIFFERENTIALS_CI = "differentials_ci.csv"
POOLED = ("balanced_accuracy", "accuracy", "macro_f1", "auroc")  # then recall/<class>, in class order
BA_STATS = ("bias", "loa_low", "loa_high")
CELLS_PER_BATCH = 4_000_000  # resample x (cells + units) values held at once by the vectorized statistics


# ---------------------------------------------------------------------------------------------- the engine
def bootstrap_interval(
    data: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
    batch: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(low, high), each (S,): the percentile interval of a vectorized statistic of the 1D data.

    statistic(x) takes x of shape (M, n) (M resamples of the n observations) and returns (S, M)."""
    # heavy import here: scipy.stats takes most of a second to load
    from scipy.stats import bootstrap

    data = np.asarray(data)
    with np.errstate(invalid="ignore", divide="ignore"):
        size = len(statistic(data[None, :]))
    if len(data) < 2:
        return np.full(size, np.nan), np.full(size, np.nan)

    def vectorized(x: np.ndarray, axis: int = -1) -> np.ndarray:
        x = np.moveaxis(x, axis, -1)
        lead = x.shape[:-1]
        return statistic(x.reshape(-1, x.shape[-1])).reshape(size, *lead)

    with np.errstate(invalid="ignore", divide="ignore"):
        result = bootstrap(
            (data,),
            vectorized,
            n_resamples=n_resamples,
            batch=batch,
            vectorized=True,
            confidence_level=CONFIDENCE,
            method=METHOD,
            rng=np.random.default_rng(seed),
        )
    low = np.array(result.confidence_interval.low, dtype=float).reshape(size)
    high = np.array(result.confidence_interval.high, dtype=float).reshape(size)
    distribution = np.asarray(result.bootstrap_distribution, dtype=float).reshape(size, -1)
    tail = 100 * (1 - CONFIDENCE) / 2
    for s in np.flatnonzero(np.isnan(low) | np.isnan(high)):
        defined = distribution[s][np.isfinite(distribution[s])]
        if len(defined):  # the resamples in which the number is defined
            low[s], high[s] = np.percentile(defined, [tail, 100 - tail])
    return low, high


def _entry(estimate: float, low: float, high: float) -> dict[str, float | None]:
    def number(v):
        return float(v) if v is not None and math.isfinite(v) else None

    return {"estimate": number(estimate), "ci_low": number(low), "ci_high": number(high)}


# ---------------------------------------------------------------------------------------------- pooled metrics
class PooledStatistic:
    """The pooled metrics of a prediction table as a function of how often each unit (patient) is drawn.

    Each unit's confusion matrix and, per class, its cells' counts at each distinct probability are
    summed once; a resample is then a multiplicity per unit, and every metric a matrix product.
    """

    def __init__(self, cells: pd.DataFrame, classes: Sequence[str], unit: str):
        self.classes = list(classes)
        k = len(self.classes)
        units, unit_of = np.unique(cells[unit].astype(str).to_numpy(), return_inverse=True)
        self.n_units = len(units)
        lookup = {c: i for i, c in enumerate(self.classes)}
        true = cells["label"].astype(str).map(lookup).to_numpy()
        pred = cells[PRED].astype(str).map(lookup).to_numpy()
        confusion = np.zeros((self.n_units, k * k))  # (U, K*K)
        np.add.at(confusion, (unit_of, true * k + pred), 1)
        self.confusion = confusion
        probs = cells[prob_columns(self.classes)].to_numpy(dtype=float)  # (N, K)
        # per class: (U, L) counts of positive and of negative cells at each of L distinct probabilities
        self.histograms = []
        for c in range(k):
            levels, level_of = np.unique(probs[:, c], return_inverse=True)
            pos = np.zeros((self.n_units, len(levels)))
            neg = np.zeros((self.n_units, len(levels)))
            np.add.at(pos, (unit_of[true == c], level_of[true == c]), 1)
            np.add.at(neg, (unit_of[true != c], level_of[true != c]), 1)
            self.histograms.append((pos, neg))

    @property
    def names(self) -> list[str]:
        return [*POOLED, *(f"recall/{c}" for c in self.classes)]

    def __call__(self, drawn: np.ndarray) -> np.ndarray:
        """drawn: (M, n) unit indices -> (len(names), M)."""
        m, k = len(drawn), len(self.classes)
        offsets = (np.arange(m) * self.n_units)[:, None]
        weight = np.bincount((drawn + offsets).ravel(), minlength=m * self.n_units).reshape(m, self.n_units)
        weight = weight.astype(float)  # (M, U): how often each unit was drawn
        confusion = (weight @ self.confusion).reshape(m, k, k)
        tp = np.diagonal(confusion, axis1=1, axis2=2)  # (M, K)
        support, predicted = confusion.sum(2), confusion.sum(1)
        recall = np.where(support > 0, tp / np.maximum(support, 1), np.nan)
        # macro F1 over the classes present in labels or predictions, as scikit-learn's (zero_division=0)
        present = (support + predicted) > 0
        f1 = np.where(present, 2 * tp / np.maximum(support + predicted, 1), np.nan)
        accuracy = tp.sum(1) / confusion.sum((1, 2))
        out = [np.nanmean(recall, 1), accuracy, np.nanmean(f1, 1), self._auroc(weight), *recall.T]
        return np.stack(out)

    def _auroc(self, weight: np.ndarray) -> np.ndarray:
        """(M,) macro one-vs-rest AUROC over the classes with positive and negative cells (Mann-Whitney, ties 1/2)."""
        aucs = []
        for pos_hist, neg_hist in self.histograms:
            pos, neg = weight @ pos_hist, weight @ neg_hist  # (M, L) weighted counts per probability level
            below = np.cumsum(neg, 1) - neg  # negatives strictly below each level
            pairs = pos.sum(1) * neg.sum(1)
            wins = (pos * (below + 0.5 * neg)).sum(1)
            aucs.append(np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan))
        return np.nanmean(np.stack(aucs), 0)


def metric_intervals(
    cells: pd.DataFrame,
    classes: Sequence[str],
    *,
    unit: str = "patient_id",
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> dict[str, dict]:
    """{balanced_accuracy | accuracy | macro_f1 | auroc | recall/<class>: {"estimate", "ci_low", "ci_high"}}.

    unit: the column whose values are resampled (patient_id; cell_id resamples cells one by one)."""
    statistic = PooledStatistic(cells, classes, unit)
    units = np.arange(statistic.n_units)
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate = statistic(units[None, :])[:, 0]
    batch = max(1, CELLS_PER_BATCH // (len(cells) + statistic.n_units))
    low, high = bootstrap_interval(units, statistic, n_resamples=n_resamples, seed=seed, batch=batch)
    return {name: _entry(*values) for name, *values in zip(statistic.names, estimate, low, high)}


# ---------------------------------------------------------------------------------------------- differentials
def differential_intervals(
    cells: pd.DataFrame,
    classes: Sequence[str],
    *,
    by: Sequence[str] = SAMPLE_KEYS,
    pred_col: str = PRED,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> pd.DataFrame:
    """One row per sample and class: <by>, class, n_cells, estimate, ci_low, ci_high (percent of the sample's
    cells predicted as that class; the sample's cells resampled)."""
    classes, by = list(classes), list(by)
    lookup = {c: i for i, c in enumerate(classes)}

    def percentages(drawn: np.ndarray) -> np.ndarray:  # (M, n) class indices -> (K, M)
        return 100.0 * (drawn[..., None] == np.arange(len(classes))).mean(1).T

    rows = []
    for key, part in cells.groupby(by, sort=True):
        codes = part[pred_col].astype(str).map(lookup).to_numpy()
        estimate = percentages(codes[None, :])[:, 0]
        low, high = bootstrap_interval(codes, percentages, n_resamples=n_resamples, seed=seed)
        key = key if isinstance(key, tuple) else (key,)
        for c, values in zip(classes, zip(estimate, low, high)):
            rows.append({**dict(zip(by, map(str, key))), "class": c, "n_cells": len(part), **_entry(*values)})
    return pd.DataFrame(rows, columns=[*by, "class", "n_cells", "estimate", "ci_low", "ci_high"])


def bland_altman_intervals(
    diffs: pd.DataFrame, classes: Sequence[str], *, n_resamples: int = N_RESAMPLES, seed: int = SEED
) -> dict[str, dict]:
    """{ba/<class>/<bias|loa_low|loa_high>: {...}} from a differentials table, the samples resampled.

    The limits are bias -+ 1.96 sd (ddof=1) of each resample, as leuko.evaluation.agreement.bland_altman."""

    def agreement(d: np.ndarray) -> np.ndarray:  # (M, n) differences -> (3, M)
        bias, sd = d.mean(1), d.std(1, ddof=1)
        return np.stack([bias, bias - LOA_SDS * sd, bias + LOA_SDS * sd])

    out = {}
    for c in classes:
        d = (diffs[f"pred_{c}"] - diffs[f"ref_{c}"]).to_numpy(dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            estimate = agreement(d[None, :])[:, 0] if len(d) >= 2 else np.full(3, np.nan)
        low, high = bootstrap_interval(d, agreement, n_resamples=n_resamples, seed=seed)
        for stat, *values in zip(BA_STATS, estimate, low, high):
            out[ba_key(c, stat)] = _entry(*values)
    return out


def ba_key(cls: str, stat: str) -> str:
    """The name of a Bland-Altman number in metrics.json and metrics_ci.json: ba/<class>/<stat>."""
    return f"ba/{metric_part(cls)}/{stat}"


# ---------------------------------------------------------------------------------------------- files, MLflow, text
def write_intervals(
    cells: pd.DataFrame, classes: Sequence[str], diffs: pd.DataFrame, out_dir: str | Path
) -> tuple[dict[str, dict], pd.DataFrame]:
    """metrics_ci.json and differentials_ci.csv in out_dir: (the metrics' intervals, the differentials' table).

    The pooled metrics are keyed oof/<metric> and recall/<class>, as in metrics.json; a metric with no
    estimate (no class with cells of other classes beside it, for AUROC) is left out."""
    out_dir = Path(out_dir)
    pooled = metric_intervals(cells, classes)
    metrics = {(k if k.startswith("recall/") else f"oof/{k}"): v for k, v in pooled.items()}
    metrics.update(bland_altman_intervals(diffs, classes))
    metrics = {k: v for k, v in metrics.items() if v["estimate"] is not None}
    (out_dir / METRICS_CI).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    table = differential_intervals(cells, classes)
    table.to_csv(out_dir / DIFFERENTIALS_CI, index=False)
    return metrics, table


def ci_metrics(intervals: dict[str, dict]) -> dict[str, float]:
    """MLflow metric name -> value: <metric>_ci_low and <metric>_ci_high for every finite bound."""
    out = {}
    for key, entry in intervals.items():
        name = "/".join(metric_part(part) for part in key.split("/"))
        for bound in ("ci_low", "ci_high"):
            if entry.get(bound) is not None:
                out[f"{name}_{bound}"] = float(entry[bound])
    return out


def log_intervals(client, run_id: str, intervals: dict[str, dict]) -> None:
    """Log ci_metrics(intervals) to an MLflow run (client: an mlflow.MlflowClient)."""
    # heavy imports here: mlflow and leuko.tracking.runs (Lightning) take seconds to load
    from mlflow.entities import Metric

    from leuko.tracking.runs import log_batch

    now = int(time.time() * 1000)
    log_batch(client, run_id, metrics=[Metric(k, v, now, 0) for k, v in ci_metrics(intervals).items()])


def format_ci(entry: dict | None, digits: int = 2, *, dash: str = "-") -> str:
    """ "0.91 (0.87-0.94)"; only the estimate when there is no interval, "–" without an estimate."""
    if not entry or entry.get("estimate") is None or not math.isfinite(entry["estimate"]):
        return "–"
    text = f"{entry['estimate']:.{digits}f}"
    low, high = entry.get("ci_low"), entry.get("ci_high")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return text
    return f"{text} ({low:.{digits}f}{dash}{high:.{digits}f})"


def differential_text(table: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """differentials_ci.csv as one row per sample: patient_id, sample_type, n_cells and per class
    "42.0 (30.0-55.0)" (percent), for a page or a card."""
    keys = [c for c in table.columns if c not in ("class", "n_cells", "estimate", "ci_low", "ci_high")]
    text = table.assign(text=[format_ci(r, digits) for r in table.to_dict("records")])
    wide = text.pivot(index=[*keys, "n_cells"], columns="class", values="text")
    return wide[list(dict.fromkeys(table["class"]))].reset_index().rename_axis(columns=None)
