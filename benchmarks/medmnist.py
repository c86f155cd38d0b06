"""A MedMNIST 3D dataset on its official split: test AUROC, accuracy and balanced accuracy, mean and 95% CI over seeds.

    python benchmarks/medmnist.py --seeds 3                              # the default recipe on VesselMNIST3D
    python benchmarks/medmnist.py --npz organmnist3d_64.npz --seeds 5 --json organ.json
    python benchmarks/medmnist.py --limit 64 --max-epochs 1 --threads 1  # a smoke run in about a minute
    python benchmarks/medmnist.py --nets resnet3d_50_tiny,fishnet3d_tiny:30 --epochs 10 --seeds 3
    python benchmarks/medmnist.py --seeds 5 --results benchmarks/RESULTS.md  # also rewrite its MedMNIST section
    python benchmarks/medmnist.py --folds 5 --seeds 3                   # 5 fold models as one
    python benchmarks/medmnist.py --seeds 9 --groups 3                  # 3 seeds' models as one, 3 times over
    python benchmarks/medmnist.py --recipe conf/experiment/phantoms_tiny.yaml  # the phantoms' fast recipe
    python benchmarks/medmnist.py --tta none --decisions balanced       # the net's own argmax on one view

--npz: train/val/test _images (N, D, H, W) or (N, D, H, W, C) and _labels (N, 1) or one-hot (N, K). Work folder:
<work>/<file stem>/. Classes: MedMNIST's names for its 3D sets, else class_<i>. AUROC: of label 1 for two classes,
else macro one-vs-rest. Default: the project's recipe for real volumes, conf/experiment/real_volumes.yaml (read at
run time), on the MedMNIST data, its best validation checkpoint tested once over the 8 flip views with labels at
the data's class mix (--tta flip --decisions prevalence); --recipe FILE...: these config files instead, layered in
order as `leuko fit --config A --config B` layers them. --nets: the MedMNIST v2 protocol (Yang et al. 2023):
Adam, lr 1e-3, x0.1 at 50% and 75% of the epochs, batch 32, 100 epochs, no augmentation or weight decay, best
val AUC; a ViT's patch is the largest side <= 8 dividing the shape. --seeds N: seeds 0..N-1 (seed_everything and
data), Student t 95% CI of the mean, and the ensemble of the seeds (their mean test probabilities, scored once;
"ensemble" in --json); --groups K: the same for disjoint groups of K seeds (0..K-1, K..2K-1, ...), mean and 95% CI
over the groups ("ensemble_groups"). --folds K: per seed, a K-fold CV of the recipe on the official train + val volumes
(class-stratified), its K fold models one model (their mean probability, as `leuko register --ensemble` ships
it); --tta flip|flip_rot90|none: that model averages over the views (leuko.deploy.tta). --decisions prevalence: the
model's probabilities get a temperature and one bias per class fitted on its validation predictions (the official
val split; with --folds, out of fold; kept in <cache>-val.csv), bias-corrected temperature scaling, fitted on and
applied to the model's output (members and views averaged). `leuko register --decisions prevalence` fits them on
its CV's out-of-fold cells (no views) and applies them to each member and view before averaging
(leuko.deploy.decisions); the same rule, fitted on other cells. The recipe's balanced sampler trains for equal
classes; prevalence moves the labels to the data's own class mix, which is what accuracy (MedMNIST's ACC, and a
count per class) asks for, and how the published models, trained on that mix, label; balanced accuracy drops.
--decisions balanced keeps the net's own argmax. Results kept in
<work>/<stem>/results/ are reused (delete one to redo it); the recipe's are keyed on its settings, not its comments.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from leuko.data.medmnist import INFO, MANIFEST, MedMNISTError, import_medmnist
from leuko.data.prepare import prepare
from leuko.deploy.decisions import DECISIONS, DEFAULT_DECISIONS
from leuko.deploy.tta import TTA_MODES
from leuko.errors import LeukoError
from leuko.evaluation.metrics import pooled_metrics
from leuko.training import run_dir
from leuko.training.epoch_log import EpochLog
from leuko.training.predictions import PRED, predictions_frame

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NPZ = ROOT.parent / "shared" / "data" / "medmnist3d" / "vesselmnist3d.npz"
RECIPE = ROOT / "conf" / "experiment" / "real_volumes.yaml"  # the project's default recipe for real volumes
RECIPE_VIEWS, RECIPE_DECISIONS = "flip", "prevalence"  # how the benchmark scores a recipe unless told otherwise
# MedMNIST v2 benchmark table, 28^3 (VesselMNIST3D also in ../shared/data/medmnist3d/README.md).
PUBLISHED = {"vesselmnist3d": {"net": "ResNet-50+3D (MedMNIST v2, published)", "auroc": 0.907, "accuracy": 0.918}}
# The protocol's optimiser and schedule (VolumeClassifier arguments); lr comes from --lr.
PROTOCOL = dict(optimizer="adam", weight_decay=0.0, warmup_epochs=0.0)
PROTOCOL |= dict(scheduler="multistep", milestones=(0.5, 0.75), gamma=0.1)
METRICS = ("auroc", "accuracy", "balanced_accuracy")
SPLITS = ("train", "val", "test")
RESULTS_HEADING = "## MedMNIST"


def _array_shape(archive: zipfile.ZipFile, key: str) -> tuple[int, ...]:
    """The shape of one array of an .npz, read from its header (a 64^3 file need not be decompressed)."""
    with archive.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(f)[0]


def check_npz(npz: Path) -> bool:
    """Raise MedMNISTError naming the file and key when npz is no MedMNIST 3D file; True when labels are one-hot."""
    if not npz.is_file():
        raise MedMNISTError(f"{npz}: no such file; give --npz the path of a MedMNIST 3D .npz (e.g. vesselmnist3d.npz)")
    try:
        with zipfile.ZipFile(npz) as archive:
            keys = sorted(name.removesuffix(".npy") for name in archive.namelist())
            missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in keys]
            if missing:
                raise MedMNISTError(f"{npz}: no key {', '.join(missing)} (keys: {', '.join(keys)}); a MedMNIST file "
                                    "holds train, val and test _images and _labels")  # fmt: skip
            shapes = {s: _array_shape(archive, f"{s}_images") for s in SPLITS}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise MedMNISTError(f"{npz}: not a readable .npz file ({exc}); give a MedMNIST 3D .npz") from exc
    with np.load(npz) as data:
        labels = {s: data[f"{s}_labels"] for s in SPLITS}
    for split, shape in shapes.items():
        n, lab = shape[0], labels[split]
        if not (len(shape) == 4 or (len(shape) == 5 and shape[-1] in (1, 3))):
            raise MedMNISTError(f"{npz}: {split}_images has shape {shape}; expected volumes (N, D, H, W) or "
                                "(N, D, H, W, C) with C 1 or 3")  # fmt: skip
        if n == 0 or lab.ndim not in (1, 2) or len(lab) != n:
            raise MedMNISTError(f"{npz}: {split}_labels has shape {lab.shape} but {split}_images holds {n} volume(s); "
                                f"expected ({n}, 1) class indices or ({n}, K) one-hot rows, at least one")  # fmt: skip
        if lab.ndim == 2 and lab.shape[1] > 1 and not (np.isin(lab, (0, 1)).all() and (lab.sum(axis=1) == 1).all()):
            raise MedMNISTError(f"{npz}: {split}_labels is {lab.shape} but not one-hot (one 1 per row); multi-label "
                                "MedMNIST sets are not supported")  # fmt: skip
    return any(lab.ndim == 2 and lab.shape[1] > 1 for lab in labels.values())


def prepare_data(npz: Path, folder: Path, *, limit: int | None = None) -> Path:
    """Import npz into folder/imported (once per file version), keep `limit` random train volumes, prepare."""
    onehot = check_npz(npz)
    imported, marker = folder / "imported", folder / "source.json"
    source = {"npz": str(npz.resolve()), "size": npz.stat().st_size, "mtime_ns": npz.stat().st_mtime_ns}
    if not (imported / MANIFEST).is_file() or not marker.is_file() or json.loads(marker.read_text()) != source:
        folder.mkdir(parents=True, exist_ok=True)
        indexed = folder / npz.name if onehot else npz
        if onehot:  # the importer takes class indices: a converted copy, of the same name for the same class names
            with np.load(npz) as data:
                labels = {f"{s}_labels" for s in SPLITS}
                np.savez(indexed, **{k: data[k].argmax(axis=1)[:, None] if k in labels else data[k] for k in data})
        import_medmnist(indexed, imported)
        if onehot:
            indexed.unlink()
        marker.write_text(json.dumps(source) + "\n")
    info = json.loads((imported / INFO).read_text())
    manifest, out = imported / MANIFEST, folder / "prepared"
    if limit is not None:  # `limit` train rows drawn at random (a fixed seed), val and test whole
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        drop = np.random.default_rng(0).permutation(np.flatnonzero(table["split"] == "train"))[limit:]
        manifest, out = manifest.with_name(f"manifest-train{limit}.csv"), folder / f"prepared-train{limit}"
        table.drop(index=drop).to_csv(manifest, index=False)
    result = prepare(manifest, out, shape=info["shape"][-3:], classes=info["classes"], progress=False)
    return Path(result.out_dir)


def _recipe_cli(
    recipe: list[Path],
    prepared: Path,
    *,
    seed: int,
    opts: argparse.Namespace,
    root: Path,
    fold: int = 0,
    splits: Path | None = None,
):
    """The recipe's LeukoCLI (not run) on the prepared MedMNIST data; fold 0 of no splits is the official val.

    Fold f starts from its own weights as in `leuko cv` (leuko.training.cv.fold_seed_args), counted from seed * K
    with --folds K so that no two seeds share a fold model's initialisation.
    """
    from leuko.training.cli import LeukoCLI
    from leuko.training.cv import fold_seed_args

    init = fold_seed_args(seed * (opts.folds or 1), fold)  # one fit (no --folds): fold 0, the seed itself
    args = [arg for config in recipe for arg in ("--config", str(config))] + [*init, "--data.seed", str(seed)]
    args += ["--data.prepared_dir", str(prepared), "--data.splits", str(splits or "null"), "--data.fold", str(fold)]
    args += ["--trainer.default_root_dir", str(root), "--tracking.enabled", "false", "--trainer.logger", "false"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    for flag, value in [("trainer.max_epochs", opts.max_epochs), ("trainer.accelerator", opts.accelerator),
                        ("data.num_workers", opts.num_workers)]:  # fmt: skip
        args += [f"--{flag}", str(value)] if value is not None else []
    cli = LeukoCLI(args=args, run=False)
    where = "" if splits is None else f" fold {fold}"
    for callback in cli.trainer.callbacks:  # the progress bar is off, so LeukoCLI prints a line per epoch
        if isinstance(callback, EpochLog):
            callback.label = f"{cli.model.hparams.net} seed {seed}{where}"
    return cli


def fit_recipe(recipe: list[Path], prepared: Path, *, seed: int, opts: argparse.Namespace, root: Path) -> tuple:
    """One fit of the recipe on the prepared MedMNIST data (fold 0 = the official val split); with --folds K, a
    K-fold CV on the official train + val volumes (class-stratified, seeded) whose K fold models form one model;
    with --tta, the model averages over those views. Tested once, as `leuko register --ensemble --tta` ships it
    (leuko.deploy.ensemble.Ensemble; uncalibrated: T = 1)."""
    if _one_fit(opts):
        cli = _recipe_cli(recipe, prepared, seed=seed, opts=opts, root=root)
        return _fit_and_test(cli.trainer, cli.model, cli.datamodule, weights_only=None)
    splits = None if opts.folds is None else write_cv_splits(prepared, root / "splits.csv", k=opts.folds, seed=seed)
    members, fits = [], []
    for fold in range(opts.folds or 1):
        cli = _recipe_cli(
            recipe, prepared, seed=seed, opts=opts, root=_fit_dir(root, opts, fold), fold=fold, splits=splits
        )
        cells, result = _fit_and_test(cli.trainer, cli.model, cli.datamodule, weights_only=None)
        members.append(cli.model.eval())  # the predict in _fit_and_test loaded the best checkpoint into it
        fits.append(result)
        print(json.dumps({"fold": fold, **{m: result[m] for m in METRICS}}), file=sys.stderr, flush=True)
    cells = ensemble_predictions(members, cli.datamodule, opts.tta)
    return cells, {
        "net": fits[0]["net"],
        **heldout_scores(cells, members[0].class_names),
        "members": len(members),
        "tta": opts.tta,
        "member_mean": {m: _number(np.mean([f[m] for f in fits])) for m in METRICS},
        "params_m": fits[0]["params_m"],
        "epochs": _span([f["epochs"] for f in fits]),
        "best_epoch": _span([f["best_epoch"] for f in fits]),
        "selected_on": fits[0]["selected_on"],
        "val_score": _number(np.mean([f["val_score"] for f in fits])),
        "train_s": round(sum(f["train_s"] for f in fits), 1),
    }


def _one_fit(opts: argparse.Namespace) -> bool:
    """One fit, tested without views: fit_recipe trains and tests it as `leuko fit` would, in root itself."""
    return opts.folds is None and opts.tta == "none"


def _fit_dir(root: Path, opts: argparse.Namespace, fold: int) -> Path:
    """Where fit_recipe trains fold `fold` (its checkpoints/): root itself for one fit without views, else
    root/fold_<fold>."""
    return root if _one_fit(opts) else run_dir.fold_dir(root, fold)


def validation_table(recipe: list[Path], prepared: Path, *, seed: int, opts: argparse.Namespace, root: Path):
    """The validation probabilities of a finished fit of the recipe (root: its run folder), from its best
    checkpoints, over the --tta views: the official val split (one fit), or with --folds K each fold model on its
    own val fold (out of fold). Columns cell_id, pred_label, prob_<class>, label, fold."""
    splits = None if opts.folds is None else root / "splits.csv"
    parts = []
    for fold in range(opts.folds or 1):
        where = _fit_dir(root, opts, fold)
        checkpoint = where / run_dir.CHECKPOINTS / run_dir.BEST
        if not checkpoint.is_file():
            raise MedMNISTError(
                f"{checkpoint}: no such file, so no validation predictions to calibrate on; delete the cached "
                f"result {root.name}.json (and its .csv) in {root.parent.parent / 'results'} to fit it again"
            )
        cli = _recipe_cli(recipe, prepared, seed=seed, opts=opts, root=where, fold=fold, splits=splits)
        cli.datamodule.setup("fit")
        cli.model.load_state_dict(run_dir.load_checkpoint(checkpoint)["state_dict"])
        parts.append(ensemble_predictions([cli.model.eval()], cli.datamodule, opts.tta, "val").assign(fold=fold))
    return pd.concat(parts, ignore_index=True)


def prevalence_decisions(result: dict, cells: pd.DataFrame, val: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """(result, test table) of the model with bias-corrected temperature scaling fitted on val (--decisions
    prevalence): the metrics of the rescaled test probabilities, the fit's own kept under "calibration"."""
    from leuko.evaluation.calibration import fit_bias_corrected, label_indices, scale
    from leuko.training.predictions import classes_from_columns, prob_columns

    classes = classes_from_columns(cells.columns)
    columns = prob_columns(classes)
    temperature, bias = fit_bias_corrected(val[columns].to_numpy(), label_indices(val, classes))
    cells = cells.copy()
    cells[columns] = scale(cells[columns].to_numpy(), temperature, bias)
    cells[PRED] = np.array(classes)[cells[columns].to_numpy().argmax(axis=1)]
    calibration = {"temperature": temperature, "bias": dict(zip(classes, bias.tolist())), "fitted_on": len(val),
                   "uncalibrated": {m: result[m] for m in METRICS}}  # fmt: skip
    label = f"{result['label']}, prevalence decisions"
    return {**result, "label": label, **heldout_scores(cells, classes), "calibration": calibration}, cells


