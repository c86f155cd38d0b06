"""run_dir.read_summary: the one reader of a CV's cv_summary.json (register, evaluate and report use it)."""

import json

import pytest

from leuko.training import run_dir


def test_read_summary_reads_what_cv_writes(tmp_path):
    summary = {"balanced_accuracy": {"mean": 0.95, "std": 0.02}, "best_epoch": {"mean": 16.4, "std": 3.1}}
    (tmp_path / run_dir.SUMMARY).write_text(json.dumps(summary))
    assert run_dir.read_summary(tmp_path) == summary


def test_read_summary_is_empty_without_a_finished_cv(tmp_path):
    assert run_dir.read_summary(tmp_path) == {}
    assert run_dir.read_summary(None) == {}


@pytest.mark.parametrize("text", ['{"balanced_accuracy": {"mean": 0.9', "[0.9, 0.8]"])
def test_a_damaged_summary_names_the_file_and_the_fix(tmp_path, text):
    path = tmp_path / run_dir.SUMMARY
    path.write_text(text)
    with pytest.raises(run_dir.RunFolderError, match="cv_summary.json") as info:
        run_dir.read_summary(tmp_path)
    assert str(path) in str(info.value) and "rerun the `leuko cv`" in str(info.value)
    assert path.read_text() == text  # left as it was
