"""Which registered version carries the alias `champion`: the decision, and setting it as a compare-and-set.

A new version becomes champion only when its test score is strictly higher than the current champion's
(recorded on that version as the tag leuko.score); otherwise it becomes challenger. Two registers at once
must not both find "no champion yet", so the alias is read right before it is set, under a lock where the
store allows one:

    sqlite:///PATH        an exclusive file lock on PATH.leuko-lock, beside the database (flock)
    postgresql://...      a session advisory lock in that database (pg_advisory_lock)
    other stores (http)   no lock to take: after setting the alias it is read back, and the decision taken
                          again against the version another register set in between

Both locks go with the process that holds them, so a register killed while deciding blocks nobody.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CHAMPION, CHALLENGER = "champion", "challenger"
ATTEMPTS = 5  # decisions retaken after another register moved the alias (stores without a lock)


@dataclass
class Decision:
    alias: str
    reason: str
    compared_to: str | None  # the champion's version, None when there was none
    champion_score: float | None


SCORE_DECIMALS = 6  # the precision of the leuko.score tag a version records


def decide(score: float, champion_version: str | None, champion_score: float | None, metric: str) -> tuple[str, str]:
    """(alias, reason): champion only for a strictly better test score than the current champion's."""
    if champion_version is None:
        return CHAMPION, "no champion yet"
    if champion_score is None:
        return CHALLENGER, f"champion v{champion_version} has no recorded leuko.score to compare with"
    # The champion's score is recorded to 6 decimals (SCORE_DECIMALS), so compare at that precision: the same
    # model registered again (0.93601745... against the recorded 0.936017) is not better, it ties.
    score = round(float(score), SCORE_DECIMALS)
    digits = 4 if f"{score:.4f}" != f"{champion_score:.4f}" else SCORE_DECIMALS
    better = score > champion_score
    shown = f"{score:.{digits}f} {'>' if better else '<='} {champion_score:.{digits}f}"
    return (CHAMPION if better else CHALLENGER), f"test {metric} {shown} of champion v{champion_version}"


def current_champion(client, name: str, version: str) -> tuple[str | None, float | None]:
    """(version, recorded score) of the current champion other than `version`; (None, None) when there is none."""
    from mlflow.exceptions import MlflowException  # heavy import here: mlflow loads in seconds

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None  # no champion yet
    champion_version = str(champion.version)  # an int from some stores, a str from others
    if champion_version == version:
        return None, None
    recorded = champion.tags.get("leuko.score")
    return champion_version, float(recorded) if recorded is not None else None


def crown(client, uri: str, name: str, version: str, score: float, metric: str) -> Decision:
    """Decide champion or challenger for `version` and set that alias, as one compare-and-set."""
    with champion_lock(uri, name):
        for _ in range(ATTEMPTS):
            champion_version, champion_score = current_champion(client, name, version)
            alias, reason = decide(score, champion_version, champion_score, metric)
            client.set_registered_model_alias(name, alias, version)
            # Under a lock this holds at once; without one, another register may have moved the alias since
            # the read: decide again against the version it set.
            if alias == CHALLENGER or _alias_version(client, name, CHAMPION) == version:
                return Decision(alias, reason, champion_version, champion_score)
    return Decision(alias, reason, champion_version, champion_score)


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException  # heavy import here, as in current_champion

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


@contextmanager
def champion_lock(uri: str, name: str) -> Iterator[None]:
    """Hold the lock that orders champion decisions for model `name` in the store at uri (see the docstring)."""
    if uri.startswith("sqlite:///"):
        with _file_lock(sqlite_lock_path(uri)):
            yield
    elif re.match(r"^postgres(ql)?(\+\w+)?://", uri):
        with _advisory_lock(uri, name):
            yield
    else:
        yield


def sqlite_lock_path(uri: str) -> Path:
    """sqlite:///mlflow.db -> mlflow.db.leuko-lock; sqlite:////abs/m.db -> /abs/m.db.leuko-lock."""
    database = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(database + ".leuko-lock")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel when the process ends
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _advisory_lock(uri: str, name: str) -> Iterator[None]:
    import psycopg  # heavy import here: only a register on a PostgreSQL store needs the driver

    # SQLAlchemy's postgresql+psycopg://... is libpq's postgresql://...
    dsn = re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", uri)
    key = int.from_bytes(hashlib.sha256(f"leuko champion {name}".encode()).digest()[:8], "big", signed=True)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("SELECT pg_advisory_lock(%s)", (key,))  # released when the session ends
        try:
            yield
        finally:
            connection.execute("SELECT pg_advisory_unlock(%s)", (key,))
