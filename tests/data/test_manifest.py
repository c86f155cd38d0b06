import numpy as np
import pytest

from leuko.data.manifest import (
    REQUIRED_COLUMNS,
    ManifestError,
    Problem,
    read_manifest,
    read_manifest_table,
    validate_manifest,
)

HEADER = ",".join(REQUIRED_COLUMNS)


def _write(tmp_path, lines, header=HEADER, files=("a.npy", "b.npy", "c.npy")):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / name, np.zeros((2, 2, 2)))
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


GOOD = [
    "007,a.npy,neutrophil,p1,blood,0.5,0.2,0.2",
    "c2,b.npy,eosinophil,p1,blood,0.5,0.2,0.2",
    "c3,c.npy,monocyte,p2,BALF,0.5,0.2,0.2",
]


def _problems(path, **kwargs):
    with pytest.raises(ManifestError) as info:
        read_manifest(path, **kwargs)
    return info.value


def test_reads_a_valid_manifest(tmp_path):
    df = read_manifest(_write(tmp_path, GOOD))
    assert df["cell_id"].tolist() == ["007", "c2", "c3"]  # ids stay text
    assert df["line"].tolist() == [2, 3, 4]
    assert df["abs_path"].tolist() == [str(tmp_path / n) for n in ("a.npy", "b.npy", "c.npy")]
    assert df["voxel_size_z"].dtype == float and df["voxel_size_x"].iloc[0] == 0.2
    assert (df["modality"] == "ri").all()  # default when the column is absent


def test_paths_relative_to_the_manifest_folder_or_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    absolute = str(tmp_path / "b.npy")
    df = read_manifest(_write(tmp_path, [GOOD[0], GOOD[1].replace("b.npy", absolute)], files=("a.npy", "b.npy")))
    assert df["abs_path"].tolist() == [str(tmp_path / "a.npy"), absolute]


def test_blank_lines_keep_spreadsheet_line_numbers(tmp_path):
    df = read_manifest(_write(tmp_path, [GOOD[0], "", GOOD[1]]))
    assert df["line"].tolist() == [2, 4]


def test_reports_every_problem_at_once_with_lines(tmp_path):
    path = _write(
        tmp_path,
        [
            *GOOD,
            "c2,nope.npy,basophil,,blood,0,abc,0.2",
            "c5,a.npy,Neutrophil,p3,blood,0.5,0.2,-1",
        ],
    )
    error = _problems(path)
    text = str(error)
    assert text.startswith(f"{path}: 8 problems:")
    expected = [
        "line 5 (cell_id c2): duplicate cell_id 'c2', first used on line 3",
        f"line 5 (cell_id c2): file not found: {tmp_path / 'nope.npy'}",
        "line 5 (cell_id c2): label 'basophil' is not one of neutrophil, eosinophil, lymphocyte, monocyte;"
        " fix the label or change the class list with --classes",
        "line 5 (cell_id c2): empty patient_id",
        "line 5 (cell_id c2): voxel_size_z '0' must be a positive number",
        "line 5 (cell_id c2): voxel_size_y 'abc' is not a number",
        "line 6 (cell_id c5): label 'Neutrophil' is not one of",
    ]
    for piece in expected:
        assert piece in text, piece
    assert "did you mean 'neutrophil'" in text
    assert "voxel_size_x '-1' must be a positive number" in text
    assert len(error.problems) == 8
    assert all(p.startswith("line ") for p in error.problems)
    assert text.endswith(f"Fix these in {path} and run again.")


def test_missing_columns_listed_with_the_found_ones(tmp_path):
    path = _write(tmp_path, ["c1,a.npy,neutrophil,p1"], header="cell_id,path,label,patient")
    text = str(_problems(path))
    assert (
        "line 1: missing required column(s) patient_id, sample_type, voxel_size_z, voxel_size_y, voxel_size_x" in text
    )
    assert "found cell_id, path, label, patient" in text


def test_classes_none_accepts_any_label_and_custom_classes(tmp_path):
    path = _write(tmp_path, [GOOD[0].replace("neutrophil", "basophil")], files=("a.npy",))
    assert read_manifest(path, classes=None)["label"].tolist() == ["basophil"]
    assert read_manifest(path, classes=["basophil", "mast"])["label"].tolist() == ["basophil"]
    assert "not one of neutrophil" in str(_problems(path))


def test_split_and_modality_values(tmp_path):
    header = HEADER + ",modality,split"
    path = _write(tmp_path, [GOOD[0] + ",ri,train", GOOD[1] + ",RI,Test", GOOD[2] + ",ri,holdout"], header=header)
    text = str(_problems(path))
    assert "line 4 (cell_id c3): split 'holdout' is not one of train, val, test" in text
    df = read_manifest(_write(tmp_path, [GOOD[0] + ",ri,train", GOOD[1] + ",RI,Test"], header=header))
    assert df["split"].tolist() == ["train", "test"] and df["modality"].tolist() == ["ri", "ri"]


def test_mixed_modalities_are_one_problem_for_the_whole_file(tmp_path):
    header = HEADER + ",modality"
    path = _write(tmp_path, [GOOD[0] + ",ri", GOOD[1] + ",hhg", GOOD[2] + ",xray"], header=header)
    error = _problems(path)
    assert (
        "manifest: mixes modalities (hhg on line 3; ri on line 2); prepare one modality per manifest" in error.problems
    )
    assert "line 4 (cell_id c3): modality 'xray' is not one of ri, hhg, generic" in error.problems
    assert [p.is_row for p in error.details] == [False, True]


def test_rows_with_the_wrong_number_of_fields(tmp_path):
    path = _write(tmp_path, [GOOD[0], "c2,b.npy,eosinophil,p1,blood,0.5,0.2", GOOD[2] + ",extra"])
    text = str(_problems(path))
    assert "line 3 (cell_id c2): has 7 fields but the header has 8" in text
    assert "line 4 (cell_id c3): has 9 fields but the header has 8" in text


def test_check_files_false_skips_the_file_check(tmp_path):
    path = _write(tmp_path, GOOD, files=())
    assert "file not found" in str(_problems(path))
    assert len(read_manifest(path, check_files=False)) == 3


def test_unsupported_file_type(tmp_path):
    path = _write(tmp_path, [GOOD[0].replace("a.npy", "a.mat")], files=())
    assert "unsupported file type in path 'a.mat'; use one of .npy, .npz" in str(_problems(path))


def test_manifest_file_problems(tmp_path):
    assert "file not found" in str(_problems(tmp_path / "missing.csv"))
    (tmp_path / "empty.csv").write_text("")
    assert "file is empty" in str(_problems(tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text(HEADER + "\n")
    assert "manifest: has no cell rows below the header" in str(_problems(tmp_path / "header.csv"))


def test_validate_manifest_returns_problems_for_skipping(tmp_path):
    path = _write(tmp_path, [*GOOD, "c4,nope.npy,neutrophil,p2,blood,0.5,0.2,0.2"])
    problems = validate_manifest(read_manifest_table(path), tmp_path, ("neutrophil", "eosinophil", "monocyte"))
    assert len(problems) == 1
    assert problems[0] == Problem(5, "c4", problems[0].message) and problems[0].is_row
    assert str(problems[0]).startswith("line 5 (cell_id c4): file not found")
