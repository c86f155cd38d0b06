"""Figures a run logs: the confusion matrix (counts, shaded by the row's share of the true class)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str):
    """A matplotlib figure of a (K, K) count matrix, rows the true class, columns the predicted one."""
    # heavy imports here: matplotlib takes a second to load and only plotting needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    row_sums = matrix.sum(axis=1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2, 1.1 * len(class_names) + 1.5))
    ax.imshow(matrix / row_sums, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            colour = "white" if matrix[i, j] / row_sums[i, 0] > 0.5 else "black"
            ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", color=colour)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def log_confusion(
    client, run_id: str, matrix: np.ndarray, class_names: Sequence[str], name: str, title: str | None = None
) -> None:
    """The confusion figure as the artifact <name>.png of an MLflow run (client: an MlflowClient, or a
    Lightning MLFlowLogger's `experiment`); the title defaults to the name."""
    fig = confusion_figure(matrix, class_names, title or name.replace("_", " "))
    client.log_figure(run_id, fig, f"{name}.png")
    # heavy import here, as above; confusion_figure has loaded it by now
    import matplotlib.pyplot as plt

    plt.close(fig)
