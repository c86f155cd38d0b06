"""`leuko predict --model URI`: a registered model on a folder of volumes or a manifest.

Writes, next to each other:
    predictions.csv                cell_id, path, [patient_id, sample_type | folder], [label], pred_label, prob_<class>,
                                   [out_of_distribution], [uncertainty, review], [seen_patient]
    predictions_differential.csv   per sample (patient_id + sample_type from a manifest) or per folder that occurs:
                                   n_cells, [ref_<class> percent of the labelled cells, ref_other], pred_<class> percent
                                   [, n_review: cells to review, retained_<class>: percent of the other cells]
    predictions_skipped.csv        cell_id, path, reason: volumes that could not be read (only if any)
Each volume is read with leuko.data.io.read_volume and prepared with the model's own copy of the
settings `leuko prepare` used for its training data (leuko.data.preprocess.process_cell), by worker threads
(--workers) that read, prepare and check chunks of --batch-size cells (leuko.deploy.inputs.read_cells) a few
chunks ahead of the net. The net runs through ONNX Runtime on the CPU when it can, on a graph cached per
model and checked against PyTorch (load_model's runtime; leuko.deploy.onnx_model).

Input the model was not trained for is refused before anything is written: a manifest whose modality
is not the model's, duplicate cell ids, a manifest with no rows, and an input whose cells mostly lie
outside the intensities of the training data (leuko.deploy.intensity; --allow-out-of-distribution
predicts anyway). A minority of such cells is predicted and flagged in out_of_distribution. Models
registered before the intensity range was stored predict without that check, with a note saying so.

Probabilities are calibrated by the model's temperature (and class biases: leuko.deploy.decisions);
uncertainty, review and seen_patient (cells of a patient the model was trained on, whose scores would be
optimistic) come from what the model stores: see leuko.deploy.trust.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from leuko.data.io import SUPPORTED_SUFFIXES, volume_suffix
from leuko.data.manifest import VOXEL_SIZE_COLUMNS, read_manifest_table
from leuko.data.progress import progress as progress_bar
from leuko.deploy import onnx_model
from leuko.deploy.inputs import read_cells
from leuko.deploy.intensity import cell_quantiles, out_of_distribution_cells
from leuko.deploy.trust import add_trust_columns
from leuko.errors import LeukoError
from leuko.evaluation.agreement import percentages
from leuko.evaluation.review import REVIEW, review_differential
from leuko.tracking.uri import resolve_tracking_uri
from leuko.training.predictions import PRED, probability_table

MANIFEST = "manifest.csv"
SAMPLE_KEYS = ("patient_id", "sample_type")
OOD = "out_of_distribution"
PICKLE_SWITCH = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
RUNTIMES = ("auto", "onnx", "torch")  # see load_model


class PredictError(LeukoError, ValueError):
    """Bad --model, --input or --out; the message says how to fix it."""


def find_cells(source: str | Path, *, voxel_size: Sequence[float] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """(cells, group columns). A manifest (or a folder holding manifest.csv): its rows, grouped by
    patient_id and sample_type when it has them. Any other folder: every volume file below it, grouped by
    the folder each file is in. A manifest's modality column, if any, comes along as `modality`."""
    source = Path(source)
    if source.is_dir() and (source / MANIFEST).is_file():
        source = source / MANIFEST
        print(f"using {source}", file=sys.stderr)
    if source.is_file():
        return _from_manifest(source, voxel_size)
    if not source.is_dir():
        raise PredictError(f"--input {source}: no such file or folder; give a folder of volumes or a manifest CSV")
    files = sorted(p for p in source.rglob("*") if p.is_file() and volume_suffix(p) in SUPPORTED_SUFFIXES)
    if not files:
        raise PredictError(f"--input {source}: no volume files ({', '.join(SUPPORTED_SUFFIXES)}) in it or below it")
    rel = [p.relative_to(source) for p in files]
    cells = pd.DataFrame(
        {
            "cell_id": [str(r.with_name(r.name[: -len(volume_suffix(r))])) for r in rel],
            "path": [str(p) for p in files],
            "folder": [str(r.parent) for r in rel],
        }
    )
    _unique_ids(cells, [str(r) for r in rel], f"--input {source}", "give each volume its own file name")
    _add_voxel_size(cells, voxel_size)
    return cells, ["folder"]


