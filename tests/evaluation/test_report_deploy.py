"""`leuko report --model URI`: the registered model's ONNX export check and model card in the CV's report."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.entities.model_registry import ModelVersion

from helpers.evaluation import fake_cv
from helpers.sweep import registered_model
from leuko.cli import main
from leuko.deploy import export as export_module
from leuko.evaluation import report_deploy
from leuko.evaluation.report import write_report
from leuko.evaluation.report_deploy import (
    CHECK,
    GRAPH,
    Deployment,
    ModelRef,
    ModelUriError,
    deploy_section,
    markdown_html,
    model_card,
    pinned_store,
    resolve_model,
    training_manifest,
    with_deploy_section,
)
from leuko.evaluation.report_sections import SECTIONS, ReportInputs, provenance_section

URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _numbers(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="leuko-numbers">(.*?)</script>', html, re.S)
    return json.loads(match.group(1).replace("<\\/", "</"))


def _section(html: str) -> str:
    match = re.search(r'<section id="deployment">.*?</section>', html, re.S)
    assert match, "no deployment section"
    return match.group(0)


@pytest.fixture(autouse=True)
def _quick_and_isolated(monkeypatch):
    """Short throughput timing, and no MLflow store from the environment: each test names its own."""
    monkeypatch.setattr(export_module, "SECONDS", 0.2)
    for name in URI_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_prepared):
    """The tiny registered model (helpers.sweep), with a store's artifacts kept out of the working directory."""
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("artifacts"))  # a new store puts its artifact root (./mlruns) here
    try:
        return registered_model(tmp_path_factory.getbasetemp(), tiny_prepared)
    finally:
        os.chdir(here)


@pytest.fixture
def cv(registry, tmp_path) -> Path:
    """A copy of the CV the model was registered from (the trial's cross-validation): reports write into it."""
    copy = tmp_path / "runs" / "cv"
    shutil.copytree(registry["source"].cv_dir, copy)
    return copy


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('empty-store') / 'mlflow.db'}"
    mlflow.MlflowClient(uri, registry_uri=uri).search_registered_models()  # creates the database
    return uri


