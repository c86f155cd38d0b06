"""Data commands: `leuko phantoms`, `folds`, `prepare`, `import-medmnist` and `features`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from leuko.cli.command import UsageError, add_command
from leuko.data.optics import DEFAULT_CLASSES, N_MEDIUM, RI_CELL_THRESHOLD, RI_INCREMENT_ML_PER_G


def add_parsers(sub) -> None:
    _add_phantoms(sub)
    _add_folds(sub)
    _add_prepare(sub)
    _add_import_medmnist(sub)
    _add_features(sub)


def _shape(values: list[int]) -> tuple[int, int, int]:
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) < 16:
        raise UsageError(f"--shape {' '.join(map(str, values))}: give D H W (or one size for a cube), each at least 16")
    return tuple(values)


def _add_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shape", type=int, nargs="+", default=[32], metavar="N", help="D H W, or one size for a cube (default 32)"
    )


# ---------------------------------------------------------------------------------------------- phantoms
def _add_phantoms(sub) -> None:
    p = add_command(
        sub,
        "phantoms",
        "make the embedded synthetic cohort (volumes, manifest.csv, cohort.json)",
        """
        leuko phantoms --out data
        leuko phantoms --out data_hhg --modality hhg --format tif
        leuko phantoms --out big --patients 48 --cells-per-patient 200 --shape 48 96 96
        """,
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--patients", type=int, default=24, help="number of patients (default 24)")
    p.add_argument("--cells-per-patient", type=int, default=60, help="cells per patient (default 60)")
    _add_shape(p)
    p.add_argument(
        "--modality", choices=["ri", "hhg"], default="ri", help="ri: refractive index, 1 channel; hhg: THG+SHG"
    )
    p.add_argument("--format", choices=["npy", "tif", "nii.gz", "h5"], default="npy", help="volume file format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_phantoms)


def cmd_phantoms(args: argparse.Namespace) -> None:
    # heavy imports here: keeps `leuko --help` instant
    from leuko.data.phantoms import make_cohort

    manifest = make_cohort(
        args.out,
        n_patients=args.patients,
        cells_per_patient=args.cells_per_patient,
        shape=_shape(args.shape),
        modality=args.modality,
        fmt=args.format,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(f"wrote {manifest} (volumes beside it, cohort.json with each patient's true differential)")


# ---------------------------------------------------------------------------------------------- folds
def _add_folds(sub) -> None:
    p = add_command(
        sub,
        "folds",
        "split cells into patient-grouped, class-stratified folds plus held-out test patients",
        """
        leuko folds --manifest data/manifest.csv --out splits.csv
        leuko folds --manifest data/manifest.csv --k 3 --test-fraction 0.25 --seed 1 --out splits.csv
        """,
    )
    p.add_argument(
        "--manifest", required=True, help="manifest.csv (cell_id, path, label, patient_id, sample_type, ...)"
    )
    p.add_argument("--out", required=True, help="CSV to write: cell_id, patient_id, label, sample_type, fold")
    p.add_argument("--k", type=int, default=5, help="number of folds (default 5)")
    p.add_argument(
        "--test-fraction", type=float, default=0.2, help="fraction of patients held out for test (default 0.2)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_folds)


def cmd_folds(args: argparse.Namespace) -> None:
    # heavy imports here: keeps `leuko --help` instant
    from leuko.data.folds import make_splits, summarize, write_splits
    from leuko.data.manifest import read_manifest

    cells = read_manifest(args.manifest, classes=None, check_files=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = make_splits(cells, k=args.k, test_fraction=args.test_fraction, seed=args.seed)
    write_splits(splits, args.out)
    print(f"wrote {args.out}: {len(splits)} cells of {splits['patient_id'].nunique()} patients")
    print(summarize(splits).to_string())
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- prepare
def _add_prepare(sub) -> None:
    p = add_command(
        sub,
        "prepare",
        "validate a manifest and its volumes, normalise, crop/pad to one shape, write one memory-mapped array",
        """
        leuko prepare --manifest data/manifest.csv --out prepared
        leuko prepare --manifest data/manifest.csv --out prepared --shape 48 96 96 --skip-bad
        leuko prepare --manifest lab/manifest.csv --out prepared --classes neutrophil,lymphocyte --voxel-size 0.4 0.2 0.2
        """,  # noqa: E501 (an example line as users type it)
    )
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="folder for volumes.npy, index.csv, meta.json")
    _add_shape(p)
    p.add_argument("--classes", default=",".join(DEFAULT_CLASSES), help="comma-separated class list, in label order")
    p.add_argument(
        "--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"), help="resample to this voxel size (um)"
    )
    p.add_argument("--skip-bad", action="store_true", help="skip bad cells (listed in skipped.csv) instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> None:
    # heavy imports here: keeps `leuko --help` instant
    from leuko.data.prepare import prepare
    from leuko.data.prepared import INDEX, META, SKIPPED, VOLUMES

    result = prepare(
        args.manifest,
        args.out,
        shape=_shape(args.shape),
        classes=tuple(args.classes.split(",")) if args.classes else None,
        skip_bad=args.skip_bad,
        target_voxel_size=tuple(args.voxel_size) if args.voxel_size else None,
        progress=not args.quiet,
    )
    if result.up_to_date:
        print(f"{args.out} is up to date ({result.n_cells} cells); nothing to do")
        return
    print(f"wrote {result.n_cells} cells to {args.out} ({VOLUMES}, {INDEX}, {META})")
    if result.n_skipped:
        print(f"skipped {result.n_skipped} bad cells: see {args.out}/{SKIPPED}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- import-medmnist
def _add_import_medmnist(sub) -> None:
    p = add_command(
        sub,
        "import-medmnist",
        "turn a MedMNIST 3D .npz into volumes and a manifest, keeping the official train/val/test split",
        """
        leuko import-medmnist ../shared/data/medmnist3d/vesselmnist3d.npz --out vessel
        leuko prepare --manifest vessel/manifest.csv --out vessel_prepared --shape 28 --classes vessel,aneurysm
        python benchmarks/medmnist.py --seeds 3          # the recipe for real volumes, mean and CI over 3 seeds
        the split column makes val the single fold 0 and holds test out; MedMNIST has no subject ids, so
        every volume is its own patient. Modality generic: per-volume robust scaling, no re-centring.
        """,
    )
    p.add_argument("npz", help="a MedMNIST 3D .npz (train/val/test _images and _labels)")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created): volumes/, manifest.csv, medmnist.json"
    )
    p.add_argument(
        "--classes",
        default=None,
        metavar="A,B",
        help="comma-separated names for labels 0, 1, ... (default: from the dataset)",
    )
    p.add_argument(
        "--limit", type=int, default=None, metavar="N", help="at most this many volumes per split (quick checks)"
    )
    p.set_defaults(func=cmd_import_medmnist)


def cmd_import_medmnist(args: argparse.Namespace) -> None:
    # heavy imports here: keeps `leuko --help` instant
    from leuko.data.medmnist import import_medmnist

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    manifest = import_medmnist(args.npz, args.out, classes=classes, limit=args.limit)
    info = json.loads((manifest.parent / "medmnist.json").read_text())
    print(
        f"wrote {manifest} and {sum(sum(c.values()) for c in info['counts'].values())} volumes "
        f"{'x'.join(map(str, info['shape']))} ({info['dataset']}; classes {', '.join(info['classes'])})"
    )
    for split, counts in info["counts"].items():
        print(f"  {split:<5} " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    shape = " ".join(str(s) for s in info["shape"][-3:])
    print(
        f"next: leuko prepare --manifest {manifest} --out {args.out.rstrip('/')}_prepared --shape {shape} "
        f"--classes {','.join(info['classes'])}"
    )


# ---------------------------------------------------------------------------------------------- features
def _add_features(sub) -> None:
    p = add_command(
        sub,
        "features",
        "measure the six morphology features of the RI study for every cell (volume, area, sphericity, dry mass, ...)",
        """
        leuko features --manifest data/manifest.csv --out features.csv
        leuko features --manifest data/manifest.csv --out features.csv --plot features.png
        leuko features --manifest lab/manifest.csv --out f.csv --threshold 1.355 --n-medium 1.334
        leuko features --manifest hhg/manifest.csv --out f.csv --hhg-threshold 120   # THG volumes: no RI features
        reads the raw volumes of the manifest (absolute RI), not the prepared (normalised) copy.
        """,
    )
    p.add_argument("--manifest", required=True, metavar="CSV", help="manifest.csv of the raw volumes")
    p.add_argument(
        "--out",
        required=True,
        metavar="CSV",
        help="CSV to write: cell_id, patient_id, label, sample_type, modality, features",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=RI_CELL_THRESHOLD,
        metavar="RI",
        help=f"RI above which a voxel is cell (default {RI_CELL_THRESHOLD})",
    )
    p.add_argument(
        "--n-medium", type=float, default=N_MEDIUM, metavar="RI", help=f"RI of the medium (default {N_MEDIUM})"
    )
    p.add_argument(
        "--increment",
        type=float,
        default=RI_INCREMENT_ML_PER_G,
        metavar="ML_G",
        help=f"RI increment of protein, mL/g (default {RI_INCREMENT_ML_PER_G})",
    )
    p.add_argument(
        "--hhg-threshold",
        type=float,
        default=None,
        metavar="I",
        help="THG intensity counted as cell for hhg volumes (default: background median + 3 noise SDs)",
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw each feature's distribution per class")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_features)


def cmd_features(args: argparse.Namespace) -> None:
    # heavy imports here: keeps `leuko --help` instant
    from leuko.evaluation.morphology import FEATURES, feature_plot, features_table

    table = features_table(
        args.manifest,
        threshold=args.threshold,
        n_medium=args.n_medium,
        increment=args.increment,
        hhg_threshold=args.hhg_threshold,
        progress=not args.quiet,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(f"wrote {out}: {len(table)} cells x {len(FEATURES)} features ({', '.join(FEATURES)})")
    medians = table.groupby("label")[list(FEATURES)].median().dropna(axis=1, how="all")
    print("median per class:\n" + medians.to_string(float_format=lambda v: f"{v:.4g}"))
    if args.plot:
        print(f"wrote {feature_plot(table, args.plot)}")
