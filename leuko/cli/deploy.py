"""`leuko predict --model URI`: a registered model on a folder of volumes or a manifest.

Without --model (or with LightningCLI's `--model CONFIG.yaml`), `leuko predict` is LightningCLI predict
(leuko.cli.training); `wants_model` tells the two apart before any parser runs.
"""

from __future__ import annotations

import argparse
import sys

from leuko.cli.command import examples, formatter


def wants_model(argv: list[str]) -> bool:
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


def predict_model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leuko predict",
        description="run a registered model on a folder of volumes or a manifest: per-cell classes and "
        "probabilities, and the per-sample differential (without --model, `leuko predict` is LightningCLI "
        "predict on prepared data)",
        epilog=examples(
            """
            leuko predict --model models:/leuko@champion --input data --out predictions.csv
            leuko predict --model models:/leuko/3 --input lab/manifest.csv --out out/pred.csv
            leuko predict --model models:/leuko@champion --input scans/ --voxel-size 0.4 0.2 0.2
            MLFLOW_TRACKING_URI=http://mlflow.lab:5001 leuko predict --model models:/leuko@champion --input scans/
            a folder holding manifest.csv is read through it; other folders are searched for volume files
            and grouped by the folder each file is in. Writes OUT, OUT_differential.csv, OUT_skipped.csv.
            OUT has per cell the calibrated probabilities, uncertainty, review (true: a person should look at
            the cell) and seen_patient (a patient the model was trained on); OUT_differential.csv gives each
            sample's differential with and without the cells to review, and n_review.
            """
        ),
        formatter_class=formatter,
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
    p.add_argument(
        "--allow-out-of-distribution",
        action="store_true",
        help="predict even when most cells lie outside the training data's intensities (they stay flagged)",
    )
    p.add_argument(
        "--runtime",
        choices=["auto", "onnx", "torch"],
        default="auto",
        help="onnx: ONNX Runtime on the CPU, with the model's graph exported once to a cache and checked against "
        "PyTorch; torch: the model's own PyTorch code; auto (default): onnx unless an NVIDIA GPU is visible",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict_model, command="predict")
    return p


def cmd_predict_model(args: argparse.Namespace) -> None:
    # heavy imports here: keeps `leuko --help` instant
    from leuko.deploy.predict import predict

    result = predict(
        args.model,
        args.input,
        args.out,
        batch_size=args.batch_size,
        voxel_size=args.voxel_size,
        progress=not args.quiet,
        allow_out_of_distribution=args.allow_out_of_distribution,
        runtime=args.runtime,
    )
    paths = result["paths"]
    print(f"predictions for {result['n_cells']} cells -> {paths['predictions']}")
    print(f"differential per {' + '.join(result['groups'])} -> {paths['differential']}")
    if result.get("n_review") is not None:
        print(f"{result['n_review']} of {result['n_cells']} cells to review (the review column)")
    if result["n_skipped"]:
        print(f"skipped {result['n_skipped']} unreadable volume(s): see {paths['skipped']}", file=sys.stderr)
