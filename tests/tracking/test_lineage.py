"""Lineage: runs carry the DVC hash of their data; `leuko lineage` walks model version -> run -> data."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from leuko.cli import main
from leuko.tracking.lineage import _data_version, data_version_tags

# Every test here runs git and dvc in subprocesses and builds a SQLite MLflow store.
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "DVC_NO_ANALYTICS": "1",
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
}


def sh(*cmd: str, cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    """A git + DVC repository whose data.dvc tracks a small data folder with a manifest; committed."""
    repo = tmp_path_factory.mktemp("lineage") / "repo"
    (repo / "data" / "volumes").mkdir(parents=True)
    (repo / "data" / "manifest.csv").write_text("cell_id,path\nc1,volumes/c1.npy\n")
    (repo / "data" / "volumes" / "c1.npy").write_bytes(b"not really a volume")
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "add", "-q", "data", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "data", cwd=repo)
    md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    commit = sh("git", "rev-parse", "HEAD", cwd=repo).strip()
    sha = hashlib.sha256((repo / "data" / "manifest.csv").read_bytes()).hexdigest()
    return {"repo": repo, "md5": md5, "commit": commit, "manifest_sha256": sha}


def test_data_version_found_by_manifest_content(dvc_repo):
    _data_version.cache_clear()
    tags = data_version_tags(dvc_repo["manifest_sha256"], start=dvc_repo["repo"] / "data")
    assert tags == {
        "leuko.data_dvc_file": "data.dvc",
        "leuko.data_dvc_path": "data",
        "leuko.data_dvc_md5": dvc_repo["md5"],
        "leuko.data_dvc_state": "clean",
    }


def test_data_version_other_data_is_untracked(dvc_repo, tmp_path):
    # a manifest that no .dvc file tracks is never credited to data.dvc
    assert data_version_tags("0" * 64, start=dvc_repo["repo"])["leuko.data_dvc_md5"] == "untracked"
    assert data_version_tags(dvc_repo["manifest_sha256"], start=tmp_path)["leuko.data_dvc_md5"] == "untracked"


def test_data_version_reports_changes_not_yet_added(dvc_repo):
    volume = dvc_repo["repo"] / "data" / "volumes" / "c1.npy"
    original = volume.read_bytes()
    try:
        volume.write_bytes(b"changed after dvc add")
        _data_version.cache_clear()
        tags = data_version_tags(dvc_repo["manifest_sha256"], start=dvc_repo["repo"])
        assert tags["leuko.data_dvc_md5"] == dvc_repo["md5"] and tags["leuko.data_dvc_state"] == "modified"
    finally:
        volume.write_bytes(original)
        _data_version.cache_clear()


def test_data_version_is_clean_in_a_new_clone_before_the_cache_has_it(dvc_repo, tmp_path):
    # a new clone that regenerated the data (make data) has the right bytes but nothing in .dvc/cache
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(dvc_repo["repo"]), str(clone), cwd=tmp_path)
    shutil.copytree(dvc_repo["repo"] / "data", clone / "data")
    _data_version.cache_clear()
    tags = data_version_tags(dvc_repo["manifest_sha256"], start=clone)
    assert (tags["leuko.data_dvc_md5"], tags["leuko.data_dvc_state"]) == (dvc_repo["md5"], "clean")


@pytest.fixture(scope="module")
def registered(dvc_repo, tmp_path_factory):
    """A sqlite MLflow store: a cv parent run, a child run with lineage tags, a registered version @champion."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("lineage")
    parent = client.create_run(exp, run_name="cv-demo", tags={"leuko.command": "cv"})
    tags = {
        "leuko.command": "register",
        "leuko.git_commit": dvc_repo["commit"],
        "leuko.manifest_sha256": dvc_repo["manifest_sha256"],
        "leuko.prepared_fingerprint": "f" * 64,
        "leuko.data_dvc_file": "data.dvc",
        "leuko.data_dvc_path": "data",
        "leuko.data_dvc_md5": dvc_repo["md5"],
        "leuko.data_dvc_state": "clean",
        "mlflow.parentRunId": parent.info.run_id,
    }
    run = client.create_run(exp, run_name="register-demo", tags=tags)
    client.set_terminated(run.info.run_id)
    client.create_registered_model("leuko-t")
    version = client.create_model_version("leuko-t", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("leuko-t", "champion", version.version)
    return {"uri": uri, "run_id": run.info.run_id, "parent_id": parent.info.run_id, "client": client}


def test_lineage_prints_data_run_and_model(registered, dvc_repo, capsys, monkeypatch):
    monkeypatch.chdir(dvc_repo["repo"])
    assert main(["lineage", "models:/leuko-t@champion", "--tracking-uri", registered["uri"]]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.index("data ") < first.index("run ") < first.index("model leuko-t v1")  # data -> run -> model
    assert dvc_repo["md5"] in out and dvc_repo["commit"] in out and registered["run_id"] in out
    assert registered["parent_id"] in out and "cv-demo" in out
    assert "leuko-t version 1  aliases: champion" in out
    # the commit's data.dvc records this md5: checking it out and pulling gives exactly that data
    assert f"git checkout {dvc_repo['commit']} -- data.dvc" in out
    assert "dvc pull data.dvc" in out


def test_lineage_by_version_and_by_run_id_as_json(registered, dvc_repo, capsys, monkeypatch):
    monkeypatch.chdir(dvc_repo["repo"])
    assert main(["lineage", "models:/leuko-t/1", "--tracking-uri", registered["uri"], "--json"]) == 0
    by_version = json.loads(capsys.readouterr().out)
    assert by_version["data"]["data_dvc_md5"] == dvc_repo["md5"]
    assert by_version["run"]["run_id"] == registered["run_id"]
    assert by_version["model_versions"] == [{"name": "leuko-t", "version": "1", "aliases": ["champion"]}]
    assert main(["lineage", registered["run_id"], "--tracking-uri", registered["uri"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_versions"][0]["version"] == "1"


def test_lineage_without_the_commit_writes_the_dvc_file_from_the_tag(registered, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository the run came from: the commit cannot be checked here
    assert main(["lineage", "models:/leuko-t@champion", "--tracking-uri", registered["uri"]]) == 0
    out = capsys.readouterr().out
    assert "printf 'outs:\\n- md5: " in out and "path: data\\n' > data.dvc" in out


def test_lineage_errors_name_the_target(registered, capsys):
    assert main(["lineage", "models:/leuko-t@nosuchalias", "--tracking-uri", registered["uri"]]) == 1
    assert "models:/leuko-t@nosuchalias" in capsys.readouterr().err
    assert main(["lineage", "leuko-t", "--tracking-uri", registered["uri"]]) == 1
    assert "not a model URI" in capsys.readouterr().err


def test_lineage_gives_tag_text_neither_to_git_nor_unquoted_to_the_shell(
    registered, dvc_repo, capsys, monkeypatch, tmp_path
):
    """A run's tags are text anyone with write access to the store chose: never options, never shell code."""
    monkeypatch.chdir(dvc_repo["repo"])
    client = registered["client"]
    hostile = {
        "leuko.git_commit": f"--output={tmp_path / 'written'}",  # `git show --output=FILE` writes FILE
        "leuko.data_dvc_file": "data.dvc; touch pwned",
        "leuko.data_dvc_path": "data",
        "leuko.data_dvc_md5": dvc_repo["md5"],
        "leuko.data_dvc_state": "clean",
    }
    run = client.create_run(client.get_experiment_by_name("lineage").experiment_id, run_name="hostile", tags=hostile)
    assert main(["lineage", run.info.run_id, "--tracking-uri", registered["uri"]]) == 0
    out = capsys.readouterr().out
    assert not list(tmp_path.glob("written*")), "a tag reached git as an option"
    assert "'data.dvc; touch pwned'" in out

    # the printed commands do what they read: in a scratch folder, the printf line writes the .dvc file only
    printf = next(line.strip() for line in out.splitlines() if line.strip().startswith("printf "))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    subprocess.run(["bash", "-c", printf], cwd=scratch, check=True)
    assert [p.name for p in scratch.iterdir()] == ["data.dvc; touch pwned"]
    written = yaml.safe_load((scratch / "data.dvc; touch pwned").read_text())
    assert written == {"outs": [{"md5": dvc_repo["md5"], "hash": "md5", "path": "data"}]}


def test_lineage_refuses_a_recorded_md5_that_is_no_dvc_hash(dvc_repo):
    from leuko.tracking.lineage import _restore_lines

    tags = {"leuko.data_dvc_md5": "x' > /tmp/y; echo '", "leuko.git_commit": dvc_repo["commit"]}
    lines = _restore_lines(tags, dvc_repo["repo"])
    assert not any(line.strip().startswith(("printf", "dvc ", "git ")) for line in lines), lines
    assert "not a DVC hash" in " ".join(lines)
