"""A refit trains for the epochs its CV earned (the mean best validation epoch), unless told otherwise."""

import json

from leuko.tracking.registry import Source, earned_epochs, refit_epochs


def test_the_mean_best_epoch_rounded():
    assert earned_epochs({"best_epoch": {"mean": 7.6, "std": 1.1}}) == ["--trainer.max_epochs", "8"]
    assert earned_epochs({"best_epoch": {"mean": 0.2}}) == ["--trainer.max_epochs", "1"]


def test_none_without_a_best_epoch_or_with_epochs_given():
    assert earned_epochs({}) == [] and earned_epochs({"best_epoch": {"mean": None}}) == []
    assert earned_epochs({"best_epoch": {"mean": 12.0}}, ["--trainer.max_epochs", "20"]) == []
    assert earned_epochs({"best_epoch": {"mean": 12.0}}, ["--trainer.max_epochs=20"]) == []


def test_a_trial_refits_for_its_earned_epochs_over_the_sweeps_budget(tmp_path):
    """A sweep trial's overrides carry the sweep's epoch budget (conf/sweep/default.yaml: trainer.max_epochs 30);
    its refit trains for the epochs its CV earned instead. Epochs given by hand with --config win."""
    cv = {"best_epoch": {"mean": 14.6, "std": 2.0}}
    budget = ["--model.lr", "0.003", "--trainer.max_epochs", "30"]
    trial = Source(configs=["base.yaml"], overrides=budget, cv=cv, study="s", trial=3)
    assert refit_epochs(trial) == ["--trainer.max_epochs", "15"]
    assert refit_epochs(Source(configs=["base.yaml"], overrides=budget, cv=cv)) == []  # by hand: 30 it is

    folder = tmp_path / "cv"  # `leuko register --config ... --cv folder`: the CV's summary file
    folder.mkdir()
    (folder / "cv_summary.json").write_text(json.dumps(cv))
    by_cv = Source(configs=["base.yaml"], overrides=[], cv_dir=str(folder))
    assert refit_epochs(by_cv) == ["--trainer.max_epochs", "15"]
    assert refit_epochs(Source(configs=["base.yaml"], overrides=[])) == []  # no CV, nothing earned


def test_a_damaged_cv_summary_is_named_before_any_refit_folder_is_made(tmp_path):
    """`leuko register --config ... --cv DIR` with a broken DIR/cv_summary.json: the error names the file, and
    no empty register-<time> folder is left in --out."""
    import pytest

    from leuko.errors import LeukoError
    from leuko.tracking.registry import register

    folder = tmp_path / "cv"
    folder.mkdir()
    (folder / "cv_summary.json").write_text("{broken")
    with pytest.raises(LeukoError, match=r"cv_summary\.json: not valid JSON"):
        register(Source(configs=["base.yaml"], overrides=[], cv_dir=str(folder)), out=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
