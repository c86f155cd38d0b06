"""`leuko register --ensemble`: the k fold models of a CV as one registered model, and what the test says of it.

The CV: --cv-dir names a finished `leuko cv` of the same config, every fold with fold_<k>/checkpoints/best.ckpt
(leuko.training.run_dir); without it, register runs one first, in out/<register folder>-cv. Each fold model
trained on the other folds and was chosen on its own, so none of them saw the test patients; a CV of another
net, another split or one with folds missing is refused (EnsembleError).

The test report (held_out_report): on the register's held-out test patients, each fold model alone (mean, min and
max over the folds), their ensemble, and the ensemble with its test-time augmentation; for a single refit with
TTA, the refit alone and with TTA. The last row is the model that is registered, the one whose score
decides champion or challenger. Scored as `leuko test` scores (VolumeClassifier's test metrics), on the
calibrated probabilities the registered model returns (leuko.deploy.ensemble).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np

from leuko.errors import LeukoError
from leuko.training import run_dir

COMPARED = ("balanced_accuracy", "accuracy", "macro_f1", "auroc")  # the columns of the report's rows
SPLIT_KEYS = ("k", "test_fraction", "seed", "splits")  # the data settings that decide which patients are test
LABEL = "model"


class EnsembleError(LeukoError, ValueError):
    """A CV whose fold models cannot form the ensemble; the message names the folder, fold or setting and the fix."""


def run_cv(source, root: Path, out: str | Path, name: str) -> Path:
    """A `leuko cv` of the source's config over all its folds, in out/<root name>-cv: its folder."""
    from leuko.training.cv import cross_validate  # heavy import here: Lightning

    tags = {"leuko.role": "ensemble_cv", "leuko.registered_model": name}
    if source.study is not None:
        tags.update({"leuko.study": source.study, "leuko.trial": str(source.trial)})
    print(f"cross-validating every fold for the ensemble in {Path(out) / f'{root.name}-cv'}", file=sys.stderr)
    result = cross_validate(
        config=list(source.configs),
        overrides=list(source.overrides),
        name=f"{root.name}-cv",
        out=out,
        parent_run_id=source.sweep_run_id,
        extra_tags=tags,
    )
    return Path(result["out_dir"])


def _net_spec(hp: dict) -> dict:
    """What decides a fold model's weights and outputs, from VolumeClassifier hyperparameters, JSON-normalised."""
    from leuko.nets import constructor_kwargs  # heavy import here: torch

    spec = {
        "net": hp.get("net"),
        "net_kwargs": constructor_kwargs(hp.get("net"), hp.get("net_kwargs"), hp.get("input_shape")),
        "in_channels": hp.get("in_channels"),
        "class_names": list(hp.get("class_names") or []),
        "input_shape": list(hp.get("input_shape") or []),
    }
    return json.loads(json.dumps(spec, default=list))


