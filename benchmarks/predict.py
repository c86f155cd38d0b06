"""`leuko predict` throughput: cells/s and peak memory per stage and end to end, one cell at a time against
chunks of cells on worker threads, on a few CPU cores (2 by default).

    python benchmarks/predict.py                          # models:/leuko@champion on data/ (make sweep, make data)
    python benchmarks/predict.py --model models:/leuko/3 --input data --runtime torch
    python benchmarks/predict.py --before /tmp/before     # also end to end with another leuko source tree
    python benchmarks/predict.py --json predict.json

The stages run in this process on the same cells, each alone (best of --repeats) and once more under
tracemalloc for its peak memory (what numpy and Python allocate during it; the stage's input, made before,
is not counted):

    read       read_volume of every file
    prepare    the model's preparation of every raw volume (normalise, find and centre the cell, crop)
    check      the intensity quantiles and the out-of-distribution test of every prepared cell
    infer      the net on the prepared cells, --batch-size at a time
    pipeline   the four together, as `leuko predict` interleaves them

in two variants:

    per cell   one cell at a time in one thread (read_volume, prepare_volume, np.quantile, out_of_distribution),
               the net through the pyfunc model's predict on a second thread: how predict ran before
    batched    chunks of --batch-size cells on --workers threads (read_cells, prepare_volumes, cell_quantiles,
               out_of_distribution_cells), the net's predict_proba on its own thread: leuko.deploy.predict._run

End to end: `leuko predict` in a fresh process (imports, the model from the registry, reading, preparing,
inference, the CSVs), its wall time and peak RSS, best of --repeats; with --before, the same command with
another source tree's leuko first on PYTHONPATH (e.g. `git worktree add /tmp/before HEAD~1`), and how far its
probabilities are from this tree's. The model's ONNX graph is cached before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pin(cores: int) -> list[int]:
    """Run this process and its children on the first `cores` CPUs it may use, with as many BLAS/OMP threads."""
    allowed = sorted(os.sched_getaffinity(0))[:cores]
    os.sched_setaffinity(0, allowed)
    os.environ["OMP_NUM_THREADS"] = str(len(allowed))
    return allowed


# ---------------------------------------------------------------------------------------------- stages
def stages(impl, model, cells, *, batch_size: int, workers: int) -> dict[str, dict]:
    """{stage: {variant: a function of no arguments that runs the stage on every cell}}."""
    import numpy as np

    from leuko.data.io import read_volume
    from leuko.data.manifest import VOXEL_SIZE_COLUMNS
    from leuko.deploy import predict as predict_module
    from leuko.deploy.inputs import prepare_volume, prepare_volumes
    from leuko.deploy.intensity import LEVELS, cell_quantiles, out_of_distribution, out_of_distribution_cells

    config, reference = impl.config, impl.config.get("intensity")
    paths = cells["path"].astype(str).tolist()
    volumes = [read_volume(p) for p in paths]  # the input of prepare
    windows = prepare_volumes(config, volumes, [None] * len(volumes))  # the input of check and infer
    chunks = [slice(i, i + batch_size) for i in range(0, len(paths), batch_size)]

    def threads(job):  # job(chunk) over every chunk on the worker threads; the results are dropped
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(job, chunks):
                pass

    def each(job, items):  # job(item) over every item in this thread; the results are dropped
        for item in items:
            job(item)

    def plain_check(window):
        quantiles = np.moveaxis(np.quantile(window.reshape(len(window), -1), LEVELS, axis=-1), 0, -1)
        return out_of_distribution(quantiles, reference) if reference else ""

    def plain_infer(batch):
        return model.predict(batch, params={"preprocess": False})

    def plain_pipeline():  # predict's loop before chunks: one thread prepares, a second runs the net
        net, pending, batch = ThreadPoolExecutor(max_workers=1), deque(), []
        for path in paths:
            window = prepare_volume(config, read_volume(path))
            plain_check(window)
            batch.append(window)
            if len(batch) == batch_size:
                pending.append(net.submit(plain_infer, np.stack(batch)))
                batch.clear()
            while len(pending) > 1:
                pending.popleft().result()
        pending.extend([net.submit(plain_infer, np.stack(batch))] if batch else [])
        [p.result() for p in pending]
        net.shutdown()

    def batched_check(chunk):
        quantiles = cell_quantiles(windows[chunk])
        return out_of_distribution_cells(quantiles, reference) if reference else []

    sizes = cells.copy()
    sizes[list(VOXEL_SIZE_COLUMNS)] = np.nan
    return {
        "read": {
            "per cell": lambda: each(read_volume, paths),
            "batched": lambda: threads(lambda c: [read_volume(p) for p in paths[c]]),
        },
        "prepare": {
            "per cell": lambda: each(lambda v: prepare_volume(config, v), volumes),
            "batched": lambda: threads(lambda c: prepare_volumes(config, volumes[c], [None] * len(volumes[c]))),
        },
        "check": {
            "per cell": lambda: each(plain_check, windows),
            "batched": lambda: threads(batched_check),
        },
        "infer": {
            "per cell": lambda: each(lambda c: plain_infer(windows[c]), chunks),
            "batched": lambda: each(lambda c: impl.predict_proba(windows[c]), chunks),
        },
        "pipeline": {
            "per cell": plain_pipeline,
            "batched": lambda: predict_module._run(sizes, impl, reference, batch_size, workers, progress=False),
        },
    }


def time_stage(run, repeats: int) -> tuple[float, float]:
    """(best wall seconds of repeats, peak MB traced in one more run)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    tracemalloc.start()
    run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return best, peak / 2**20


