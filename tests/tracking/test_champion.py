"""The champion decision as a compare-and-set: a lock per store kind, and two concurrent decisions on one store."""

from __future__ import annotations

import threading
import time

import mlflow
import pytest

import leuko.tracking.champion as champion
from leuko.tracking.champion import CHAMPION, champion_lock, crown, sqlite_lock_path


def hold_twice(uri: str) -> list[tuple[str, int]]:
    """Two threads take the lock at once and hold it a moment: the order in which they entered and left."""
    events: list[tuple[str, int]] = []

    def hold(n: int) -> None:
        with champion_lock(uri, "m"):
            events.append(("in", n))
            time.sleep(0.3)
            events.append(("out", n))

    threads = [threading.Thread(target=hold, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return events


def test_sqlite_lock_lies_beside_the_database_and_excludes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert sqlite_lock_path(uri) == tmp_path / "mlflow.db.leuko-lock"
    assert sqlite_lock_path("sqlite:///mlflow.db").as_posix() == "mlflow.db.leuko-lock"
    events = hold_twice(uri)
    assert [e[0] for e in events] == ["in", "out", "in", "out"] and events[0][1] == events[1][1]


def test_two_decisions_at_once_read_each_other(tmp_path, monkeypatch):
    """Each reads the alias, then waits: without the lock both would find no champion and both crown."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("m")
    for score in (0.6, 0.8):
        client.create_model_version("m", str(tmp_path), tags={"leuko.score": f"{score:.6f}"})
    real = champion.current_champion

    def read_then_wait(*args):
        found = real(*args)
        time.sleep(0.5)
        return found

    monkeypatch.setattr(champion, "current_champion", read_then_wait)
    decisions = {}

    def decide(version: str, score: float) -> None:
        decisions[version] = crown(mlflow.MlflowClient(uri, registry_uri=uri), uri, "m", version, score, "acc")

    threads = [threading.Thread(target=decide, args=args) for args in (("1", 0.6), ("2", 0.8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == "2"  # the better one, in any order
    reasons = [d.reason for d in decisions.values()]
    assert reasons.count("no champion yet") == 1, reasons


@pytest.mark.slow
def test_postgres_advisory_lock_excludes():
    from helpers.postgres import postgres_bin, postgres_server

    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (make setup installs it)")
    with postgres_server("locks") as url:
        events = hold_twice(url)
    assert [e[0] for e in events] == ["in", "out", "in", "out"] and events[0][1] == events[1][1]


def test_the_same_score_registered_again_ties_and_stays_challenger():
    """The champion's score is read back from its 6-decimal leuko.score tag: the same model's full-precision score
    must tie with it (challenger), and a better one at that precision must win."""
    score = 0.9360174536705017  # `make sweep` run twice registers the same refit, scoring exactly this
    recorded = float(f"{score:.{champion.SCORE_DECIMALS}f}")  # 0.936017 < score
    alias, reason = champion.decide(score, "1", recorded, "balanced_accuracy")
    assert alias == champion.CHALLENGER and reason == "test balanced_accuracy 0.936017 <= 0.936017 of champion v1"
    alias, reason = champion.decide(0.9393, "1", recorded, "balanced_accuracy")
    assert alias == CHAMPION and reason == "test balanced_accuracy 0.9393 > 0.9360 of champion v1"
    assert champion.decide(0.936016, "1", recorded, "balanced_accuracy")[0] == champion.CHALLENGER
