"""MedMNIST 3D `.npz` files (Yang et al., MedMNIST v2, Scientific Data 2023) -> volumes and a leuko manifest.

An npz holds train_images/val_images/test_images (N, D, H, W) uint8 and train_labels/... (N, 1). Each volume
becomes volumes/<split>/<split>_<i>.npy (uint8 as stored: read_volume gives float32, and `generic`
modality normalises per volume), the manifest keeps the official split in a `split` column, which
make_splits and the DataModule honour (val is the single fold "0", test is held out).

MedMNIST has no subject ids: every volume gets its own patient_id, so nothing is grouped by patient and
per-"sample" differentials are meaningless for it. Voxel sizes are not given either; they are set to 1.
"""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leuko.data.manifest import OPTIONAL_COLUMNS, REQUIRED_COLUMNS
from leuko.data.swap import recover, staging_dir, swap_into_place
from leuko.errors import LeukoError

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.csv"
INFO = "medmnist.json"  # source, dataset, classes, counts per split, shape, dtype
MANIFEST_COLUMNS = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)  # modality, split
# Class names per dataset, from the MedMNIST v2 INFO table (medmnist/info.py); index = label value.
KNOWN_CLASSES = {
    "vesselmnist3d": ("vessel", "aneurysm"),
    "adrenalmnist3d": ("normal", "hyperplasia"),
    "nodulemnist3d": ("benign", "malignant"),
    "fracturemnist3d": ("buckle", "nondisplaced", "displaced"),
    "synapsemnist3d": ("inhibitory", "excitatory"),
    "organmnist3d": (
        "liver",
        "kidney-right",
        "kidney-left",
        "femur-right",
        "femur-left",
        "bladder",
        "heart",
        "lung-right",
        "lung-left",
        "spleen",
        "pancreas",
    ),
}
SAMPLE_TYPES = {
    "vesselmnist3d": "vessel",
    "adrenalmnist3d": "adrenal",
    "nodulemnist3d": "lung nodule",
    "fracturemnist3d": "rib",
    "synapsemnist3d": "synapse",
    "organmnist3d": "abdomen",
}


class MedMNISTError(LeukoError, ValueError):
    """A MedMNIST .npz, class list or --out folder that cannot be imported; the message says the fix."""


def dataset_name(path: str | Path) -> str:
    """vesselmnist3d from .../vesselmnist3d.npz or .../vesselmnist3d_64.npz."""
    stem = Path(path).name.removesuffix(".npz").lower()
    for size in ("_28", "_64"):
        stem = stem.removesuffix(size)
    return stem


def import_medmnist(
    npz: str | Path,
    out_dir: str | Path,
    *,
    classes: Sequence[str] | None = None,
    sample_type: str | None = None,
    limit: int | None = None,
) -> Path:
    """Write out_dir/volumes/<split>/*.npy, out_dir/manifest.csv and out_dir/medmnist.json; return the manifest.

    classes: names for label values 0..K-1 (default: KNOWN_CLASSES for the file's dataset, else "class_<i>").
    limit: keep at most this many volumes per split (quick checks). out_dir must be new, empty or an earlier
    import (which is replaced)."""
    npz, out_dir = Path(npz), Path(out_dir)
    data = _open_npz(npz)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / INFO).is_file())):
        raise MedMNISTError(
            f"{out_dir} exists and is not an earlier MedMNIST import; choose a new or empty folder for --out"
        )
    name = dataset_name(npz)
    arrays = {split: _split_arrays(data, npz, split, limit) for split in SPLITS}
    _check_label_values(npz, arrays)
    n_classes = 1 + max(int(lab.max()) for _, lab in arrays.values() if len(lab))
    if classes is None:
        classes = KNOWN_CLASSES.get(name, tuple(f"class_{i}" for i in range(n_classes)))
    classes = [str(c) for c in classes]
    if len(classes) < n_classes:
        raise MedMNISTError(
            f"{npz}: labels go up to {n_classes - 1} but {len(classes)} class name(s) are known "
            f"({', '.join(classes)}): {_label_list(arrays, lambda lab: lab >= len(classes))}; "
            "give one name per label value (--classes), or fix these labels"
        )
    arrays = {split: (images, labels.astype(np.int64)) for split, (images, labels) in arrays.items()}
    sample_type = sample_type or SAMPLE_TYPES.get(name, name)

    for message in recover(out_dir):  # what an interrupted run left beside out_dir
        warnings.warn(message, stacklevel=2)
    tmp = staging_dir(out_dir)
    try:
        _write_volumes_and_manifest(tmp, arrays, classes, name=name, sample_type=sample_type)
        info = {
            "source": str(npz.resolve()),
            "dataset": name,
            "classes": classes,
            "counts": {s: {c: int((lab == i).sum()) for i, c in enumerate(classes)} for s, (_, lab) in arrays.items()},
            "shape": list(arrays["train"][0].shape[1:]),
            "dtype": str(arrays["train"][0].dtype),
            "note": "no subject ids in MedMNIST: patient_id is unique per volume; voxel sizes unknown (set to 1)",
        }
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / MANIFEST


