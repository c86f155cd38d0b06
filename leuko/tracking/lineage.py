"""Lineage: data version (DVC) -> run (MLflow) -> model version (registry), and back to the exact data.

Every run, and every registered version (which copies its run's lineage tags), carries:

    leuko.git_commit            the commit the code ran from ("-dirty" when tracked files had changes)
    leuko.data_dvc_file         the .dvc file that tracks the dataset folder, relative to the repository root
    leuko.data_dvc_path         the folder it tracks, relative to the repository root
    leuko.data_dvc_md5          DVC's hash of that folder: what `dvc checkout` / `dvc pull` restores
    leuko.data_dvc_state        clean: the folder was exactly that version; modified: it had changes not yet
                                `dvc add`ed (the md5 is then the last version added, not the data used);
                                untracked: no .dvc file tracks the manifest the prepared data came from
    leuko.manifest_sha256, leuko.prepared_fingerprint   what `leuko prepare` saw and made (see leuko.data.prepare)

`leuko lineage models:/leuko@champion` prints the chain and the commands that bring that data back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from leuko.errors import LeukoError

UNTRACKED = "untracked"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# Tags are text that anyone who can write to the tracking store chose: a commit goes to git only when it is
# a hex SHA (and after --end-of-options), an md5 into a command only when it is a DVC hash, and every value
# in a printed command is shell-quoted.
GIT_SHA = re.compile(r"^[0-9a-f]{7,64}$")
DVC_MD5 = re.compile(r"^[0-9a-f]{32}(\.dir)?$")


class LineageError(LeukoError, ValueError):
    """A model URI or run id that names nothing in the tracking store; the message gives the accepted forms."""


# ---------------------------------------------------------------------------------------------- recording


def repo_root(start: str | Path = ".") -> Path | None:
    """The DVC repository (the folder holding .dvc/) at or above start, or None."""
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dvc_files(root: Path) -> list[Path]:
    # .dvc files at the root and one level down: where a dataset's tracking file lives in practice;
    # a full walk could take seconds in a workspace with tens of thousands of volume files.
    found = sorted(root.glob("*.dvc")) + sorted(root.glob("*/*.dvc"))
    return [p for p in found if p.is_file()]


def _tracked_out(dvc_file: Path) -> tuple[Path, str] | None:
    """(tracked path, md5) of a single-output .dvc file, or None when it is not one."""
    try:
        spec = yaml.safe_load(dvc_file.read_text()) or {}
        (out,) = spec.get("outs") or [None]
        return dvc_file.parent / out["path"], str(out["md5"])
    except (OSError, yaml.YAMLError, TypeError, KeyError, ValueError):
        return None


def _manifest_in(tracked: Path) -> Path | None:
    if tracked.is_file():
        return tracked if tracked.suffix == ".csv" else None
    candidate = tracked / "manifest.csv"
    return candidate if candidate.is_file() else None


def _dvc_state(root: Path, dvc_file: Path) -> str:
    """clean or modified (the tracked folder's hash against its .dvc file), unknown when DVC cannot tell.

    The hash itself is compared, not `dvc status`, which reports a folder missing from the cache (a new
    clone after `make data`) as "not in cache" whether or not its content matches. DVC keeps file hashes
    in its state database (keyed by inode, size and mtime), so after the first check this reads metadata only.
    """
    try:
        from dvc.repo import Repo  # heavy import here: DVC loads in seconds, and only recording a run needs it

        with Repo(str(root)) as repo:
            (stage,) = repo.stage.collect(str(dvc_file))
            changed = any(out.changed_checksum() for out in stage.outs)
    except Exception:  # any DVC failure (damaged state, odd .dvc file): the hash is still recorded
        return "unknown"
    return "modified" if changed else "clean"


@functools.lru_cache(maxsize=8)
def _data_version(root: str, manifest_sha256: str) -> tuple[tuple[str, str], ...]:
    root_path = Path(root)
    for dvc_file in _dvc_files(root_path):
        tracked = _tracked_out(dvc_file)
        if tracked is None:
            continue
        path, md5 = tracked
        manifest = _manifest_in(path)
        if manifest is None or _sha256(manifest) != manifest_sha256:
            continue
        return (
            ("leuko.data_dvc_file", dvc_file.relative_to(root_path).as_posix()),
            ("leuko.data_dvc_path", path.resolve().relative_to(root_path).as_posix()),
            ("leuko.data_dvc_md5", md5),
            ("leuko.data_dvc_state", _dvc_state(root_path, dvc_file)),
        )
    return (("leuko.data_dvc_md5", UNTRACKED), ("leuko.data_dvc_state", UNTRACKED))


def data_version_tags(manifest_sha256: str | None, start: str | Path = ".") -> dict[str, str]:
    """DVC lineage tags for data whose manifest has this sha256 (see the module docstring).

    The .dvc file is found by content, not by name: the one whose tracked folder holds a manifest.csv
    with exactly this sha256, so a run on other data is never credited to data.dvc.
    """
    root = repo_root(start)
    if root is None or not manifest_sha256 or manifest_sha256 == "unknown":
        return {"leuko.data_dvc_md5": UNTRACKED, "leuko.data_dvc_state": UNTRACKED}
    return dict(_data_version(str(root), manifest_sha256))


def git_commit(path: str | Path = ".") -> str:
    """HEAD of the git repository at path, with "-dirty" when tracked files have changes; "unknown" outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=path, capture_output=True, text=True
    )
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def lineage_tags(prepared_dir: str | Path) -> dict[str, str]:
    """Tags that tie a run to the code and the exact data it saw (see the module docstring)."""
    # heavy import here: the prepared folder's reader loads pandas, which `leuko lineage` does not need
    from leuko.data.prepared import read_meta

    meta = read_meta(prepared_dir) or {}
    return {
        "leuko.git_commit": git_commit(),
        "leuko.manifest_sha256": str(meta.get("manifest_sha256", "unknown")),
        "leuko.prepared_fingerprint": str(meta.get("fingerprint", "unknown")),
        "leuko.prepared_dir": str(Path(prepared_dir).resolve()),
        **data_version_tags(meta.get("manifest_sha256")),
    }


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class Lineage:
    tags: dict[str, str]  # the run's tags, completed by the model version's
    run: object | None = None  # mlflow.entities.Run
    parent: object | None = None
    experiment: str | None = None
    versions: list = field(default_factory=list)  # mlflow.entities.model_registry.ModelVersion
    tracking_uri: str = ""


