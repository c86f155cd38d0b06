"""Per-sample leukocyte differentials and their agreement with the reference count (Bland-Altman).

A differential is, per sample (patient and sample type), the percentage of each class among its cells.
The reference is either the cells' manifest labels or a manual count (cytospin) read with
reference_from_counts. Agreement per class: diff = predicted - reference percentage, bias = mean diff,
limits of agreement = bias +- 1.96 sd (Bland & Altman 1986).
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.errors import LeukoError
from leuko.training.predictions import PRED

SAMPLE_KEYS = ("patient_id", "sample_type")
LOA_SDS = 1.96  # 95% of differences fall within bias +- 1.96 sd if they are normal
BA_COLUMNS = ("class", "bias", "sd", "loa_low", "loa_high", "n")
# The artifact names log_agreement gives the two tables (also their names in `leuko evaluate`'s eval/).
DIFFERENTIALS = "differentials.csv"
BLAND_ALTMAN = "bland_altman.csv"


class CountsError(LeukoError, ValueError):
    """A reference count file (--counts) that cannot be used; the message names the file, line or sample."""


def differentials(
    cells: pd.DataFrame,
    classes: Sequence[str],
    *,
    by: Sequence[str] = SAMPLE_KEYS,
    label_col: str = "label",
    pred_col: str = PRED,
    reference: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per sample: n_cells, pred_<class> and ref_<class> in percent (each set sums to 100).

    cells: one row per cell. The reference comes from label_col, or from reference (a table from
    reference_from_counts, joined on the by columns) when given; then label_col is not needed.
    """
    by, classes = list(by), list(classes)
    needed = by + [pred_col] + ([label_col] if reference is None else [])
    missing = [c for c in needed if c not in cells.columns]
    if missing:
        raise ValueError(
            f"cell table lacks column(s) {', '.join(missing)} (it has {', '.join(map(str, cells.columns))}); "
            "pass by=, label_col= or pred_col= to name the right columns"
        )
    if len(cells) == 0:
        raise ValueError("cell table is empty: no cells to count")
    for col in needed[len(by) :]:
        unknown = sorted(set(cells[col].astype(str)) - set(classes))
        if unknown:
            raise ValueError(
                f"column {col} holds label(s) {', '.join(unknown)} that are not among the classes "
                f"{', '.join(classes)}; pass classes= with every label, or drop those cells"
            )

    keys = cells[by].astype(str).reset_index(drop=True)
    out = keys.groupby(by, sort=True).size().rename("n_cells").to_frame()  # index: the by columns
    out = out.join(percentages(cells[pred_col], keys, classes, "pred_"))
    if reference is None:
        out = out.join(percentages(cells[label_col], keys, classes, "ref_"))
    else:
        out = out.join(_reference_by_sample(reference, by, classes, out.index))
    out = out.reset_index()
    return out[by + ["n_cells"] + [f"ref_{c}" for c in classes] + [f"pred_{c}" for c in classes]]


def reference_from_counts(path: str | Path, classes: Sequence[str], *, by: Sequence[str] = SAMPLE_KEYS) -> pd.DataFrame:
    """Read a manual differential: one CSV row per sample with the by columns and one column per class.

    Class columns may hold counts or percentages; each row is rescaled to percent of the listed classes
    (ref_<class>), so other cell types counted in the same sample (basophils, epithelial cells) drop out as
    they do from the predictions. n_counted is the row's sum over the classes.
    """
    path = Path(path)
    by, classes = list(by), list(classes)
    if not path.is_file():
        raise CountsError(f"{path}: reference count file not found; check the path")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CountsError(f"{path}: not a readable CSV file ({' '.join(str(exc).split())})") from exc
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in by + classes if c not in table.columns]
    if missing:
        raise CountsError(
            f"{path}: missing column(s) {', '.join(missing)} (found {', '.join(table.columns)}); "
            f"the file needs {', '.join(by)} and one count or percent column per class ({', '.join(classes)})"
        )

    problems = []
    values = pd.DataFrame(index=table.index, columns=classes, dtype=float)
    for c in classes:
        numbers = pd.to_numeric(table[c].str.strip(), errors="coerce")
        for i in table.index[numbers.isna() | (numbers < 0)]:
            problems.append(f"line {i + 2}: {c} = {table.at[i, c]!r} is not a count or percentage (a number >= 0)")
        values[c] = numbers
    for col in by:
        for i in table.index[table[col].str.strip() == ""]:
            problems.append(f"line {i + 2}: {col} is empty")
    totals = values.sum(axis=1)
    for i in table.index[(totals <= 0) & values.notna().all(axis=1)]:
        problems.append(f"line {i + 2}: every class is 0, so there is no differential")
    keys = table[by].apply(lambda s: s.str.strip())
    for i in table.index[keys.duplicated(keep="first")]:
        problems.append(f"line {i + 2}: sample {', '.join(keys.loc[i])} appears twice")
    if len(table) == 0:
        problems.append("no samples (only a header)")
    if problems:
        raise CountsError(
            f"{path}: {len(problems)} problem(s):\n"
            + "\n".join(f"  {p}" for p in problems)
            + f"\nFix {'these' if len(problems) > 1 else 'this'} in {path} and run again."
        )

    out = keys.copy()
    out["n_counted"] = totals
    for c in classes:
        out[f"ref_{c}"] = 100.0 * values[c] / totals
    return out.reset_index(drop=True)