def load_members(cv_dir: str | Path, cli) -> tuple[list, list[str]]:
    """(nets, fold names): the best checkpoint of every fold of the CV in cv_dir, each in a copy of the net of
    cli (the register's LeukoCLI), after checking that the CV is one of the same net and the same split."""
    cv_dir = Path(cv_dir)
    fix = "give the folder of a finished `leuko cv` of the same config, or drop --cv-dir to let register run one"
    if not cv_dir.is_dir():
        raise EnsembleError(f"--cv-dir {cv_dir}: no such folder; {fix}")
    datamodule = cli.datamodule
    folds = list(datamodule.fold_names)
    found = run_dir.best_checkpoints(cv_dir)
    missing = [f for f in folds if f not in found]
    if missing:
        where = ", ".join(str(run_dir.checkpoint(cv_dir, f)) for f in missing[:3])
        raise EnsembleError(
            f"--cv-dir {cv_dir}: the ensemble needs all {len(folds)} folds ({', '.join(folds)}), but fold(s) "
            f"{', '.join(missing)} have no best checkpoint ({where}{', ...' if len(missing) > 3 else ''}); run the "
            "CV to the end with all folds, or drop --cv-dir to let register run one"
        )
    extra = sorted(set(found) - set(folds))
    if extra:
        raise EnsembleError(
            f"--cv-dir {cv_dir}: it holds fold(s) {', '.join(extra)}, which this config's split ({len(folds)} folds) "
            f"lacks: a CV of another split; {fix}"
        )
    want = _net_spec(cli.model.hparams)
    split = {k: datamodule.hparams.get(k) for k in SPLIT_KEYS}
    nets = []
    for fold in folds:
        ckpt = run_dir.load_checkpoint(found[fold])
        if not (ckpt.get("hyper_parameters") or {}).get("net"):
            raise EnsembleError(f"{found[fold]}: no model hyperparameters, so not a checkpoint of `leuko cv`; {fix}")
        got = _net_spec(ckpt["hyper_parameters"])
        for key in want:
            if got[key] != want[key]:
                raise EnsembleError(
                    f"{found[fold]}: model {key} is {got[key]!r}, but the config being registered has "
                    f"{want[key]!r}: --cv-dir {cv_dir} is a CV of another net; {fix}"
                )
        used = ckpt.get("datamodule_hyper_parameters") or {}
        for key in SPLIT_KEYS:
            if key in used and used[key] != split[key]:
                raise EnsembleError(
                    f"{found[fold]}: data.{key} is {used[key]!r}, but the config being registered has "
                    f"{split[key]!r}: its folds may hold this register's test patients; {fix}"
                )
        state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        net = copy.deepcopy(cli.model.net)
        net.load_state_dict(state, strict=True)
        nets.append(net.eval())
    _check_no_test_patients(cv_dir, datamodule)
    return nets, folds


def _check_no_test_patients(cv_dir: Path, datamodule) -> None:
    """EnsembleError when the CV's out-of-fold cells (every fold's validation cells: what the other folds trained
    on) include a patient this register tests on."""
    import pandas as pd  # heavy import here, as in _net_spec

    oof = cv_dir / run_dir.OOF
    if not oof.is_file():
        return
    seen = set(pd.read_csv(oof, usecols=["patient_id"], dtype=str)["patient_id"].str.strip())
    leaked = sorted(seen & set(datamodule.subset("test")["patient_id"].astype(str).str.strip()))
    if leaked:
        raise EnsembleError(
            f"{oof}: its fold models trained on patient(s) {', '.join(leaked[:5])}, which this register holds out "
            "for test; run the CV with the same data.k, data.test_fraction, data.seed and data.splits, or drop "
            "--cv-dir to let register run it"
        )


def calibration_dir(cv_dir: str | Path | None, source_cv: str | None) -> str | None:
    """The CV whose out-of-fold cells calibrate the model: the ensemble's own (its members' held-out cells, the
    cells the temperature is to fit) when it has them, else the source's."""
    if cv_dir is None or not (Path(cv_dir) / run_dir.OOF).is_file():
        return source_cv
    if source_cv and Path(source_cv).resolve() != Path(cv_dir).resolve():
        print(
            f"note: calibrating on the fold models' own out-of-fold cells ({cv_dir}), not {source_cv}", file=sys.stderr
        )
    return str(cv_dir)