def write_cv_splits(prepared: Path, path: Path, *, k: int, seed: int) -> Path:
    """A splits CSV: the official test volumes held out, train + val in k class-stratified folds (seeded)."""
    from sklearn.model_selection import StratifiedKFold

    from leuko.data.folds import TEST, write_splits
    from leuko.data.prepared import load_prepared

    cells = load_prepared(prepared)[1]
    dev = np.flatnonzero(cells["split"].astype(str).to_numpy() != TEST)
    fold = np.full(len(cells), TEST, dtype=object)
    folds = StratifiedKFold(k, shuffle=True, random_state=seed).split(dev, cells["label"].to_numpy()[dev])
    for f, (_, val) in enumerate(folds):
        fold[dev[val]] = str(f)
    return write_splits(cells.assign(fold=fold), path)


def ensemble_predictions(members: list, data, tta: str, subset: str = "test") -> pd.DataFrame:
    """The test table (cell_id, pred_label, prob_<class>, label) of the members' mean probability over the tta
    views: the terms `leuko register --ensemble` scores (leuko.tracking.fold_ensemble.held_out_terms), T = 1.
    subset "val": the same for the validation cells."""
    from leuko.tracking.fold_ensemble import held_out_terms
    from leuko.training.predictions import probability_table

    rows = data.subset(subset)
    probs = held_out_terms(members, data, 1.0, tta, subset=subset).mean(axis=(0, 1))  # (N, classes)
    cells = probability_table(probs, members[0].class_names, cell_id=rows["cell_id"].astype(str).to_list())
    cells["label"] = rows["label"].to_numpy()
    return cells


