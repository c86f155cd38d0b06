"""Where MLflow runs and models live: MLFLOW_TRACKING_URI, else a config's value, else a SQLite store here.

Apart from leuko.tracking.runs (which loads Lightning, seconds) so that `leuko predict` can find a
registered model without it.
"""

from __future__ import annotations

import os

# MLflow 3 rejects the old file store and the registry needs a database; Lightning's MLFlowLogger
# would default to file:./mlruns, so leuko always passes a URI.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """MLFLOW_TRACKING_URI wins, then the config's value, then a SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or uri or DEFAULT_TRACKING_URI
