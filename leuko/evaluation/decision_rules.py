"""Which way of turning probabilities into labels agrees better with the reference: `leuko evaluate`'s decisions.json.

`leuko register --decisions` offers two rules (leuko.deploy.decisions): balanced, the net's own argmax (the
recipes train on class-balanced batches, so it treats every class as equally common), and prevalence, bias-
corrected temperature scaling fitted on the CV's out-of-fold cells, whose argmax follows the data's class mix.
This compares them on the same out-of-fold cells, each fold's cells scaled by a T and biases fitted on the
other folds, so that no cell is scored by a rule fitted on it. Per rule:

    accuracy, balanced_accuracy     over all cells
    differential_mae                mean absolute difference between the predicted and the reference
                                    differential, over samples and classes (percentage points)
    bias                            {class: Bland-Altman bias, predicted - reference (percentage points)}

The reference is the cells' labels, or the manual counts given to `leuko evaluate --counts`. With fewer than
two folds (a test set's predictions) there is nothing to fit on apart from the scored cells: no comparison.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.evaluation.agreement import bland_altman_table, differentials, reference_from_counts
from leuko.evaluation.calibration import absent_classes, held_out_scaled, label_indices
from leuko.evaluation.metrics import scores
from leuko.training.predictions import PRED, prob_columns

DECISIONS_JSON = "decisions.json"
RULES = ("balanced", "prevalence")


def compare_decisions(cells: pd.DataFrame, classes: Sequence[str], reference: pd.DataFrame | None = None) -> dict:
    """{rule: {"accuracy", "balanced_accuracy", "differential_mae", "bias"}, "closer_differential", "fitted_on"},
    or {} when the cells have fewer than two folds."""
    classes = list(classes)
    probs = cells[prob_columns(classes)].to_numpy(dtype=np.float64)
    folds = cells["fold"].astype(str).to_numpy() if "fold" in cells.columns else np.zeros(len(cells))
    labels = label_indices(cells, classes)
    if len(pd.unique(folds)) < 2:
        return {}
    for fold in pd.unique(folds):  # each fold's biases come from the other folds, which need every class
        if absent := absent_classes(labels[folds != fold], classes):
            raise ValueError(f"the folds other than {fold} have no cells of {', '.join(absent)} to fit a bias on")
    prevalence = held_out_scaled(probs, labels, folds, bias=True)
    out = {}
    for rule, chosen in zip(RULES, (probs, prevalence)):
        labelled = cells.assign(**{PRED: np.array(classes)[chosen.argmax(axis=1)]})
        diffs = differentials(labelled, classes, reference=reference)
        gaps = np.abs(
            diffs[[f"pred_{c}" for c in classes]].to_numpy() - diffs[[f"ref_{c}" for c in classes]].to_numpy()
        )
        ba = bland_altman_table(diffs, classes).set_index("class")["bias"]
        out[rule] = {
            **{k: v for k, v in scores(cells["label"].astype(str), labelled[PRED]).items() if k != "macro_f1"},
            "differential_mae": float(np.nanmean(gaps)),
            "bias": {c: None if pd.isna(ba[c]) else float(ba[c]) for c in classes},
        }
    out["closer_differential"] = min(RULES, key=lambda rule: out[rule]["differential_mae"])
    out["fitted_on"] = f"{len(cells)} out-of-fold cells; each fold's biases fitted on the other folds"
    return out


def write_decisions(pred, out_dir: Path, counts: str | Path | None = None) -> dict[str, float]:
    """decisions.json in out_dir for pred (leuko.evaluation.evaluate.Predictions: .cells, .classes) when its
    cells have folds to fit on, and a line on stderr; returns the flat numbers decisions/<rule>/<metric>. The
    reference: the manual counts in the counts CSV (agreement.reference_from_counts), else the labels."""
    reference = reference_from_counts(counts, pred.classes) if counts else None
    try:
        found = compare_decisions(pred.cells, pred.classes, reference)
    except ValueError as exc:  # a fold whose other folds lack a class: no bias to fit for it
        print(f"decisions: not compared ({exc})", file=sys.stderr, flush=True)
        return {}
    if not found:
        return {}
    (Path(out_dir) / DECISIONS_JSON).write_text(json.dumps(found, indent=2) + "\n")
    numbers = {f"decisions/{rule}/{k}": found[rule][k] for rule in RULES for k in found[rule] if k != "bias"}
    print(summary_line(numbers), file=sys.stderr, flush=True)
    return numbers


def summary_line(numbers: dict[str, float]) -> str:
    """One line for the log: each rule's accuracy, balanced accuracy and differential error."""
    parts = [
        f"{rule}: accuracy {numbers[f'decisions/{rule}/accuracy']:.3f}, balanced accuracy "
        f"{numbers[f'decisions/{rule}/balanced_accuracy']:.3f}, differential off by "
        f"{numbers[f'decisions/{rule}/differential_mae']:.2f} points"
        for rule in RULES
    ]
    return f"decisions (`leuko register --decisions`, out of fold; {DECISIONS_JSON}): " + "; ".join(parts)
