"""The report's section on what ships: a registered model's ONNX export check and its model card.

`leuko report --run runs/NAME --model URI` resolves URI (models:/NAME@ALIAS or models:/NAME/VERSION) to one
version, exports it with `leuko export` (leuko.deploy.export) into runs/NAME/export/ unless a fresh export
of that version is there, and shows what the export measured beside the version's MODEL_CARD.md:

    runs/NAME/export/model.onnx    the graph (prepared volumes -> calibrated probabilities, batch dynamic)
    runs/NAME/export/model.json    its sidecar, as `leuko export` writes it
    runs/NAME/export/check.json    the version, cells and throughputs of that export: it is fresh while the
                                   version, the cells and the graph's sha256 still match

The cells checked: --export-input, else the manifest of the model's training data when its lineage tags name
a DVC folder here that holds it, else the model's example cell and its mirrors. A failed export is told in the
section; the rest of the report stands.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from leuko.deploy.onnx_model import PARITY
from leuko.errors import LeukoError
from leuko.evaluation.report_sections import ReportInputs, Section, _e, _table, provenance_section

EXPORT = "export"  # runs/NAME/export/
GRAPH = "model.onnx"  # `leuko export` writes its sidecar beside it: model.json
CHECK = "check.json"
RATES = ("onnxruntime_cells_per_s", "torch_cells_per_s")  # the two throughputs export measures
FINGERPRINT = "leuko.prepared_fingerprint"  # the lineage tag of the prepared data a model was fit on
URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))/?$")


class ModelUriError(LeukoError, ValueError):
    """A --model that names no registered version; the message lists what the registry holds."""


@dataclass
class ModelRef:
    """One registered version, as --model named it."""

    uri: str  # as given: models:/leuko@champion
    tracking_uri: str
    version: object  # its mlflow.entities.model_registry.ModelVersion: name, version, run_id, source, tags, ...

    @property
    def pinned(self) -> str:
        return f"models:/{self.version.name}/{self.version.version}"

    @property
    def tags(self) -> dict:
        return dict(self.version.tags or {})


@dataclass
class Deployment:
    """What the section shows: the version, its export (or why there is none) and its card."""

    model: ModelRef
    folder: Path
    kept: bool  # False: the export went to a temporary folder (--run was an MLflow run id)
    check: dict | None = None  # check.json
    sidecar: dict | None = None
    reused: bool = False
    error: str | None = None
    card: str | None = None
    card_from: str = ""


# ---------------------------------------------------------------------------------------------- the version
def resolve_model(uri: str, tracking_uri: str) -> ModelRef:
    """The version --model names, from the registry at tracking_uri; ModelUriError naming what is there."""
    match = URI.match(uri.strip())
    if match is None:
        raise ModelUriError(
            f"--model {uri}: give a registered version as models:/NAME@ALIAS or models:/NAME/VERSION "
            "(models:/leuko@champion, models:/leuko/3)"
        )
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise ModelUriError(
            f"--model {uri}: there is no MLflow store at {tracking_uri} to find it in; set MLFLOW_TRACKING_URI or "
            "--tracking-uri to the store it was registered in"
        )
    # heavy import here: mlflow takes seconds to load
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    name, alias, number = match["name"], match["alias"], match["version"]
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as exc:
        raise ModelUriError(
            f"--model {uri}: no such registered version in {tracking_uri} ({exc.message.splitlines()[0]}). "
            f"Registered there: {_registered(client)}. List them with `mlflow ui --backend-store-uri {tracking_uri}` "
            "(Models), or `leuko lineage models:/NAME/VERSION` for one; set MLFLOW_TRACKING_URI or --tracking-uri "
            "when the model is in another store"
        ) from exc
    return ModelRef(uri, tracking_uri, found)


def _registered(client, limit: int = 10) -> str:
    """Each registered model (up to limit) as "leuko (versions 1, 2; @champion = 2)", or "no model"."""
    try:
        parts = []
        for m in client.search_registered_models(max_results=limit):
            numbers = sorted(int(v.version) for v in client.search_model_versions(f"name = '{m.name}'"))
            aliases = "".join(f"; @{a} = {v}" for a, v in sorted((m.aliases or {}).items()))
            parts.append(f"{m.name} (version{'s' * (len(numbers) != 1)} {', '.join(map(str, numbers))}{aliases})")
    except Exception as exc:  # the listing only helps the message; a store that cannot list must not hide it
        return f"(could not list: {type(exc).__name__})"
    return "; ".join(parts) or "no model"


@contextlib.contextmanager
def pinned_store(uri: str):
    """MLflow's process-wide tracking and registry URIs (and their environment variables) pointed at uri while
    inside, then put back as they were: leuko.deploy.predict.load_model resolves models:/ through them."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {n: os.environ.get(n) for n in names}
    tracking, registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    os.environ.update(dict.fromkeys(names, uri))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry)
        for n, value in env.items():
            os.environ.pop(n, None) if value is None else os.environ.update({n: value})


