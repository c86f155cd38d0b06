"""The DVC layer: params.yaml as the one config, dvc.yaml's stages, and the pipeline run for real in a
temporary git repository (dvc repro, a second repro that does nothing, a parameter change that reruns only
what depends on it, dvc exp run, metrics, plots, push and pull)."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leuko.cli.app import build_parser, main
from leuko.params import COMMAND_SECTIONS, ParamsError, section_tokens

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LEUKOCLI_SECTIONS = {"seed_everything", "monitor", "model", "data", "trainer", "tracking"}


def env(repo: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # dvc and leuko from this environment
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
        "OMP_NUM_THREADS": "2",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.org",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.org",
    }


def sh(repo: Path, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=repo, env=env(repo), capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"`{' '.join(cmd)}` failed:\n{output[-6000:]}"
    return output


def dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def params_yaml() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


# ---------------------------------------------------------------------------------------------- static checks


def test_every_stage_param_exists_and_every_section_is_read():
    params, stages = params_yaml(), dvc_yaml()["stages"]
    used = set()
    for name, stage in stages.items():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert part in node, f"stage {name} lists param {key}, which params.yaml lacks"
                node = node[part]
            used.add(key.split(".")[0])
    # tracking says where runs are logged, not what they compute: no stage depends on it
    assert set(params) - used == {"tracking"}
    assert set(params) <= LEUKOCLI_SECTIONS | set(COMMAND_SECTIONS)


# The code each stage runs: the module behind its command and everything that module imports.
STAGE_CODE = {
    "prepare": ["leuko.data.prepare"],
    "cv": ["leuko.training.cv"],
    "evaluate": ["leuko.evaluation.evaluate"],
    "register": ["leuko.tracking.registry", "leuko.deploy.pyfunc_model"],  # the model file is logged, not imported
}


@pytest.mark.parametrize("stage", sorted(STAGE_CODE))
def test_stage_deps_cover_the_code_the_stage_runs(stage):
    import grimp

    graph = grimp.build_graph("leuko")
    modules = set()
    for entry in STAGE_CODE[stage]:
        modules |= {entry, *graph.find_upstream_modules(entry)}
    deps = [str(d) for d in dvc_yaml()["stages"][stage]["deps"]]
    missing = []
    for module in sorted(modules):
        path = module.replace(".", "/")
        file = f"{path}/__init__.py" if (ROOT / path).is_dir() else f"{path}.py"
        if not any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps):
            missing.append(file)
    assert missing == [], f"dvc.yaml stage {stage} misses code it runs: add {missing} to its deps"


def test_pipeline_reads_params_yaml_and_nothing_under_conf():
    for name, stage in dvc_yaml()["stages"].items():
        cmd = stage["cmd"]
        assert "conf/" not in cmd, f"stage {name} reads a conf/ file: its settings belong in params.yaml"
        if "--config" in cmd:
            assert cmd.count("--config") == 1 and "--config params.yaml" in cmd
        if name in COMMAND_SECTIONS:
            assert "--params params.yaml" in cmd and name in stage["params"]


def test_dvc_config_has_a_default_local_remote():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    remote = config["core"]["remote"]
    url = config[f"'remote \"{remote}\"'"]["url"]
    assert "://" not in url and not os.path.isabs(url)  # a folder next to the clone, on any machine
    data = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    assert data["path"] == "data" and data["md5"].endswith(".dir")


def test_params_section_becomes_command_line_options():
    prepare = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices).choices["prepare"]
    tokens = section_tokens(
        prepare, "prepare", {"shape": [16, 24, 24], "classes": ["a", "b"], "voxel_size": None, "skip_bad": True}
    )
    assert tokens == ["--shape", "16", "24", "24", "--classes", "a,b", "--skip-bad"]
    with pytest.raises(ParamsError, match=r"prepare\.shap is not an option of `leuko prepare`; known: .*shape"):
        section_tokens(prepare, "prepare", {"shap": [16]})
    with pytest.raises(ParamsError, match="give true or false"):
        section_tokens(prepare, "prepare", {"skip_bad": "yes"})
    if has_command("evaluate"):  # a store_false option: false sets the flag, true (its default) nothing
        evaluate = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices).choices["evaluate"]
        assert section_tokens(evaluate, "evaluate", {"umap": False, "counts": None}) == ["--no-umap"]
        assert section_tokens(evaluate, "evaluate", {"umap": True}) == []


def test_params_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("model: {}\n")
    assert main(["prepare", "--params", str(path), "--manifest", "m.csv", "--out", "p"]) == 2
    assert "no `prepare:` section" in capsys.readouterr().err
    assert main(["prepare", "--params", str(tmp_path / "missing.yaml"), "--manifest", "m.csv", "--out", "p"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_command_line_wins_over_params(tiny_cohort, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("prepare:\n  shape: [24, 24, 24]\n")
    out = tmp_path / "prepared"
    assert (
        main(
            [
                "prepare",
                "--params",
                str(path),
                "--manifest",
                str(tiny_cohort),
                "--out",
                str(out),
                "--shape",
                "16",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((out / "meta.json").read_text())["shape"] == [16, 16, 16]


def test_params_yaml_is_a_leukocli_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "params.yaml"), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["net"] == params_yaml()["model"]["net"]
    assert printed["prepare"] == params_yaml()["prepare"]  # carried along, left to `leuko prepare`


def test_leukocli_rejects_an_unknown_section(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text() + "\nprepar:\n  shape: [16, 16, 16]\n")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_.value.code != 0
    assert "prepar" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the pipeline

TINY = {
    ("prepare", "shape"): [16, 16, 16],
    ("data", "k"): 2,
    ("data", "batch_size"): 8,
    ("data", "num_workers"): 0,
    ("model", "warmup_epochs"): 0,
    ("trainer", "max_epochs"): 1,
    ("trainer", "log_every_n_steps"): 1,
    ("trainer", "enable_model_summary"): False,
}


def has_command(name: str) -> bool:
    commands = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices).choices
    return name in commands


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """The repository's dvc.yaml and (tiny) params.yaml in a new git + DVC repo with a local remote, on a
    6-patient x 8-cell cohort of 16^3 tracked by data.dvc; `dvc repro` run once and everything committed."""
    from leuko.data.phantoms import make_cohort

    root = tmp_path_factory.mktemp("pipeline")
    repo = root / "repo"
    repo.mkdir()
    pipeline = dvc_yaml()
    for stage in ("evaluate", "register"):  # a stage whose command is not there yet cannot run
        if not has_command(stage):
            del pipeline["stages"][stage]
    if "evaluate" not in pipeline["stages"]:
        del pipeline["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = params_yaml()
    for (section, key), value in TINY.items():
        params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    # the stages' code dependencies are hashed from here; the commands run the installed leuko
    shutil.copytree(ROOT / "leuko", repo / "leuko", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (repo / ".gitignore").write_text("/data/\n/prepared/\n/runs/\n/eval/\n/mlflow.db\n/mlruns/\n/dvc_plots/\n")
    make_cohort(repo / "data", n_patients=6, cells_per_patient=8, shape=(16, 16, 16), progress=False)

    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "remote", "add", "-d", "local", "../storage")
    sh(repo, "dvc", "add", "-q", "data")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny pipeline")
    output = sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "reproduced")
    return {"repo": repo, "root": root, "output": output, "stages": list(pipeline["stages"])}


@pytest.mark.slow
def test_repro_runs_every_stage_and_records_lineage(reproduced):
    repo = reproduced["repo"]
    for stage in reproduced["stages"]:
        assert f"Running stage '{stage}'" in reproduced["output"]
    assert json.loads((repo / "prepared" / "meta.json").read_text())["shape"] == [16, 16, 16]
    assert (repo / "runs" / "dvc" / "oof_predictions.csv").is_file()
    if "evaluate" in reproduced["stages"]:
        metrics = json.loads((repo / "eval" / "metrics.json").read_text())
        assert "oof/balanced_accuracy" in metrics and "cv/balanced_accuracy_mean" in metrics
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock["cv"]["params"]["params.yaml"]) == {"seed_everything", "monitor", "model", "data", "trainer"}

    import mlflow

    data_md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    client = mlflow.MlflowClient(env(repo)["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.data.tags["leuko.data_dvc_md5"] == data_md5 for r in runs)
    assert all(r.data.tags["leuko.data_dvc_state"] == "clean" for r in runs)
    if "register" in reproduced["stages"]:
        version = client.get_model_version_by_alias("leuko", "champion")
        assert version.tags["leuko.data_dvc_md5"] == data_md5
        out = sh(repo, "leuko", "lineage", "models:/leuko@champion")
        assert data_md5 in out and version.run_id in out
        # params.yaml ships the CV's fold models (k=2 here) as one model, with flip TTA: no refit
        register = params_yaml()["register"]
        assert register["ensemble"] and register["cv_dir"] == "runs/dvc" and register["tta"] == "flip"
        assert "ensemble of 2 + TTA flip (registered)" in reproduced["output"]
        assert "refit for" not in reproduced["output"]  # the fold models are shipped as trained: nothing refits
        assert "test/ensemble_tta_balanced_accuracy" in client.get_run(version.run_id).data.metrics


@pytest.mark.slow
def test_second_repro_does_nothing(reproduced):
    out = sh(reproduced["repo"], "dvc", "repro")
    assert "Running stage" not in out
    assert "Data and pipelines are up to date" in out


@pytest.mark.slow
def test_a_parameter_change_reaches_only_the_stages_that_read_it(reproduced):
    repo = reproduced["repo"]
    original = (repo / "params.yaml").read_text()

    def changed_stages(section: str, key: str, value) -> set[str]:
        params = yaml.safe_load(original)
        params[section][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        try:
            return set(json.loads(sh(repo, "dvc", "status", "--json").strip().splitlines()[-1]))
        finally:
            (repo / "params.yaml").write_text(original)

    trains = {"cv", "register"} & set(reproduced["stages"])
    assert changed_stages("model", "lr", 0.01) == trains  # then evaluate, when cv's outputs change
    assert changed_stages("prepare", "shape", [24, 24, 24]) == {"prepare"}  # then everything below it
    assert changed_stages("tracking", "experiment", "elsewhere") == set()
    if "evaluate" in reproduced["stages"]:
        assert changed_stages("evaluate", "umap", True) == {"evaluate"}
    if "register" in reproduced["stages"]:
        assert changed_stages("register", "name", "leuko-balf") == {"register"}


@pytest.mark.slow
def test_metrics_and_plots_show(reproduced):
    if "evaluate" not in reproduced["stages"]:
        pytest.skip("no `leuko evaluate` command yet")
    repo = reproduced["repo"]
    metrics = sh(repo, "dvc", "metrics", "show")
    assert "eval/metrics.json" in metrics and "oof/balanced_accuracy" in metrics
    shown = subprocess.run(["dvc", "plots", "show", "--json"], cwd=repo, env=env(repo), capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    names = " ".join(json.loads(shown.stdout)["data"])  # plot ids
    assert "Confusion matrix" in names and "bland_altman.png" in names and "Learning curves" in names
    sh(repo, "dvc", "plots", "show")
    assert (repo / "dvc_plots" / "index.html").is_file()


@pytest.mark.slow
def test_push_then_a_new_clone_pulls_and_is_up_to_date(reproduced):
    repo, root = reproduced["repo"], reproduced["root"]
    sh(repo, "dvc", "push", "-q")
    assert any((root / "storage").rglob("*"))
    clone = root / "clone"
    sh(root, "git", "clone", "-q", str(repo), str(clone))
    # a training machine needs only the packed array: one stage's outputs, not the per-cell files
    sh(clone, "dvc", "pull", "-q", "prepare")
    assert (clone / "prepared" / "volumes.npy").is_file() and not (clone / "data").exists()
    sh(clone, "dvc", "pull", "-q")
    assert (clone / "data" / "manifest.csv").read_bytes() == (repo / "data" / "manifest.csv").read_bytes()
    # everything cached came back; only registering is left, since the clone's MLflow store is empty
    status = json.loads(sh(clone, "dvc", "status", "--json").strip().splitlines()[-1])
    assert set(status) == ({"register"} & set(reproduced["stages"]))


@pytest.mark.slow
def test_exp_run_with_a_changed_parameter_skips_prepare(reproduced):
    repo = reproduced["repo"]
    target = ["evaluate"] if "evaluate" in reproduced["stages"] else ["cv"]
    out = sh(repo, "dvc", "exp", "run", "-S", "model.lr=0.01", *target)
    assert "Running stage 'prepare'" not in out and "Stage 'prepare' didn't change" in out
    assert "Running stage 'cv'" in out
    table = sh(repo, "dvc", "exp", "show", "--no-pager", "--csv")
    rows = [line for line in table.splitlines() if "0.01" in line]
    assert rows, table


# ---------------------------------------------------------------------------------------------- data.dvc


@pytest.mark.slow
def test_make_data_gives_the_committed_data_dvc(tmp_path):
    """`make data` (the default phantom cohort) is byte-identical on every machine, so data.dvc matches it."""
    from leuko.data.phantoms import make_cohort

    make_cohort(tmp_path / "data", progress=False)
    sh(tmp_path, "dvc", "init", "-q", "--no-scm")
    sh(tmp_path, "dvc", "add", "-q", "data")
    made = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]
    committed = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    assert (made["md5"], made["nfiles"], made["size"]) == (committed["md5"], committed["nfiles"], committed["size"])