def _from_manifest(path: Path, voxel_size: Sequence[float] | None) -> tuple[pd.DataFrame, list[str]]:
    if path.suffix.lower() != ".csv":
        raise PredictError(f"--input {path}: a file must be a manifest CSV (cell_id, path, ...); or give a folder")
    table = read_manifest_table(path)
    if "path" not in table.columns:
        raise PredictError(f"--input {path}: the manifest has no `path` column (columns: {', '.join(table.columns)})")
    if table.empty:
        raise PredictError(f"--input {path}: the manifest has a header but no cell rows; add one row per volume")
    cells = pd.DataFrame(
        {"cell_id": table["cell_id"] if "cell_id" in table else table["path"], "path": table["abs_path"]}
    )
    _unique_ids(
        cells, [str(n) for n in table["line"]], f"--input {path}", "give each row its own cell_id", kind="lines "
    )
    groups = [k for k in SAMPLE_KEYS if k in table.columns]
    for key in groups + (["label"] if "label" in table.columns else []):
        cells[key] = table[key].to_numpy()
    if "modality" in table.columns:
        cells["modality"] = table["modality"].str.lower().to_numpy()
    if not groups:
        cells["folder"] = [str(Path(p).parent) for p in table["path"]]
        groups = ["folder"]
    if voxel_size is None and all(c in table.columns for c in VOXEL_SIZE_COLUMNS):
        for c in VOXEL_SIZE_COLUMNS:
            cells[c] = pd.to_numeric(table[c], errors="coerce").to_numpy()
    else:
        _add_voxel_size(cells, voxel_size)
    return cells, groups


def _unique_ids(cells: pd.DataFrame, where: list[str], source: str, fix: str, *, kind: str = "") -> None:
    """PredictError naming each cell_id that more than one row (or file) has, and where (kind + where[i])."""
    ids = cells["cell_id"].astype(str).reset_index(drop=True)
    taken = ids[ids.duplicated(keep=False)]
    if taken.empty:
        return
    shown = [
        f"{cell_id} ({kind}{', '.join(where[i] for i in rows)})"
        for cell_id, rows in taken.groupby(taken).groups.items()
    ]
    more = f", ... ({len(shown)} in all)" if len(shown) > 5 else ""
    raise PredictError(f"{source}: duplicate cell_id(s) {', '.join(shown[:5])}{more}; {fix}")


def _add_voxel_size(cells: pd.DataFrame, voxel_size: Sequence[float] | None) -> None:
    for c, v in zip(VOXEL_SIZE_COLUMNS, voxel_size or (np.nan,) * 3):
        cells[c] = float(v)