def _span(values: list[int]) -> str | int:
    return values[0] if min(values) == max(values) else f"{min(values)}-{max(values)}"


def fit_protocol(net: str, prepared: Path, *, seed: int, epochs: int, opts: argparse.Namespace, root: Path) -> tuple:
    """One fit of the MedMNIST v2 protocol (see the module docstring)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from leuko.data.datamodule import LeukoDataModule
    from leuko.training.module import VolumeClassifier

    L.seed_everything(seed, workers=True, verbose=False)
    workers = opts.num_workers or 0
    data = LeukoDataModule(str(prepared), fold=0, batch_size=opts.batch_size, num_workers=workers, seed=seed)
    # ViT 3D: patches of the largest side <= 8 that divides the volume (7^3 at 28^3; its defaults do not divide 28)
    patch = max(p for p in range(1, 9) if all(side % p == 0 for side in data.shape))
    model = VolumeClassifier(
        net=net,
        net_kwargs={"patch_size": patch} if net in ("vit3d", "vit3d_tiny") else None,
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        class_names=data.classes,
        input_shape=data.shape,
        lr=opts.lr,
        **PROTOCOL,
    )
    best = ModelCheckpoint(root / "checkpoints", "best", monitor="val/auroc", mode="max", enable_version_counter=False)
    quiet = dict(devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    callbacks = [best, EpochLog(f"{net} seed {seed}")]
    trainer = L.Trainer(max_epochs=epochs, accelerator=opts.accelerator or "cpu", callbacks=callbacks, **quiet)
    return _fit_and_test(trainer, model, data, weights_only=False)  # its own checkpoint, with the data's hparams


def _fit_and_test(trainer, model, data, *, weights_only: bool | None) -> tuple[pd.DataFrame, dict]:
    """Fit, then predict the test split once with the best validation checkpoint: (its test table, the numbers)."""
    import torch

    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_s = time.perf_counter() - started
    best = trainer.checkpoint_callback
    data.hparams.predict_split = "test"
    preds = trainer.predict(model, datamodule=data, ckpt_path=best.best_model_path, weights_only=weights_only)
    cells = predictions_frame(preds, model.class_names)
    cells["label"] = data.index.set_index("cell_id").loc[cells["cell_id"], "label"].to_numpy()
    checkpoint = torch.load(best.best_model_path, map_location="cpu", weights_only=False)  # this run's own file
    return cells, {
        "net": model.hparams.net,
        **heldout_scores(cells, model.class_names),
        "params_m": sum(p.numel() for p in model.net.parameters()) / 1e6,
        "epochs": trainer.current_epoch,  # trained (an early stop ends before max_epochs)
        "best_epoch": int(checkpoint["epoch"]) + 1,
        "selected_on": best.monitor,
        "val_score": _number(best.best_model_score),
        "train_s": round(train_s, 1),
    }


def recipe_label(result: dict) -> str:
    """The table's name of the recipe's model: its net, with the fold models and TTA views it averages."""
    parts = [f"{result['members']} fold models"] if result.get("members", 1) > 1 else []
    parts += [f"{result['tta']} TTA"] if result.get("tta", "none") != "none" else []
    return result["net"] + (f" ({', '.join(parts)})" if parts else "")


def heldout_scores(cells, classes: list[str]) -> dict:
    """AUROC (of label 1 for two classes), accuracy and balanced accuracy of one table of test probabilities."""
    scores = pooled_metrics(cells, classes)
    if len(classes) == 2:  # binary: AUROC of the positive class (label 1)
        scores["auroc"] = _binary_auroc(cells, classes[1])
    return {k: _number(scores.get(k)) for k in METRICS}


def ensemble_scores(tables: list[pd.DataFrame]) -> dict:
    """heldout_scores of the mean probabilities of several runs' test predictions (an ensemble of the seeds)."""
    probs = [c for c in tables[0].columns if c.startswith("prob_")]
    mean = tables[0][["cell_id", "label"]].copy()
    mean[probs] = np.mean([t.set_index("cell_id").loc[mean["cell_id"], probs].to_numpy() for t in tables], axis=0)
    classes = [c.removeprefix("prob_") for c in probs]
    mean[PRED] = np.array(classes)[mean[probs].to_numpy().argmax(axis=1)]
    return heldout_scores(mean, classes)