def bland_altman(pred: Sequence[float], ref: Sequence[float], *, ddof: int = 1) -> dict:
    """Bias, sd and 95% limits of agreement of pred against ref, plus each pair's mean and difference.

    diff = pred - ref, so a positive bias means the prediction over-counts. ddof=1 is the sample sd of
    Bland & Altman (1986); statsmodels' mean_diff_plot draws its limits with ddof=0 (narrower by
    sqrt((n-1)/n), which matters with few samples).
    """
    pred, ref = np.asarray(pred, dtype=float), np.asarray(ref, dtype=float)
    if pred.shape != ref.shape or pred.ndim != 1:
        raise ValueError(f"pred and ref must be two 1D arrays of one length, got shapes {pred.shape} and {ref.shape}")
    if not (np.isfinite(pred).all() and np.isfinite(ref).all()):
        raise ValueError("pred and ref must be finite; drop the samples with missing values first")
    if len(pred) <= ddof:
        raise ValueError(f"Bland-Altman needs more than {ddof} pair(s) for an sd with ddof={ddof}, got {len(pred)}")
    diff = pred - ref
    bias, sd = float(diff.mean()), float(diff.std(ddof=ddof))
    return {
        "bias": bias,
        "sd": sd,
        "loa_low": bias - LOA_SDS * sd,
        "loa_high": bias + LOA_SDS * sd,
        "n": int(len(diff)),
        "mean": (pred + ref) / 2,
        "diff": diff,
    }


def bland_altman_table(diffs: pd.DataFrame, classes: Sequence[str], *, by: str | None = None) -> pd.DataFrame:
    """One row per class (per class and group of by, e.g. sample_type) from a differentials table.

    Groups with fewer than two samples get NaN bias and limits rather than an error."""
    _check_differential_columns(diffs, classes)
    parts = [(None, diffs)] if by is None else list(diffs.groupby(by, sort=True))
    rows = []
    for group, part in parts:
        for c in classes:
            row = {} if by is None else {by: group}
            if len(part) >= 2:
                ba = bland_altman(part[f"pred_{c}"], part[f"ref_{c}"])
                row.update({"class": c, **{k: ba[k] for k in BA_COLUMNS[1:]}})
            else:
                row.update(
                    {"class": c, "bias": np.nan, "sd": np.nan, "loa_low": np.nan, "loa_high": np.nan, "n": len(part)}
                )
            rows.append(row)
    return pd.DataFrame(rows, columns=([] if by is None else [by]) + list(BA_COLUMNS))