# ---------------------------------------------------------------------------------------------- the section
@pytest.mark.slow
def test_report_shows_the_onnx_check_and_the_card(registry, cv, tiny_cohort, capsys):
    uri = registry["tracking_uri"]
    before = mlflow.get_tracking_uri()
    args = ["report", "--run", str(cv), "--no-evaluate", "--model", "models:/leuko@champion"]
    assert main([*args, "--tracking-uri", uri, "--export-input", str(tiny_cohort)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"models:/leuko/\d+: ONNX parity \d\.\d\de-\d\d, onnxruntime ", out)

    html = (cv / "report.html").read_text()
    section = _section(html)
    assert '<a href="#deployment">' in html and html.index('id="deployment"') < html.index('id="provenance"')
    numbers = _numbers(html)
    parity = numbers["export/max_abs_difference"]
    assert 0 <= parity < 1e-4 and f"{parity:.2e}" in section
    for key in ("export/onnxruntime_cells_per_s", "export/torch_cells_per_s"):
        assert numbers[key] > 0
    assert "onnxruntime (CPU)" in section and re.search(r"PyTorch \((cpu|cuda:\d)\)", section)
    assert section.count(" cells/s") >= 2
    assert "volumes float32 (batch, 1, 16, 16, 16)" in section and "yes: axis <code>batch</code>" in section
    assert 'ensemble members, TTA</td><td class="text">1, none' in section
    assert "Trained on the prepared data of this CV" in section

    check = json.loads((cv / "export" / CHECK).read_text())  # parity on real cells of the tiny cohort
    assert check["input"] == str(tiny_cohort) and check["n_cells"] == 32 and check["batch_sizes"] == [1, 32]
    assert check["max_abs_difference"] == parity and (cv / "export" / "model.json").is_file()

    card = section[section.index('<div class="model-card">') :]
    assert "<h3>Model card: vit3d_tiny leukocyte classifier (4 classes)</h3>" in card
    assert "<h4>Test metrics</h4>" in card and "<strong>decision support</strong>" in card
    assert '<th class="text">metric</th>' in card and '<td class="text">balanced accuracy</td>' in card
    assert "<li><strong>Out-of-distribution intensities</strong>" in card
    assert "|" not in re.sub(r"<[^>]+>", "", card.split("<h4>Test metrics</h4>")[1].split("<h4>")[0])  # no raw pipes

    # the process-wide MLflow settings are as they were
    assert all(name not in os.environ for name in URI_VARS) and mlflow.get_tracking_uri() == before


@pytest.mark.slow
def test_a_fresh_export_is_reused_and_a_failed_one_is_told(registry, cv, tmp_path):
    uri = registry["tracking_uri"]
    first = write_report(str(cv), cv / "r1.html", tracking_uri=uri, evaluate_missing=False, model="models:/leuko/1")
    graph = cv / "export" / GRAPH
    written = graph.stat().st_mtime_ns
    second = write_report(str(cv), cv / "r2.html", tracking_uri=uri, evaluate_missing=False, model="models:/leuko/1")
    assert first["deployment"]["reused"] is False and second["deployment"]["reused"] is True
    assert graph.stat().st_mtime_ns == written
    assert second["deployment"]["export/max_abs_difference"] == first["deployment"]["export/max_abs_difference"] < 1e-4
    assert "reused, exported" in _section((cv / "r2.html").read_text())
    # the example cell and its mirror images (no --export-input; the tiny data are not tracked by DVC)
    assert json.loads((cv / "export" / CHECK).read_text())["input"] is None

    empty = tmp_path / "no_volumes"
    empty.mkdir()
    result = write_report(
        str(cv), cv / "r3.html", tracking_uri=uri, evaluate_missing=False, model="models:/leuko/1", export_input=empty
    )
    section = _section((cv / "r3.html").read_text())
    assert result["deployment"]["error"].startswith("PredictError") and "no volume files" in section
    assert '<p class="warn">The ONNX export of <code>models:/leuko/1</code> failed' in section
    assert "onnxruntime (CPU)" not in section and not any(k.startswith("export/") for k in result["numbers"])
    assert '<div class="model-card">' in section  # the card does not depend on the export


@pytest.mark.slow
def test_a_version_that_is_not_there_lists_what_is(registry, cv):
    with pytest.raises(ModelUriError) as info:
        write_report(str(cv), cv / "r.html", tracking_uri=registry["tracking_uri"], model="models:/leuko/99")
    message = str(info.value)
    assert message.startswith("--model models:/leuko/99: no such registered version in " + registry["tracking_uri"])
    assert re.search(r"Registered there: leuko \(versions? [\d, ]+; @champion = \d+", message)
    assert not (cv / "r.html").exists() and not (cv / "eval").exists()  # refused before any work


# ---------------------------------------------------------------------------------------------- bad --model
def test_bad_model_uris_say_what_to_give(tmp_path, empty_store, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no MLflow store of the working directory is read
    cv = fake_cv(tmp_path / "runs", name="plain")
    assert main(["report", "--run", str(cv), "--model", "models:/leuko@champion", "--tracking-uri", empty_store]) == 1
    err = capsys.readouterr().err
    assert "--model models:/leuko@champion: no such registered version in " + empty_store in err
    assert "Registered there: no model" in err and f"mlflow ui --backend-store-uri {empty_store}" in err
    assert not (cv / "eval").exists() and not (cv / "report.html").exists()

    assert main(["report", "--run", str(cv), "--model", "leuko@champion"]) == 1
    assert "--model leuko@champion: give a registered version as models:/NAME@ALIAS" in capsys.readouterr().err

    missing = tmp_path / "nowhere.db"
    assert (
        main(["report", "--run", str(cv), "--model", "models:/leuko/1", "--tracking-uri", f"sqlite:///{missing}"]) == 1
    )
    assert f"there is no MLflow store at sqlite:///{missing}" in capsys.readouterr().err and not missing.exists()

    assert main(["report", "--run", str(cv), "--model", "models:/leuko/1", "--export-input", str(tmp_path / "x")]) == 1
    assert f"--export-input {tmp_path / 'x'}: no such file or folder" in capsys.readouterr().err


def test_without_model_there_is_no_deployment_section(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cv = fake_cv(tmp_path / "runs", name="plain")
    result = write_report(str(cv), tmp_path / "r.html", evaluate_missing=False)
    assert result["deployment"] is None and 'id="deployment"' not in (tmp_path / "r.html").read_text()
    assert with_deploy_section(SECTIONS, None) == SECTIONS


# ---------------------------------------------------------------------------------------------- the parts
CARD = """# Model card: <b>net</b>

## Intended use

Decision support, **not a diagnosis**; see `leuko predict`
and its <script>alert("x")</script> flags.

| metric | all (3 patients) |
|---|---|
| balanced accuracy | 0.912 (0.850-0.950) |
| `a|b` & co \\| more | 0.5 |

- **Out of distribution**: flagged
  by predict
- second <i>item</i>
stays in the item
"""


def test_markdown_gives_headings_paragraphs_tables_and_lists_and_escapes_everything():
    out = markdown_html(CARD)
    assert "<script>" not in out and "<b>" not in out and "<i>" not in out
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in out
    assert "<h3>Model card: &lt;b&gt;net&lt;/b&gt;</h3>" in out and "<h4>Intended use</h4>" in out
    assert (
        "<p>Decision support, <strong>not a diagnosis</strong>; see <code>leuko predict</code> and its "
        "&lt;script&gt;" in out
    )
    assert '<th class="text">metric</th><th>all (3 patients)</th>' in out  # the number column stays right-aligned
    assert '<td class="text">balanced accuracy</td><td>0.912 (0.850-0.950)</td>' in out
    assert '<td class="text"><code>a|b</code> &amp; co | more</td><td>0.5</td>' in out  # | in code, and \|
    assert "<ul><li><strong>Out of distribution</strong>: flagged by predict</li>" in out
    assert "<li>second &lt;i&gt;item&lt;/i&gt; stays in the item</li></ul>" in out
    assert markdown_html("a `b") == "<p>a `b</p>"  # an unpaired backtick is text


def _inputs(tmp_path: Path) -> ReportInputs:
    return ReportInputs("x", tmp_path, "folder", None, None, None, {}, {}, {}, None, {}, "")


def _version(**fields) -> ModelVersion:
    return ModelVersion("leuko", "4", 1_700_000_000_000, run_id="r" * 32, **fields)


def test_the_section_escapes_the_card_and_says_why_the_export_failed(tmp_path):
    dep = Deployment(ModelRef("models:/leuko@champion", "sqlite:///x.db", _version()), tmp_path, True)
    dep.card, dep.card_from, dep.error = CARD, "a test", "ExportError: differs <by> 0.1."
    anchor, title, body = deploy_section(_inputs(tmp_path), dep)
    assert anchor == "deployment" and title == "Deployment: ONNX export and model card"
    assert "<script>" not in body and "&lt;script&gt;" in body
    assert "<code>models:/leuko@champion</code> = <code>models:/leuko/4</code>" in body
    assert "failed: ExportError: differs &lt;by&gt; 0.1. The rest of the report" in body
    makers = with_deploy_section(SECTIONS, dep)
    assert len(makers) == len(SECTIONS) + 1 and makers[makers.index(provenance_section) - 1].func is deploy_section


def test_the_card_falls_back_to_the_version_description(empty_store):
    described = ModelRef("models:/leuko/4", empty_store, _version(description="summary.\n\n# Model card: x\n\nbody"))
    text, where = model_card(described)  # the empty store has no files for it: the description
    assert text == "# Model card: x\n\nbody" and where.startswith("the description of models:/leuko/4")
    assert model_card(ModelRef("models:/leuko/4", empty_store, _version()))[0] is None


def test_resolving_needs_an_existing_store_and_a_model_uri(tmp_path):
    with pytest.raises(ModelUriError, match="give a registered version as models:/NAME@ALIAS"):
        resolve_model("runs:/abc/model", "sqlite:///x.db")
    with pytest.raises(ModelUriError, match="there is no MLflow store at"):
        resolve_model("models:/leuko/2", f"sqlite:///{tmp_path / 'none.db'}")


def test_the_training_manifest_is_used_only_when_its_checksum_matches(tmp_path, monkeypatch):
    import hashlib

    import leuko.tracking.lineage as lineage

    (tmp_path / "data").mkdir()
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text("cell_id,path,label\n")
    monkeypatch.setattr(lineage, "repo_root", lambda start=".": tmp_path)
    sha = hashlib.sha256(manifest.read_bytes()).hexdigest()
    tags = {"leuko.data_dvc_path": "data", "leuko.manifest_sha256": sha}
    assert training_manifest(tags) == str(manifest)
    assert training_manifest({**tags, "leuko.manifest_sha256": "0" * 64}) is None  # the data changed since
    assert training_manifest({"leuko.data_dvc_path": "untracked"}) is None


def test_the_store_is_pinned_inside_and_restored_after(monkeypatch, empty_store):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    with pinned_store(empty_store):
        assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == empty_store
        assert os.environ["MLFLOW_TRACKING_URI"] == os.environ["MLFLOW_REGISTRY_URI"] == empty_store
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db" and "MLFLOW_REGISTRY_URI" not in os.environ
    assert report_deploy.EXPORT == "export"
