"""The `leuko` command. Thin: parses arguments and calls the modules that do the work.

Heavy imports (torch, lightning, mlflow) happen inside the subcommands so `leuko --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class UsageError(Exception):
    """A user-facing error: printed as one message, exit code 2, no traceback."""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add(sub, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=_formatter,
    )


def _shape(values: list[int]) -> tuple[int, int, int]:
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) < 4:
        raise UsageError(f"--shape {' '.join(map(str, values))}: give D H W (or one size for a cube), each at least 4")
    return tuple(values)


# ---------------------------------------------------------------------------------------------- phantoms
def cmd_phantoms(args: argparse.Namespace) -> None:
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
def cmd_folds(args: argparse.Namespace) -> None:
    import warnings

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
def cmd_prepare(args: argparse.Namespace) -> None:
    from leuko.data.prepare import prepare

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
    print(f"wrote {result.n_cells} cells to {args.out} (volumes.npy, index.csv, meta.json)")
    if result.n_skipped:
        print(f"skipped {result.n_skipped} bad cells: see {args.out}/skipped.csv", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- cv
def cmd_cv(args: argparse.Namespace, rest: list[str]) -> None:
    from leuko.cv import cross_validate

    folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    cross_validate(config=args.config, overrides=rest, folds=folds, name=args.name, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leuko",
        description="Label-free 3D leukocyte differentiation: train, tune, track, version and ship 3D classifiers.",
        epilog=textwrap.dedent(
            """
            typical workflow:
              leuko phantoms --out data                          # the embedded default cohort
              leuko prepare --manifest data/manifest.csv --out prepared
              leuko cv --config conf/experiment/phantoms_tiny.yaml
              leuko fit --config conf/experiment/phantoms_tiny.yaml --print_config
            run `leuko COMMAND --help` for each command's options and examples.
            """
        ),
        formatter_class=_formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _add(
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
    p.add_argument("--shape", type=int, nargs="+", default=[32], metavar="N", help="D H W, or one size for a cube (default 32)")
    p.add_argument("--modality", choices=["ri", "hhg"], default="ri", help="ri: refractive index, 1 channel; hhg: THG+SHG")
    p.add_argument("--format", choices=["npy", "tif", "nii.gz", "h5"], default="npy", help="volume file format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_phantoms)

    p = _add(
        sub,
        "folds",
        "split cells into patient-grouped, class-stratified folds plus held-out test patients",
        """
        leuko folds --manifest data/manifest.csv --out splits.csv
        leuko folds --manifest data/manifest.csv --k 3 --test-fraction 0.25 --seed 1 --out splits.csv
        """,
    )
    p.add_argument("--manifest", required=True, help="manifest.csv (cell_id, path, label, patient_id, sample_type, ...)")
    p.add_argument("--out", required=True, help="CSV to write: cell_id, patient_id, label, sample_type, fold")
    p.add_argument("--k", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of patients held out for test (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_folds)

    p = _add(
        sub,
        "prepare",
        "validate a manifest and its volumes, normalise, crop/pad to one shape, write one memory-mapped array",
        """
        leuko prepare --manifest data/manifest.csv --out prepared
        leuko prepare --manifest data/manifest.csv --out prepared --shape 48 96 96 --skip-bad
        leuko prepare --manifest lab/manifest.csv --out prepared --classes neutrophil,lymphocyte --voxel-size 0.4 0.2 0.2
        """,
    )
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="folder for volumes.npy, index.csv, meta.json")
    p.add_argument("--shape", type=int, nargs="+", default=[32], metavar="N", help="D H W, or one size for a cube (default 32)")
    p.add_argument(
        "--classes", default="neutrophil,eosinophil,lymphocyte,monocyte", help="comma-separated class list, in label order"
    )
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"), help="resample to this voxel size (um)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad cells (listed in skipped.csv) instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = _add(
        sub,
        "cv",
        "cross-validate by patient: train each fold, write out-of-fold predictions and metric mean/std",
        """
        leuko cv --config conf/experiment/phantoms_tiny.yaml
        leuko cv --config conf/experiment/phantoms_tiny.yaml --folds 0,1 --model.net vit3d_tiny
        leuko cv --config conf/experiment/phantoms_tiny.yaml --trainer.max_epochs 20 --name long
        any further --section.key value is a config override, as for `leuko fit`.
        """,
    )
    p.add_argument("--config", action="append", required=True, help="YAML config (repeat to layer files)")
    p.add_argument("--folds", help="comma-separated folds to run (default: all)")
    p.add_argument("--name", default=None, help="name of the CV (MLflow parent run, output folder); default cv-<time>")
    p.add_argument("--out", default="runs", help="parent folder of the CV output (default runs)")
    p.set_defaults(func=cmd_cv, takes_rest=True)

    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (see `leuko {name} --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from leuko.lightning_cli import run

        return _guarded(argv[0], lambda: run(argv))
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "takes_rest", False):
        return _guarded(args.command, lambda: args.func(args, rest))
    return _guarded(args.command, lambda: args.func(args))


def _guarded(command: str, work) -> int:
    """Run a command; boundary errors (bad manifests, volumes, splits, configs) become one clear message."""
    import os

    try:
        work()
    except UsageError as err:
        print(f"leuko {command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("LEUKO_DEBUG"):
            raise
        print(f"leuko {command}: error: {err}\n(set LEUKO_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