def group_scores(tables: list[pd.DataFrame], k: int) -> dict:
    """ensemble_scores of disjoint groups of k consecutive seeds' tables: {"k", "groups": [{"seeds", metric: ..}],
    "summary": {metric: confidence_interval over the groups}} (the spread of an ensemble of k models)."""
    groups = [{"seeds": list(range(i, i + k)), **ensemble_scores(tables[i : i + k])} for i in range(0, len(tables), k)]
    return {"k": k, "groups": groups, "summary": {m: confidence_interval([g[m] for g in groups]) for m in METRICS}}


def _binary_auroc(cells, positive: str) -> float:
    from sklearn.metrics import roc_auc_score

    y = (cells["label"] == positive).to_numpy()
    return float(roc_auc_score(y, cells[f"prob_{positive}"])) if 0 < y.sum() < len(y) else math.nan


def _number(value) -> float | None:
    """A finite float, or None (JSON null) for an undefined score (e.g. AUROC with one class in test)."""
    return float(value) if value is not None and math.isfinite(float(value)) else None


def confidence_interval(values: list[float | None], confidence: float = 0.95) -> dict:
    """{"mean", "ci_low", "ci_high", "n"}: a Student t interval of the mean over seeds (null below two values)."""
    x = np.array([v for v in values if v is not None], dtype=float)
    mean, low, high = (float(x.mean()) if len(x) else None), None, None
    if len(x) > 1:
        sem = float(stats.sem(x))
        # t.interval needs a positive scale: equal values give the degenerate interval [mean, mean]
        low, high = (mean, mean) if sem == 0 else map(float, stats.t.interval(confidence, len(x) - 1, mean, sem))
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": int(len(x))}


