"""Temperature scaling, and how well probabilities match the frequencies they claim (calibration error).

Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks") divides a net's logits by
one number T > 0 before the softmax. Every argmax stays, so accuracy and the confusion matrix do not change;
T > 1 softens an over-confident net, T < 1 sharpens an under-confident one. T is fitted by minimising the
negative log-likelihood (NLL) of held-out cells: a CV's out-of-fold predictions, or validation predictions.

Prediction tables hold probabilities (prob_<class>), not logits. log p = z - logsumexp(z) differs from the
logits z by one constant per row, which the softmax ignores, so softmax(log p / T) == softmax(z / T): T fitted
on log-probabilities is the T to divide the logits by (leuko.deploy.pyfunc_model does).

Bias-corrected temperature scaling (BCTS; Alexandari et al. 2020, "Maximum likelihood with bias-corrected
calibration is hard-to-beat at label shift adaptation") adds one bias per class: softmax(log p / T + b). The
biases move the decision boundaries to the class frequencies of the cells it is fitted on. A net trained on
class-balanced batches predicts as if every class were equally common; BCTS on held-out cells of the data's own
mix turns its probabilities into ones for that mix, whose argmax is the one that maximises accuracy (and whose sum
over a sample is its expected count per class). It changes argmaxes, so it is a choice of decision rule, not
only of confidence: balanced accuracy is highest with the balanced net's own argmax, accuracy with BCTS.

Calibration error: torchmetrics' expected calibration error (ECE), N_BINS equal-width confidence bins, l1
norm: overall on the top-1 confidence (MulticlassCalibrationError), and per class one-vs-rest, prob_<class>
against label == class (BinaryCalibrationError).

`leuko evaluate` writes (calibration.json; the keys):
    temperature              T fitted on every cell of the table
    ece_before, ece_after    ECE of the probabilities as predicted, and divided by T
    ece_after_held_out       with more than one fold: each fold's cells scaled by a T fitted on the other folds
                             (ece_after scores T on the cells it was fitted to; this one does not)
    nll_before, nll_after    mean negative log-likelihood (nats)
    per_class                {class: {"ece_before", "ece_after"}}, one-vs-rest
    n_cells, n_bins, norm, fitted_on
and reliability.png: accuracy against confidence per bin, before and after.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax

from leuko.training.predictions import prob_columns

N_BINS = 15
NORM = "l1"
# log T is searched in [log 1/100, log 100]: a net whose probabilities need more than that is broken, not
# miscalibrated. A table the net gets entirely right with margin drives T to the lower bound (NLL -> 0).
LOG_T_BOUNDS = (-math.log(100.0), math.log(100.0))
TINY = 1e-300  # probabilities are clipped here before the log: a 0 in a CSV stays finite
CALIBRATION_JSON = "calibration.json"
RELIABILITY_PLOT = "reliability.png"


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    """(N, K) probabilities -> (N, K) log-probabilities, usable as logits."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), TINY, None))


