"""Patient-grouped, class-stratified folds with whole patients held out for test.

Every cell of a patient lands in one fold, so no model is ever validated or tested on a patient
it has seen: cells of one patient share acquisition effects, and splitting them leaks.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from leuko.errors import LeukoError

SPLIT_COLUMNS = ("cell_id", "patient_id", "label", "sample_type", "fold")
TEST = "test"
# With a `split` column, the given validation cells form the single fold "0"; "train" never validates.
TRAIN_ONLY = "train"


class SplitError(LeukoError, ValueError):
    pass


class MissingClassWarning(UserWarning):
    pass


def make_splits(
    cells: pd.DataFrame,
    *,
    k: int = 5,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> pd.DataFrame:
    """Assign each cell a fold "0".."k-1" or "test".

    `cells` needs cell_id, patient_id, label and sample_type. When it carries a non-empty `split`
    column (train/val/test), that split is honoured as given: val -> fold "0", train -> "train",
    test -> "test".
    """
    missing = [c for c in ("cell_id", "patient_id", "label", "sample_type") if c not in cells.columns]
    if missing:
        raise SplitError(f"cannot make folds: columns {missing} are missing (found {list(cells.columns)})")
    cells = cells.reset_index(drop=True)
    if "split" in cells.columns and cells["split"].notna().any() and (cells["split"].astype(str) != "").any():
        return _from_split_column(cells)
    if k < 2:
        raise SplitError(f"k={k}: cross-validation needs at least 2 folds; pass --k 2 or more")
    if not 0.0 <= test_fraction < 1.0:
        raise SplitError(f"test_fraction={test_fraction} must be in [0, 1); 0 holds out no test patients")

    patients = _patient_table(cells)
    n_patients = len(patients)
    n_test = int(round(test_fraction * n_patients))
    if test_fraction > 0 and n_test == 0:
        n_test = 1
    if n_patients - n_test < k:
        raise SplitError(
            f"{n_patients} patients cannot make {k} folds plus {n_test} held-out test patient(s): "
            f"each fold needs at least one patient. Lower --k (at most {max(n_patients - n_test, 0)}), "
            f"lower --test-fraction, or add patients."
        )

    test_patients = _pick_test_patients(patients, n_test, seed)
    fold = pd.Series(TEST, index=cells.index, dtype=object)
    dev = cells[~cells["patient_id"].isin(test_patients)]
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer members than k; the per-fold check below says it better.
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, val_idx) in enumerate(splitter.split(dev, dev["label"], groups=dev["patient_id"])):
            fold.loc[dev.index[val_idx]] = str(f)

    out = cells[["cell_id", "patient_id", "label", "sample_type"]].copy()
    out["fold"] = fold.values
    _warn_missing_classes(out)
    return out


def _from_split_column(cells: pd.DataFrame) -> pd.DataFrame:
    split = cells["split"].fillna("").astype(str).str.strip().str.lower()
    bad = sorted(set(split) - {"train", "val", "test"})
    if bad:
        raise SplitError(f"split column has values {bad}; allowed are train, val and test")
    if not (split == "val").any():
        raise SplitError("split column has no 'val' cells: mark some cells val, or drop the column to make folds")
    out = cells[["cell_id", "patient_id", "label", "sample_type"]].copy()
    out["fold"] = split.map({"val": "0", "train": TRAIN_ONLY, "test": TEST}).values
    return out


def _patient_table(cells: pd.DataFrame) -> pd.DataFrame:
    # A patient may give both BALF and blood; stratify the test hold-out by their majority sample type.
    majority = cells.groupby("patient_id")["sample_type"].agg(lambda s: s.value_counts().index[0])
    return majority.rename("sample_type").reset_index().sort_values("patient_id", kind="stable")


def _pick_test_patients(patients: pd.DataFrame, n_test: int, seed: int) -> set:
    if n_test == 0:
        return set()
    ids = patients["patient_id"].to_numpy()
    strata = patients["sample_type"].to_numpy()
    counts = pd.Series(strata).value_counts()
    stratify = strata if (counts.min() >= 2 and n_test >= len(counts)) else None
    _, test = train_test_split(ids, test_size=n_test, random_state=seed, stratify=stratify)
    return set(test.tolist())


def _warn_missing_classes(splits: pd.DataFrame) -> None:
    classes = set(splits["label"])
    for f in fold_names(splits):
        train = splits[(splits["fold"] != f) & (splits["fold"] != TEST)]
        absent = sorted(classes - set(train["label"]))
        if absent:
            warnings.warn(
                f"fold {f}: class(es) {absent} have no training cells; the model trained for this fold "
                f"cannot learn them. Use fewer folds or more patients with these classes.",
                MissingClassWarning,
                stacklevel=3,
            )


def fold_names(splits: pd.DataFrame) -> list[str]:
    names = [f for f in splits["fold"].astype(str).unique() if f not in (TEST, TRAIN_ONLY)]
    return sorted(names, key=int)


def summarize(splits: pd.DataFrame) -> pd.DataFrame:
    """Patients and cells per class for each fold, one row per fold."""
    table = pd.crosstab(splits["fold"], splits["label"]).rename_axis(index="fold", columns=None)
    table.insert(0, "cells", table.sum(axis=1))
    table.insert(0, "patients", splits.groupby("fold")["patient_id"].nunique())
    order = list(fold_names(splits)) + [f for f in (TRAIN_ONLY, TEST) if f in table.index]
    return table.loc[order]


def write_splits(splits: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    splits[list(SPLIT_COLUMNS)].to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def read_splits(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"splits file {path} does not exist; make it with `leuko folds --manifest M --out {path}`")
    splits = pd.read_csv(path, dtype={"fold": str, "cell_id": str, "patient_id": str})
    missing = [c for c in SPLIT_COLUMNS if c not in splits.columns]
    if missing:
        raise SplitError(f"{path}: columns {missing} are missing; expected {list(SPLIT_COLUMNS)}")
    return splits


def require_cells(ids: pd.Series, known: pd.Index, problem: str, fix: str) -> None:
    """Raise SplitError naming the cells of the folds (ids) that a table (known ids) lacks: problem says how
    they are missing, fix what to do."""
    absent = sorted(set(ids) - set(known))
    if absent:
        raise SplitError(f"{len(absent)} cell(s) of the folds {problem} (e.g. {', '.join(absent[:3])}); {fix}")


def fold_masks(splits: pd.DataFrame, fold: int | str) -> dict[str, np.ndarray]:
    """Boolean masks over `splits` rows for train, val and test of one fold."""
    f = str(fold)
    known = fold_names(splits)
    if f not in known:
        raise SplitError(f"fold {fold!r} does not exist; the splits have folds {known}")
    is_test = (splits["fold"] == TEST).to_numpy()
    is_val = (splits["fold"].astype(str) == f).to_numpy()
    return {"train": ~is_test & ~is_val, "val": is_val, "test": is_test}
