"""`leuko register`: refit the best trial on every non-test patient, test it once on the held-out
patients, log it to MLflow as a pyfunc and register it; alias `champion` only when it beats the
current champion's test score, `challenger` otherwise (leuko.tracking.champion decides, as a
compare-and-set that two registers at once cannot both win).

A version is tagged leuko.status=incomplete when it is created and complete once its scores, decision,
alias and description are set; its refit run is KILLED meanwhile and FINISHED at that point. So a
register killed at any point (even by SIGKILL) leaves no RUNNING run and no version that looks whole.

The model's code travels with it: the leuko package is logged as the model's code path (code/leuko/),
and its requirements name only public packages, never `leuko`. What a registered model holds, and the
trust boundary of loading one: see leuko.deploy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from leuko import __version__
from leuko.errors import LeukoError
from leuko.tracking.champion import CHALLENGER, CHAMPION, crown, decide
from leuko.training import run_dir

DEFAULT_NAME = "leuko"
PACKAGE = Path(__file__).parents[1]  # the leuko package: logged with the model as its code path
CODE = PACKAGE / "deploy" / "pyfunc_model.py"  # the logged inference code
# What the inference code imports (pyfunc_model.py, leuko.nets, leuko.data.preprocess), pinned as installed here.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "monai", "numpy", "pandas", "scipy", "safetensors")
STATUS, INCOMPLETE, COMPLETE = "leuko.status", "incomplete", "complete"
REFIT_FOLDER = "LEUKO_REFIT_FOLDER"  # the folder rank zero claimed, for the DDP ranks Lightning starts
__all__ = ["CHALLENGER", "CHAMPION", "RegisterError", "Source", "decide", "register", "source_from_study"]


class RegisterError(LeukoError, ValueError):
    """Nothing to register, or the registry cannot take it; the message says what to do."""


@dataclass
class Source:
    """What to refit: the base configs and overrides of a trial (or given by hand), and its CV scores."""

    configs: list[str]
    overrides: list[str]
    cv: dict = field(default_factory=dict)  # {metric: {"mean": .., "std": ..}}
    study: str | None = None
    trial: int | None = None
    sweep_run_id: str | None = None
    objective: str = "balanced_accuracy"
    cv_dir: str | None = None  # a CV of this config, whose out-of-fold predictions calibrate the model


def source_from_study(space: str | Path, *, storage: str | None = None, trial: int | None = None) -> Source:
    # heavy imports in this module's functions: optuna, mlflow and torch load in seconds, and `leuko --help`
    # should stay instant
    import optuna

    from leuko.sweep.space import load_sweep_config
    from leuko.sweep.study import A_CONFIG, A_CV, A_DIR, A_OVERRIDES, open_storage

    cfg = load_sweep_config(space)
    url = cfg.storage_url(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=cfg.study, storage=open_storage(url))
    except KeyError as exc:
        raise RegisterError(f"no study {cfg.study!r} in {url}; run `leuko sweep --space {space}` first") from exc
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise RegisterError(
            f"study {cfg.study!r} in {url} has no COMPLETE trial yet; run more trials with `leuko sweep`"
        )
    if trial is None:
        chosen = study.best_trial
    else:
        chosen = next((t for t in complete if t.number == trial), None)
        if chosen is None:
            raise RegisterError(
                f"trial {trial} of study {cfg.study!r} is not COMPLETE; COMPLETE trials: {[t.number for t in complete]}"
            )
    attrs = chosen.user_attrs
    return Source(
        configs=list(attrs[A_CONFIG]),
        overrides=list(attrs[A_OVERRIDES]),
        cv=dict(attrs.get(A_CV, {})),
        study=cfg.study,
        trial=chosen.number,
        sweep_run_id=study.user_attrs.get("leuko.sweep_run_id"),
        cv_dir=attrs.get(A_DIR),
        objective=cfg.objective,
    )


def register(source: Source, *, name: str = DEFAULT_NAME, metric: str | None = None, out: str | Path = "runs") -> dict:
    """Refit, test, log and register; returns {"version", "alias", "score", "run_id", "model_uri", ...}."""
    # heavy imports here, as in source_from_study
    from leuko.training.cli import LeukoCLI
    from leuko.training.cv import is_rank_zero

    metric = metric or source.objective
    root = _refit_folder(out, source)
    run_name = root.name
    tags = {"leuko.command": "register", "leuko.role": "refit", "leuko.registered_model": name}
    if source.study is not None:
        tags.update({"leuko.study": source.study, "leuko.trial": str(source.trial)})
    args = [a for c in source.configs for a in ("--config", c)] + list(source.overrides)
    args += ["--data.fold", "null", "--trainer.default_root_dir", str(root), "--tracking.run_name", run_name]
    cli = LeukoCLI(args=args, run=False, parent_run_id=source.sweep_run_id if is_rank_zero() else None, extra_tags=tags)
    tracking = cli.config["tracking"]
    if not tracking.enabled or cli.trainer.logger is None:
        with contextlib.suppress(OSError):
            root.rmdir()  # nothing was written to it
        raise RegisterError(
            "tracking is off (tracking.enabled false or trainer.logger false): registering needs MLflow"
        )
    print(f"refit on every non-test patient: {shlex.join(args[:-6])}", file=sys.stderr)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    if not cli.trainer.is_global_zero:
        return {}
    test = {k.removeprefix("test/"): float(v) for k, v in tested.items()}
    if metric not in test:
        raise RegisterError(
            f"metric {metric!r} is not among the test metrics {sorted(test)}; pass --metric with one of them"
        )
    return _log_and_register(cli, source, test, name=name, metric=metric)


def _refit_folder(out: str | Path, source: Source) -> Path:
    """out/register-<study>-trial<n> (or register-<time>), never one another register holds (-2, ... then).

    Rank zero claims it; the other DDP ranks, which Lightning starts with its environment, use the same."""
    from leuko.training.cv import is_rank_zero  # heavy import here, as in source_from_study

    label = f"register-{source.study}-trial{source.trial:03d}" if source.study is not None else None
    if not is_rank_zero():
        return Path(out) / (os.environ.get(REFIT_FOLDER) or label or time.strftime("register-%Y%m%d-%H%M%S"))
    folder = run_dir.new_folder(out, label, stamp=False) if label else run_dir.new_folder(out, "register")
    os.environ[REFIT_FOLDER] = folder.name
    return folder


def _model_config(cli) -> dict:
    # heavy imports here (torch, numpy), as in source_from_study
    from leuko.deploy.intensity import training_intensities
    from leuko.nets import constructor_kwargs

    model, meta = cli.model, cli.datamodule.meta
    hp = model.hparams
    settings = meta.get("settings", {})
    return {
        "net": hp.net,
        # what VolumeClassifier built the net with: net_kwargs plus what the net takes from the input shape
        "net_kwargs": constructor_kwargs(hp.net, hp.net_kwargs, hp.input_shape),
        "in_channels": int(hp.in_channels),
        "classes": list(model.class_names),
        "preprocessing": {
            "modality": meta["modality"],
            "shape": list(meta["shape"]),
            "target_voxel_size": settings.get("target_voxel_size"),
            "n_medium": settings.get("n_medium"),
            "ri_scale": settings.get("ri_scale"),
            "read_options": settings.get("read_options", {}),
            "normalisation": meta.get("normalisation"),
        },
        # what `leuko predict` checks each cell against (leuko.deploy.intensity): the cells it was fit on
        "intensity": training_intensities(cli.datamodule.volumes_path, cli.datamodule.subset("train")["row"]),
        "prepared_fingerprint": meta.get("fingerprint"),
        "manifest_sha256": meta.get("manifest_sha256"),
        "leuko_version": __version__,
    }


def _signature(config: dict):
    # heavy imports here, as in source_from_study
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from leuko.training.predictions import PRED, prob_columns

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, config["in_channels"], -1, -1, -1))])
    outputs = Schema([ColSpec("string", PRED)] + [ColSpec("double", c) for c in prob_columns(config["classes"])])
    params = ParamSchema([ParamSpec("preprocess", "boolean", True), ParamSpec("voxel_size", "double", [], shape=(-1,))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _requirements() -> list[str]:
    """Pins of the public packages the inference code needs; leuko itself travels as the model's code path."""
    return [f"{p}=={metadata.version(p).split('+')[0]}" for p in REQUIREMENTS]


