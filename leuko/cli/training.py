"""Training commands: `leuko cv`, and LightningCLI's fit, validate, test and predict passed through as they are.

The LightningCLI commands are parsed by LightningCLI itself (leuko.training.cli); their entries here only
list them in `leuko --help`. `leuko predict --model URI` is leuko.cli.deploy's, not LightningCLI's.
"""

from __future__ import annotations

import argparse

from leuko.cli.command import add_command

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def add_parsers(sub) -> None:
    _add_cv(sub)


# ---------------------------------------------------------------------------------------------- cv
def _add_cv(sub) -> None:
    p = add_command(
        sub,
        "cv",
        "cross-validate by patient: train each fold, write out-of-fold predictions and metric mean/std",
        """
        leuko cv --config conf/experiment/phantoms_tiny.yaml
        leuko cv --config conf/experiment/phantoms_tiny.yaml --folds 0,1 --model.net vit3d_tiny
        leuko cv --config conf/experiment/phantoms_tiny.yaml --trainer.max_epochs 20 --name long
        leuko cv --config conf/experiment/real_volumes.yaml --data.prepared_dir mine   # a lab's own volumes
        any further --section.key value is a config override, as for `leuko fit`.
        fold f trains with seed_everything + f (fold 0 as `leuko fit --data.fold 0`), so the fold models of
        `leuko register --ensemble` start from different weights; each fold's config.yaml records its seed.
        outputs: <out>/<name>/fold_<f>/ (checkpoints, config.yaml), oof_predictions.csv, cv_summary.json.
        """,
    )
    p.add_argument("--config", action="append", required=True, help="YAML config (repeat to layer files)")
    p.add_argument("--folds", help="comma-separated folds to run (default: all)")
    p.add_argument("--name", default=None, help="name of the CV (MLflow parent run, output folder); default cv-<time>")
    p.add_argument("--out", default="runs", help="parent folder of the CV output (default runs)")
    p.add_argument(
        "--replace",
        action="store_true",
        help="when <out>/<name> holds an earlier CV, delete that folder and run there (default: refuse)",
    )
    p.set_defaults(func=cmd_cv, takes_rest=True)


def cmd_cv(args: argparse.Namespace, rest: list[str]) -> None:
    # heavy imports here: keeps `leuko --help` instant
    from leuko.training.cv import cross_validate

    folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    cross_validate(config=args.config, overrides=rest, folds=folds, name=args.name, out=args.out, replace=args.replace)


# ------------------------------------------------------------------------------ fit, validate, test, predict
def add_lightning_parsers(sub) -> None:
    """Entries for `leuko --help` only (listed last there); LightningCLI parses these commands."""
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(
            name,
            help=f"LightningCLI {name} (see `leuko {name} --help`)"
            if name != "predict"
            else "LightningCLI predict on prepared data; with --model URI a registered model on volume files "
            "(see `leuko predict --model URI --help`)",
            add_help=False,
        )


def run_lightning(argv: list[str]) -> None:
    """`leuko fit|validate|test|predict ...`: argv as LightningCLI takes it, the command first."""
    # heavy imports here (torch, lightning): keeps `leuko --help` instant
    from leuko.training.cli import run

    run(argv)