# ---------------------------------------------------------------------------------------------- the test report
def held_out_terms(
    members, datamodule, temperature: float, tta: str, subset: str = "test", bias: list[float] | None = None
) -> np.ndarray:
    """(views, members, N, classes): each member's calibrated probabilities (temperature, class biases) on each
    TTA view of the N held-out test cells (or of another subset: val) (leuko.deploy.ensemble.Ensemble.terms), in
    forward passes of the datamodule's batch size."""
    import torch  # heavy import here, as in _net_spec

    from leuko.deploy.ensemble import Ensemble

    rows = datamodule.subset(subset)
    if rows.empty and subset == "test":
        raise EnsembleError(
            f"{datamodule.prepared_dir}: no held-out test patients (data.test_fraction "
            f"{datamodule.hparams.test_fraction}); registering scores the model on them: set data.test_fraction > 0"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = Ensemble(members, temperature, tta, bias).to(device).eval()
    volumes = np.load(datamodule.volumes_path, mmap_mode="r")  # (N, C, D, H, W)
    size, parts = datamodule.hparams.batch_size, []
    with torch.inference_mode():
        for start in range(0, len(rows), size):
            batch = np.asarray(volumes[rows["row"].to_numpy()[start : start + size]], dtype=np.float32)
            parts.append(module.terms(torch.from_numpy(batch).to(device)).cpu().numpy())
    return np.concatenate(parts, axis=2)


def scores(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, float]:
    """The test metrics of VolumeClassifier (accuracy, balanced_accuracy, macro_f1, auroc, recall_<class>) of
    probabilities (N, classes) against label indices (N,)."""
    import torch  # heavy imports here, as in _net_spec
    from torchmetrics.classification import MulticlassRecall

    from leuko.training.module import _metrics

    p, y = torch.from_numpy(np.array(probs, np.float32)), torch.from_numpy(np.array(labels, np.int64))
    out = {k: float(v) for k, v in _metrics(len(classes))(p, y).items()}
    recall = MulticlassRecall(len(classes), average=None)(p, y)
    return out | {f"recall_{c}": float(recall[i]) for i, c in enumerate(classes)}


def held_out_report(terms: np.ndarray, labels: np.ndarray, classes: list[str], tta: str) -> dict:
    """{"test": the registered model's metrics, "rows": the comparison (LABEL and COMPARED per row, the
    registered model last), "metrics": {MLflow metric: value}, "probs": (N, classes) of the registered model}."""
    n_views, n_members = terms.shape[:2]
    single = [scores(terms[0, m], labels, classes) for m in range(n_members)]
    probs = terms.mean(axis=(0, 1))  # (N, classes): the registered model's
    shipped = scores(probs, labels, classes)
    keys = [k for k in COMPARED if k in shipped]
    rows, metrics = [], {}
    if n_members > 1:
        for stat, reduce in (("mean", np.mean), ("min", np.min), ("max", np.max)):
            values = {k: float(reduce([s[k] for s in single])) for k in keys}
            rows.append({LABEL: f"fold model alone, {stat} of {n_members}", **values})
            metrics.update({f"test/single_{stat}_{k}": v for k, v in values.items()})
        together = shipped if n_views == 1 else scores(terms[0].mean(axis=0), labels, classes)
        rows.append({LABEL: f"ensemble of {n_members}", **{k: together[k] for k in keys}})
        metrics.update({f"test/ensemble_{k}": together[k] for k in keys})
        name = "ensemble"
    else:
        rows.append({LABEL: "refit alone", **{k: single[0][k] for k in keys}})
        metrics.update({f"test/single_{k}": single[0][k] for k in keys})
        name = "single"
    if n_views > 1:
        rows.append({LABEL: f"{rows[-1][LABEL].removesuffix(' alone')} + TTA {tta}", **{k: shipped[k] for k in keys}})
        metrics.update({f"test/{name}_tta_{k}": shipped[k] for k in keys})
    rows[-1][LABEL] += " (registered)"
    metrics.update({f"test/{k}": v for k, v in shipped.items()})
    return {"test": shipped, "rows": rows, "metrics": metrics, "probs": probs}


def table_lines(rows: list[dict], key: str) -> list[str]:
    """Rows of dicts as aligned text lines: the key column first, then every other key in order of appearance."""
    columns = [key] + list(dict.fromkeys(c for row in rows for c in row if c != key))
    text = [
        [f"{row.get(c):.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns] for row in rows
    ]
    widths = [max(len(c), *(len(r[i]) for r in text)) for i, c in enumerate(columns)]
    lines = [columns] + text
    return [
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))) for line in lines
    ]
