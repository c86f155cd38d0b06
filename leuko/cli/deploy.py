"""Deployment commands: `leuko predict --model URI` (a registered model on a folder of volumes or a manifest),
`leuko export` (the model as an ONNX graph) and `leuko explain` (what the model looked at in chosen cells).

Without --model (or with LightningCLI's `--model CONFIG.yaml`), `leuko predict` is LightningCLI predict
(leuko.cli.training); `wants_model` tells the two apart before any parser runs.
"""

from __future__ import annotations

import argparse
import sys

from leuko.cli.command import UsageError, add_command, examples, formatter


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
        "predict on prepared data: `leuko predict --config CONFIG.yaml --help` lists its options)",
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
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="threads that read and prepare volumes while the net runs (default: OMP_NUM_THREADS, else one per "
        "core; more can help on slow network storage)",
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
        workers=args.workers,
    )
    paths = result["paths"]
    print(f"predictions for {result['n_cells']} cells -> {paths['predictions']}")
    print(f"differential per {' + '.join(result['groups'])} -> {paths['differential']}")
    if result.get("n_review") is not None:
        print(f"{result['n_review']} of {result['n_cells']} cells to review (the review column)")
    if result["n_skipped"]:
        print(f"skipped {result['n_skipped']} unreadable volume(s): see {paths['skipped']}", file=sys.stderr)


def add_parsers(sub) -> None:
    _add_export(sub)
    _add_explain(sub)


# ---------------------------------------------------------------------------------------------- export
def _add_export(sub) -> None:
    p = add_command(
        sub,
        "export",
        "write a registered model as an ONNX graph of calibrated probabilities, checked against PyTorch",
        """
        leuko export --model models:/leuko@champion --format onnx --out model.onnx
        leuko export --model models:/leuko/3 --out deploy/leuko3.onnx --input data/manifest.csv --cells 64
        the graph maps prepared volumes (B, C, D, H, W) float32, B dynamic, to calibrated class probabilities;
        OUT.json beside it holds the classes, preprocessing, input shape and temperature. The command checks
        the graph against PyTorch on real cells (--input, else the model's example cell) at two batch sizes and
        prints the largest probability difference (must be < 1e-4) and both runtimes' CPU throughput.
        """,
    )
    p.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a folder"
    )
    p.add_argument("--format", default="onnx", choices=["onnx"], help="graph format (default onnx)")
    p.add_argument("--out", default="model.onnx", help="graph file, ending in .onnx (default model.onnx)")
    p.add_argument(
        "--input",
        default=None,
        help="volumes (folder or manifest) to check parity on; default: the "
        "model's logged example cell and its mirror images",
    )
    p.add_argument("--cells", type=int, default=32, help="cells of --input to check on (default 32)")
    p.add_argument("--batch-size", type=int, default=32, help="batch for the parity check and timing (default 32)")
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"), help="voxel size (um) of --input")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    # heavy imports here: keeps `leuko --help` instant
    from leuko.deploy.export import export

    result = export(
        args.model,
        args.out,
        fmt=args.format,
        source=args.input,
        n_cells=args.cells,
        batch_size=args.batch_size,
        voxel_size=args.voxel_size,
    )
    print(f"ONNX graph -> {result['graph']}; sidecar -> {result['sidecar']}")
    print(
        f"parity: max |p_onnx - p_torch| = {result['parity']:.2e} over {result['n_cells']} cells "
        f"(batch sizes {', '.join(map(str, result['batch_sizes']))}; limit 1e-04)"
    )
    print(
        f"throughput at batch {result['batch_size']}: onnxruntime (CPU) {result['onnxruntime_cells_per_s']:.1f} "
        f"cells/s, PyTorch ({result['torch_device']}) {result['torch_cells_per_s']:.1f} cells/s"
    )


# ---------------------------------------------------------------------------------------------- explain
def _add_explain(sub) -> None:
    p = add_command(
        sub,
        "explain",
        "what a registered model looked at: 3D Grad-CAM and occlusion sensitivity of chosen cells, as PNGs",
        """
        leuko explain --model models:/leuko@champion --input data/manifest.csv --cells P01_C001,P01_C002 --out expl
        leuko explain --model models:/leuko/3 --input scans/ --n 8 --methods gradcam --out expl
        leuko explain --model models:/leuko@champion --input data --cells P02_C007 --cam-layer net.down2.0
        writes OUT/<cell>_gradcam.png and OUT/<cell>_occlusion.png (mid-slices z, y, x and maximum projections
        with the map over the cell, for the predicted class) and OUT/explain.csv, OUT/explain.json.
        """,
    )
    p.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a folder"
    )
    p.add_argument("--input", required=True, help="a manifest CSV or a folder of volumes, as for leuko predict")
    p.add_argument("--cells", default=None, metavar="ID,...", help="cell ids to explain (default: the first --n)")
    p.add_argument("--n", type=int, default=4, help="cells to explain without --cells (default 4)")
    p.add_argument("--out", default="explain", help="output folder (default explain)")
    p.add_argument("--methods", default="gradcam,occlusion", help="gradcam, occlusion or both (default both)")
    p.add_argument(
        "--cam-layer",
        default=None,
        help="Grad-CAM layer, e.g. net.backbone.layer4 (default: per net, the deepest feature map that keeps at "
        "least 4 voxels per axis)",
    )
    p.add_argument(
        "--mask-size",
        type=int,
        nargs=3,
        metavar=("D", "H", "W"),
        help="occluded cube (default: a quarter of each side)",
    )
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"), help="voxel size (um) of --input")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> None:
    # heavy imports here: keeps `leuko --help` instant
    from leuko.deploy.explain import explain

    if args.n < 1:
        raise UsageError(f"--n {args.n}: must be at least 1")
    result = explain(
        args.model,
        args.input,
        args.out,
        cells=[c.strip() for c in args.cells.split(",") if c.strip()] if args.cells else None,
        n=args.n,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        layer=args.cam_layer,
        mask_size=args.mask_size,
        voxel_size=args.voxel_size,
        progress=not args.quiet,
    )
    index = result["index"]
    print(f"explained {result['n_cells']} cells -> {result['out']}/ ({len(index)} PNGs, explain.csv, explain.json)")
    for row in index.drop_duplicates("cell_id").itertuples(index=False):
        print(f"  {row.cell_id}: predicted {row.pred_label} ({row.probability:.2f})")
