"""`leuko import-medmnist`: MedMNIST 3D npz -> volumes + manifest with the official split, prepared as `generic`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from leuko.cli import main
from leuko.data.folds import TEST, TRAIN_ONLY, make_splits
from leuko.data.manifest import read_manifest
from leuko.data.medmnist import dataset_name, import_medmnist
from leuko.data.prepare import prepare
from leuko.data.prepared import load_prepared

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "medmnist3d"


def _npz(path: Path, n=(6, 3, 4), size=8, seed=0) -> Path:
    """A MedMNIST-like file: binary {0, 255} uint8 cubes, labels (N, 1) in {0, 1}."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        images = np.zeros((count, size, size, size), np.uint8)
        labels = (np.arange(count) % 2).astype(np.uint8)[:, None]
        for i in range(count):
            c = rng.integers(2, size - 2, 3)
            images[i, c[0] - 1 : c[0] + 2, c[1] - 1 : c[1] + 2, c[2] - 1 : c[2] + 2] = 255
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez_compressed(path, **arrays)
    return path


def test_import_writes_volumes_and_a_valid_manifest_with_the_split(tmp_path):
    npz = _npz(tmp_path / "vesselmnist3d.npz")
    manifest = import_medmnist(npz, tmp_path / "vessel")
    cells = read_manifest(manifest, classes=["vessel", "aneurysm"])
    assert len(cells) == 13
    assert cells["split"].value_counts().to_dict() == {"train": 6, "test": 4, "val": 3}
    assert (cells["modality"] == "generic").all() and (cells["sample_type"] == "vessel").all()
    assert cells["patient_id"].is_unique  # no subject ids in MedMNIST: one patient per volume
    assert list(cells.loc[cells["split"] == "val", "label"]) == ["vessel", "aneurysm", "vessel"]
    first = np.load(cells.loc[0, "abs_path"])
    np.testing.assert_array_equal(first, np.load(npz)["train_images"][0])  # stored as given: uint8 (D, H, W)
    assert first.dtype == np.uint8


def test_prepared_generic_volumes_are_scaled_not_recentred(tmp_path):
    npz = _npz(tmp_path / "vesselmnist3d.npz")
    manifest = import_medmnist(npz, tmp_path / "vessel")
    prepare(manifest, tmp_path / "prepared", shape=(8, 8, 8), classes=["vessel", "aneurysm"], progress=False)
    volumes, index, meta = load_prepared(tmp_path / "prepared")
    assert meta["modality"] == "generic" and meta["classes"] == ["vessel", "aneurysm"]
    raw = np.load(npz)["train_images"][0].astype(np.float32)
    # median 0, p99.5 - p0.5 = 255: x = v / 255, and the blob stays where it was (no centring on it)
    np.testing.assert_allclose(volumes[0, 0], raw / 255.0)
    assert list(index["split"][:6]) == ["train"] * 6


def test_split_column_drives_folds_and_the_datamodule(tmp_path):
    from leuko.data.datamodule import LeukoDataModule

    npz = _npz(tmp_path / "vesselmnist3d.npz")
    manifest = import_medmnist(npz, tmp_path / "vessel")
    splits = make_splits(read_manifest(manifest, classes=None))
    assert splits["fold"].value_counts().to_dict() == {TRAIN_ONLY: 6, TEST: 4, "0": 3}
    prepare(manifest, tmp_path / "prepared", shape=(8, 8, 8), classes=["vessel", "aneurysm"], progress=False)
    dm = LeukoDataModule(prepared_dir=str(tmp_path / "prepared"), fold=0, num_workers=0)
    assert dm.fold_names == ["0"]
    assert [len(dm.subset(s)) for s in ("train", "val", "test")] == [6, 3, 4]
    assert set(dm.subset("val")["cell_id"]) == {"val_0", "val_1", "val_2"}


