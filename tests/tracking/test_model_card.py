"""MODEL_CARD.md: every section, built from data; inside every registered model and its version's description."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from helpers.sweep import registered_model
from leuko.tracking.model_card import (
    DESCRIPTION_LIMIT,
    MODEL_CARD,
    SECTIONS,
    CardData,
    calibration,
    cohort_table,
    description,
    held_out_intervals,
    held_out_predictions,
    model_summary,
    render,
)
from leuko.training.predictions import PRED, prob_columns

CLASSES = ["neutrophil", "eosinophil", "lymphocyte", "monocyte"]
LINEAGE = {
    "leuko.git_commit": "0123456789abcdef",
    "leuko.data_dvc_md5": "d41d8cd98f00b204e9800998ecf8427e.dir",
    "leuko.data_dvc_state": "clean",
    "leuko.data_dvc_path": "data",
    "leuko.manifest_sha256": "ab" * 32,
    "leuko.prepared_fingerprint": "cd" * 32,
}
CONFIG = {
    "net": "vit3d_tiny",
    "in_channels": 1,
    "classes": CLASSES,
    "preprocessing": {
        "modality": "ri",
        "shape": [16, 16, 16],
        "target_voxel_size": None,
        "n_medium": 1.337,
        "normalisation": {"method": "ri_contrast", "formula": "x = (n - n_medium) / ri_scale"},
    },
    "intensity": {"tolerance": 0.5, "n_cells": 48},
}


def index_and_masks(n_patients: int = 6, cells: int = 8):
    rows = [
        {"cell_id": f"P{p}_C{i}", "patient_id": f"P{p}", "sample_type": ["BALF", "blood"][p % 2], "label": c}
        for p in range(n_patients)
        for i, c in enumerate(np.resize(CLASSES, cells))
    ]
    index = pd.DataFrame(rows)
    test = index["patient_id"].isin(["P0", "P1"]).to_numpy()
    return index, {"train": ~test, "test": test}


def held_out_cells(index: pd.DataFrame, mask: np.ndarray, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cells = index[mask].reset_index(drop=True)
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=len(cells))
    probs[np.arange(len(cells)), [CLASSES.index(c) for c in cells["label"]]] += 0.5 * (rng.random(len(cells)) < 0.8)
    probs /= probs.sum(1, keepdims=True)
    cells[PRED] = [CLASSES[i] for i in probs.argmax(1)]
    cells[prob_columns(CLASSES)] = probs
    return cells


def card_data(config: dict = CONFIG, **changes) -> CardData:
    index, masks = index_and_masks()
    values = dict(
        net="vit3d_tiny",
        classes=CLASSES,
        config=config,
        lineage=LINEAGE,
        cohort=cohort_table(index, masks),
        test=held_out_intervals(held_out_cells(index, masks["test"]), CLASSES),
        cv={"balanced_accuracy": {"mean": 0.8, "std": 0.05}},
        run_id="f" * 32,
        voxel_sizes=[[0.5, 0.5, 0.5]],
        phantom=True,
    )
    return CardData(**{**values, **changes})


def assert_every_section(text: str) -> None:
    headings = [line.removeprefix("## ") for line in text.splitlines() if line.startswith("## ")]
    assert headings == list(SECTIONS)


def test_cohort_table_counts_patients_and_cells_per_class_and_sample_type():
    index, masks = index_and_masks()
    table = cohort_table(index, masks)
    assert list(table.columns) == [
        "sample_type",
        "class",
        "train_patients",
        "train_cells",
        "test_patients",
        "test_cells",
    ]
    blood = table.set_index(["sample_type", "class"]).loc[("blood", "monocyte")]
    assert blood["train_patients"] == 2 and blood["train_cells"] == 4  # P3 and P5, 2 monocytes each
    assert blood["test_patients"] == 1 and blood["test_cells"] == 2  # P1
    assert list(table["class"][:5]) == ["eosinophil", "lymphocyte", "monocyte", "neutrophil", "all"]
    assert table.iloc[4]["sample_type"] == "BALF" and table.iloc[4]["train_cells"] == 16
    total = table.iloc[-1]
    assert (total["sample_type"], total["class"]) == ("all", "all")
    assert total["train_patients"] == 4 and total["test_patients"] == 2 and total["test_cells"] == 16


def test_card_states_every_section_from_its_data():
    card = card_data()
    text = render(card)
    assert_every_section(text)
    assert "decision support" in text and "not a diagnosis by itself" in text
    for value in LINEAGE.values():
        assert value in text
    assert "| BALF | eosinophil |" in text and "| all | all | 4 | 32 | 2 | 16 |" in text
    ba = card.test["all"]["balanced_accuracy"]
    assert f"{ba['estimate']:.3f} ({ba['ci_low']:.3f}-{ba['ci_high']:.3f})" in text
    assert "| metric | all (2 patients) | BALF (1 patient) | blood (1 patient) |" in text  # overall, per sample type
    assert "patient as the unit" in text and "0.800 ± 0.050" in text
    assert "Not calibrated" in text and "No review threshold stored" in text
    assert "ri" in text and "16 x 16 x 16" in text and "[[0.5, 0.5, 0.5]]" in text and "ri_contrast" in text
    for failure in ("Out-of-distribution", "Other modalities", "not trained on", "Small training cohort", "Phantom"):
        assert failure in text
    assert "trained on phantoms only" in text


def test_card_reads_calibration_and_review_from_the_model_config():
    config = {
        **CONFIG,
        "calibration": {"temperature": 1.7, "ece_before": 0.081, "ece_after": 0.023, "fitted_on": "480 cells"},
        "review": {"uncertainty": "entropy", "threshold": 0.4, "target_accuracy": 0.99, "coverage": 0.62},
    }
    assert calibration(config)["temperature"] == 1.7
    text = render(card_data(config))
    assert "T = 1.700" in text and "0.081 before, 0.023 after" in text and "Not calibrated" not in text
    assert "above 0.4000" in text and "62.0% of cells retained" in text and "99.0%" in text
    no_threshold = render(card_data({**CONFIG, "review": {"threshold": None, "target_accuracy": 0.99}}))
    assert "every cell is flagged" in no_threshold


def test_description_fits_the_registry_limit():
    text = render(card_data())
    assert description("summary.", text) == f"summary.\n\n{text}"
    cut = description("summary.", text + "x" * DESCRIPTION_LIMIT)
    assert len(cut) <= DESCRIPTION_LIMIT and cut.startswith("summary.\n\n# Model card") and MODEL_CARD in cut


def test_test_predictions_run_the_model_on_the_held_out_cells(tiny_prepared):
    from leuko.data.datamodule import LeukoDataModule
    from leuko.training.module import VolumeClassifier

    datamodule = LeukoDataModule(str(tiny_prepared), fold=None, k=2, num_workers=0)
    model = VolumeClassifier("fishnet3d_tiny", num_classes=4, class_names=CLASSES, input_shape=(16, 16, 16))
    cells = held_out_predictions(model, datamodule, batch_size=4)
    test = datamodule.subset("test")
    assert list(cells["cell_id"]) == list(test["cell_id"].astype(str))
    assert list(cells.columns) == ["cell_id", "patient_id", "sample_type", "label", PRED, *prob_columns(CLASSES)]
    assert np.allclose(cells[prob_columns(CLASSES)].sum(1), 1.0)
    soft = held_out_predictions(model, datamodule, temperature=10.0, batch_size=4)
    assert (soft[PRED] == cells[PRED]).all()  # the temperature keeps every argmax
    assert soft[prob_columns(CLASSES)].max(axis=1).max() <= cells[prob_columns(CLASSES)].max(axis=1).max()
    assert model.training  # left as it was found


@pytest.mark.slow
def test_registered_version_carries_the_card_and_shows_it(tmp_path_factory, tiny_prepared):
    registry = registered_model(tmp_path_factory.getbasetemp(), tiny_prepared)
    uri, version = registry["tracking_uri"], registry["result"]["version"]
    mlflow.set_registry_uri(uri)  # models:/ below resolves the registry process-wide: pin it to this store
    try:
        _check_card(uri, version)
    finally:
        mlflow.set_registry_uri(None)


def _check_card(uri: str, version: str) -> None:
    local = Path(mlflow.artifacts.download_artifacts(f"models:/leuko/{version}", tracking_uri=uri))
    cards = list(local.rglob(MODEL_CARD))
    assert len(cards) == 1 and (cards[0].parent / "weights.safetensors").is_file()  # beside the weights
    text = cards[0].read_text()
    assert_every_section(text)
    described = mlflow.MlflowClient(uri).get_model_version("leuko", version).description
    assert described.endswith(text) and described.startswith("vit3d_tiny refit on all non-test patients")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| metric | all ("))
    row = next(line for line in lines if line.startswith("| balanced accuracy |"))
    # an interval wherever there are two held-out patients or more (the tiny cohort may hold out one)
    assert ("(" in row.split("|")[2]) == (not header.startswith("| metric | all (1 patient)"))


def test_card_states_the_ensemble_size_and_tta():
    single = render(card_data())
    assert "Model: vit3d_tiny refit on all non-test patients; no test-time augmentation." in single
    config = {**CONFIG, "ensemble": {"weights": ["weights", "weights_1", "weights_2"], "folds": ["0", "1", "2"]}}
    text = render(card_data({**config, "tta": "flip_rot90"}))
    assert_every_section(text)
    assert "Model: ensemble of 3 vit3d_tiny fold models (folds 0, 1, 2 of a 3-fold CV" in text
    assert "test-time augmentation flip_rot90 (16 views averaged)" in text
    assert model_summary({**CONFIG, "tta": "flip"}).endswith("test-time augmentation flip (8 views averaged)")
