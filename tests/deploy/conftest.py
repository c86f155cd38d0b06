from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _tracking_uri_stays_put():
    """mlflow.set_tracking_uri (in a test, or in leuko.deploy.predict.load_model) also sets MLFLOW_TRACKING_URI in
    os.environ: put it back after each test, so later tests do not find this directory's model store."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved
