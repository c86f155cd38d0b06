"""The `leuko` command. Thin: parses arguments and calls the modules that do the work.

Heavy imports (torch, lightning, mlflow) happen inside the subcommands so `leuko --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from leuko.errors import LeukoError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class UsageError(LeukoError):
    """A user-facing error: printed as one message, exit code 2, no traceback."""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add(sub, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    from leuko.cli.params import COMMAND_SECTIONS

    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=_formatter,
    )
    if name in COMMAND_SECTIONS:
        p.add_argument(
            "--params",
            metavar="FILE",
            help=f"read options from the `{name}:` section of FILE (params.yaml); options given here win",
        )
    return p


def _shape(values: list[int]) -> tuple[int, int, int]:
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) < 16:
        raise UsageError(f"--shape {' '.join(map(str, values))}: give D H W (or one size for a cube), each at least 16")
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
    from leuko.training.cv import cross_validate

    folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    cross_validate(config=args.config, overrides=rest, folds=folds, name=args.name, out=args.out)


# ---------------------------------------------------------------------------------------------- sweep
def cmd_sweep(args: argparse.Namespace, rest: list[str]) -> None:
    from leuko.sweep import run_sweep

    try:
        run_sweep(
            args.space,
            trials=args.trials,
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


# ---------------------------------------------------------------------------------------------- register
def cmd_register(args: argparse.Namespace, rest: list[str]) -> None:
    from leuko.tracking.registry import Source, print_summary, register, source_from_study

    if args.config:
        source = Source(configs=args.config, overrides=rest)
    elif rest:
        raise UsageError(f"config overrides ({' '.join(rest)}) need --config; a trial from --space brings its own")
    else:
        source = source_from_study(args.space, storage=args.storage, trial=args.trial)
        print(f"registering trial {source.trial} of study {source.study}", file=sys.stderr)
    result = register(source, name=args.name, metric=args.metric, out=args.out)
    if result:
        print_summary(result)


# ---------------------------------------------------------------------------------------------- lineage
def cmd_lineage(args: argparse.Namespace) -> None:
    from leuko.tracking.lineage import format_lineage, lineage_json, resolve

    lineage = resolve(args.target, tracking_uri=args.tracking_uri)
    print(lineage_json(lineage) if args.json else format_lineage(lineage))


# ---------------------------------------------------------------------------------------------- predict --model
def cmd_predict_model(args: argparse.Namespace) -> None:
    from leuko.deploy.predict import predict

    result = predict(
        args.model,
        args.input,
        args.out,
        batch_size=args.batch_size,
        voxel_size=args.voxel_size,
        progress=not args.quiet,
    )
    paths = result["paths"]
    print(f"predictions for {result['n_cells']} cells -> {paths['predictions']}")
    print(f"differential per {' + '.join(result['groups'])} -> {paths['differential']}")
    if result["n_skipped"]:
        print(f"skipped {result['n_skipped']} unreadable volume(s): see {paths['skipped']}", file=sys.stderr)


def _predict_model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leuko predict",
        description="run a registered model on a folder of volumes or a manifest: per-cell classes and "
        "probabilities, and the per-sample differential (without --model, `leuko predict` is LightningCLI "
        "predict on prepared data)",
        epilog="examples:\n"
        + textwrap.indent(
            textwrap.dedent(
                """
            leuko predict --model models:/leuko@champion --input data --out predictions.csv
            leuko predict --model models:/leuko/3 --input lab/manifest.csv --out out/pred.csv
            leuko predict --model models:/leuko@champion --input scans/ --voxel-size 0.4 0.2 0.2
            MLFLOW_TRACKING_URI=http://mlflow.lab:5001 leuko predict --model models:/leuko@champion --input scans/
            a folder holding manifest.csv is read through it; other folders are searched for volume files
            and grouped by the folder each file is in. Writes OUT, OUT_differential.csv, OUT_skipped.csv.
            """
            ).strip(),
            "  ",
        ),
        formatter_class=_formatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a local model folder",
    )
    p.add_argument("--input", required=True, help="a folder of volumes (searched recursively) or a manifest CSV")
    p.add_argument("--out", default="predictions.csv", help="per-cell CSV (default predictions.csv)")
    p.add_argument("--batch-size", type=int, default=32, help="volumes per forward pass (default 32)")
    p.add_argument(
        "--voxel-size",
        type=float,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="voxel size (um) of every volume, when the model resamples and there is no manifest",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict_model, command="predict")
    return p


def _wants_model(argv: list[str]) -> bool:
    """`leuko predict --model URI` (a registered model) rather than LightningCLI's `--model CONFIG.yaml`."""
    for i, arg in enumerate(argv):
        value = (
            arg.split("=", 1)[1]
            if arg.startswith("--model=")
            else (argv[i + 1] if arg == "--model" and i + 1 < len(argv) else None)
        )
        if value is not None and not value.lower().endswith((".yaml", ".yml", ".json")):
            return True
    return False