# ---------------------------------------------------------------------------------------------- export + card
def deployment(model: ModelRef, folder: Path, *, cells: str | Path | None = None, kept: bool = True) -> Deployment:
    """The version's export into folder (reused when fresh) and its card; an export that fails is recorded."""
    dep = Deployment(model=model, folder=Path(folder), kept=kept)
    source = str(cells) if cells is not None else training_manifest(model.tags)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with pinned_store(model.tracking_uri):
        dep.card, dep.card_from = model_card(model)
        try:
            dep.check, dep.reused = fresh_export(dep.folder, model, source), True
            if dep.check is None:
                dep.check, dep.reused = run_export(dep.folder, model, source), False
            dep.sidecar = json.loads((dep.folder / GRAPH).with_suffix(".json").read_text())
        except Exception as exc:  # any failure of the exporter or runtimes is the section's to tell, not fatal
            dep.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return dep


def training_manifest(tags: dict) -> str | None:
    """The manifest of the model's training data when its lineage names a DVC folder here with that manifest."""
    from leuko.tracking.lineage import repo_root  # heavy import here: DVC and git helpers

    folder, sha, root = tags.get("leuko.data_dvc_path"), tags.get("leuko.manifest_sha256"), repo_root()
    if not folder or not sha or root is None:
        return None
    manifest = root / folder if folder.endswith(".csv") else root / folder / "manifest.csv"
    return str(manifest) if manifest.is_file() and _sha256(manifest) == sha else None


def _identity(model: ModelRef, source: str | None) -> dict:
    v = model.version
    return {"model_uri": model.pinned, "run_id": v.run_id, "source": v.source, "input": source}


def fresh_export(folder: Path, model: ModelRef, source: str | None) -> dict | None:
    """check.json of folder when its graph, sidecar and check are those of this version and cells, else None."""
    try:
        check = json.loads((folder / CHECK).read_text())
        sidecar = json.loads((folder / GRAPH).with_suffix(".json").read_text())
        digest = _sha256(folder / GRAPH)
    except (OSError, ValueError):
        return None
    same = {**_identity(model, source), "graph_sha256": digest}
    parity = (sidecar.get("parity") or {}).get("max_abs_difference")
    fresh = all(check.get(k) == v for k, v in same.items()) and sidecar.get("sha256") == digest
    return check if fresh and parity is not None and parity < PARITY else None


