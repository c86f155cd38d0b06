"""Shared fixtures: a tiny phantom cohort, made once per test session and prepared once."""

from __future__ import annotations

import os
import tempfile

import pytest

# Keep tests on the 2 cores CI has (one thread per process when pytest-xdist runs two), and MLflow quiet and local.
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# ONNX graphs `leuko predict` caches (leuko.deploy.onnx_model) go to a folder of this session, not ~/.cache
os.environ.setdefault("LEUKO_CACHE_DIR", tempfile.mkdtemp(prefix="leuko-test-cache-"))


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """6 patients x 10 cells of 16^3 RI volumes: manifest path."""
    from leuko.data.phantoms import make_cohort

    out = tmp_path_factory.mktemp("cohort")
    return make_cohort(out / "data", n_patients=6, cells_per_patient=10, shape=(16, 16, 16), progress=False)


@pytest.fixture(scope="session")
def tiny_prepared(tiny_cohort, tmp_path_factory):
    """The tiny cohort prepared at 16^3: prepared folder."""
    from leuko.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare(tiny_cohort, out, shape=(16, 16, 16), progress=False)
    return out