# ---------------------------------------------------------------------------------------------- features
def cmd_features(args: argparse.Namespace) -> None:
    from pathlib import Path

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


# ---------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from leuko.evaluation.evaluate import evaluate, load_cv, load_predictions

    if bool(args.cv) == bool(args.predictions):
        raise UsageError(
            "give --cv runs/NAME (a CV's out-of-fold predictions) or --predictions FILE (a test set's), one of them"
        )
    if args.cv:
        pred = load_cv(args.cv)
        out = Path(args.out) if args.out else Path(args.cv) / "eval"
    else:
        if not args.out:
            raise UsageError("--predictions needs --out (the folder for the evaluation files)")
        pred = load_predictions(args.predictions, args.prepared)
        out = Path(args.out)
    result = evaluate(
        pred,
        out,
        counts=args.counts,
        tracking_uri=args.tracking_uri,
        run_id=args.run_id,
        umap=args.umap,
        umap_fold=args.umap_fold,
        umap_cells=args.umap_cells,
        log_to_mlflow=not args.no_mlflow,
    )
    metrics = result["metrics"]
    print(f"{len(pred.cells)} cells, {len(result['diffs'])} samples; reference: {args.counts or 'manifest labels'}")
    for key in ("balanced_accuracy", "accuracy", "macro_f1", "auroc"):
        if f"oof/{key}" in metrics:
            cv = (
                f"   (fold mean {metrics[f'cv/{key}_mean']:.3f} ± {metrics[f'cv/{key}_std']:.3f})"
                if f"cv/{key}_mean" in metrics
                else ""
            )
            print(f"  pooled {key:<18} {metrics[f'oof/{key}']:.3f}{cv}")
    print("Bland-Altman, predicted - reference (% points):")
    print(result["ba"].to_string(index=False, float_format=lambda v: f"{v:+.2f}"))
    print(f"wrote {out}/: {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))}")


# ---------------------------------------------------------------------------------------------- baselines
def cmd_baselines(args: argparse.Namespace) -> None:
    import shutil
    from pathlib import Path

    import pandas as pd

    from leuko.evaluation import baselines as bl

    if not args.cv and not args.prepared:
        raise UsageError(
            "give --cv runs/NAME (its folds and prepared data) or --prepared DIR (folds from --k/--seed/--test-fraction)"
        )
    out = Path(args.out) if args.out else (Path(args.cv[0]) / "baselines" if args.cv else Path("baselines"))
    features_path = Path(args.features) if args.features else out / "features.csv"
    if args.features and features_path.is_file():
        features = pd.read_csv(features_path, dtype={"cell_id": str, "patient_id": str, "label": str})
        print(f"features from {features_path} ({len(features)} cells)", file=sys.stderr)
    elif args.manifest:
        from leuko.evaluation.morphology import features_table

        features = features_table(args.manifest, progress=not args.quiet)
        features_path.parent.mkdir(parents=True, exist_ok=True)
        features.to_csv(features_path, index=False)
        print(f"features of {len(features)} cells -> {features_path}", file=sys.stderr)
    else:
        where = f"{features_path} does not exist; " if args.features else ""
        raise UsageError(
            f"{where}give --manifest (the manifest the data was prepared from) to compute the morphology features"
        )
    table, per_fold, settings = bl.compare(
        features,
        cv_dirs=args.cv,
        prepared_dir=args.prepared,
        k=args.k,
        test_fraction=args.test_fraction,
        seed=args.seed,
        mip_net=None if args.no_mip else args.mip_net,
        mip_epochs=args.mip_epochs,
        mip_batch_size=args.mip_batch_size,
        device=args.device,
    )
    settings["features_file"] = str(features_path)
    bl.write_outputs(out, table, per_fold, settings)
    copies = [Path(c) / "baselines" for c in args.cv if (Path(c) / "baselines").resolve() != out.resolve()]
    for copy in copies:
        copy.mkdir(parents=True, exist_ok=True)
        for name in ("baselines.csv", "baselines_folds.csv", "baselines.json"):
            shutil.copyfile(out / name, copy / name)
    print(bl.format_table(table))
    print(
        f"\nwrote {out}/baselines.csv, baselines_folds.csv, baselines.json"
        + (f" (copied to {', '.join(map(str, copies))})" if copies else "")
    )
    if not args.no_mlflow:
        _log_baselines(args, out, table)


