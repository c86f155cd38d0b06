"""Tracking commands: `leuko register` (refit, test, register a model) and `leuko lineage` (where a model came from)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from leuko.cli.command import UsageError, add_command
from leuko.deploy.decisions import DECISIONS, DEFAULT_DECISIONS
from leuko.deploy.tta import DEFAULT_TTA, TTA_MODES
from leuko.training.run_dir import OOF


def add_parsers(sub) -> None:
    _add_register(sub)
    _add_lineage(sub)


# ---------------------------------------------------------------------------------------------- register
def _add_register(sub) -> None:
    p = add_command(
        sub,
        "register",
        "refit the best trial on all non-test patients, test once, log and register the model "
        "(alias champion if better)",
        """
        leuko register --space conf/sweep/default.yaml                  # the study's best trial
        leuko register --space conf/sweep/default.yaml --trial 7 --name leuko-balf
        leuko register --config conf/experiment/phantoms_tiny.yaml --model.net vit3d_tiny --model.lr 0.002
        leuko register --config params.yaml --cv runs/dvc        # calibrated on that CV's out-of-fold cells
        leuko register --config params.yaml --ensemble --cv-dir runs/dvc --tta flip   # its 5 fold models, 8 views
        leuko register --space conf/sweep/default.yaml --ensemble       # runs a CV of the best trial first
        leuko register --config params.yaml --cv runs/dvc --decisions prevalence   # labels at the data's class mix
        MLFLOW_TRACKING_URI=http://127.0.0.1:5001 leuko register --space conf/sweep/default.yaml
        """,
    )
    p.add_argument(
        "--space",
        default="conf/sweep/default.yaml",
        help="sweep file naming the study (default conf/sweep/default.yaml)",
    )
    p.add_argument("--storage", default=None, help="study storage, when not the sweep file's")
    p.add_argument("--trial", type=int, default=None, help="register this trial instead of the best one")
    p.add_argument(
        "--config",
        action="append",
        default=[],
        help="register this config instead of a trial (repeatable; overrides may follow)",
    )
    p.add_argument(
        "--cv",
        default=None,
        metavar="DIR",
        help="a `leuko cv` of the same config: its out-of-fold predictions give the temperature and review "
        "threshold, its mean best epoch the refit's epochs unless --trainer.max_epochs is given, and its scores "
        "the version's leuko.cv_* tags (a trial from --space brings its own CV; an --ensemble is calibrated on "
        "its own CV)",
    )
    p.add_argument(
        "--ensemble",
        action="store_true",
        help="register the k fold models of a k-fold CV of the config (each trained without the test patients), "
        "their probabilities averaged, instead of one refit; the test report compares each fold model alone, "
        "the ensemble and the ensemble with --tta",
    )
    p.add_argument(
        "--cv-dir",
        default=None,
        metavar="DIR",
        help="with --ensemble: a finished `leuko cv` of the same config with all k folds, whose best checkpoints "
        "are the members (default: register runs that CV first, in OUT/<register folder>-cv)",
    )
    p.add_argument(
        "--tta",
        default=DEFAULT_TTA,
        choices=TTA_MODES,
        help=f"test-time augmentation the model applies (default {DEFAULT_TTA}): flip averages over the 8 flip "
        "combinations of D, H and W; flip_rot90 also turns each a quarter in (H, W) (16 views; needs H == W). "
        "Costs views x members forward passes per cell",
    )
    p.add_argument(
        "--decisions",
        default=DEFAULT_DECISIONS,
        choices=DECISIONS,
        help=f"how probabilities become labels (default {DEFAULT_DECISIONS}): balanced is the net's own argmax, "
        "trained on class-balanced batches (best balanced accuracy); prevalence adds class biases fitted with the "
        "temperature on the CV's out-of-fold cells, so labels and differentials follow the training data's class "
        "mix (best accuracy; needs --cv, a sweep trial or --ensemble)",
    )
    p.add_argument("--name", default="leuko", help="registered model name (default leuko)")
    p.add_argument(
        "--metric",
        default=None,
        help="test metric that decides champion vs challenger (default: the study's objective)",
    )
    p.add_argument("--out", default="runs", help="parent folder of the refit's checkpoints (default runs)")
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="with --space: skip the sweep file's baselines on the same held-out test patients",
    )
    p.set_defaults(func=cmd_register, takes_rest=True)


def cmd_register(args: argparse.Namespace, rest: list[str]) -> None:
    # heavy imports here: keeps `leuko --help` instant
    from leuko.tracking.registry import Source, print_summary, register, source_from_study

    if args.config:
        source = Source(configs=args.config, overrides=rest)
    elif rest:
        raise UsageError(f"config overrides ({' '.join(rest)}) need --config; a trial from --space brings its own")
    else:
        source = source_from_study(args.space, storage=args.storage, trial=args.trial)
        print(f"registering trial {source.trial} of study {source.study}", file=sys.stderr)
    if args.cv:
        if not (Path(args.cv) / OOF).is_file():
            raise UsageError(f"--cv {args.cv}: no {OOF} in it; give the output folder of a finished `leuko cv`")
        source.cv_dir = args.cv  # register() refits for the epochs this CV earned
    if args.cv_dir and not args.ensemble:
        raise UsageError(f"--cv-dir {args.cv_dir}: names the CV whose fold models form an ensemble; add --ensemble")
    result = register(
        source,
        name=args.name,
        metric=args.metric,
        out=args.out,
        ensemble=args.ensemble,
        cv_dir=args.cv_dir,
        tta=args.tta,
        decisions=args.decisions,
    )
    if result and not args.config and not args.no_baselines:
        # the sweep's own folder (--out of `leuko sweep`) holds its trials and the baselines it cached
        sweep_folder = Path(source.cv_dir).parent if source.cv_dir else None
        result["baselines"] = _heldout_baselines(args.space, result, sweep_folder)
    if result:
        print_summary(result)


def _heldout_baselines(space: str, result: dict, sweep_folder: Path | None) -> list[dict] | None:
    """The sweep file's baselines on the model's held-out test patients (cached in the sweep's folder, the one
    its trials ran in; sweeps/<study> when unknown), logged to the model's run as baseline/<key>/<metric>; None
    when the sweep file names none."""
    from mlflow import MlflowClient  # heavy imports here, as above
    from mlflow.entities import Metric

    from leuko.evaluation.heldout import sweep_baselines
    from leuko.evaluation.metrics import SCORES
    from leuko.sweep.space import load_sweep_config
    from leuko.tracking.runs import log_batch

    cfg = load_sweep_config(space)
    if not cfg.baselines:
        return None
    table = sweep_baselines(cfg.baselines, result["data"], sweep_folder or Path("sweeps") / cfg.study)
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"baseline/{r['key']}/{m}", float(r[m]), now, 0) for r in table.to_dict("records") for m in SCORES
    ]
    log_batch(MlflowClient(result["tracking_uri"]), result["run_id"], metrics=metrics)
    return [{"method": r["method"], **{m: r[m] for m in SCORES}} for r in table.to_dict("records")]


# ---------------------------------------------------------------------------------------------- lineage
def _add_lineage(sub) -> None:
    p = add_command(
        sub,
        "lineage",
        "where a model or run came from: data version (DVC) -> run (MLflow) -> model version, and how to get that data",
        """
        leuko lineage models:/leuko@champion
        leuko lineage models:/leuko/3 --json
        leuko lineage 0123456789abcdef0123456789abcdef          # a run id, e.g. one CV fold
        MLFLOW_TRACKING_URI=http://mlflow.lab:5001 leuko lineage models:/leuko@champion
        """,
    )
    p.add_argument("target", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID or a run id")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (MLFLOW_TRACKING_URI wins; default sqlite:///mlflow.db)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_lineage)


def cmd_lineage(args: argparse.Namespace) -> None:
    # heavy imports here: keeps `leuko --help` instant
    from leuko.tracking.lineage import format_lineage, lineage_json, resolve

    lineage = resolve(args.target, tracking_uri=args.tracking_uri)
    print(lineage_json(lineage) if args.json else format_lineage(lineage))