def load_model(model_uri: str, *, runtime: str = "torch"):
    """(model, impl): what to call predict on, and what answers config, classes and preprocess. MLFLOW_TRACKING_URI,
    or sqlite:///mlflow.db, says where models:/ lives.

    runtime "torch": the pyfunc model and its LeukoModel (the model's own inference code, PyTorch). "onnx":
    the model's ONNX graph from the cache (leuko.deploy.onnx_model), written there on first use if it matches
    PyTorch, as an OnnxModel (both); PyTorch, with a note, when it cannot be. "auto": "onnx" when onnxruntime
    is installed and no NVIDIA GPU is visible, else "torch".

    Nothing is unpickled: a leuko model is code, safetensors weights and JSON, so a model stored as a
    pickle (which would run code stored in it while loading) is refused."""
    # heavy import here: mlflow takes seconds to load
    import mlflow

    uri = resolve_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if "://" not in model_uri and ":/" not in model_uri and not Path(model_uri).exists():
        raise PredictError(
            f"--model {model_uri}: give a model URI such as models:/leuko@champion, or a folder with an MLmodel file"
        )
    use_onnx = _use_onnx(runtime)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one progress bar (ours) is enough
    allowed = os.environ.get(PICKLE_SWITCH)
    os.environ[PICKLE_SWITCH] = "false"
    try:
        folder = mlflow.artifacts.download_artifacts(model_uri)
        graph = onnx_model.cached(folder) if use_onnx else None
        if graph is not None:
            return graph, graph
        model = mlflow.pyfunc.load_model(folder)
    except mlflow.exceptions.MlflowException as exc:
        if "pickle" in exc.message:
            raise PredictError(
                f"--model {model_uri}: refused: it is stored as a pickle, and unpickling runs code stored in the "
                "model. A leuko model is code, safetensors weights and JSON; register one with `leuko register`"
            ) from exc
        raise PredictError(
            f"--model {model_uri}: cannot load it from {uri} ({exc.message.splitlines()[0]}); set "
            "MLFLOW_TRACKING_URI to the store the model was registered in, and check the name, version or alias "
            "(`leuko register` prints them)"
        ) from exc
    finally:
        if allowed is None:
            os.environ.pop(PICKLE_SWITCH, None)
        else:
            os.environ[PICKLE_SWITCH] = allowed
    impl = model.unwrap_python_model()
    if not hasattr(impl, "preprocess"):
        raise PredictError(f"--model {model_uri}: not a leuko model (registered with `leuko register`)")
    if use_onnx:
        from leuko.deploy.graph import cache_graph  # heavy import here (torch's ONNX exporter): a model's first run

        graph = cache_graph(impl, folder, model_uri)
        if graph is not None:
            return graph, graph
    return model, impl