def run_export(folder: Path, model: ModelRef, source: str | None) -> dict:
    """`leuko export` of the version into folder; check.json: what it measured, for which version and cells."""
    from leuko.deploy import export as exporter  # heavy import here: torch and onnxruntime

    result = exporter.export(model.pinned, folder / GRAPH, source=source)
    measured = ("n_cells", "batch_sizes", "batch_size", "onnxruntime_cells_per_s", "torch_cells_per_s", "torch_device")
    check = {
        **_identity(model, source),
        "graph_sha256": _sha256(folder / GRAPH),
        "max_abs_difference": result["parity"],
        **{k: result[k] for k in measured},
        "seconds": exporter.SECONDS,  # each runtime's timing
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (folder / CHECK).write_text(json.dumps(check, indent=2) + "\n")
    return check


def model_card(model: ModelRef) -> tuple[str | None, str]:
    """(MODEL_CARD.md of the version, where it was read): its file among the model's artifacts, else the card in
    the version's description, else None."""
    import mlflow  # heavy imports here, as in resolve_model

    from leuko.tracking.model_card import MODEL_CARD

    v, uri = model.version, model.tracking_uri
    path = f"artifacts/{MODEL_CARD}"  # where leuko.tracking.model_files logs it, beside the weights
    try:
        base = mlflow.MlflowClient(uri, registry_uri=uri).get_model_version_download_uri(v.name, v.version)
        with tempfile.TemporaryDirectory(prefix="leuko-card-") as tmp:
            got = mlflow.artifacts.download_artifacts(f"{base}/{path}", dst_path=tmp, tracking_uri=uri)
            return Path(got).read_text(encoding="utf-8"), f"{path} in the files of {model.pinned}"
    except Exception:  # an older version without the file, or a store that cannot serve it: the description
        pass
    at = (v.description or "").find("# Model card")
    if at >= 0:
        return v.description[at:], f"the description of {model.pinned} (the registry may hold it shortened)"
    return None, f"{model.pinned} has no MODEL_CARD.md and no card in its description"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------------------------------------- Markdown
ITEM = re.compile(r"^\s*[-*+]\s+(.*)$")
RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")  # | --- | :-: | under a table's header
PIPE = re.compile(r"(?<!\\)\|(?=(?:[^`]*`[^`]*`)*[^`]*$)")  # a cell boundary: not escaped, not inside `code`
NUMBER = re.compile(r"^[-+]?\d[\d.,]*(e[-+]?\d+)?%?( \(.*\))?$")  # a number, or one with its CI


def markdown_html(text: str, *, demote: int = 2) -> str:
    """What a model card uses, as HTML: headings (demoted by `demote` levels), paragraphs, bullet lists, pipe
    tables, **bold** and `code`. Every character of text is HTML-escaped."""
    lines, out, i = text.replace("\r\n", "\n").split("\n"), [], 0

    def table_at(j: int) -> bool:
        return lines[j].strip().startswith("|") and j + 1 < len(lines) and bool(RULE.match(lines[j + 1]))

    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
        elif heading := re.match(r"^(#{1,6})\s+(.*?)(\s+#+)?$", line):
            level = min(len(heading[1]) + demote, 6)
            out.append(f"<h{level}>{_inline(heading[2])}</h{level}>")
            i += 1
        elif table_at(i):
            end = next((j for j in range(i + 2, len(lines)) if not lines[j].strip().startswith("|")), len(lines))
            out.append(_md_table(lines[i], lines[i + 2 : end]))
            i = end
        elif ITEM.match(lines[i]):
            items = []
            while i < len(lines) and lines[i].strip() and not table_at(i):
                item = ITEM.match(lines[i])  # else the item goes on
                items += [item[1]] if item else [f"{items.pop()} {lines[i].strip()}"]
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in items) + "</ul>")
        else:
            para = [line]
            i += 1
            while i < len(lines) and lines[i].strip() and not (table_at(i) or re.match(r"\s*([-*+]|#+)\s", lines[i])):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


def _cells(row: str) -> list[str]:
    """The cells of a pipe-table row; \\| is a | inside a cell."""
    cells = [c.strip().replace("\\|", "|") for c in PIPE.split(row.strip())]
    return cells[1 if cells and not cells[0] else 0 : -1 if len(cells) > 1 and not cells[-1] else None]


def _md_table(header: str, rows: list[str]) -> str:
    """A pipe table like the report's own: left-aligned up to the first column that holds only numbers."""
    head, body = _cells(header), [_cells(r) for r in rows]
    numeric = (k for k in range(len(head)) if body and all(k < len(r) and NUMBER.match(r[k]) for r in body))
    return _table(head, [[_inline(c) for c in r] for r in body], text_cols=next(numeric, len(head)))


