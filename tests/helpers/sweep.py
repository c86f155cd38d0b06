"""Shared by the sweep, register, predict and serving tests: tiny sweep files and one registered model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the environment running the tests: leuko, mlflow, uvicorn live here


def write_base(folder: Path, prepared: Path, **trainer) -> Path:
    """A complete experiment file for the tiny cohort: ViT tiny (the fastest net at 16^3 on a CPU), 2 folds, 1 epoch."""
    settings = {"max_epochs": 1, **trainer}
    path = folder / "base.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            seed_everything: 0
            model:
              net: vit3d_tiny
              lr: 0.003
              warmup_epochs: 0.5
            data:
              prepared_dir: {prepared}
              k: 2
              test_fraction: 0.2
              batch_size: 16
              num_workers: 0
            trainer:
              accelerator: cpu
              devices: 1
              log_every_n_steps: 1
              enable_progress_bar: false
              enable_model_summary: false
              num_sanity_val_steps: 0
              deterministic: true
            """
        )
        + "".join(f"  {k}: {v}\n" for k, v in settings.items())
    )
    return path


def write_space(folder: Path, base: Path, *, study: str, name: str = "sweep.yaml", **overrides) -> Path:
    """A sweep file over the learning rate and dropout of the tiny config; keyword arguments replace keys."""
    spec = {
        "study": study,
        "config": [str(base)],
        "trials": 2,
        "objective": "balanced_accuracy",
        "folds": 1,
        "pruner": {"type": "none"},
        "heartbeat": {"interval": 1, "grace": 3},
        "fixed": {},
        "space": {
            "model.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
            "model.net_kwargs.drop_rate": {"low": 0.0, "high": 0.3},
        },
        **overrides,
    }
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def env_with(**extra: str) -> dict:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")
    # mlflow.set_registry_uri (an earlier test in this process) exports MLFLOW_REGISTRY_URI: a command started
    # here would register into that store instead of its tracking URI's, unless a test asks for it
    env.pop("MLFLOW_REGISTRY_URI", None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll url until it answers 200; fail early if proc died."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with code {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """End a server started with start_new_session=True, and everything it started."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_REGISTRY: dict = {}


def registered_model(root: Path, prepared: Path) -> dict:
    """Once per test session: a 1-trial sweep and `leuko register` into a SQLite store under root.

    Returns {"tracking_uri", "space", "study", "result" (register's dict), "folder"}.
    """
    if "result" in _REGISTRY:
        return _REGISTRY
    from leuko.sweep.run import run_sweep
    from leuko.tracking.registry import register, source_from_study

    folder = root / "registry"
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    base = write_base(folder, prepared)
    space = write_space(folder, base, study="reg", trials=1, fixed={"tracking.experiment": "t_registry"})
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        run_sweep(space, out=folder / "sweeps", storage=str(folder / "sweeps" / "reg.journal"))
        source = source_from_study(space, storage=str(folder / "sweeps" / "reg.journal"))
        result = register(source, out=folder / "runs")
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    _REGISTRY.update(tracking_uri=uri, space=space, study="reg", result=result, folder=folder, source=source)
    return _REGISTRY