def resolve(target: str, tracking_uri: str | None = None) -> Lineage:
    """models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID[/...] or a bare run id -> its lineage."""
    # heavy imports here: mlflow, and runs (Lightning), load in seconds; recording tags needs neither
    import mlflow
    from mlflow.exceptions import MlflowException

    from leuko.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    versions = []
    try:
        if target.startswith("models:/"):
            rest = target.removeprefix("models:/")
            if "@" in rest:
                name, alias = rest.split("@", 1)
                versions = [client.get_model_version_by_alias(name, alias)]
            elif rest.count("/") == 1 and rest.split("/")[1].isdigit():
                name, number = rest.split("/")
                versions = [client.get_model_version(name, number)]
            else:
                raise LineageError(
                    f"{target}: give models:/NAME@ALIAS or models:/NAME/VERSION (models:/leuko@champion)"
                )
            run_id = versions[0].run_id
        else:
            run_id = target.removeprefix("runs:/").split("/")[0]
            if not RUN_ID.match(run_id):
                raise LineageError(f"{target}: not a model URI (models:/NAME@ALIAS, models:/NAME/VERSION) or a run id")
    except MlflowException as exc:
        raise LineageError(f"{target}: not found in the registry at {uri} ({exc.message.splitlines()[0]})") from exc

    run = parent = experiment = None
    tags: dict[str, str] = {}
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            if not versions:
                raise LineageError(f"{target}: no such run in {uri}") from exc
    if run is not None:
        tags = dict(run.data.tags)
        experiment = client.get_experiment(run.info.experiment_id).name
        parent_id = tags.get("mlflow.parentRunId")
        if parent_id:
            try:
                parent = client.get_run(parent_id)
            except MlflowException:
                parent = None
        if not versions:
            versions = list(client.search_model_versions(f"run_id = '{run_id}'"))
    for version in versions:
        for key, value in (version.tags or {}).items():
            tags.setdefault(key, value)  # the run's own tags win; the version's fill gaps (run deleted)
    return Lineage(tags=tags, run=run, parent=parent, experiment=experiment, versions=versions, tracking_uri=uri)


