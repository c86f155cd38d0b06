"""Evaluation commands: `leuko evaluate` (differentials, Bland-Altman, confusion, UMAP), `leuko baselines`
(classical models and a 2D MIP net on a CV's folds) and `leuko report` (one HTML page of a CV)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from leuko.cli.command import UsageError, add_command


def add_parsers(sub) -> None:
    _add_evaluate(sub)
    _add_baselines(sub)
    _add_report(sub)


# ---------------------------------------------------------------------------------------------- evaluate
def _add_evaluate(sub) -> None:
    p = add_command(
        sub,
        "evaluate",
        "differentials and Bland-Altman per class, confusion matrix, calibration and decision rules, learning "
        "curves and UMAP of a CV; logged to MLflow",
        """
        leuko evaluate --cv runs/cv-20250101-120000
        leuko evaluate --cv runs/demo --counts cytospin_counts.csv        # reference: manual counts per sample
        leuko evaluate --cv runs/dvc --out eval --no-umap
        leuko evaluate --predictions runs/refit/predictions.csv --prepared prepared --out eval_test --run-id RUN_ID
        --counts CSV: one row per sample, columns patient_id, sample_type and one count (or %) column per class.
        writes metrics.json, differentials.csv, bland_altman.csv/.png, confusion.csv, confusion_matrix.png,
        per_class.csv, learning_curves.csv and umap_*.png into --out (default runs/NAME/eval), with
        calibration.json + reliability.png (temperature scaling) and coverage.csv/.png + review.json (cells to review).
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


def cmd_evaluate(args: argparse.Namespace) -> None:
    # heavy imports here: keeps `leuko --help` instant
    from leuko.evaluation.evaluate import evaluate, load_cv, load_predictions
    from leuko.evaluation.review import TARGET_ACCURACY

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
    if "calibration/temperature" in metrics:
        retained = f"{metrics['review/coverage']:.1%} of cells" if "review/threshold" in metrics else "no share"
        ece = f"{metrics['calibration/ece_before']:.3f} -> {metrics['calibration/ece_after']:.3f}"
        print(
            f"calibration: T = {metrics['calibration/temperature']:.3f}, ECE {ece}; "
            f"review: {retained} retained at {TARGET_ACCURACY:.0%} accuracy"
        )
    print(f"wrote {out}/: {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))}")