def _inline(text: str) -> str:
    """`code` and **bold** of one line, everything else escaped."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick stays a backtick
        parts[-2:] = [parts[-2] + "`" + parts[-1]]
    return "".join(
        f"<code>{html.escape(p)}</code>" if k % 2 else re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(p))
        for k, p in enumerate(parts)
    )


# ---------------------------------------------------------------------------------------------- the section
def deploy_numbers(dep: Deployment | None) -> dict[str, float]:
    """The export's numbers for the page's JSON (export/...), none when there is no export."""
    if dep is None or dep.check is None or dep.error:
        return {}
    return {f"export/{k}": float(dep.check[k]) for k in ("max_abs_difference", *RATES)}


def deploy_section(inp: ReportInputs, dep: Deployment) -> Section:
    m, v = dep.model, dep.model.version
    named = f"<code>{_e(m.uri)}</code>" + (f" = <code>{_e(m.pinned)}</code>" if m.uri != m.pinned else "")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)) if v.creation_timestamp else "?"
    about = [f"registered {when} from run {v.run_id} in {m.tracking_uri}"]
    about += [f"aliases {', '.join(v.aliases)}"] if v.aliases else []
    about += [m.tags["leuko.decision"]] if m.tags.get("leuko.decision") else []
    parts = [f'<p class="note">The registered model {named}: {_e("; ".join(about))}.</p>', _data_check(inp, m)]
    if m.tags.get("leuko.status", "complete") != "complete":
        parts.append(f'<p class="warn">Tagged leuko.status={_e(m.tags["leuko.status"])}: its register did not end.</p>')
    failed = (
        f'<p class="warn">The ONNX export of <code>{_e(m.pinned)}</code> failed: {_e(str(dep.error).rstrip("."))}. '
        f"The rest of the report does not depend on it; <code>leuko export --model {_e(m.pinned)}</code> says more.</p>"
    )
    parts.append("<h3>ONNX export</h3>" + (failed if dep.error else _export_body(dep)))
    card = f'<div class="model-card">{markdown_html(dep.card)}</div>' if dep.card else ""
    parts.append(f'<h3>Model card</h3><p class="note">From {_e(dep.card_from)}.</p>{card}')
    return "deployment", "Deployment: ONNX export and model card", "".join(parts)


def _data_check(inp: ReportInputs, m: ModelRef) -> str:
    """Whether the model was trained on the prepared data of this CV (their fingerprints), when both are known."""
    from leuko.data.prepared import read_meta  # heavy import here: pandas

    prepared = (inp.config.get("data") or {}).get("prepared_dir")
    ours, theirs = (read_meta(prepared) or {}).get("fingerprint") if prepared else None, m.tags.get(FINGERPRINT)
    if not ours or theirs in (None, "unknown"):
        return ""
    if ours == theirs:
        return f'<p class="ok">Trained on the prepared data of this CV (fingerprint <code>{_e(ours[:12])}</code>).</p>'
    return f'<p class="warn">Trained on other prepared data than this CV ({FINGERPRINT} {_e(theirs[:12])}).</p>'


def _export_body(dep: Deployment) -> str:
    check, meta = dep.check, dep.sidecar
    worst, (onnx, pt) = float(check["max_abs_difference"]), (float(check[k]) for k in RATES)
    cells = (meta.get("parity") or {}).get("cells") or check["input"]
    verdict = (  # export writes no graph over the limit, and fresh_export takes none
        f'<p class="ok">The graph gives PyTorch\'s calibrated probabilities within {worst:.2e} (limit {PARITY:.0e}) on '
        f"{check['n_cells']} cells ({_e(cells)}), run at batch sizes {_e(' and '.join(map(str, check['batch_sizes'])))}"
        ".</p>"
    )
    graph = dep.folder / GRAPH
    where = f"<code>{_e(graph)}</code>" if dep.kept else "a temporary folder (not kept: --run named an MLflow run)"
    made = f"reused, exported {check.get('written', '?')}" if dep.reused else "exported for this report"
    size = f"{graph.stat().st_size / 1e6:.1f} MB" if graph.is_file() else "?"
    shape = {
        k: _e(f"{meta[k]['name']} {meta[k].get('dtype', '')} ({', '.join(map(str, meta[k]['shape']))})")
        for k in ("input", "output")
    }
    axis = meta["input"]["shape"][0]  # a name ("batch") for a dynamic axis, as the graph declares it
    rows = [
        ["graph", f"{where}, {size}, ONNX opset {_e(meta.get('opset', '?'))}; {_e(made)}"],
        ["input", shape["input"]],
        ["dynamic batch", f"yes: axis <code>{_e(axis)}</code>" if isinstance(axis, str) else f"no: {axis}"],
        ["output", f"{shape['output']}: {_e(', '.join(meta['classes']))}"],
        ["ensemble members, TTA", _e(f"{meta.get('ensemble_size', 1)}, {meta.get('tta', 'none')}")],
        ["temperature", f"{float(meta.get('temperature', 1.0)):.3f}"],
        *([["class biases", _e(", ".join(f"{b:+.3f}" for b in meta["bias"]))]] if meta.get("bias") else []),
        ["max |p<sub>ONNX</sub> − p<sub>PyTorch</sub>|", f"{worst:.2e}"],
        ["onnxruntime (CPU)", f"{_rate(onnx)} cells/s"],
        [f"PyTorch ({_e(check['torch_device'])})", f"{_rate(pt)} cells/s (ONNX {onnx / pt:.2f}x)"],
    ]
    return (
        verdict
        + _table(["", "value"], rows, text_cols=2)
        + f'<p class="note">Throughput: batches of {check["batch_size"]} cells, each runtime timed for '
        f"{check.get('seconds', '?')} s on this machine (leuko.deploy.export). The sidecar <code>model.json</code> "
        "beside the graph holds the classes, preprocessing, calibration and review threshold a deployment needs; "
        f"<code>leuko export --model {_e(dep.model.pinned)} --out model.onnx</code> writes the same pair anywhere.</p>"
    )


def _rate(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def with_deploy_section(makers: tuple, dep: Deployment | None) -> tuple:
    """The report's section makers with the deployment section before the provenance (else last); unchanged
    without a --model."""
    makers = tuple(makers)
    if dep is None:
        return makers
    at = makers.index(provenance_section) if provenance_section in makers else len(makers)
    return (*makers[:at], functools.partial(deploy_section, dep=dep), *makers[at:])