def _use_onnx(runtime: str) -> bool:
    if runtime not in RUNTIMES:
        raise PredictError(f"--runtime {runtime}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return False
    if not onnx_model.available():
        if runtime == "onnx":
            raise PredictError(
                "--runtime onnx: onnxruntime is not installed; pip install onnxruntime, or use --runtime torch"
            )
        return False
    return runtime == "onnx" or not onnx_model.gpu_visible()


def predict(
    model_uri: str,
    source: str | Path,
    out: str | Path = "predictions.csv",
    *,
    batch_size: int = 32,
    voxel_size: Sequence[float] | None = None,
    progress: bool = True,
    allow_out_of_distribution: bool = False,
    runtime: str = "auto",
    workers: int | None = None,
) -> dict:
    """Run the model on every cell; unreadable cells are reported on stderr, listed, and skipped.
    runtime: "auto", "onnx" or "torch" (load_model). workers: threads reading and preparing volumes
    (default: OMP_NUM_THREADS, else the cores this process may use)."""
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise PredictError(f"--out {out}: give a .csv file name (the differential goes next to it)")
    if batch_size < 1:
        raise PredictError(f"--batch-size {batch_size}: must be at least 1")
    if workers is not None and workers < 1:
        raise PredictError(f"--workers {workers}: must be at least 1")
    cells, groups = find_cells(source, voxel_size=voxel_size)
    _, impl = load_model(model_uri, runtime=runtime)  # impl.predict_proba: the pyfunc model's own inference
    settings = impl.config["preprocessing"]
    _check_modality(cells, settings.get("modality"), source, model_uri)
    if settings.get("target_voxel_size") is not None and cells[list(VOXEL_SIZE_COLUMNS)].isna().any(axis=None):
        raise PredictError(
            f"the model resamples to {settings['target_voxel_size']} um, so it needs each volume's voxel size: "
            "give a manifest with voxel_size_z/y/x, or --voxel-size Z Y X"
        )
    reference = impl.config.get("intensity")
    if reference is None:
        print(
            f"note: {model_uri} was registered without the intensity range of its training data: the "
            "out-of-distribution check is off (register the model again to turn it on)",
            file=sys.stderr,
        )
    workers = workers or onnx_model.default_threads()
    kept, probs, reasons, skipped = _run(cells, impl, reference, batch_size, workers, progress=progress)
    paths = _paths(out)
    if not kept:
        _write_skipped(paths["skipped"], skipped)
        raise PredictError(f"none of the {len(cells)} volume(s) could be read (see {paths['skipped']})")
    drop = list(VOXEL_SIZE_COLUMNS) + (["modality"] if "modality" in cells.columns else [])
    table = cells.iloc[kept].reset_index(drop=True).drop(columns=drop)
    table = pd.concat([table, probability_table(np.concatenate(probs), impl.classes)], axis=1)
    if reference is not None:
        table[OOD] = [bool(r) for r in reasons]
        _check_distribution(table, reasons, model_uri, allow_out_of_distribution)  # before anything is written
    trust = add_trust_columns(table, impl.config, impl.classes, model_uri)  # uncertainty, review, seen_patient
    _write_skipped(paths["skipped"], skipped)
    table.to_csv(out, index=False)
    differential(table, impl.classes, groups).to_csv(paths["differential"], index=False)
    return {
        "n_cells": len(table),
        "n_skipped": len(skipped),
        "n_out_of_distribution": int(table[OOD].sum()) if reference is not None else None,
        **trust,
        "paths": paths,
        "groups": groups,
        "classes": impl.classes,
        "runtime": "onnxruntime" if isinstance(impl, onnx_model.OnnxModel) else "pytorch",
    }


def _write_skipped(path: Path, skipped: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if skipped:
        pd.DataFrame(skipped).to_csv(path, index=False)
    elif path.exists():
        os.remove(path)  # from an earlier run: it would describe other inputs


def _paths(out: Path) -> dict[str, Path]:
    base = out.with_suffix("")
    return {
        "predictions": out,
        "differential": Path(f"{base}_differential.csv"),
        "skipped": Path(f"{base}_skipped.csv"),
    }


def _check_modality(cells: pd.DataFrame, trained: str | None, source, model_uri: str) -> None:
    """PredictError when the manifest names a modality other than the one the model was trained on."""
    if trained is None:
        print(f"note: {model_uri} does not record its modality: the modality check is off", file=sys.stderr)
        return
    given = sorted({m for m in cells.get("modality", pd.Series(dtype=object)).dropna() if m})
    if given and given != [trained]:
        raise PredictError(
            f"--input {source}: the manifest gives modality {', '.join(given)}, but {model_uri} was trained on "
            f"{trained} data; give it {trained} volumes, or use a model trained on {given[0]} data"
        )


def _check_distribution(table: pd.DataFrame, reasons: list[str], model_uri: str, allow: bool) -> None:
    """Report cells outside the training intensities; PredictError when they are most cells, unless allowed."""
    out = [i for i, r in enumerate(reasons) if r]
    if not out:
        return
    first = f"{table['cell_id'].iloc[out[0]]}: {reasons[out[0]]}"
    if 2 * len(out) > len(table) and not allow:
        raise PredictError(
            f"{len(out)} of {len(table)} cells are out of the training data's intensity range (e.g. {first}): this "
            f"input is not what {model_uri} was trained for (another modality, scale or instrument?). Check --input "
            "and --model; to predict anyway, pass --allow-out-of-distribution (the cells are flagged in the "
            f"{OOD} column)"
        )
    print(
        f"warning: {len(out)} of {len(table)} cells are out of the training data's intensity range (e.g. {first}); "
        f"they are flagged in the {OOD} column: do not trust their predictions",
        file=sys.stderr,
    )


def _run(
    cells: pd.DataFrame, impl, reference: dict | None, batch_size: int, workers: int, *, progress: bool
) -> tuple[list[int], list, list[str], list[dict]]:
    """(rows of cells read, their (b, classes) probability batches, why each read cell is out of distribution
    ('' when it is not, or without a reference), {cell_id, path, reason} of the skipped ones)."""
    config = impl.config
    paths = cells["path"].astype(str).tolist()
    sizes = [None if np.isnan(s).any() else tuple(s) for s in cells[list(VOXEL_SIZE_COLUMNS)].to_numpy(float)]

    def chunk(start: int) -> tuple:  # in a worker thread: read, prepare and check cells start .. start + batch_size
        stop = min(start + batch_size, len(cells))
        windows, rows, errors = read_cells(config, paths[start:stop], sizes[start:stop])  # (k, C, *shape)
        why = out_of_distribution_cells(cell_quantiles(windows), reference) if reference else [""] * len(rows)
        return stop - start, windows, [start + r for r in rows], {start + i: e for i, e in errors.items()}, why

    kept, probs, reasons, skipped = [], [], [], []
    starts = iter(range(0, len(cells), batch_size))
    bar = progress_bar(total=len(cells), desc="predict", unit="cell", enabled=progress)
    # One thread runs the net (outside the GIL) on a chunk while the workers prepare the next ones; at most
    # workers + 1 chunks are prepared ahead and one waits for the net, so memory stays at a few chunks.
    net = ThreadPoolExecutor(max_workers=1)
    with ThreadPoolExecutor(max_workers=workers) as pool, net, bar:
        pending = deque(pool.submit(chunk, start) for start in itertools.islice(starts, workers + 1))
        inferring: deque = deque()
        while pending or inferring:
            if pending:
                n, windows, rows, errors, why = pending.popleft().result()
                pending.extend(pool.submit(chunk, start) for start in itertools.islice(starts, 1))
                for i, exc in errors.items():
                    reason = " ".join(str(exc).split())
                    bar.write(f"skipped {cells['cell_id'].iat[i]}: {reason}")
                    skipped.append({"cell_id": cells["cell_id"].iat[i], "path": paths[i], "reason": reason})
                inferring.append((n, net.submit(impl.predict_proba, windows) if rows else None))
                kept.extend(rows)
                reasons.extend(why)
            while inferring and (len(inferring) > 1 or not pending):
                n, result = inferring.popleft()
                if result is not None:
                    probs.append(result.result())  # (b, classes)
                bar.update(n)
    return kept, probs, reasons, skipped


def differential(cells: pd.DataFrame, classes: Sequence[str], groups: list[str]) -> pd.DataFrame:
    """Per group that occurs: n_cells, pred_<class> percent and, with labels, ref_<class> percent of the
    group's labelled cells. Labels that are not model classes are named in a warning and counted as
    ref_other; cells without a label are left out of the reference."""
    classes = list(classes)
    keys = cells[groups].astype(str).reset_index(drop=True)
    table = keys.groupby(groups, sort=True).size().rename("n_cells").to_frame()  # index: the groups that occur
    if "label" in cells.columns:
        labels = cells["label"].reset_index(drop=True)
        labelled = labels.notna() & (labels.astype(str).str.strip() != "")
        labels = labels.astype(str).str.strip().where(labelled)  # (N,) text, NaN where unlabelled
        unknown = sorted(set(labels[labelled]) - set(classes))
        other = "other" if "other" not in classes else "other_label"
        if unknown:
            counts = labels[labels.isin(unknown)].value_counts()
            print(
                f"warning: label(s) {', '.join(f'{u} ({counts[u]} cells)' for u in unknown)} are not classes of the "
                f"model ({', '.join(classes)}): ref_<class> is each class's share of the labelled cells, "
                f"ref_{other} the share of these",
                file=sys.stderr,
            )
            labels = labels.where(~labels.isin(unknown), other)
        table = table.join(percentages(labels, keys, classes + ([other] if unknown else []), "ref_"))
    table = table.join(percentages(cells[PRED].reset_index(drop=True), keys, classes, "pred_"))
    if REVIEW in cells.columns:  # the differential without the cells flagged for review
        table = table.join(review_differential(cells, classes, groups, PRED))
    table.columns.name = None
    return table.reset_index()
