"""What the CV's nets looked at, for the report: an explain folder from a fold's best checkpoint, and its section.

explain_cv picks, in one fold's out-of-fold cells, up to N cells per class that the fold's best checkpoint
got right and up to N it got wrong (the most confident of each), and writes Grad-CAM and occlusion maps
of them into runs/NAME/explain/ (leuko.evaluation.saliency_figures): `leuko report --explain N`. The
report shows that folder whenever it exists (saliency_section), whatever wrote it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.data.prepared import load_prepared
from leuko.evaluation.report_sections import ReportInputs, Section, _e, _img_file, provenance_section
from leuko.evaluation.saliency_figures import EXPLAIN, METHODS, TITLES, explain_cells, read_index
from leuko.training.predictions import PRED, classes_from_columns, prob_columns
from leuko.training.run_dir import OOF, best_checkpoints


def pick_cells(oof: pd.DataFrame, classes: Sequence[str], per_class: int) -> pd.DataFrame:
    """Per class (by label): the per_class most confident correct cells, then the per_class most confident wrong."""
    confidence = oof[prob_columns(classes)].max(axis=1)
    chosen = []
    for c in classes:
        of_class = oof[oof["label"] == c].assign(_conf=confidence)
        right = of_class[of_class[PRED] == c].nlargest(per_class, "_conf")
        wrong = of_class[of_class[PRED] != c].nlargest(per_class, "_conf")
        chosen += [right, wrong]
    return pd.concat(chosen).drop(columns="_conf").reset_index(drop=True)


def explain_cv(
    cv_dir: str | Path,
    per_class: int = 2,
    *,
    fold: str | None = None,
    methods: Sequence[str] = METHODS,
    progress: bool = True,
) -> pd.DataFrame:
    """Write cv_dir/explain/ (module docstring) from one fold (default: the first with a best checkpoint)."""
    # heavy imports here: torch, Lightning and scikit-learn take seconds to load
    from leuko.evaluation.baselines import cv_splits
    from leuko.evaluation.embedding import load_classifier

    cv_dir = Path(cv_dir)
    oof = pd.read_csv(cv_dir / OOF, dtype={"cell_id": str, "label": str, "fold": str})
    checkpoints = best_checkpoints(cv_dir)
    folds = [f for f in sorted(checkpoints, key=lambda f: (len(f), f)) if f in set(oof["fold"])]
    if not folds or (fold is not None and str(fold) not in folds):
        raise ValueError(
            f"{cv_dir}: no fold with both a best checkpoint and out-of-fold cells"
            + (f" named {fold}; folds with both: {', '.join(folds) or 'none'}" if fold is not None else "")
        )
    fold = str(fold) if fold is not None else folds[0]
    classes = classes_from_columns(oof.columns)
    cells = pick_cells(oof[oof["fold"] == fold].reset_index(drop=True), classes, per_class)
    _, _, prepared = cv_splits(cv_dir)
    volumes, index, _ = load_prepared(prepared)
    rows = index.set_index(index["cell_id"].astype(str)).loc[cells["cell_id"], "row"].to_numpy()
    net = load_classifier(checkpoints[fold]).net
    print(f"explain: {len(cells)} cells of fold {fold} through {checkpoints[fold]}", file=sys.stderr)
    return explain_cells(
        net,
        np.asarray(volumes[rows]),  # (N, C, D, H, W)
        cells[["cell_id", "label"]],
        cells[prob_columns(classes)].to_numpy(),
        classes,
        cv_dir / EXPLAIN,
        source=f"{cv_dir} fold {fold}: {checkpoints[fold].name}",
        methods=methods,
        progress=progress,
    )


def saliency_section(inp: ReportInputs) -> Section | None:
    """Per class, the explained cells the net got right and those it got wrong, each map beside the other."""
    folder = inp.root / EXPLAIN
    index = read_index(folder)
    if index is None or index.empty:
        return None
    parts = [
        '<p class="note">Where the network looked, for the class it predicted: Grad-CAM (the class score\'s '
        "gradient-weighted feature map of a deep layer, upsampled) and occlusion sensitivity (how much the "
        "probability drops when the neighbourhood of each voxel is set to the medium). Each picture shows the "
        "prepared cell's mid-slices (top) and maximum projections (bottom) with the map over it; red is where the "
        f"map peaks. From <code>{_e(folder)}</code>.</p>"
    ]
    labels = index["label"] if "label" in index.columns else pd.Series([None] * len(index), dtype=object)
    correct = index["correct"].astype(str).str.lower()  # "true", "false", or "nan" for an unlabelled cell
    for label in dict.fromkeys(labels.fillna("")):
        for outcome in ("true", "false", "nan"):
            rows = index[(labels.fillna("") == label) & (correct == outcome)]
            if rows.empty:
                continue
            heading = f"{label}: predicted {'right' if outcome == 'true' else 'wrong'}" if label else "unlabelled"
            figures = [
                _img_file(folder / r.png, f"{r.cell_id} {TITLES.get(r.method, r.method)}", _caption(r), 420)
                for r in rows.itertuples(index=False)
            ]
            parts.append(f'<h3>{_e(heading)}</h3><div class="figs">{"".join(figures)}</div>')
    return "saliency", "What the network looked at", "".join(parts)


def _caption(row) -> str:
    return _e(
        f"{row.cell_id}: predicted {row.pred_label} ({row.probability:.2f}); {TITLES.get(row.method, row.method)}"
    )


def with_saliency_section(makers: tuple) -> tuple:
    """The report's section makers with saliency_section before the provenance (else last)."""
    makers = tuple(makers)
    at = makers.index(provenance_section) if provenance_section in makers else len(makers)
    return (*makers[:at], saliency_section, *makers[at:])