def _committed_md5(commit: str, dvc_file: str, root: Path | None) -> str | None:
    """md5 that dvc_file records at commit, when this repository has that commit."""
    if root is None or not GIT_SHA.match(commit):
        return None
    try:
        shown = subprocess.run(
            ["git", "show", "--end-of-options", f"{commit}:{dvc_file}", "--"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if shown.returncode != 0:
        return None
    try:
        (out,) = (yaml.safe_load(shown.stdout) or {}).get("outs") or [None]
        return str(out["md5"])
    except (yaml.YAMLError, TypeError, KeyError, ValueError):
        return None


def _short(value: str | None, n: int = 12) -> str:
    return "?" if not value else value if len(value) <= n else value[:n]


def format_lineage(lineage: Lineage, start: str | Path = ".") -> str:
    tags = lineage.tags
    md5 = tags.get("leuko.data_dvc_md5")
    state = tags.get("leuko.data_dvc_state", "not recorded")
    dvc_file = tags.get("leuko.data_dvc_file", "data.dvc")
    data_path = tags.get("leuko.data_dvc_path", "data")
    full_commit = tags.get("leuko.git_commit", "unknown")
    run = lineage.run
    run_id = run.info.run_id if run is not None else (lineage.versions[0].run_id if lineage.versions else "?")
    run_name = run.info.run_name if run is not None else "(run not found)"

    data_label = f"{_short(md5)} ({dvc_file})" if md5 and md5 != UNTRACKED else "untracked data"
    chain = [f"data {data_label}", f"run {_short(run_id)} ({run_name})"]
    for v in lineage.versions:
        aliases = getattr(v, "aliases", None) or []
        chain.append(f"model {v.name} v{v.version}" + (f" @{','.join(aliases)}" if aliases else ""))
    lines = [" -> ".join(chain), ""]

    lines.append("data")
    if md5 and md5 != UNTRACKED:
        lines.append(f"  {dvc_file}: {data_path}  md5 {md5}  (state when trained: {state})")
    else:
        lines.append(f"  no DVC hash recorded ({md5 or 'tag missing'}): the data was not tracked by a .dvc file")
    lines.append(f"  manifest sha256 {tags.get('leuko.manifest_sha256', '?')}")
    lines.append(f"  prepared fingerprint {tags.get('leuko.prepared_fingerprint', '?')}")
    lines.append(f"  git commit {full_commit}")
    if full_commit.endswith("-dirty"):
        lines.append("  (-dirty: tracked files had uncommitted changes when this ran; the commit is the nearest one)")

    lines.append("run")
    if run is not None:
        command = tags.get("leuko.command", "?")
        lines.append(f"  {run_id}  {run_name}  ({command}, experiment {lineage.experiment}, {run.info.status})")
    else:
        lines.append(f"  {run_id}  (not in the tracking store any more; tags above come from the model version)")
    if lineage.parent is not None:
        p = lineage.parent
        lines.append(f"  parent {p.info.run_id}  {p.info.run_name}  ({p.data.tags.get('leuko.command', '?')})")
    if tags.get("leuko.fold"):
        lines.append(f"  fold {tags['leuko.fold']}")

    lines.append("model")
    if lineage.versions:
        for v in lineage.versions:
            aliases = ", ".join(getattr(v, "aliases", None) or []) or "none"
            lines.append(f"  {v.name} version {v.version}  aliases: {aliases}  models:/{v.name}/{v.version}")
    else:
        lines.append("  no registered version comes from this run")

    lines += ["", "to work with exactly this data:"]
    lines += _restore_lines(tags, start)
    return "\n".join(lines)


def _restore_lines(tags: dict[str, str], start: str | Path) -> list[str]:
    """The commands that bring back the data a run's tags record."""
    md5 = tags.get("leuko.data_dvc_md5")
    dvc_file = tags.get("leuko.data_dvc_file", "data.dvc")
    data_path = tags.get("leuko.data_dvc_path", "data")
    commit = tags.get("leuko.git_commit", "unknown").removesuffix("-dirty")
    if not md5 or md5 == UNTRACKED:
        return ["  not possible from the tags: track the dataset with `dvc add` before training"]
    if not DVC_MD5.match(md5):
        return [f"  not possible from the tags: the recorded md5 {shlex.quote(md5)} is not a DVC hash"]
    lines = []
    if tags.get("leuko.data_dvc_state", "not recorded") == "modified":
        lines.append(
            f"  warning: {data_path} had changes not yet `dvc add`ed when this ran; "
            "the md5 is of the last added version"
        )
    committed = _committed_md5(commit, dvc_file, repo_root(start))
    quoted = shlex.quote(dvc_file)
    if committed == md5:
        lines.append(f"  git checkout {commit} -- {quoted}    # {quoted} there records md5 {_short(md5)}")
    else:
        if committed is not None:
            lines.append(
                f"  note: {dvc_file} at {_short(commit)} records md5 {_short(committed)}, not {_short(md5)}: "
                "write it from the tag"
            )
        elif GIT_SHA.match(commit):
            lines.append(
                f"  (commit {_short(commit)} or its {dvc_file} is not in this repository: write it from the tag)"
            )
        elif commit and commit != "unknown":
            lines.append(f"  (the recorded commit {shlex.quote(commit)} is no git commit hash: write it from the tag)")
        relative = os.path.relpath(data_path, Path(dvc_file).parent)  # a .dvc file's path is relative to it
        escaped = relative.replace("\\", "\\\\").replace("%", "%%")  # printf reads its format's \ and %
        text = f"outs:\\n- md5: {md5}\\n  hash: md5\\n  path: {escaped}\\n"
        lines.append(f"  printf {shlex.quote(text)} > {quoted}")
    lines.append(f"  dvc pull {quoted}        # or `dvc checkout {quoted}` when the local cache has it")
    return lines


_DATA_TAGS = ("leuko.git_commit", "leuko.manifest_sha256", "leuko.prepared_fingerprint")


def lineage_json(lineage: Lineage) -> str:
    run = lineage.run
    data = {
        key.removeprefix("leuko."): value
        for key, value in lineage.tags.items()
        if key.startswith("leuko.data_dvc") or key in _DATA_TAGS
    }
    return json.dumps(
        {
            "data": data,
            "run": None
            if run is None
            else {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "experiment": lineage.experiment,
                "status": run.info.status,
                "parent_run_id": lineage.tags.get("mlflow.parentRunId"),
            },
            "model_versions": [
                {"name": v.name, "version": str(v.version), "aliases": list(getattr(v, "aliases", None) or [])}
                for v in lineage.versions
            ],
            "tracking_uri": lineage.tracking_uri,
        },
        indent=2,
    )