def _log_baselines(args: argparse.Namespace, out, table) -> None:
    """To each CV's parent run (the report of that run then finds the table), or to a run of its own."""
    from pathlib import Path

    from leuko.evaluation.baselines import log_baselines
    from leuko.evaluation.evaluate import cv_run_id, tracking_client

    logged = []
    for cv in args.cv:
        client = tracking_client(Path(cv), args.tracking_uri)
        run_id = cv_run_id(Path(cv), client) if client is not None else None
        if run_id:
            log_baselines(client, run_id, out, table)
            logged.append(run_id)
        else:
            print(f"no MLflow run found for {cv}: the table is not logged for it", file=sys.stderr)
    if not args.cv:
        import mlflow

        from leuko.tracking.runs import DEFAULT_EXPERIMENT, lineage_tags, resolve_tracking_uri

        client = mlflow.MlflowClient(resolve_tracking_uri(args.tracking_uri))
        exp = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
        exp_id = exp.experiment_id if exp else client.create_experiment(DEFAULT_EXPERIMENT)
        tags = {**lineage_tags(args.prepared), "leuko.command": "baselines"}
        run_id = client.create_run(exp_id, run_name="baselines", tags=tags).info.run_id
        log_baselines(client, run_id, out, table)
        client.set_terminated(run_id)
        logged.append(run_id)
    if logged:
        print(f"logged to MLflow run(s) {', '.join(logged)}")


# ---------------------------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> None:
    from pathlib import Path

    from leuko.evaluation.report import write_report

    run = Path(args.run)
    out = args.out or (run / "report.html" if run.is_dir() else f"report-{args.run[:8]}.html")
    result = write_report(
        args.run,
        out,
        tracking_uri=args.tracking_uri,
        eval_dir=args.eval,
        baselines_dir=args.baselines,
        evaluate_missing=not args.no_evaluate,
    )
    print(f"wrote {result['out']} ({Path(result['out']).stat().st_size / 1e6:.1f} MB, self-contained)")
    if not result["has_baselines"]:
        print(
            "no baselines for this run: add them with `leuko baselines --cv RUN --manifest MANIFEST`", file=sys.stderr
        )
    if result["run_id"] and result["checked"]:
        if result["mismatches"]:
            print(
                f"warning: {len(result['mismatches'])} number(s) differ from MLflow run {result['run_id']}:",
                file=sys.stderr,
            )
            for line in result["mismatches"][:10]:
                print(f"  {line}", file=sys.stderr)
        else:
            print(f"{result['checked']} numbers checked against MLflow run {result['run_id']}: all match")


