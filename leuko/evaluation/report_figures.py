"""The figures `leuko report` draws itself (the others are PNGs `leuko evaluate` wrote), as PNG bytes."""

from __future__ import annotations

import io

import pandas as pd

from leuko.training.run_dir import FOLD_PREFIX


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def baselines_figure(table: pd.DataFrame) -> bytes:
    """Horizontal bars of balanced accuracy (mean, std as error bar) per method; 3D rows in blue."""
    # heavy import here: matplotlib takes half a second to load
    from matplotlib.figure import Figure

    order = table.iloc[::-1]
    fig = Figure(figsize=(7.2, 0.38 * len(order) + 1.1), layout="constrained")
    ax = fig.subplots()
    colours = ["C0" if s == "3D volume" else ("C2" if "projection" in s else "0.6") for s in order["input"]]
    ax.barh(
        range(len(order)),
        order["balanced_accuracy_mean"],
        xerr=order["balanced_accuracy_std"],
        color=colours,
        capsize=3,
    )
    ax.set_yticks(range(len(order)), order["method"], fontsize=8.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel("balanced accuracy across folds (mean ± std)")
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)
    return _png(fig)


def curves_figure(curves: pd.DataFrame) -> bytes:
    """Validation balanced accuracy per epoch: one thin line per fold, the mean in black."""
    # heavy imports here: matplotlib takes half a second to load
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.0, 3.4), layout="constrained")
    ax = fig.subplots()

    epoch = curves["epoch"] + 1  # Lightning counts epochs from 0
    for column in [c for c in curves.columns if c.startswith(FOLD_PREFIX)]:
        ax.plot(epoch, curves[column], lw=1, alpha=0.6, marker=".", label=column.replace("_", " "))
    ax.plot(epoch, curves["mean"], color="black", lw=2, label="mean")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation balanced accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncols=2)
    ax.grid(color="0.92")
    return _png(fig)