def _open_npz(npz: Path):
    """The arrays of a MedMNIST .npz, which must hold <split>_images and <split>_labels for every split."""
    if not npz.is_file():
        raise FileNotFoundError(f"{npz}: no such file; give the path of a MedMNIST 3D .npz (e.g. vesselmnist3d.npz)")
    try:
        data = np.load(npz)
        keys = set(data.files)
    except (OSError, ValueError) as exc:
        raise MedMNISTError(f"{npz}: not a readable .npz file ({exc})") from exc
    missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in keys]
    if missing:
        raise MedMNISTError(
            f"{npz}: lacks array(s) {', '.join(missing)} (has {', '.join(sorted(keys))}); "
            "a MedMNIST file holds train/val/test _images and _labels"
        )
    return data


def _split_arrays(data, npz: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, [C,] D, H, W), integer labels (N,)) of one split, the first `limit` of them."""
    images, labels = data[f"{split}_images"], data[f"{split}_labels"]
    if images.ndim == 5 and images.shape[-1] in (1, 3):  # (N, D, H, W, C): channels last in MedMNIST+
        images = np.moveaxis(images, -1, 1)
    if images.ndim not in (4, 5):
        raise MedMNISTError(f"{npz}: {split}_images has shape {images.shape}; expected (N, D, H, W) volumes")
    labels = np.asarray(labels).reshape(len(labels), -1)
    if labels.shape[1] != 1 or len(labels) != len(images):
        raise MedMNISTError(
            f"{npz}: {split}_labels has shape {data[f'{split}_labels'].shape}; expected "
            f"({len(images)}, 1) single labels (multi-label MedMNIST sets are not supported)"
        )
    keep = slice(None) if limit is None else slice(0, limit)
    return images[keep], labels[keep, 0]


def _check_label_values(npz: Path, arrays: dict) -> None:
    """Every label a class index: a whole number from 0 (not -1, not 0.7, not NaN)."""
    for split, (_, labels) in arrays.items():
        if labels.dtype.kind not in "biuf":
            raise MedMNISTError(
                f"{npz}: {split}_labels holds {labels.dtype} values; labels are class indices 0, 1, ..."
            )

    def bad(labels: np.ndarray) -> np.ndarray:
        values = labels.astype(np.float64)
        with np.errstate(invalid="ignore"):
            return ~(np.isfinite(values) & (values >= 0) & (values == np.floor(values)))

    if any(bad(labels).any() for _, labels in arrays.values()):
        raise MedMNISTError(
            f"{npz}: label(s) that are not class indices (whole numbers from 0): {_label_list(arrays, bad)};"
            " fix them in the file"
        )


def _label_list(arrays: dict, is_bad, limit: int = 5) -> str:
    """The labels where is_bad(labels) holds, as "train_labels[2] = -1, val_labels[0] = 0.7 and 3 more"."""
    found = [
        f"{split}_labels[{i}] = {labels[i].item():g}"
        for split, (_, labels) in arrays.items()
        for i in np.flatnonzero(is_bad(labels))
    ]
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return ", ".join(found[:limit]) + more


def _write_volumes_and_manifest(tmp: Path, arrays: dict, classes: list[str], *, name: str, sample_type: str) -> None:
    """tmp/volumes/<split>/<cell_id>.npy and tmp/manifest.csv."""
    rows = []
    for split, (images, labels) in arrays.items():
        folder = tmp / "volumes" / split
        folder.mkdir(parents=True)
        width = len(str(max(len(images) - 1, 0)))
        for i, (volume, label) in enumerate(zip(images, labels)):
            cell_id = f"{split}_{i:0{width}d}"
            np.save(folder / f"{cell_id}.npy", np.ascontiguousarray(volume))  # (D, H, W) or (C, D, H, W)
            # No subject ids in MedMNIST: one "patient" per volume, so patient grouping is a no-op.
            path = f"volumes/{split}/{cell_id}.npy"
            rows.append(
                [cell_id, path, classes[label], f"{name}_{cell_id}", sample_type, 1.0, 1.0, 1.0, "generic", split]
            )
    with open(tmp / MANIFEST, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