# ---------------------------------------------------------------------------------------------- end to end
# The command, started so that it writes its peak resident memory (VmHWM: of its own process image, unlike
# ru_maxrss, which also counts the parent's memory the child had between fork and exec) to a file at exit.
LAUNCH = (
    "import atexit, os, runpy, sys\n"
    "def peak():\n"
    "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
    "    open(os.environ['LEUKO_BENCH_PEAK'], 'w').write(line.split()[1])  # KiB\n"
    "atexit.register(peak)\n"
    "sys.argv = ['leuko', *sys.argv[1:]]\n"
    "runpy.run_module('leuko.cli', run_name='__main__')\n"
)


def end_to_end(tree: Path, args, out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of `leuko predict` with tree's leuko first on PYTHONPATH, run in a folder of
    its own (python -m would find a ./leuko first), on the registry this process uses."""
    from leuko.tracking.uri import resolve_tracking_uri

    out.parent.mkdir(parents=True, exist_ok=True)
    peak = out.parent / "peak_kib"
    uri = resolve_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative to this folder
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    env.update(LEUKO_BENCH_PEAK=str(peak), MLFLOW_TRACKING_URI=uri)
    command = [sys.executable, "-c", LAUNCH, "predict", "--model", args.model, "--input", str(args.input.resolve())]
    command += ["--out", str(out), "--quiet", "--runtime", args.runtime, "--batch-size", str(args.batch_size)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=out.parent, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"leuko predict with {tree} failed:\n{done.stderr[-3000:]}")
    return seconds, int(peak.read_text()) / 1024


def probability_gap(a: Path, b: Path) -> float:
    """Largest |p_a - p_b| over the cells and prob_ columns two predictions.csv share."""
    import pandas as pd

    x, y = pd.read_csv(a).set_index("cell_id"), pd.read_csv(b).set_index("cell_id")
    columns = [c for c in x.columns if c.startswith("prob_") and c in y.columns]
    cells = x.index.intersection(y.index)
    if len(cells) != len(x) or len(cells) != len(y):
        return float("inf")  # other cells: not the same predictions
    return float((x.loc[cells, columns] - y.loc[cells, columns]).abs().to_numpy().max())


# ---------------------------------------------------------------------------------------------- table
def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths)))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="models:/leuko@champion", help="registered model (default: the champion)")
    p.add_argument("--input", type=Path, default=REPO / "data", help="cohort folder or manifest (default data/)")
    p.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"], help="as leuko predict --runtime")
    p.add_argument("--batch-size", type=int, default=32, help="cells per chunk and per forward pass (default 32)")
    p.add_argument("--workers", type=int, default=None, help="batched variant's threads (default: --cores)")
    p.add_argument("--cores", type=int, default=2, help="CPUs to run on, and OMP_NUM_THREADS (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per stage and end to end; the best counts")
    p.add_argument("--before", type=Path, default=None, help="a leuko source tree to time end to end as well")
    p.add_argument("--no-stages", action="store_true", help="only the end-to-end runs")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    cores = pin(args.cores)
    workers = args.workers or len(cores)
    print(f"{args.model} on {args.input}: {len(cores)} cores {cores}, {workers} workers, batch {args.batch_size}")

    from leuko.deploy.predict import find_cells, load_model  # heavy imports after pinning: threads follow it

    cells, _ = find_cells(args.input)
    model, impl = load_model(args.model, runtime=args.runtime)  # caches the ONNX graph before any timing
    n = len(cells)
    runtime = type(impl).__name__
    rows = []
    if not args.no_stages:
        for stage, variants in stages(impl, model, cells, batch_size=args.batch_size, workers=workers).items():
            base = None
            for variant, run in variants.items():
                seconds, peak = time_stage(run, args.repeats)
                base = base or seconds
                rows.append(
                    {
                        "stage": stage,
                        "variant": variant,
                        "cells/s": round(n / seconds, 1),
                        "ms/cell": round(1e3 * seconds / n, 3),
                        "speed-up": f"{base / seconds:.1f}x",
                        "peak MB": round(peak, 1),
                    }
                )
    with tempfile.TemporaryDirectory() as tmp:
        trees = [("now", REPO)] + ([("before", args.before.resolve())] if args.before else [])
        best = {name: (float("inf"), 0.0) for name, _ in trees}
        for _ in range(args.repeats):  # interleaved, so a busy moment of the machine hits both alike
            for name, tree in trees:
                seconds, rss = end_to_end(tree, args, Path(tmp) / name / "predictions.csv")
                best[name] = min(best[name], (seconds, rss))
        for name, _ in trees:
            seconds, rss = best[name]
            gap = probability_gap(Path(tmp) / trees[0][0] / "predictions.csv", Path(tmp) / name / "predictions.csv")
            rows.append(
                {
                    "stage": "end to end",
                    "variant": f"{name} ({runtime})",
                    "cells/s": round(n / seconds, 1),
                    "ms/cell": round(1e3 * seconds / n, 3),
                    "speed-up": f"{best[trees[-1][0]][0] / seconds:.1f}x",
                    "peak MB": round(rss, 1),
                    "max |dp|": f"{gap:.1e}",
                }
            )
    for row in rows:
        row.setdefault("max |dp|", "")
    print(f"{n} cells; stages: best of {args.repeats}, peak traced memory; end to end: wall time, peak RSS")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"cells": n, "cores": cores, "workers": workers, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