def _log_and_register(cli, source: Source, test: dict, *, name: str, metric: str) -> dict:
    """Log the model to the refit run, register it incomplete, crown it, complete it (see the module docstring)."""
    # heavy imports here, as in source_from_study
    import mlflow

    from leuko.deploy.trust import trust_config
    from leuko.tracking.lineage import lineage_tags
    from leuko.tracking.model_card import card_for_refit
    from leuko.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(cli.config["tracking"].uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    run_id = cli.trainer.logger.run_id
    config = _model_config(cli)
    score = test[metric]
    # The run says KILLED until its version is complete: what a kill from here on leaves behind, even
    # SIGKILL, which no handler can catch.
    client.set_terminated(run_id, "KILLED")
    try:
        # temperature and review threshold from the CV's out-of-fold cells; hashes of the training patients
        config.update(trust_config(source.cv_dir, config["classes"], cli.datamodule.subset("train")["patient_id"]))
        lineage = lineage_tags(cli.config["data"]["prepared_dir"])
        card = card_for_refit(cli, config, lineage, cv=source.cv, metric=metric, run_id=run_id)  # MODEL_CARD.md
        model_uri = _log_model(client, cli, config, source, run_id, card)
        tags = _version_tags(source, test, metric, config, lineage)
        version = str(mlflow.register_model(model_uri, name, tags={**tags, STATUS: INCOMPLETE}).version)
        decision = crown(client, uri, name, version, score, metric)
        _complete_version(client, name, version, decision, config, source.cv.get(metric), score, metric, card)
    except BaseException as exc:
        client.set_terminated(run_id, "FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return {
        "name": name,
        "version": version,
        "alias": decision.alias,
        "reason": decision.reason,
        "score": score,
        "metric": metric,
        "test": test,
        "cv": source.cv,
        "run_id": run_id,
        "tracking_uri": uri,
        "model_uri": f"models:/{name}/{version}",
    }


def _complete_version(
    client, name: str, version: str, decision, config: dict, cv, score: float, metric: str, card: str | None = None
) -> None:
    """The decision tags and description (a summary line, then the model card) of a crowned version, then
    leuko.status=complete, last."""
    from leuko.tracking.model_card import description  # heavy imports here, as in source_from_study

    compared = {
        "leuko.decision": f"{decision.alias}: {decision.reason}",
        "leuko.compared_to": decision.compared_to or "none",
        "leuko.champion_score": "none" if decision.champion_score is None else f"{decision.champion_score:.6f}",
    }
    for key, value in compared.items():
        client.set_model_version_tag(name, version, key, value)
    summary = (
        f"{config['net']} refit on all non-test patients; test {metric} {score:.4f}"
        + (f", cross-validated {cv['mean']:.4f} +- {cv['std']:.4f}" if cv else "")
        + f". {decision.alias}: {decision.reason}."
    )
    client.update_model_version(name, version, description=description(summary, card) if card else summary)
    client.set_model_version_tag(name, version, STATUS, COMPLETE)


def _log_model(client, cli, config: dict, source: Source, run_id: str, card: str | None = None) -> str:
    """Log the CV scores and the pyfunc model (weights, config, code, MODEL_CARD.md) to the refit run: its URI.

    The run is addressed by id, never made the active run, so its status stays what _log_and_register set.
    """
    # heavy imports here, as in source_from_study
    import mlflow
    import numpy as np
    from mlflow.entities import Metric
    from safetensors.torch import save_file

    from leuko.tracking.model_card import MODEL_CARD
    from leuko.tracking.runs import log_batch

    now = int(time.time() * 1000)
    cv = [Metric(f"cv/{k}_{stat}", v[stat], now, 0) for k, v in source.cv.items() for stat in ("mean", "std")]
    log_batch(client, run_id, metrics=cv)
    datamodule = cli.datamodule
    test_rows = datamodule.subset("test")["row"].to_numpy()
    volumes = np.load(datamodule.volumes_path, mmap_mode="r")
    example = np.asarray(volumes[test_rows[:1]], dtype=np.float32)  # (1, C, D, H, W), one prepared test cell
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in cli.model.net.state_dict().items()}
        save_file(state, str(weights))
        config_path = Path(tmp) / "model_config.json"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        files = {"weights": str(weights), "model_config": str(config_path)}
        if card is not None:  # beside the weights and config, in the model's artifacts/
            (Path(tmp) / MODEL_CARD).write_text(card, encoding="utf-8")
            files["model_card"] = str(Path(tmp) / MODEL_CARD)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        info = mlflow.models.Model.log(
            artifact_path=None,  # deprecated in favour of name, but still a required argument
            name="model",
            flavor=mlflow.pyfunc,
            flavor_name="pyfunc.ModelFromCode",  # what mlflow.pyfunc.log_model passes for a code file
            run_id=run_id,
            python_model=str(CODE),
            code_paths=[str(PACKAGE)],
            artifacts=files,
            signature=_signature(config),
            input_example=(example, {"preprocess": False}),
            pip_requirements=_requirements(),
            metadata={"classes": config["classes"], "preprocessing": config["preprocessing"]},
        )
    return info.model_uri