# ---------------------------------------------------------------------------------------------- import-medmnist
def cmd_import_medmnist(args: argparse.Namespace) -> None:
    import json

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


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument(
        "--shape", type=int, nargs="+", default=[32], metavar="N", help="D H W, or one size for a cube (default 32)"
    )
    p.add_argument(
        "--modality", choices=["ri", "hhg"], default="ri", help="ri: refractive index, 1 channel; hhg: THG+SHG"
    )
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
    p.add_argument(
        "--shape", type=int, nargs="+", default=[32], metavar="N", help="D H W, or one size for a cube (default 32)"
    )
    p.add_argument(
        "--classes",
        default="neutrophil,eosinophil,lymphocyte,monocyte",
        help="comma-separated class list, in label order",
    )
    p.add_argument(
        "--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"), help="resample to this voxel size (um)"
    )
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

    p = _add(
        sub,
        "sweep",
        "Optuna study over model families and hyperparameters; each trial a cross-validated fit",
        """
        leuko sweep --space conf/sweep/default.yaml                     # the defaults: 2 CPU cores, ~10 min
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
        help="study storage: a journal file path, or a database URL (default: the sweep file's, else sweeps/STUDY.journal)",
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
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--sweep-run-id", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_sweep, takes_rest=True)

    p = _add(
        sub,
        "register",
        "refit the best trial on all non-test patients, test once, log and register the model (alias champion if better)",
        """
        leuko register --space conf/sweep/default.yaml                  # the study's best trial
        leuko register --space conf/sweep/default.yaml --trial 7 --name leuko-balf
        leuko register --config conf/experiment/phantoms_tiny.yaml --model.net vit3d_tiny --model.lr 0.002
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
    p.add_argument("--name", default="leuko", help="registered model name (default leuko)")
    p.add_argument(
        "--metric",
        default=None,
        help="test metric that decides champion vs challenger (default: the study's objective)",
    )
    p.add_argument("--out", default="runs", help="parent folder of the refit's checkpoints (default runs)")
    p.set_defaults(func=cmd_register, takes_rest=True)

    p = _add(
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

    p = _add(
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
        "--threshold", type=float, default=1.35, metavar="RI", help="RI above which a voxel is cell (default 1.35)"
    )
    p.add_argument("--n-medium", type=float, default=1.337, metavar="RI", help="RI of the medium (default 1.337)")
    p.add_argument(
        "--increment", type=float, default=0.2, metavar="ML_G", help="RI increment of protein, mL/g (default 0.2)"
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

    p = _add(
        sub,
        "evaluate",
        "differentials and Bland-Altman per class, confusion matrix, learning curves and UMAP of a CV; logged to MLflow",
        """
        leuko evaluate --cv runs/cv-20250101-120000
        leuko evaluate --cv runs/demo --counts cytospin_counts.csv        # reference: manual counts per sample
        leuko evaluate --cv runs/dvc --out eval --no-umap
        leuko evaluate --predictions runs/refit/predictions.csv --prepared prepared --out eval_test --run-id RUN_ID
        --counts CSV: one row per sample, columns patient_id, sample_type and one count (or %) column per class.
        writes metrics.json, differentials.csv, bland_altman.csv/.png, confusion.csv, confusion_matrix.png,
        per_class.csv, learning_curves.csv and umap_*.png into --out (default runs/NAME/eval).
        """,
    )
    p.add_argument("--cv", default=None, metavar="DIR", help="output folder of `leuko cv` (runs/NAME)")
    p.add_argument(
        "--predictions",
        default=None,
        metavar="CSV",
        help="instead of --cv: a predictions CSV of test cells (`leuko predict`)",
    )
    p.add_argument(
        "--prepared",
        default=None,
        metavar="DIR",
        help="with --predictions: prepared folder to look up label, patient and sample type",
    )
    p.add_argument(
        "--counts",
        default=None,
        metavar="CSV",
        help="manual differential per sample (CSV); default: the manifest labels",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default runs/NAME/eval)")
    p.add_argument("--run-id", default=None, metavar="ID", help="MLflow run to log to (default: the CV's parent run)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="MLflow tracking URI (MLFLOW_TRACKING_URI wins; default: the CV's)",
    )
    p.add_argument("--no-mlflow", action="store_true", help="write the files only; log nothing")
    p.add_argument("--no-umap", dest="umap", action="store_false", help="skip the UMAP of penultimate features")
    p.add_argument(
        "--umap-fold", default=None, metavar="F", help="fold whose best checkpoint the UMAP shows (default: the first)"
    )
    p.add_argument(
        "--umap-cells",
        choices=["val", "dev", "all"],
        default="val",
        help="cells in the UMAP: the fold's validation cells (default), all non-test cells, or all",
    )
    p.set_defaults(func=cmd_evaluate)

    p = _add(
        sub,
        "baselines",
        "classical models on the morphology features and a 2D CNN on the MIP, on a CV's folds, beside its 3D nets",
        """
        leuko baselines --cv runs/demo --manifest data/manifest.csv
        leuko baselines --cv runs/fishnet --cv runs/resnet --features features.csv
        leuko baselines --prepared prepared --manifest data/manifest.csv --k 5 --seed 0 --test-fraction 0.2
        leuko baselines --cv runs/demo --features features.csv --mip-net resnet18 --mip-epochs 20
        models: SVM (RBF), KNN (k=5), LDA, naive Bayes, decision tree (each after a StandardScaler), and
        a timm 2D net (random init) on the z-projection of the prepared volumes. Folds: those of the first
        --cv, else make_splits over --prepared with --k/--seed/--test-fraction (as `leuko folds`).
        """,
    )
    p.add_argument(
        "--cv",
        action="append",
        default=[],
        metavar="DIR",
        help="output folder of `leuko cv`; repeat to compare several",
    )
    p.add_argument(
        "--manifest", default=None, metavar="CSV", help="manifest of the raw volumes (to compute the features)"
    )
    p.add_argument(
        "--features",
        default=None,
        metavar="CSV",
        help="features CSV from `leuko features`: read if it exists, else written",
    )
    p.add_argument(
        "--prepared", default=None, metavar="DIR", help="prepared folder (default: the one the first --cv trained on)"
    )
    p.add_argument("--k", type=int, default=5, help="without --cv: number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="fold seed without --cv; model seed always (default 0)")
    p.add_argument(
        "--test-fraction", type=float, default=0.2, metavar="F", help="without --cv: held-out patients (default 0.2)"
    )
    p.add_argument(
        "--mip-net", default="resnet10t", metavar="NAME", help="timm 2D model for the MIP baseline (default resnet10t)"
    )
    p.add_argument(
        "--mip-epochs", type=int, default=10, metavar="N", help="epochs per fold for the MIP net (default 10)"
    )
    p.add_argument(
        "--mip-batch-size", type=int, default=32, metavar="N", help="batch size for the MIP net (default 32)"
    )
    p.add_argument("--no-mip", action="store_true", help="leave out the 2D MIP baseline")
    p.add_argument("--device", default="cpu", help="torch device for the MIP net (default cpu)")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder (default runs/NAME/baselines of the first --cv, else baselines)",
    )
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="MLflow tracking URI (MLFLOW_TRACKING_URI wins)")
    p.add_argument("--no-mlflow", action="store_true", help="write the files only; log nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_baselines)

    p = _add(
        sub,
        "report",
        "one self-contained HTML report of a CV: metrics, confusion, recall, Bland-Altman, baselines, UMAP",
        """
        leuko report --run runs/demo                         # writes runs/demo/report.html
        leuko report --run runs/demo --out demo.html
        leuko report --run 3f2a9c0d5e6b47e1a2b3c4d5e6f7a8b9 --out report.html   # from MLflow artifacts
        a CV folder without eval/ is evaluated first (`leuko evaluate --cv RUN`); numbers shown are checked
        against the metrics logged to the CV's MLflow run.
        """,
    )
    p.add_argument(
        "--run",
        required=True,
        metavar="DIR|ID",
        help="output folder of `leuko cv` (runs/NAME) or the MLflow id of its parent run",
    )
    p.add_argument(
        "--out", default=None, metavar="HTML", help="HTML file (default runs/NAME/report.html, or report-<run id>.html)"
    )
    p.add_argument("--eval", default=None, metavar="DIR", help="evaluation folder (default runs/NAME/eval)")
    p.add_argument("--baselines", default=None, metavar="DIR", help="baselines folder (default runs/NAME/baselines)")
    p.add_argument("--no-evaluate", action="store_true", help="do not run `leuko evaluate` when eval/ is missing")
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="MLflow tracking URI (MLFLOW_TRACKING_URI wins)")
    p.set_defaults(func=cmd_report)

    p = _add(
        sub,
        "import-medmnist",
        "turn a MedMNIST 3D .npz into volumes and a manifest, keeping the official train/val/test split",
        """
        leuko import-medmnist ../shared/data/medmnist3d/vesselmnist3d.npz --out vessel
        leuko prepare --manifest vessel/manifest.csv --out vessel_prepared --shape 28 --classes vessel,aneurysm
        python benchmarks/medmnist.py --epochs 10        # train and test each net with the MedMNIST protocol
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

    for name in LIGHTNING_COMMANDS:
        sub.add_parser(
            name,
            help=f"LightningCLI {name} (see `leuko {name} --help`)"
            if name != "predict"
            else "LightningCLI predict on prepared data; with --model URI a registered model on volume files (see `leuko predict --model URI --help`)",
            add_help=False,
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict" and _wants_model(argv[1:]):
        args = _predict_model_parser().parse_args(argv[1:])
        return _guarded("predict", lambda: args.func(args))
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from leuko.training.cli import run

        return _guarded(argv[0], lambda: run(argv))
    parser = build_parser()
    from leuko.cli.params import ParamsError, expand

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
