"""The sweep file (conf/sweep/*.yaml): its schema, the search space, and a trial's parameters as config overrides.

Every key under `space` and `fixed` is a config key of `leuko fit`/`leuko cv`, so a trial is a list of
overrides on top of `config`. load_sweep_config checks the whole file before anything runs; a bad file
raises SweepConfigError naming the file, the key and the fix.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from leuko.errors import LeukoError

OBJECTIVES = {
    "balanced_accuracy": "maximize",
    "macro_f1": "maximize",
    "accuracy": "maximize",
    "auroc": "maximize",
    "loss": "minimize",
}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "none": optuna.pruners.NopPruner,
}
SWEEP_KEYS = (
    "study",
    "storage",
    "config",
    "budget",
    "trials",
    "start_from_config",
    "baselines",
    "objective",
    "folds",
    "isolate",
    "sampler",
    "pruner",
    "heartbeat",
    "fixed",
    "space",
)
PARAM_KEYS = ("choices", "low", "high", "log", "step", "type", "when")
NET_KWARGS = "model.net_kwargs"  # a dict-typed config key: its entries are gathered into one JSON override


class SweepConfigError(LeukoError, ValueError):
    """A sweep file that cannot be used; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Param:
    key: str  # a config key, e.g. model.lr or data.augment.elastic
    kind: str  # categorical | int | float
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: dict = field(default_factory=dict)  # {other key: allowed values}: sampled only then

    def active(self, sampled: dict) -> bool:
        return all(sampled.get(key) in allowed for key, allowed in self.when.items())

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class SweepConfig:
    path: Path
    study: str
    storage: str | None
    config: list[str]
    budget: float | None  # seconds of wall time for the trials; None: no limit but `trials`
    trials: int | None  # None: as many as the budget allows
    objective: str
    folds: int
    isolate: str  # auto | always | never: a process per trial (auto: when a trial uses more than one device)
    sampler: dict
    pruner: dict
    heartbeat: dict
    fixed: dict
    space: dict[str, Param]
    start_from_config: bool = False  # the study's first trial is the base config's own point of the space
    baselines: dict | None = None  # {manifest, mip_net, mip_epochs}: held-out baselines beside the champion

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    @property
    def monitor(self) -> str:
        return f"val/{self.objective}"

    def storage_url(self, override: str | None = None) -> str:
        return override or self.storage or f"sweeps/{self.study}.journal"


def load_sweep_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    raw = _read(path)
    need = functools.partial(_need, path, raw)
    study = str(need("study", str))
    if not study.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SweepConfigError(
            f"{path}: `study: {study}` may hold only letters, digits, '-', '_' and '.' (it names files)"
        )
    config = need("config", (list, str))
    config = [config] if isinstance(config, str) else [str(c) for c in config]
    objective = need("objective", str, "balanced_accuracy")
    if objective not in OBJECTIVES:
        raise SweepConfigError(f"{path}: `objective: {objective}` is not one of {', '.join(OBJECTIVES)}")
    budget = parse_budget(raw.get("budget"), f"{path}: `budget`")
    trials = raw.get("trials", None if budget else 10)
    folds = need("folds", int, 1)
    if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 0):
        raise SweepConfigError(f"{path}: `trials: {trials!r}` must be an integer >= 0 (or null with a budget)")
    if trials is None and budget is None:
        raise SweepConfigError(f"{path}: `trials: null` needs a `budget` (e.g. budget: 10m), or give a number")
    if folds < 1:
        raise SweepConfigError(f"{path}: `folds` must be >= 1 (got {folds})")
    baselines = raw.get("baselines")
    if baselines is not None and (not isinstance(baselines, dict) or "manifest" not in baselines):
        raise SweepConfigError(
            f"{path}: `baselines: {baselines!r}` should be a mapping with `manifest` (the raw cells' manifest, "
            "for the morphology features), e.g. {manifest: data/manifest.csv, mip_epochs: 10}; or null"
        )
    isolate = str(need("isolate", (str, bool), "auto")).lower()
    isolate = {"true": "always", "false": "never"}.get(isolate, isolate)
    if isolate not in ("auto", "always", "never"):
        raise SweepConfigError(f"{path}: `isolate: {raw['isolate']}` must be auto, always or never")
    pruner = dict(need("pruner", dict, {"type": "median"}))
    if pruner.get("type", "median") not in PRUNERS:
        raise SweepConfigError(f"{path}: `pruner.type: {pruner['type']}` is not one of {', '.join(PRUNERS)}")
    heartbeat = {"interval": 60, "grace": 180, **need("heartbeat", dict, {})}
    if not 0 < heartbeat["interval"] < heartbeat["grace"]:
        raise SweepConfigError(
            f"{path}: `heartbeat: {heartbeat}` needs 0 < interval < grace (seconds), e.g. interval 60, grace 180"
        )
    fixed = need("fixed", dict, {})
    space = _space(path, need("space", dict), fixed)
    storage = raw.get("storage")
    return SweepConfig(
        path=path,
        study=study,
        storage=None if storage is None else str(storage),
        config=config,
        budget=budget,
        trials=trials,
        objective=objective,
        folds=folds,
        isolate=isolate,
        sampler=dict(need("sampler", dict, {})),
        pruner=pruner,
        heartbeat=heartbeat,
        fixed=dict(fixed),
        space=space,
        start_from_config=bool(raw.get("start_from_config", False)),
        baselines=None if baselines is None else dict(baselines),
    )