def _version_tags(source: Source, test: dict, metric: str, config: dict, lineage: dict) -> dict[str, str]:
    """The tags a registered version carries, besides the alias decision."""
    score = test[metric]
    tags = {
        "leuko.score": f"{score:.6f}",
        "leuko.metric": f"test/{metric}",
        "leuko.classes": ",".join(config["classes"]),
        **{f"leuko.test_{k}": f"{v:.6f}" for k, v in test.items() if not k.startswith("recall_")},
        **{
            f"leuko.cv_{k}": f"{v['mean']:.6f} +- {v['std']:.6f}"
            for k, v in source.cv.items()
            if k in ("balanced_accuracy", "macro_f1", "accuracy")
        },
        **lineage,
    }
    if source.study is not None:
        tags.update({"leuko.study": source.study, "leuko.trial": str(source.trial)})
    return tags


def print_summary(result: dict) -> None:
    name, uri = result["name"], result["tracking_uri"]
    cv = result["cv"].get(result["metric"])
    print(f"\nregistered {name} version {result['version']} (refit run {result['run_id']})")
    print(
        f"  test {result['metric']}: {result['score']:.4f}"
        + (f"   cross-validated: {cv['mean']:.4f} +- {cv['std']:.4f}" if cv else "")
    )
    print(f"  alias: {result['alias']} ({result['reason']})")
    env = "" if uri == "sqlite:///mlflow.db" else f"MLFLOW_TRACKING_URI={uri} "
    alias_uri = f"models:/{name}@{CHAMPION}"
    print(f"  this version: models:/{name}/{result['version']}    current champion: {alias_uri}")
    print("next:")
    print(f"  {env}leuko predict --model {alias_uri} --input data --out predictions.csv")
    print(f"  {env}mlflow models serve -m {alias_uri} --env-manager local -h 127.0.0.1 -p 5002")
    print(f"  MLflow UI: make mlflow-ui  (or mlflow ui --backend-store-uri {uri})")
