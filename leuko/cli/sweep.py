"""`leuko sweep`: an Optuna study over model families and hyperparameters (leuko.sweep does the work)."""

from __future__ import annotations

import argparse
import sys

from leuko.cli.command import add_command


def add_parsers(sub) -> None:
    p = add_command(
        sub,
        "sweep",
        "Optuna study over model families and hyperparameters; each trial a cross-validated fit",
        """
        leuko sweep --space conf/sweep/default.yaml                     # the file's budget (8 min on 2 CPU cores)
        leuko sweep --space conf/sweep/default.yaml --budget 30m        # resumes the study for 30 more minutes
        leuko sweep --space conf/sweep/default.yaml --trials 20 --workers 2   # resumes: adds 20 trials
        leuko sweep --space conf/sweep/gpu.yaml --trials 200 --workers 4 --storage postgresql://optuna@db/leuko
        leuko sweep --space conf/sweep/default.yaml --trials 4 --trainer.strategy ddp --trainer.devices 2
        leuko sweep --space conf/sweep/default.yaml --leaderboard      # print the leaderboard only
        leuko sweep --space conf/sweep/default.yaml --fail-stale       # fail trials whose worker died
        further --section.key value arguments are config overrides for every trial, as for `leuko cv`.
        """,
    )
    p.add_argument(
        "--space",
        default="conf/sweep/default.yaml",
        help="sweep file: study, objective, search space (default conf/sweep/default.yaml)",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        help="new trials to run, over all workers (default: the sweep file's `trials`)",
    )
    p.add_argument(
        "--budget",
        default=None,
        metavar="TIME",
        help="wall time for new trials, e.g. 600, 600s, 10m, 1.5h (default: the sweep file's `budget`); "
        "with --trials, whichever ends first",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="worker processes on this machine sharing the study (default 1)"
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        help="extra config layered after the sweep file's (repeatable), e.g. conf/trainer/gpu.yaml",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="study storage: a journal file path, or a database URL "
        "(default: the sweep file's, else sweeps/STUDY.journal)",
    )
    p.add_argument("--out", default="sweeps", help="folder for trial outputs and leaderboard.csv (default sweeps)")
    p.add_argument("--leaderboard", action="store_true", help="print the leaderboard and exit")
    p.add_argument(
        "--fail-stale",
        action="store_true",
        help="mark RUNNING trials whose worker is gone as FAIL, then print the leaderboard",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=None,
        help="with --fail-stale: seconds without heartbeat before a trial counts as stale (0: every RUNNING trial)",
    )
    # set by the first worker when it starts the others
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--sweep-run-id", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_sweep, takes_rest=True)


def cmd_sweep(args: argparse.Namespace, rest: list[str]) -> None:
    # heavy imports here (optuna, mlflow, torch): keeps `leuko --help` instant
    from leuko.sweep.run import run_sweep

    try:
        run_sweep(
            args.space,
            trials=args.trials,
            budget=args.budget,
            workers=args.workers,
            configs=args.config,
            overrides=rest,
            storage=args.storage,
            out=args.out,
            fail_stale=args.fail_stale,
            grace=args.grace,
            leaderboard_only=args.leaderboard,
            worker_index=args.worker_index,
            sweep_run_id=args.sweep_run_id,
        )
    except KeyboardInterrupt:
        print(
            "leuko sweep: interrupted; the running trial is recorded as FAIL and finished trials stay in the "
            "study: run the same command again to add trials",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
