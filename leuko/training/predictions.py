"""The prediction table every command writes: one row per cell, pred_label and a prob_<class> column per class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

PRED = "pred_label"
PROB_PREFIX = "prob_"


def prob_columns(class_names: Sequence[str]) -> list[str]:
    return [f"{PROB_PREFIX}{c}" for c in class_names]


def classes_from_columns(columns: Sequence[str]) -> list[str]:
    """The class names of a table's prob_<class> columns, in column order."""
    return [c.removeprefix(PROB_PREFIX) for c in columns if c.startswith(PROB_PREFIX)]


def probability_table(probs: np.ndarray, class_names: Sequence[str], **leading) -> pd.DataFrame:
    """leading columns (e.g. cell_id=[...]), then pred_label (the argmax) and prob_<class> per class.

    probs: (N, K) with K == len(class_names).
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(class_names))
    frame = pd.DataFrame(leading)
    frame[PRED] = [class_names[i] for i in probs.argmax(1)] if len(probs) else []
    for i, column in enumerate(prob_columns(class_names)):
        frame[column] = probs[:, i]
    return frame


def predictions_frame(predictions: list[dict], class_names: list[str]) -> pd.DataFrame:
    """The outputs of VolumeClassifier.predict_step ({"cell_id", "probs"} per batch) as one table."""
    if not predictions:
        return pd.DataFrame(columns=["cell_id", PRED, *prob_columns(class_names)])
    probs = np.concatenate([p["probs"].float().numpy() for p in predictions])  # (N, K); no torch import needed
    return probability_table(probs, class_names, cell_id=[c for p in predictions for c in p["cell_id"]])