_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600}


def parse_budget(value: Any, where: str = "--budget") -> float | None:
    """A wall-time budget in seconds: 600, "600s", "10m", "1.5h"; None for null."""
    if value is None:
        return None
    text = str(value).strip().lower()
    number, unit = text, "s"
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(suffix):
            number, unit = text[: -len(suffix)].strip(), suffix
            break
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        seconds = -1.0
    if isinstance(value, bool) or not seconds > 0:
        raise SweepConfigError(f"{where}: {value!r} is not a wall time; write e.g. 600, 600s, 10m or 1.5h")
    return seconds


def _read(path: Path) -> dict:
    """The sweep file as a mapping with known top-level keys."""
    if not path.is_file():
        raise SweepConfigError(f"{path}: sweep file not found; pass --space conf/sweep/default.yaml or another file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SweepConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise SweepConfigError(f"{path}: expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise SweepConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a sweep file has {', '.join(SWEEP_KEYS)}")
    return raw


def _need(path: Path, raw: dict, key: str, kind: type | tuple, default: Any = None) -> Any:
    value = raw.get(key, default)
    if value is None and default is None and key not in ("storage",):
        raise SweepConfigError(f"{path}: `{key}` is missing; see conf/sweep/default.yaml for an example")
    if value is not None and not isinstance(value, kind):
        raise SweepConfigError(f"{path}: `{key}: {value!r}` should be {getattr(kind, '__name__', kind)}")
    return value


def _space(path: Path, space_raw: dict, fixed: dict) -> dict[str, Param]:
    if not space_raw:
        raise SweepConfigError(
            f"{path}: `space` is empty; give at least one parameter, "
            "e.g. model.lr: {low: 1e-4, high: 1e-2, log: true}"
        )
    space: dict[str, Param] = {}
    for key, spec in space_raw.items():
        space[key] = _param(path, key, spec, space)
        if key in fixed:
            raise SweepConfigError(f"{path}: `{key}` is both in `fixed` and in `space`; keep it in one of them")
    return space


def _param(path: Path, key: str, spec: Any, earlier: dict[str, Param]) -> Param:
    where = f"{path}: space.{key}"
    example = "{choices: [a, b]} or {low: 0.0001, high: 0.01, log: true}"
    if not isinstance(spec, dict):
        raise SweepConfigError(f"{where}: expected a mapping such as {example}, got {spec!r}")
    unknown = sorted(set(spec) - set(PARAM_KEYS))
    if unknown:
        raise SweepConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; use {', '.join(PARAM_KEYS)}")
    when = {}
    for other, allowed in (spec.get("when") or {}).items():
        if other not in earlier or earlier[other].kind != "categorical":
            raise SweepConfigError(
                f"{where}: `when` refers to {other!r}, "
                "which is not a categorical parameter listed above it in the space"
            )
        when[other] = tuple(allowed if isinstance(allowed, list) else [allowed])
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SweepConfigError(f"{where}: `choices` must be a non-empty list")
        return Param(key, "categorical", choices=tuple(choices), when=when)
    if "low" not in spec or "high" not in spec:
        raise SweepConfigError(f"{where}: give `choices`, or `low` and `high`: {example}")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise SweepConfigError(f"{where}: need numbers low < high, got low={low!r} high={high!r}")
    kind = spec.get("type") or ("int" if all(isinstance(v, int) for v in (low, high, spec.get("step", 1))) else "float")
    if kind not in ("int", "float"):
        raise SweepConfigError(f"{where}: `type: {kind}` must be int or float (categorical parameters use `choices`)")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise SweepConfigError(f"{where}: `log: true` needs low > 0, got low={low}")
    return Param(key, kind, low=low, high=high, log=log, step=spec.get("step"), when=when)


def sample(trial: optuna.Trial, space: dict[str, Param]) -> dict:
    params: dict = {}
    for param in space.values():
        if param.active(params):
            params[param.key] = param.suggest(trial)
    return params


def overrides_for(fixed: dict, params: dict) -> list[str]:
    """Config overrides for `leuko cv`/`leuko fit`: ["--model.lr", "0.001", ...].

    model.net_kwargs is one dict in the config; its sampled and fixed entries become one JSON value.
    """
    merged = {**fixed, **params}
    net_kwargs: dict = {}
    out: list[str] = []
    for key, value in merged.items():
        if key == NET_KWARGS and isinstance(value, dict):
            net_kwargs.update(value)
        elif key.startswith(NET_KWARGS + "."):
            net_kwargs[key[len(NET_KWARGS) + 1 :]] = value
        else:
            out += [f"--{key}", _format(value)]
    if net_kwargs:
        out += [f"--{NET_KWARGS}", json.dumps(net_kwargs, sort_keys=True)]
    return out


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def first_point(space: dict[str, Param]) -> dict:
    """One point of the space (first choice, lower bound), to check the config keys before any trial starts."""
    point: dict = {}
    for param in space.values():
        if param.active(point):
            point[param.key] = param.choices[0] if param.kind == "categorical" else param.low
    return point


def describe(params: dict) -> str:
    """Sampled parameters for one console line: `lr=0.00123 net=vit3d_tiny`."""
    return " ".join(f"{short_key(k)}={show_value(v)}" for k, v in params.items())


def short_key(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def show_value(value: Any) -> Any:
    return f"{value:.3g}" if isinstance(value, float) else value
