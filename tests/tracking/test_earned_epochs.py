"""A refit trains for the epochs its CV earned (the mean best validation epoch), unless told otherwise."""

from leuko.tracking.registry import earned_epochs


def test_the_mean_best_epoch_rounded():
    assert earned_epochs({"best_epoch": {"mean": 7.6, "std": 1.1}}) == ["--trainer.max_epochs", "8"]
    assert earned_epochs({"best_epoch": {"mean": 0.2}}) == ["--trainer.max_epochs", "1"]


def test_none_without_a_best_epoch_or_with_epochs_given():
    assert earned_epochs({}) == [] and earned_epochs({"best_epoch": {"mean": None}}) == []
    assert earned_epochs({"best_epoch": {"mean": 12.0}}, ["--trainer.max_epochs", "20"]) == []
    assert earned_epochs({"best_epoch": {"mean": 12.0}}, ["--trainer.max_epochs=20"]) == []
