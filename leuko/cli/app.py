"""The `leuko` command. Thin: parses arguments and calls the modules that do the work.

One module per command group, each subcommand's parser beside its handler:

    data        phantoms, folds, prepare, import-medmnist, features
    training    cv; fit, validate, test, predict (LightningCLI, passed through)
    sweep       sweep
    tracking    register, lineage
    evaluation  evaluate, baselines, report
    deploy      predict --model URI (a registered model on volume files), export, explain

Heavy imports (torch, lightning, mlflow, optuna, pandas) happen inside the handlers so `leuko --help` is
instant. Errors: a LeukoError (or a missing file the user named) is an input error and prints as one line,
`leuko CMD: error: ...`, exit code 2 for a usage error and 1 for the others. Any other exception is a
fault in leuko or a library: its traceback is printed with a line asking to report it, exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback

from leuko.cli import data, deploy, evaluation, sweep, tracking, training
from leuko.cli.command import UsageError, formatter
from leuko.errors import LeukoError
from leuko.params import ParamsError, expand

__all__ = ["UsageError", "build_parser", "main"]

# Its name from when every handler lived here; callers still import it from leuko.cli.app.
_wants_model = deploy.wants_model


def build_parser() -> argparse.ArgumentParser:
    """The `leuko` parser with every subcommand except the LightningCLI ones, which only show in its help."""
    parser = argparse.ArgumentParser(
        prog="leuko",
        description="Label-free 3D leukocyte differentiation: train, tune, track, version and ship 3D classifiers.",
        epilog=textwrap.dedent(
            """
            typical workflow:
              leuko phantoms --out data                          # the embedded default cohort
              leuko prepare --manifest data/manifest.csv --out prepared
              leuko cv --config conf/experiment/phantoms_tiny.yaml --name demo
              leuko baselines --cv runs/demo --manifest data/manifest.csv
              leuko report --run runs/demo                       # evaluates, then runs/demo/report.html
              leuko fit --config conf/experiment/phantoms_tiny.yaml --print_config
            run `leuko COMMAND --help` for each command's options and examples.
            """
        ),
        formatter_class=formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (data, training, sweep, tracking, evaluation, deploy):
        group.add_parsers(sub)
    training.add_lightning_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `leuko predict --help` alone shows the registered-model predict (its description points to LightningCLI's)
    if argv and argv[0] == "predict" and (deploy.wants_model(argv[1:]) or argv[1:] in (["--help"], ["-h"])):
        args = deploy.predict_model_parser().parse_args(argv[1:])
        return _guarded("predict", lambda: args.func(args))
    if argv and argv[0] in training.LIGHTNING_COMMANDS:
        return _guarded(argv[0], lambda: training.run_lightning(argv))
    parser = build_parser()
    try:
        argv = expand(argv, parser)
    except ParamsError as err:
        print(f"leuko {argv[0]}: error: {err}", file=sys.stderr)
        return 2
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
    """Run a command. Input errors (a LeukoError: bad manifests, volumes, splits, configs, options; or a file
    the user named that does not exist) become one clear message; anything else keeps its traceback."""
    debug = bool(os.environ.get("LEUKO_DEBUG"))
    try:
        work()
    except (LeukoError, FileNotFoundError) as err:
        if debug:
            traceback.print_exc()
        usage = isinstance(err, UsageError)
        hint = "" if usage or debug else "\n(set LEUKO_DEBUG=1 to see the traceback)"
        print(f"leuko {command}: error: {err}{hint}", file=sys.stderr)
        return 2 if usage else 1
    except Exception:
        traceback.print_exc()
        print(
            f"leuko {command}: unexpected error (a fault in leuko or a library; the traceback is above); "
            "please report it with the command line",
            file=sys.stderr,
        )
        return 1
    return 0
