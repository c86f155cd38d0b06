"""A registered model run by ONNX Runtime on the CPU, and the cache of its graphs.

`leuko predict` runs a model through ONNX Runtime when it can: the model's net exported once
(leuko.deploy.export) to a graph that maps prepared volumes (B, C, D, H, W) float32 to calibrated class
probabilities, kept in a cache:

    $LEUKO_CACHE_DIR (default $XDG_CACHE_HOME/leuko, else ~/.cache/leuko) / onnx / <key> /
        model.onnx      the graph
        model.json      its sidecar (leuko.deploy.export.sidecar): classes, preprocessing, input shape,
                        temperature, and the parity with PyTorch measured when it was written
    key = sha256 of the model's weight files (weights.safetensors, weights_1 ... for an ensemble), its
          model_config.json (which names its TTA) and GRAPH_VERSION

So each model version gets its graph once, and a changed weight or setting gets a new one. A graph
enters the cache only when its probabilities match PyTorch's within PARITY on the model's own example
cells. OnnxModel answers like the model's inference code (leuko.deploy.pyfunc_model.LeukoModel):
config, classes, temperature, preprocess, predict_proba and predict; it never imports torch, which
is most of a model's loading time. A graph is data: loading one runs no code, so the cache is only as
trustworthy as the folder it is in.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from leuko.deploy.inputs import VolumeModel, check_prepared

GRAPH_VERSION = 1  # bump when the exported graph changes for the same weights and config
PARITY = 1e-4  # largest |p_onnx - p_torch| a graph may show: the probabilities predict writes stay the same
INPUT, OUTPUT = "volumes", "probabilities"  # the graph's input and output names
GRAPH, SIDECAR = "model.onnx", "model.json"
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # MLmodel's loader of a models-from-code pyfunc
BATCH = 32  # volumes per run: the same batches as the PyTorch path


def available() -> bool:
    """Whether onnxruntime can be imported."""
    try:
        import onnxruntime  # noqa: F401  (heavy import here: only when a graph is to be run)
    except ImportError:
        return False
    return True


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is there for PyTorch (asked of the driver, so that torch need not be imported)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return any(Path("/proc/driver/nvidia/gpus").glob("*"))


def cache_root() -> Path:
    if os.environ.get("LEUKO_CACHE_DIR"):
        return Path(os.environ["LEUKO_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "leuko"


def model_files(folder: str | Path) -> dict[str, Path] | None:
    """{"weights", ["weights_1", ...,] "model_config"} of a leuko model folder (MLmodel, artifacts/...): every
    weight file (an ensemble has one per member), then the config; None when the folder is not a leuko
    models-from-code pyfunc (e.g. a pickled model: that is for the pyfunc loader to refuse)."""
    folder = Path(folder)
    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text())
        flavor = meta["flavors"]["python_function"]
        artifacts = flavor["artifacts"]
        extra = sorted((n for n in artifacts if n.startswith("weights_")), key=lambda n: (len(n), n))
        files = {name: folder / artifacts[name]["path"] for name in ("weights", *extra, "model_config")}
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    if flavor.get("loader_module") != CODE_LOADER or not all(p.is_file() for p in files.values()):
        return None
    return files


def cache_folder(files: dict[str, Path]) -> Path:
    """Where the graph of the model with these files lives (the module docstring's key)."""
    digest = hashlib.sha256(f"leuko-onnx-{GRAPH_VERSION}\n".encode())
    for name in files:  # the weights, then the config: a single net's key is what it was before ensembles
        with open(files[name], "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\n")
    return cache_root() / "onnx" / digest.hexdigest()[:32]


def cached(folder: str | Path) -> OnnxModel | None:
    """The cached graph of the model in folder, when there is one that passed its parity check."""
    files = model_files(folder)
    if files is None:
        return None
    where = cache_folder(files)
    try:
        sidecar = json.loads((where / SIDECAR).read_text())
    except (OSError, ValueError):
        return None
    if not (where / GRAPH).is_file() or sidecar.get("parity", {}).get("max_abs_difference", 1.0) >= PARITY:
        return None
    return OnnxModel(where / GRAPH, json.loads(files["model_config"].read_text()))


def session(path: str | Path):
    """A single-threaded onnxruntime CPU session on the graph at path (OnnxModel runs several at once)."""
    import onnxruntime as ort  # heavy import here: only when a graph is to be run

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def default_threads() -> int:
    """OMP_NUM_THREADS when set, else the cores this process may run on."""
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class OnnxModel(VolumeModel):
    """A model's graph with its config: the interface of leuko.deploy.pyfunc_model.LeukoModel, without torch."""

    def __init__(self, path: str | Path, config: dict, *, threads: int | None = None) -> None:
        self.path = Path(path)
        self.use_config(config)  # its temperature is in the graph
        self.session = session(self.path)
        self.threads = threads or default_threads()
        self._pool = ThreadPoolExecutor(max_workers=self.threads) if self.threads > 1 else None

    def predict_proba(self, prepared: np.ndarray) -> np.ndarray:
        """(B, C, *shape) prepared volumes -> (B, classes) calibrated probabilities."""
        prepared = np.ascontiguousarray(prepared, dtype=np.float32)
        check_prepared(self.config, prepared)
        # One part of the batch per thread, each run single-threaded: small 3D convolutions keep the cores
        # busier that way than one run spread over them (measured: 7.1 against 8.5 ms of CPU per 32^3 cell).
        bounds = np.linspace(0, len(prepared), self.threads + 1).round().astype(int)
        parts = [prepared[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        out = list(self._pool.map(self._run, parts)) if self._pool and len(parts) > 1 else list(map(self._run, parts))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def _run(self, part: np.ndarray) -> np.ndarray:
        """(b, C, *shape) -> (b, classes), at most BATCH volumes per run."""
        runs = [self.session.run([OUTPUT], {INPUT: part[i : i + BATCH]})[0] for i in range(0, len(part), BATCH)]
        return np.concatenate(runs)

    def predict(self, model_input, params=None) -> pd.DataFrame:
        """As the pyfunc model's predict: params preprocess (default true) and voxel_size."""
        return self.predict_table(model_input, params)