def scale(probs: np.ndarray, temperature: float, bias: np.ndarray | None = None) -> np.ndarray:
    """(N, K) probabilities -> (N, K) softmax(log p / T (+ b)): the probabilities a net with logits / T (plus
    fit_bias_corrected's class biases b) gives."""
    logits = log_probabilities(probs) / float(temperature)
    return np.exp(log_softmax(logits if bias is None else logits + np.asarray(bias), axis=1))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood (nats) of the true classes; labels: (N,) class indices."""
    labels = np.asarray(labels, dtype=int)
    return float(-log_probabilities(probs)[np.arange(len(labels)), labels].mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the NLL of softmax(log p / T); labels: (N,) class indices.

    The NLL is convex in 1/T, hence unimodal in log T, where a bounded Brent search finds its minimum."""
    logits = log_probabilities(probs)
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0:
        raise ValueError("no cells to fit a temperature on")
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        return float(-log_softmax(logits / math.exp(log_t), axis=1)[rows, labels].mean())

    found = minimize_scalar(loss, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(math.exp(found.x))


def absent_classes(labels: np.ndarray, classes: Sequence) -> list:
    """The classes (in order) with no cell among labels ((N,) indices into classes): a bias cannot be fitted
    for them."""
    present = set(np.asarray(labels).tolist())
    return [c for i, c in enumerate(classes) if i not in present]


def fit_bias_corrected(probs: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """(T, b): the temperature and per-class biases (b[0] = 0) that minimise the NLL of softmax(log p / T + b).

    The NLL is convex in (1 / T, b) (a multinomial logistic regression on the log-probabilities), so L-BFGS finds
    its one minimum; 1 / T is bounded as log T is in fit_temperature. labels: (N,) class indices."""
    logits = log_probabilities(probs)
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0:
        raise ValueError("no cells to fit a temperature and biases on")
    rows, k = np.arange(len(labels)), logits.shape[1]
    if absent := absent_classes(labels, range(k)):  # its bias would run off to minus infinity
        raise ValueError(f"no cells of class index(es) {', '.join(map(str, absent))} to fit their biases on")
    onehot = np.eye(k)[labels]

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        inverse_t, bias = params[0], np.concatenate([[0.0], params[1:]])
        logp = log_softmax(logits * inverse_t + bias, axis=1)
        residual = (np.exp(logp) - onehot) / len(labels)  # d NLL / d (logits / T + b)
        return float(-logp[rows, labels].mean()), np.concatenate([[np.sum(residual * logits)], residual.sum(0)[1:]])

    bounds = [(math.exp(-LOG_T_BOUNDS[1]), math.exp(-LOG_T_BOUNDS[0]))] + [(None, None)] * (k - 1)
    found = minimize(loss, np.concatenate([[1.0], np.zeros(k - 1)]), jac=True, method="L-BFGS-B", bounds=bounds)
    return float(1.0 / found.x[0]), np.concatenate([[0.0], found.x[1:]])


def fit_scaling(probs: np.ndarray, labels: np.ndarray, bias: bool = False) -> tuple[float, np.ndarray | None]:
    """(T, b) for scale: fit_bias_corrected's with bias, else (fit_temperature's T, None)."""
    return fit_bias_corrected(probs, labels) if bias else (fit_temperature(probs, labels), None)


def calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-1 ECE (torchmetrics MulticlassCalibrationError, l1); labels: (N,) class indices."""
    # heavy imports here: torch and torchmetrics take seconds to load; only the ECE needs them
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = torch.as_tensor(np.array(probs, dtype=np.float64))
    target = torch.as_tensor(np.array(labels, dtype=np.int64))
    return float(multiclass_calibration_error(probs, target, num_classes=probs.shape[1], n_bins=n_bins, norm=NORM))


def class_calibration_errors(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> list[float]:
    """Per class k, ECE of prob_k against label == k (torchmetrics BinaryCalibrationError, l1)."""
    # heavy imports here, as in calibration_error
    import torch
    from torchmetrics.functional.classification import binary_calibration_error

    probs = torch.as_tensor(np.array(probs, dtype=np.float64))
    labels = torch.as_tensor(np.array(labels, dtype=np.int64))
    return [
        float(binary_calibration_error(probs[:, k].contiguous(), (labels == k).long(), n_bins=n_bins, norm=NORM))
        for k in range(probs.shape[1])
    ]


def label_indices(cells: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """(N,) index in classes of each cell's label; a ValueError names a label that is not a class."""
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(cells["label"].astype(str)) - set(lookup))
    if unknown:
        raise ValueError(f"label(s) {', '.join(unknown)} are not among the classes {', '.join(classes)}")
    return cells["label"].astype(str).map(lookup).to_numpy(dtype=int)


def held_out_scaled(probs: np.ndarray, labels: np.ndarray, folds: np.ndarray, bias: bool = False) -> np.ndarray | None:
    """(N, K): each fold's probabilities scaled by a T (and with bias, class biases) fitted on the other folds;
    None with fewer than 2 folds."""
    names = pd.unique(folds)
    if len(names) < 2:
        return None
    out = np.empty_like(np.asarray(probs, dtype=np.float64))
    for fold in names:
        inside = folds == fold
        out[inside] = scale(probs[inside], *fit_scaling(probs[~inside], labels[~inside], bias))
    return out


def calibrate(
    cells: pd.DataFrame, classes: Sequence[str], fitted_on: str, bias: bool = False
) -> tuple[dict, np.ndarray]:
    """(the calibration.json dict, (N, K) temperature-scaled probabilities) of a prediction table with labels;
    with bias, bias-corrected temperature scaling: "bias" {class: b} joins the dict and the argmax moves to the
    table's class mix ("decisions": "prevalence")."""
    probs = cells[prob_columns(classes)].to_numpy(dtype=np.float64)  # (N, K)
    labels = label_indices(cells, classes)
    if bias and (absent := absent_classes(labels, classes)):
        raise ValueError(
            f"no cells of class(es) {', '.join(absent)} among the {fitted_on}: their biases cannot be fitted; "
            "keep the balanced decisions, or give cells of every class"
        )
    temperature, biases = fit_scaling(probs, labels, bias)
    scaled = scale(probs, temperature, biases)
    summary = {
        "temperature": temperature,
        **({"bias": dict(zip(classes, biases.tolist())), "decisions": "prevalence"} if bias else {}),
        "ece_before": calibration_error(probs, labels),
        "ece_after": calibration_error(scaled, labels),
        "nll_before": nll(probs, labels),
        "nll_after": nll(scaled, labels),
    }
    folds = cells["fold"].to_numpy() if "fold" in cells.columns else np.zeros(len(cells))
    if (held_out := held_out_scaled(probs, labels, folds, bias)) is not None:
        summary["ece_after_held_out"] = calibration_error(held_out, labels)
    before, after = class_calibration_errors(probs, labels), class_calibration_errors(scaled, labels)
    summary["per_class"] = {c: {"ece_before": b, "ece_after": a} for c, b, a in zip(classes, before, after)}
    summary.update(n_cells=len(cells), n_bins=N_BINS, norm=NORM, fitted_on=fitted_on)
    return summary, scaled


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> pd.DataFrame:
    """Per equal-width bin of top-1 confidence: low, high, n, confidence (mean), accuracy; empty bins left out."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    which = np.clip((confidence * n_bins).astype(int), 0, n_bins - 1)  # a confidence of 1.0 joins the last bin
    frame = pd.DataFrame({"bin": which, "confidence": confidence, "accuracy": correct.astype(float)})
    table = frame.groupby("bin").agg(
        n=("bin", "size"), confidence=("confidence", "mean"), accuracy=("accuracy", "mean")
    )
    table.insert(0, "low", table.index / n_bins)
    table.insert(1, "high", (table.index + 1) / n_bins)
    return table.reset_index(drop=True)


def reliability_figure(before: np.ndarray, after: np.ndarray, labels: np.ndarray, summary: dict, path: Path) -> None:
    """Two panels, as predicted and divided by T: accuracy per confidence bin against the diagonal."""
    # heavy imports here: matplotlib takes half a second to load
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 3.9), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    panels = [
        (before, f"as predicted: ECE {summary['ece_before']:.3f}"),
        (after, f"divided by T = {summary['temperature']:.2f}: ECE {summary['ece_after']:.3f}"),
    ]
    for ax, (probs, title) in zip(axes, panels):
        bins = reliability_bins(probs, labels)
        width = bins["high"] - bins["low"]
        ax.bar(
            bins["low"], bins["accuracy"], width=width, align="edge", color="C0", edgecolor="white", label="accuracy"
        )
        ax.bar(  # from accuracy up to the bin's mean confidence (over-confident) or down to it (under-confident)
            bins["low"],
            (bins["confidence"] - bins["accuracy"]).abs(),
            bottom=bins[["confidence", "accuracy"]].min(axis=1),
            width=width,
            align="edge",
            facecolor=(0.84, 0.15, 0.16, 0.25),
            edgecolor="C3",
            hatch="//",
            label="gap to mean confidence",
        )
        ax.plot([0, 1], [0, 1], color="0.3", lw=1, ls="--")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("accuracy of the bin's cells")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Reliability, {len(labels)} cells, {N_BINS} bins", fontsize=11)
    fig.savefig(path, dpi=110)


def write_calibration(
    cells: pd.DataFrame, classes: Sequence[str], out_dir: Path, fitted_on: str
) -> tuple[dict, np.ndarray]:
    """calibration.json and reliability.png in out_dir: (the JSON's dict, (N, K) temperature-scaled probabilities)."""
    summary, scaled = calibrate(cells, classes, fitted_on)
    (Path(out_dir) / CALIBRATION_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    probs = cells[prob_columns(classes)].to_numpy(dtype=np.float64)
    reliability_figure(probs, scaled, label_indices(cells, classes), summary, Path(out_dir) / RELIABILITY_PLOT)
    return summary, scaled