def test_import_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        import_medmnist(tmp_path / "none.npz", tmp_path / "o")
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((2, 4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="lacks array\\(s\\) train_labels, val_images"):
        import_medmnist(tmp_path / "bad.npz", tmp_path / "o")
    npz = _npz(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="labels go up to 1 but 1 class name"):
        import_medmnist(npz, tmp_path / "o", classes=["only"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an earlier MedMNIST import"):
        import_medmnist(npz, tmp_path / "busy")
    # an earlier import is replaced; unknown datasets get class_<i> names
    manifest = import_medmnist(npz, tmp_path / "again")
    manifest = import_medmnist(npz, tmp_path / "again", limit=2)
    assert len(pd.read_csv(manifest)) == 6 and set(pd.read_csv(manifest)["label"]) == {"class_0", "class_1"}
    assert dataset_name("a/vesselmnist3d_64.npz") == "vesselmnist3d"


def _relabel(npz: Path, **labels) -> Path:
    """The file with some splits' labels replaced."""
    arrays = dict(np.load(npz))
    for split, values in labels.items():
        arrays[f"{split}_labels"] = np.asarray(values)[:, None]
    np.savez(npz, **arrays)
    return npz


def test_labels_must_be_integers_within_the_classes(tmp_path):
    from leuko.data.medmnist import MedMNISTError

    npz = _relabel(_npz(tmp_path / "vesselmnist3d.npz"), train=[0, 1, -1, 0, 1, 0])
    with pytest.raises(MedMNISTError, match=r"not class indices \(whole numbers from 0\): train_labels\[2\] = -1;"):
        import_medmnist(npz, tmp_path / "out")
    npz = _relabel(npz, train=[0, 1, 0, 0, 1, 0], val=[0.7, 1.9, 1.0])
    with pytest.raises(MedMNISTError, match=r"not class indices .*: val_labels\[0\] = 0\.7, val_labels\[1\] = 1\.9;"):
        import_medmnist(npz, tmp_path / "out")
    npz = _relabel(npz, val=[0, 1, 1], test=[0, 1, 2, 1])
    known = r"labels go up to 2 but 2 class name\(s\) are known"
    with pytest.raises(MedMNISTError, match=known + r" \(vessel, aneurysm\): test_labels\[2\] = 2;"):
        import_medmnist(npz, tmp_path / "out")
    with pytest.raises(MedMNISTError, match=known + r" \(a, b\): test_labels\[2\] = 2;"):
        import_medmnist(npz, tmp_path / "out", classes=["a", "b"])
    assert not (tmp_path / "out").exists()
    # integral floats are unambiguous, and labels of cells left out by limit are not looked at
    npz = _relabel(npz, val=[0.0, 1.0, 1.0], test=[0, 1, 1, 7])
    manifest = import_medmnist(npz, tmp_path / "out", limit=3)
    assert pd.read_csv(manifest)["label"].tolist()[3:6] == ["vessel", "aneurysm", "aneurysm"]


def test_cli_prints_counts_and_the_next_step(tmp_path, capsys):
    npz = _npz(tmp_path / "vesselmnist3d.npz")
    assert main(["import-medmnist", str(npz), "--out", str(tmp_path / "v")]) == 0
    out = capsys.readouterr().out
    assert "train vessel 3, aneurysm 3" in out and "--shape 8 8 8 --classes vessel,aneurysm" in out
    assert main(["import-medmnist", str(tmp_path / "none.npz"), "--out", str(tmp_path / "w")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_multistep_schedule_of_the_medmnist_protocol():
    """lr x0.1 at 50% and 75% of training, as the MedMNIST benchmark trains."""
    from leuko.training.module import VolumeClassifier

    model = VolumeClassifier(
        net="fishnet3d_tiny", num_classes=2, scheduler="multistep", warmup_epochs=0, optimizer="adam", weight_decay=0.0
    )

    class _Trainer:
        estimated_stepping_batches = 100
        max_epochs = 10

    model._trainer = _Trainer()  # configure_optimizers reads only these two
    config = model.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    factors = [scheduler.lr_lambdas[0](step) for step in (0, 49, 50, 74, 75, 99)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="milestones"):
        VolumeClassifier(net="fishnet3d_tiny", scheduler="multistep", milestones=(50, 75))


@pytest.mark.skipif(
    not (SHARED / "vesselmnist3d.npz").is_file(),
    reason=f"VesselMNIST3D is not at {SHARED} (the shared data folder is absent)",
)
def test_real_vesselmnist3d(tmp_path):
    manifest = import_medmnist(SHARED / "vesselmnist3d.npz", tmp_path / "vessel", limit=10)
    cells = read_manifest(manifest, classes=["vessel", "aneurysm"])
    assert len(cells) == 30 and np.load(cells.loc[0, "abs_path"]).shape == (28, 28, 28)
    info = (tmp_path / "vessel" / "medmnist.json").read_text()
    assert '"vessel"' in info and '"aneurysm"' in info