def summarise(runs: list[dict]) -> dict:
    nets = dict.fromkeys(r["label"] for r in runs)
    return {n: {m: confidence_interval([r[m] for r in runs if r["label"] == n]) for m in METRICS} for n in nets}


def _fmt(value: float | None, ci: tuple = (None, None)) -> str:
    return "–" if value is None else f"{value:.3f}" + ("" if ci[0] is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


def table(
    runs: list[dict], per_net: dict, published: dict | None, ensembles: dict | None = None, groups: dict | None = None
) -> str:
    """Markdown: a row per run, the mean [95% CI] over seeds and the ensemble of the seeds per net (and of groups
    of seeds: group_scores), the published."""
    head = "| net | seed | params (M) | epochs | best epoch (val) | test AUC | test ACC | test balanced ACC | train |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        scores = " | ".join(_fmt(r[m]) for m in METRICS)
        lines.append(f"| {r['label']} | {r['seed']} | {r['params_m']:.3f} | {r['epochs']} | {r['best_epoch']} "
                     f"({_fmt(r['val_score'])}) | {scores} | {r['train_s']:.0f} s |")  # fmt: skip
    for net, summary in per_net.items():
        scores = " | ".join(_fmt(s["mean"], (s["ci_low"], s["ci_high"])) for s in summary.values())
        n = max(s["n"] for s in summary.values())
        lines.append(f"| **{net}: mean [95% CI]** | {n} seed(s) | | | | {scores} | |")
        if ensemble := (ensembles or {}).get(net):  # one model: the mean probability of the seeds' models
            lines.append(f"| {net}: ensemble of the seeds | {n} | | | | {' | '.join(map(_fmt, ensemble.values()))} | |")
        if group := (groups or {}).get(net):
            scores = " | ".join(_fmt(s["mean"], (s["ci_low"], s["ci_high"])) for s in group["summary"].values())
            count = len(group["groups"])
            lines.append(
                f"| **{net}: {count} ensembles of {group['k']} seeds, mean [95% CI]** | {n} | | | | {scores} | |"
            )
    if p := published:
        lines.append(f"| {p['net']} | – | – | 100 | – | {p['auroc']:.3f} | {p['accuracy']:.3f} | – | – |")
    return "\n".join(lines)


def environment(accelerator: str | None) -> str:
    import lightning
    import torch

    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        cpu = platform.processor() or platform.machine()
        device = f"CPU ({cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    return f"{device}; Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}"


