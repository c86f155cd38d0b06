"""`leuko export --model URI --format onnx --out model.onnx`: a registered model as an ONNX graph.

Writes OUT, the graph (prepared volumes "volumes" (B, C, D, H, W) float32, B dynamic -> calibrated class
probabilities "probabilities" (B, classes); leuko.deploy.graph), and beside it OUT with the suffix .json,
its sidecar: classes, input shape, preprocessing, temperature, parity. Before writing, it checks the graph
against the model's PyTorch code on real cells, at two batch sizes (1 and --batch-size): the largest
difference of a probability must stay under 1e-4, else nothing is written. Then it times both on the
CPU at the same batch size.

Real cells: the first --cells volumes of --input (a folder or a manifest, as `leuko predict` takes them),
prepared with the model's own settings; without --input, the prepared example cell logged with the model
and its mirror images.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from leuko.data.io import VolumeError, read_volume
from leuko.data.manifest import VOXEL_SIZE_COLUMNS
from leuko.deploy.graph import (
    example_cells,
    max_difference,
    onnx_runner,
    probabilities,
    sidecar,
    torch_runner,
    write_graph,
)
from leuko.deploy.onnx_model import PARITY, OnnxModel
from leuko.deploy.predict import find_cells, load_model
from leuko.errors import LeukoError

FORMATS = ("onnx",)
SECONDS = 2.0  # timed per runtime: enough for a steady rate, short enough for a command


class ExportError(LeukoError, ValueError):
    """A bad --format or --out, or a graph that does not match PyTorch; the message says what to do."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_out(out: Path) -> None:
    """ExportError unless out ends in .onnx and its folder can be made and written to."""
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"--out {out}: give a file name ending in .onnx (its sidecar {out.stem}.json goes beside it)")
    probe = out.parent / f".{out.name}.probe-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ExportError(
            f"--out {out}: cannot write there ({exc.strerror or exc}); give a path in a writable folder"
        ) from None


def real_cells(impl, source, n: int, voxel_size: Sequence[float] | None) -> np.ndarray:
    """(m, C, D, H, W): the first n readable volumes of source, prepared as the model prepares them."""
    cells, _ = find_cells(source, voxel_size=voxel_size)
    read_options = impl.config["preprocessing"].get("read_options") or {}
    out = []
    for cell in cells.itertuples(index=False):
        size = [getattr(cell, c) for c in VOXEL_SIZE_COLUMNS]
        try:
            out.append(impl.preprocess(read_volume(cell.path, **read_options), None if any(np.isnan(size)) else size))
        except (VolumeError, ValueError, OSError) as exc:
            log(f"skipped {cell.cell_id}: {' '.join(str(exc).split())}")
        if len(out) == n:
            break
    if not out:
        raise ExportError(f"--input {source}: none of its volumes could be read and prepared for this model")
    return np.stack(out)


def throughput(predict_proba: Callable[[np.ndarray], np.ndarray], cells: np.ndarray, batch: int) -> float:
    """Cells per second of predict_proba on batches of `batch` cells (cells repeated to fill one)."""
    x = np.ascontiguousarray(np.resize(cells, (batch, *cells.shape[1:])))  # (batch, C, D, H, W)
    predict_proba(x)  # warm-up: allocations, kernel choice
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        predict_proba(x)
        done += batch
    return done / (time.perf_counter() - start)


def export(
    model_uri: str,
    out: str | Path,
    *,
    fmt: str = "onnx",
    source: str | Path | None = None,
    n_cells: int = 32,
    batch_size: int = 32,
    voxel_size: Sequence[float] | None = None,
) -> dict:
    """Write the graph and its sidecar (module docstring); returns the paths, the parity and both throughputs."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if n_cells < 1 or batch_size < 1:
        raise ExportError(f"--cells {n_cells} and --batch-size {batch_size}: both must be at least 1")
    out = Path(out)
    check_out(out)
    _, impl = load_model(model_uri, runtime="torch")
    if source is not None:
        cells, where = real_cells(impl, source, n_cells, voxel_size), f"the first volumes of {source}"
    else:
        # heavy import here: mlflow, only to find the model's example cell
        import mlflow

        folder = mlflow.artifacts.download_artifacts(model_uri)
        cells, where = example_cells(folder, impl.config), "the model's example cell and its mirror images"
    members = len((impl.config.get("ensemble") or {}).get("weights") or ["weights"])
    what = f"{impl.config['net']}" + (f" ensemble of {members}" if members > 1 else "")
    what += f", TTA {impl.config['tta']}" if impl.config.get("tta", "none") != "none" else ""
    log(f"export: {what} -> {out}; checking it on {len(cells)} cells ({where})")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        write_graph(probabilities(impl), impl.config, tmp)
        graph = OnnxModel(tmp, impl.config)
        sizes = (1, min(batch_size, len(cells))) if len(cells) > 1 else (1,)
        worst = max_difference(graph, impl, cells, sizes)
        if worst >= PARITY:
            raise ExportError(
                f"the ONNX graph of {model_uri} differs from PyTorch by {worst:.3g} (limit {PARITY:g}); nothing "
                "written. Export with the same torch and onnxruntime as requirements.txt pins, or report it"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    parity = {"max_abs_difference": worst, "n_cells": len(cells), "batch_sizes": list(sizes), "cells": where}
    meta_path = out.with_suffix(".json")
    meta_path.write_text(json.dumps(sidecar(impl.config, out, model_uri=model_uri, parity=parity), indent=2) + "\n")
    log(f"timing both runtimes at batch {batch_size} ({SECONDS:g} s each)")
    graph = OnnxModel(out, impl.config)
    return {
        "graph": out,
        "sidecar": meta_path,
        "parity": worst,
        "n_cells": len(cells),
        "batch_sizes": list(sizes),
        "batch_size": batch_size,
        "onnxruntime_cells_per_s": throughput(onnx_runner(graph), cells, batch_size),
        "torch_cells_per_s": throughput(torch_runner(impl), cells, batch_size),
        "torch_device": str(next(impl.net.parameters()).device),
    }
