"""A model's net as an ONNX graph of calibrated probabilities, its sidecar, and the parity check against PyTorch.

    graph    input "volumes" (B, C, D, H, W) float32 prepared volumes, B dynamic
             output "probabilities" (B, classes) float32 = softmax(net(volumes) / temperature + bias),
             averaged inside the graph over an ensemble's members and the test-time views
             (leuko.deploy.ensemble): what the model's inference code (leuko.deploy.pyfunc_model) returns;
             temperature from model_config.json calibration.temperature, 1 for a model without one; bias
             from calibration.bias (leuko.deploy.decisions), 0 without it
    sidecar  JSON beside it (sidecar()): classes, input and output, temperature, ensemble size and TTA,
             the preprocessing a raw volume needs first (leuko.deploy.inputs), the intensity range and
             review threshold when the model has them, the parity with PyTorch, the graph's sha256

Used by `leuko export` (leuko.deploy.export) and by `leuko predict`'s cache of graphs (cache_graph;
leuko.deploy.onnx_model).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leuko import __version__
from leuko.deploy.decisions import class_bias, temperature
from leuko.deploy.ensemble import Ensemble
from leuko.deploy.onnx_model import GRAPH, INPUT, OUTPUT, PARITY, SIDECAR, OnnxModel, cache_folder, model_files

OPSET = 17  # every op of the nets (3D conv, pooling, layer norm, attention) exists at 17; onnxruntime runs it


def probabilities(impl) -> nn.Module:
    """The model's whole computation, prepared volumes -> calibrated probabilities, as one module: its
    Ensemble (members and TTA views), or, for the inference code of models registered before ensembles
    (which has only .net), the one-member Ensemble: softmax(net / temperature)."""
    module = getattr(impl, "module", None)
    return module if module is not None else Ensemble([impl.net], temperature(impl.config)).eval()  # no bias then


def write_graph(model: nn.Module, config: dict, path: str | Path) -> None:
    """Export model (probabilities(impl); a CPU copy, in eval mode) to an ONNX file at path."""
    path = Path(path)
    module = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(2, config["in_channels"], *config["preprocessing"]["shape"])  # (B, C, D, H, W)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            # The TorchScript-based exporter: a tenth of the time of the dynamo one (which also needs
            # onnxscript), with the same graph and parity for every leuko net on the pinned torch.
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def max_difference(graph: OnnxModel, impl, cells: np.ndarray, batch_sizes: tuple[int, ...]) -> float:
    """max |p_onnx - p_torch| over cells (N, C, D, H, W), the graph run at each batch size."""
    reference = impl.predict_proba(cells)  # (N, classes), the model's own inference code
    worst = 0.0
    for size in batch_sizes:
        got = np.concatenate(
            [graph.session.run([OUTPUT], {INPUT: cells[i : i + size]})[0] for i in range(0, len(cells), size)]
        )
        worst = max(worst, float(np.abs(got - reference).max()))
    return worst


def torch_runner(impl) -> Callable[[np.ndarray], np.ndarray]:
    """(B, C, D, H, W) -> (B, classes) calibrated probabilities by the model's net in PyTorch, in one pass."""
    module = probabilities(impl)
    device = next(module.parameters()).device

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x).to(device)).cpu().numpy()

    return run


def onnx_runner(graph: OnnxModel) -> Callable[[np.ndarray], np.ndarray]:
    """The same by onnxruntime, as predict runs it: the batch shared among the CPU threads."""
    return graph.predict_proba


def sidecar(config: dict, graph_path: str | Path, *, model_uri: str, parity: dict) -> dict:
    """The JSON beside a graph (module docstring)."""
    shape = list(config["preprocessing"]["shape"])
    out = {
        "format": "onnx",
        "opset": OPSET,
        "model_uri": model_uri,
        "net": config["net"],
        "classes": list(config["classes"]),
        "input": {
            "name": INPUT,
            "dtype": "float32",
            "shape": ["batch", config["in_channels"], *shape],
            "layout": "(B, C, D, H, W): volumes prepared as `leuko prepare` does (see preprocessing)",
        },
        "output": {
            "name": OUTPUT,
            "dtype": "float32",
            "shape": ["batch", len(config["classes"])],
            "meaning": "calibrated class probabilities, softmax(logits / temperature + bias) averaged over the "
            "ensemble's members and TTA views, in the order of classes",
        },
        "temperature": temperature(config),
        "bias": class_bias(config),  # null: none (decisions as trained)
        "ensemble_size": len((config.get("ensemble") or {}).get("weights") or ["weights"]),
        "tta": config.get("tta", "none"),
        "preprocessing": config["preprocessing"],
        "parity": parity,
        "sha256": hashlib.sha256(Path(graph_path).read_bytes()).hexdigest(),
        "leuko_version": __version__,
    }
    for key in ("intensity", "review", "calibration"):  # what predict checks and flags with, when the model has it
        if config.get(key) is not None:
            out[key] = config[key]
    return out


def example_cells(folder: str | Path, config: dict, n: int = 8) -> np.ndarray:
    """(n, C, D, H, W) cells to check a graph on: the prepared example cell logged with the model and its mirror
    images; random volumes for a model logged without one."""
    # heavy import here: mlflow, only on the way to a new graph
    from mlflow.models import Model

    example = None
    try:
        example = Model.load(str(folder)).load_input_example(str(folder))
    except Exception:  # an older or hand-made model: no example, or one in another form
        example = None
    shape = (config["in_channels"], *config["preprocessing"]["shape"])
    if isinstance(example, np.ndarray) and example.ndim == 5 and tuple(example.shape[1:]) == shape:
        cell = example[0].astype(np.float32)
        flips = [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]
        return np.stack([np.flip(cell, axes) if axes else cell for axes in flips[:n]]).copy()
    return np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32)


def cache_graph(impl, folder: str | Path, model_uri: str) -> OnnxModel | None:
    """`leuko predict`'s first run of a model: its graph written to the cache and checked on the model's example
    cells; None (with a note on stderr) when the export fails or the graph does not match PyTorch."""
    files = model_files(folder)
    if files is None:
        return None
    where = cache_folder(files)
    tmp = where.with_name(f".{where.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_graph(probabilities(impl), impl.config, tmp / GRAPH)
        graph = OnnxModel(tmp / GRAPH, impl.config)
        cells = example_cells(folder, impl.config)
        worst = max_difference(graph, impl, cells, (1, len(cells)))
        if worst >= PARITY:
            print(
                f"note: {model_uri}: its ONNX graph differs from PyTorch by {worst:.2g} (> {PARITY:g}): "
                "predicting with PyTorch",
                file=sys.stderr,
            )
            return None
        parity = {"max_abs_difference": worst, "n_cells": len(cells), "batch_sizes": [1, len(cells)]}
        meta = sidecar(impl.config, tmp / GRAPH, model_uri=model_uri, parity=parity)
        (tmp / SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.replace(tmp, where)
        except OSError:
            if not (where / SIDECAR).is_file():
                raise  # else another predict wrote the same graph meanwhile: keep that one
        print(f"note: {model_uri}: its ONNX graph (|p - p_torch| <= {worst:.1e}) is cached in {where}", file=sys.stderr)
    except Exception as exc:  # whatever stops the exporter (an op it lacks, a full disk): run with PyTorch
        print(
            f"note: {model_uri}: no ONNX graph ({type(exc).__name__}: {exc}); predicting with PyTorch", file=sys.stderr
        )
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return OnnxModel(where / GRAPH, impl.config)