def plan(opts: argparse.Namespace) -> list[tuple[str | None, str | None, int | None]]:
    """(label, net, epochs) per setting: one per --nets item, else the recipe's (None, None, --max-epochs)."""
    settings = []
    for item in [n.strip() for n in (opts.nets or "").split(",") if n.strip()]:
        net, _, epochs = item.partition(":")
        epochs = int(epochs or opts.epochs)
        settings.append((item, net, min(epochs, opts.max_epochs or epochs)))
    return settings or [(None, None, opts.max_epochs)]


def recipe_key(*configs: Path) -> str:
    """8 hex digits of the recipe's settings (each parsed YAML, keys sorted): a changed comment keeps its results.

    One file is keyed on its settings alone, several on the list of them in order (as they are layered)."""
    settings = [_read_config(config) for config in configs]
    key = json.dumps(settings[0] if len(settings) == 1 else settings, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def run(opts: argparse.Namespace) -> dict:
    """Every (setting, seed) of opts: rows, summary, and the details (also written to <work>/<stem>/results.json)."""
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    folder = Path(opts.work) / opts.npz.name.removesuffix(".npz")
    prepared = prepare_data(opts.npz, folder, limit=opts.limit)
    configs = opts.recipe or [RECIPE]
    recipe = f"recipe-{recipe_key(*configs)}"  # a changed recipe is trained again
    runs, tables = [], {}  # tables: each setting's test probabilities per seed, for the ensemble of its seeds
    shipped = ("" if opts.folds is None else f"-k{opts.folds}") + ("" if opts.tta == "none" else f"-{opts.tta}")
    for label, net, epochs in plan(opts):
        for seed in range(opts.seeds):
            key = f"{net}-e{epochs}-b{opts.batch_size}-lr{opts.lr:g}" if net else f"{recipe}-e{epochs or 'r'}{shipped}"
            cache = folder / "results" / f"{key}-s{seed}{'' if opts.limit is None else f'-train{opts.limit}'}.json"
            print(f"--- {folder.name}: {label or 'default recipe'}, seed {seed}", file=sys.stderr, flush=True)
            root = folder / "runs" / cache.stem
            if cache.is_file():
                result, test = json.loads(cache.read_text()), cache.with_suffix(".csv")
                cells = pd.read_csv(test) if test.is_file() else None
                print(f"result from {cache}", file=sys.stderr, flush=True)
            else:
                cache.with_name(f"{cache.stem}-val.csv").unlink(missing_ok=True)  # another fit's, if any
                if net is None:
                    cells, result = fit_recipe(configs, prepared, seed=seed, opts=opts, root=root)
                else:
                    cells, result = fit_protocol(net, prepared, seed=seed, epochs=epochs, opts=opts, root=root)
                result = {"label": label or recipe_label(result), "seed": seed, **result}
                cache.parent.mkdir(parents=True, exist_ok=True)
                cells.to_csv(cache.with_suffix(".csv"), index=False)
                result["environment"] = environment(opts.accelerator)
                cache.write_text(json.dumps(result, indent=2) + "\n")
            if opts.decisions == "prevalence":  # the val predictions: cached, else made
                if cells is None:
                    raise MedMNISTError(f"{cache.with_suffix('.csv')}: no such file, so nothing to calibrate; "
                                        f"delete {cache} to fit it again")  # fmt: skip
                val = cache.with_name(f"{cache.stem}-val.csv")
                if not val.is_file():
                    validation_table(configs, prepared, seed=seed, opts=opts, root=root).to_csv(val, index=False)
                # read back even when just made: a fresh run and a cached one fit on the same (CSV) numbers
                result, cells = prevalence_decisions(result, cells, pd.read_csv(val))
            runs.append(result)
            tables.setdefault(result["label"], []).append(cells)
            print(json.dumps({k: result[k] for k in ("label", "seed", *METRICS)}), file=sys.stderr, flush=True)
    per_net = summarise(runs)
    ensembles = {n: ensemble_scores(t) for n, t in tables.items() if len(t) > 1 and all(x is not None for x in t)}
    groups = {n: group_scores(tables[n], opts.groups) for n in ensembles} if opts.groups else {}
    document = {
        "rows": [{"net": r["label"], "seed": r["seed"], **{m: r[m] for m in METRICS}} for r in runs],
        "summary": next(iter(per_net.values())) if len(per_net) == 1 else per_net,
        "ensemble": next(iter(ensembles.values())) if len(per_net) == 1 and ensembles else ensembles,
        **({"ensemble_groups": next(iter(groups.values())) if len(per_net) == 1 else groups} if groups else {}),
        "dataset": folder.name,
        "recipe": "MedMNIST v2 protocol" if opts.nets else " + ".join(_shown(c) for c in configs),
        "work": str(folder),
        "runs": runs,
    }
    (folder / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    return document


def _read_config(path: Path) -> dict | str:
    """The parsed YAML file, or what is wrong with it."""
    import yaml

    try:
        settings = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        return f"not valid YAML ({' '.join(str(exc).split())})"
    return settings if isinstance(settings, dict) else f"holds {type(settings).__name__}, not a mapping"


def _shown(path: Path) -> str:
    """path relative to the repository when it is inside it."""
    return path.resolve().as_posix().removeprefix(f"{ROOT.as_posix()}/")


def write_results(path: Path, document: dict, text: str, command: str, env: str) -> None:
    """Replace (or append) the MedMNIST section of RESULTS.md, leaving the other sections as they are."""
    info = json.loads((Path(document["work"]) / "imported" / INFO).read_text())
    counts, test = info["counts"], info["counts"]["test"]
    section = (
        f"{RESULTS_HEADING}\n\n{document['dataset']} ({'x'.join(map(str, info['shape']))}; MedMNIST v2, CC BY 4.0), "
        f"official split: {', '.join(f'{s} {sum(counts[s].values())}' for s in SPLITS)} volumes; test classes "
        f"{', '.join(f'{c} {n}' for c, n in test.items())} (the majority class alone scores ACC "
        f"{max(test.values()) / sum(test.values()):.3f}). Training: {document['recipe']}; the best validation "
        "checkpoint is tested once; mean and Student t 95% CI over seeds.\n\n"
        f"- date: {datetime.date.today().isoformat()}\n- device: {env}\n- command: `{command}`\n\n{text}\n"
    )
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    start = old.find(RESULTS_HEADING + "\n")
    end = old.find("\n## ", start + 1) if start >= 0 else -1  # the next section
    before = old[:start] if start >= 0 else old.rstrip("\n") + "\n\n"
    after = "\n" + old[end + 1 :] if end >= 0 else ""
    path.write_text((before + section + after).rstrip("\n") + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__.splitlines()
    parser = argparse.ArgumentParser(
        description=doc[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(doc[2:])
    )
    parser.add_argument("--npz", type=Path, default=DEFAULT_NPZ, help=f"MedMNIST 3D file (default {DEFAULT_NPZ})")
    parser.add_argument(
        "--recipe", type=Path, nargs="+", default=None, metavar="FILE",
        help="config files layered in order (default conf/experiment/real_volumes.yaml)",
    )  # fmt: skip
    parser.add_argument("--nets", help="NAME[:EPOCHS],... of leuko.nets, on the MedMNIST v2 protocol (default: recipe)")
    parser.add_argument("--epochs", type=int, default=100, help="--nets: epochs per net (protocol: 100)")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap on epochs (default: recipe's, --epochs)")
    parser.add_argument("--batch-size", type=int, default=32, help="--nets: batch size (protocol: 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="--nets: learning rate (protocol: 1e-3)")
    parser.add_argument(
        "--folds", type=int, default=None, help="recipe: a K-fold CV on train + val, its K models as one"
    )
    parser.add_argument(
        "--tta", default=None, choices=TTA_MODES, help=f"recipe: test-time views averaged (default {RECIPE_VIEWS})"
    )
    parser.add_argument(
        "--decisions", default=None, choices=DECISIONS,
        help="recipe: prevalence fits a temperature and class biases on the validation predictions, so labels "
        f"follow the data's class mix; balanced: the net's own argmax (default {RECIPE_DECISIONS})",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=1, help="repeat each setting with seeds 0..N-1 (default 1)")
    parser.add_argument(
        "--groups", type=int, default=None, help="also score each K seeds' models as one (disjoint groups), mean + CI"
    )
    parser.add_argument("--limit", type=int, default=None, help="keep N random train volumes (quick checks)")
    parser.add_argument("--accelerator", default=None, help="cpu, gpu, auto (default: the recipe's; cpu for --nets)")
    parser.add_argument("--num-workers", type=int, default=None, help="data-loader workers (default: recipe's, 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "medmnist", help="holds <stem>/ (runs/medmnist)")
    parser.add_argument("--json", type=Path, default=None, help="write rows and summary to this JSON file")
    parser.add_argument("--results", type=Path, default=None, help="also write the table into this RESULTS.md")
    opts = parser.parse_args(argv)
    for name, value in vars(opts).items():
        if (
            name in ("seeds", "limit", "max_epochs", "epochs", "threads", "folds", "groups")
            and value is not None
            and value < 1
        ):
            parser.error(f"--{name.replace('_', '-')} {value}: give a positive number")
    if opts.groups is not None and (opts.groups < 2 or opts.seeds % opts.groups or opts.seeds == opts.groups):
        parser.error(f"--groups {opts.groups} --seeds {opts.seeds}: give a group size of 2 or more that divides the "
                     f"seeds into at least two groups, e.g. --groups 3 --seeds 9")  # fmt: skip
    if opts.folds == 1:
        parser.error("--folds 1: a CV needs at least 2 folds; drop --folds to train once on the official split")
    if opts.nets and (opts.folds or opts.tta or opts.recipe or opts.decisions):
        parser.error("--recipe, --folds, --tta and --decisions apply to a recipe; drop --nets to use them")
    if opts.nets:  # the protocol's own scoring: one view, the net's argmax
        opts.tta, opts.decisions = "none", DEFAULT_DECISIONS
    else:
        opts.tta, opts.decisions = opts.tta or RECIPE_VIEWS, opts.decisions or RECIPE_DECISIONS
    missing = [str(config) for config in opts.recipe or [] if not config.is_file()]
    if missing:
        parser.error(f"--recipe {' '.join(missing)}: no such file; give config files such as "
                     "conf/experiment/phantoms_tiny.yaml conf/model/resnet3d_50_slim.yaml")  # fmt: skip
    for config in opts.recipe or []:
        if not isinstance(settings := _read_config(config), dict):
            parser.error(f"--recipe {config}: {settings}; give a YAML mapping of config sections, as in conf/")
    if opts.nets and not re.fullmatch(r"\s*[\w.-]+(:\d+)?\s*(,\s*[\w.-]+(:\d+)?\s*)*,?", opts.nets):
        parser.error(f"--nets {opts.nets!r}: give NAME[:EPOCHS],..., e.g. fishnet3d_tiny:30,vit3d_tiny")
    return opts


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    try:
        document = run(opts)
    except LeukoError as exc:
        raise SystemExit(f"medmnist: {exc}") from None
    env = environment(opts.accelerator)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)])
    published = PUBLISHED.get(document["dataset"].removesuffix("_28"))
    per_net = summarise(document["runs"])
    # the document keeps one setting's ensembles unkeyed (as its summary); the table takes them per setting
    ensembles, groups = ({next(iter(per_net)): v} if v and len(per_net) == 1 else v
                         for v in (document["ensemble"], document.get("ensemble_groups")))  # fmt: skip
    text = table(document["runs"], per_net, published, ensembles or None, groups)
    print(f"\n{document['dataset']}, test split, model chosen on validation; {env}\n\n{text}")
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        keys = ("rows", "summary", "ensemble", "ensemble_groups")
        opts.json.write_text(json.dumps({k: document[k] for k in keys if k in document}, indent=2) + "\n")
        print(f"\nwrote {opts.json}", file=sys.stderr)
    if opts.results:
        write_results(opts.results, document, text, command, env)
        print(f"\nwrote the {RESULTS_HEADING} section of {opts.results}", file=sys.stderr)
    return document


if __name__ == "__main__":
    main()