def bland_altman_plot(
    diffs: pd.DataFrame, classes: Sequence[str], path: str | Path, *, title: str | None = None
) -> Path:
    """One panel per class: difference (predicted - reference, %) against the mean of the two (%), with the
    bias and both limits of agreement drawn and labelled. Points are coloured by sample_type when present."""
    # heavy import here: matplotlib takes half a second to load. No pyplot: no GUI backend, no global figure state
    from matplotlib.figure import Figure

    _check_differential_columns(diffs, classes)
    classes = list(classes)
    ncols = min(len(classes), 4)
    nrows = -(-len(classes) // ncols)
    fig = Figure(figsize=(4.0 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    groups = sorted(diffs["sample_type"].astype(str).unique()) if "sample_type" in diffs.columns else [None]
    for ax, c in zip(axes, classes):
        ax.set_title(c)
        ax.set_xlabel("mean of predicted and reference (%)")
        ax.set_ylabel("predicted - reference (%)")
        if len(diffs) < 2:
            ax.text(0.5, 0.5, "fewer than 2 samples", ha="center", va="center", transform=ax.transAxes)
            continue
        ba = bland_altman(diffs[f"pred_{c}"], diffs[f"ref_{c}"])
        for k, g in enumerate(groups):
            sel = np.ones(len(diffs), bool) if g is None else (diffs["sample_type"].astype(str) == g).to_numpy()
            ax.scatter(ba["mean"][sel], ba["diff"][sel], s=18, alpha=0.8, color=f"C{k}", label=g)
        ax.axhline(0.0, color="0.8", lw=0.8)
        lines = (("bias", ba["bias"], "-"), ("+1.96 SD", ba["loa_high"], "--"), ("-1.96 SD", ba["loa_low"], "--"))
        for name, y, style in lines:
            ax.axhline(y, color="black" if name == "bias" else "C3", ls=style, lw=1.2)
            ax.annotate(
                f"{name}: {y:+.1f}%",
                xy=(0.99, y),
                xycoords=("axes fraction", "data"),
                ha="right",
                va="bottom",
                fontsize=8,
            )
        span = max(abs(ba["loa_high"]), abs(ba["loa_low"]), np.abs(ba["diff"]).max(), 1.0) * 1.25
        ax.set_ylim(-span, span)
    for ax in axes[len(classes) :]:
        ax.set_visible(False)
    if len(groups) > 1:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", title="sample type")
    fig.suptitle(title or f"Bland-Altman: predicted vs reference differential ({len(diffs)} samples)")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def log_agreement(
    client,
    run_id: str,
    *,
    diffs: pd.DataFrame,
    table: pd.DataFrame,
    plot: str | Path | None = None,
    artifact_path: str = "agreement",
) -> None:
    """Log the differentials and Bland-Altman table (CSV), the plot (PNG) and metrics
    ba/<class>/<bias|sd|loa_low|loa_high> (ba/<group>/<class>/... for a grouped table) to an MLflow run.

    client: an mlflow.MlflowClient (passed in so callers choose the tracking URI)."""
    from mlflow.entities import Metric  # heavy import here: mlflow takes a second or two to load

    group_col = table.columns[0] if table.columns[0] != "class" else None
    with tempfile.TemporaryDirectory() as tmp:
        for name, frame in ((DIFFERENTIALS, diffs), (BLAND_ALTMAN, table)):
            frame.to_csv(Path(tmp) / name, index=False)
            client.log_artifact(run_id, str(Path(tmp) / name), artifact_path)
    if plot is not None:
        client.log_artifact(run_id, str(plot), artifact_path)
    now = int(time.time() * 1000)
    metrics = []
    for row in table.to_dict("records"):
        prefix = "ba/" + (f"{metric_part(row[group_col])}/" if group_col else "") + metric_part(row["class"])
        for stat in ("bias", "sd", "loa_low", "loa_high"):
            if np.isfinite(row[stat]):  # a group with one sample has no sd
                metrics.append(Metric(f"{prefix}/{stat}", float(row[stat]), now, 0))
    client.log_batch(run_id, metrics=metrics)


def metric_part(name) -> str:
    """MLflow metric names allow letters, digits, _ - . space and /; other characters become _."""
    return re.sub(r"[^\w\-. ]", "_", str(name))


def percentages(labels: pd.Series, keys: pd.DataFrame, classes: list[str], prefix: str) -> pd.DataFrame:
    """Per group of keys (rows aligned by position): each class's percentage of the rows whose label is one of
    classes; other labels are not counted."""
    onehot = pd.get_dummies(pd.Categorical(labels.astype(str), categories=classes), dtype=float)
    onehot.columns = [f"{prefix}{c}" for c in classes]
    counts = pd.concat([keys, onehot], axis=1).groupby(list(keys.columns), sort=True).sum()
    return 100.0 * counts.div(counts.sum(axis=1), axis=0)


def _reference_by_sample(reference: pd.DataFrame, by: list[str], classes: list[str], samples: pd.Index) -> pd.DataFrame:
    columns = [f"ref_{c}" for c in classes]
    missing = [c for c in by + columns if c not in reference.columns]
    if missing:
        raise ValueError(f"reference table lacks column(s) {', '.join(missing)}; read it with reference_from_counts")
    ref = reference[columns].set_axis(
        pd.MultiIndex.from_frame(reference[by].astype(str))
        if len(by) > 1
        else pd.Index(reference[by[0]].astype(str), name=by[0])
    )
    absent = [s for s in samples if s not in ref.index]
    if absent:
        shown = "; ".join(", ".join(s) if isinstance(s, tuple) else s for s in absent[:5])
        raise CountsError(
            f"{len(absent)} sample(s) with predictions have no reference count ({shown}"
            f"{' ...' if len(absent) > 5 else ''}); add them to the counts file or leave their cells out"
        )
    return ref.loc[samples]


def _check_differential_columns(diffs: pd.DataFrame, classes: Sequence[str]) -> None:
    missing = [f"{p}_{c}" for c in classes for p in ("pred", "ref") if f"{p}_{c}" not in diffs.columns]
    if missing:
        raise ValueError(f"differential table lacks column(s) {', '.join(missing)}; make it with differentials()")