# ---------------------------------------------------------------------------------------------- baselines
def _add_baselines(sub) -> None:
    p = add_command(
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


def cmd_baselines(args: argparse.Namespace) -> None:
    # heavy imports here: keeps `leuko --help` instant
    from leuko.evaluation import baselines as bl

    if not args.cv and not args.prepared:
        raise UsageError(
            "give --cv runs/NAME (its folds and prepared data) "
            "or --prepared DIR (folds from --k/--seed/--test-fraction)"
        )
    out = Path(args.out) if args.out else (Path(args.cv[0]) / "baselines" if args.cv else Path("baselines"))
    features_path = Path(args.features) if args.features else out / "features.csv"
    features = _features(args, features_path)
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


def _features(args: argparse.Namespace, features_path: Path):
    """The morphology features: read from --features when that file exists, else computed from --manifest."""
    # heavy imports here: keeps `leuko --help` instant
    import pandas as pd

    from leuko.evaluation.morphology import features_table

    if args.features and features_path.is_file():
        features = pd.read_csv(features_path, dtype={"cell_id": str, "patient_id": str, "label": str})
        print(f"features from {features_path} ({len(features)} cells)", file=sys.stderr)
        return features
    if not args.manifest:
        where = f"{features_path} does not exist; " if args.features else ""
        raise UsageError(
            f"{where}give --manifest (the manifest the data was prepared from) to compute the morphology features"
        )
    features = features_table(args.manifest, progress=not args.quiet)
    features_path.parent.mkdir(parents=True, exist_ok=True)
    features.to_csv(features_path, index=False)
    print(f"features of {len(features)} cells -> {features_path}", file=sys.stderr)
    return features


def _log_baselines(args: argparse.Namespace, out: Path, table) -> None:
    """To each CV's parent run (the report of that run then finds the table), or to a run of its own."""
    # heavy imports here: keeps `leuko --help` instant
    import mlflow

    from leuko.evaluation.baselines import log_baselines
    from leuko.evaluation.evaluate import cv_run_id, tracking_client
    from leuko.tracking.lineage import lineage_tags
    from leuko.tracking.runs import DEFAULT_EXPERIMENT, experiment_id, resolve_tracking_uri

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
        client = mlflow.MlflowClient(resolve_tracking_uri(args.tracking_uri))
        tags = {**lineage_tags(args.prepared), "leuko.command": "baselines"}
        run_id = client.create_run(
            experiment_id(client, DEFAULT_EXPERIMENT), run_name="baselines", tags=tags
        ).info.run_id
        log_baselines(client, run_id, out, table)
        client.set_terminated(run_id)
        logged.append(run_id)
    if logged:
        print(f"logged to MLflow run(s) {', '.join(logged)}")


# ---------------------------------------------------------------------------------------------- report
def _add_report(sub) -> None:
    p = add_command(
        sub,
        "report",
        "one self-contained HTML report of a CV: metrics, confusion, recall, Bland-Altman, baselines, UMAP",
        """
        leuko report --run runs/demo                         # writes runs/demo/report.html
        leuko report --run runs/demo --out demo.html
        leuko report --run 3f2a9c0d5e6b47e1a2b3c4d5e6f7a8b9 --out report.html   # from MLflow artifacts
        leuko report --run runs/demo --model models:/leuko@champion   # + its ONNX export check and model card
        a CV folder without eval/ is evaluated first (`leuko evaluate --cv RUN`); numbers shown are checked
        against the metrics logged to the CV's MLflow run. --model exports the registered version into
        runs/NAME/export/ (model.onnx, model.json; reused while fresh) and shows its parity with PyTorch, both
        runtimes' CPU throughput, its input and its MODEL_CARD.md.
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
    p.add_argument(
        "--explain",
        type=int,
        default=0,
        metavar="N",
        help="first write Grad-CAM and occlusion maps of N right and N wrong cells per class from the first fold's "
        "best checkpoint into runs/NAME/explain/ (default 0: only show that folder if it exists)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="URI",
        help="a registered version, models:/NAME@ALIAS or models:/NAME/VERSION: add a section with its ONNX export "
        "check and its model card",
    )
    p.add_argument(
        "--export-input",
        default=None,
        metavar="DIR|CSV",
        help="volumes to check the ONNX graph on (default: the model's training manifest when DVC tracks it here, "
        "else its logged example cell and its mirror images)",
    )
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="MLflow tracking URI (MLFLOW_TRACKING_URI wins)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> None:
    # heavy imports here: keeps `leuko --help` instant
    from leuko.evaluation.report import write_report

    run = Path(args.run)
    out = args.out or (run / "report.html" if run.is_dir() else f"report-{args.run[:8]}.html")
    if args.explain:
        if not run.is_dir():
            raise UsageError(f"--explain {args.explain}: needs a CV folder as --run (runs/NAME), not a run id")
        from leuko.evaluation.report_saliency import explain_cv  # heavy import (torch, MONAI), as above

        explain_cv(run, args.explain)
    result = write_report(
        args.run,
        out,
        tracking_uri=args.tracking_uri,
        eval_dir=args.eval,
        baselines_dir=args.baselines,
        evaluate_missing=not args.no_evaluate,
        model=args.model,
        export_input=args.export_input,
    )
    print(f"wrote {result['out']} ({Path(result['out']).stat().st_size / 1e6:.1f} MB, self-contained)")
    deployed = result["deployment"]
    if deployed and deployed["error"]:
        print(
            f"the ONNX export of {deployed['model']} failed (the report says why): {deployed['error']}", file=sys.stderr
        )
    elif deployed:
        rates = deployed["export/onnxruntime_cells_per_s"], deployed["export/torch_cells_per_s"]
        print(
            f"{deployed['model']}: ONNX parity {deployed['export/max_abs_difference']:.2e}, onnxruntime {rates[0]:.1f} "
            f"cells/s, PyTorch {rates[1]:.1f} cells/s{' (a fresh export, reused)' if deployed['reused'] else ''}"
        )
    if not result["has_baselines"]:
        print(
            "no baselines for this run: add them with `leuko baselines --cv RUN --manifest MANIFEST`", file=sys.stderr
        )
    if not (result["run_id"] and result["checked"]):
        return
    if result["mismatches"]:
        print(
            f"warning: {len(result['mismatches'])} number(s) differ from MLflow run {result['run_id']}:",
            file=sys.stderr,
        )
        for line in result["mismatches"][:10]:
            print(f"  {line}", file=sys.stderr)
    else:
        print(f"{result['checked']} numbers checked against MLflow run {result['run_id']}: all match")
