import numpy as np
import pandas as pd
import pytest

from leuko.data.folds import (
    MissingClassWarning,
    SplitError,
    fold_masks,
    make_splits,
    read_splits,
    summarize,
    write_splits,
)


def cohort(n_patients=12, cells=20, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    classes = ["neutrophil", "eosinophil", "lymphocyte", "monocyte"]
    for p in range(n_patients):
        sample = "BALF" if p % 2 else "blood"
        for c in range(cells):
            rows.append(
                {
                    "cell_id": f"p{p:02d}_c{c:03d}",
                    "patient_id": f"p{p:02d}",
                    "label": classes[rng.integers(4)],
                    "sample_type": sample,
                }
            )
    return pd.DataFrame(rows)


def test_patients_never_cross_folds_and_test_is_held_out():
    cells = cohort()
    splits = make_splits(cells, k=4, test_fraction=0.2, seed=0)
    per_patient = splits.groupby("patient_id")["fold"].nunique()
    assert (per_patient == 1).all()
    assert set(splits["fold"]) == {"0", "1", "2", "3", "test"}
    test_patients = splits.loc[splits["fold"] == "test", "patient_id"].unique()
    assert len(test_patients) == round(0.2 * 12)
    # stratified by sample type: both sample types are held out
    assert set(splits.loc[splits["fold"] == "test", "sample_type"]) == {"BALF", "blood"}


def test_same_seed_same_split_other_seed_differs():
    cells = cohort()
    a = make_splits(cells, k=4, seed=3)
    b = make_splits(cells, k=4, seed=3)
    c = make_splits(cells, k=4, seed=4)
    assert a.equals(b)
    assert not a["fold"].equals(c["fold"])


def test_folds_are_class_stratified():
    cells = cohort(n_patients=20, cells=30)
    splits = make_splits(cells, k=4, test_fraction=0.0, seed=0)
    table = pd.crosstab(splits["fold"], splits["label"], normalize="index")
    overall = splits["label"].value_counts(normalize=True)
    assert (table.sub(overall, axis=1).abs() < 0.12).all().all()


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(SplitError, match=r"5 patients cannot make 5 folds plus 1 held-out"):
        make_splits(cohort(n_patients=5), k=5, test_fraction=0.2)


def test_missing_class_in_training_fold_warns():
    cells = cohort(n_patients=8)
    # one rare class lives in a single patient only
    cells.loc[cells["label"] == "eosinophil", "label"] = "neutrophil"
    cells.loc[cells["cell_id"] == "p01_c000", "label"] = "eosinophil"
    with pytest.warns(MissingClassWarning, match="eosinophil"):
        make_splits(cells, k=3, test_fraction=0.0, seed=0)


def test_split_column_is_honoured():
    cells = cohort(n_patients=6)
    cells["split"] = np.where(
        cells["patient_id"] == "p00", "test", np.where(cells["patient_id"] == "p01", "val", "train")
    )
    splits = make_splits(cells, k=5)
    assert set(splits.loc[cells["split"] == "val", "fold"]) == {"0"}
    assert set(splits.loc[cells["split"] == "test", "fold"]) == {"test"}
    masks = fold_masks(splits, 0)
    assert masks["train"].sum() == (cells["split"] == "train").sum()


def test_bad_split_values_are_named():
    cells = cohort(n_patients=4)
    cells["split"] = "training"
    with pytest.raises(SplitError, match="training"):
        make_splits(cells)


def test_write_read_roundtrip_and_summary(tmp_path):
    splits = make_splits(cohort(), k=3, seed=0)
    path = write_splits(splits, tmp_path / "s" / "splits.csv")
    back = read_splits(path)
    assert list(back.columns) == ["cell_id", "patient_id", "label", "sample_type", "fold"]
    assert back["fold"].tolist() == splits["fold"].tolist()
    table = summarize(back)
    assert table["cells"].sum() == len(splits)
    assert list(table.index) == ["0", "1", "2", "test"]


def test_unknown_fold_and_missing_file(tmp_path):
    splits = make_splits(cohort(), k=3)
    with pytest.raises(SplitError, match=r"fold 7"):
        fold_masks(splits, 7)
    with pytest.raises(SplitError, match="leuko folds"):
        read_splits(tmp_path / "nope.csv")
