"""benchmarks/medmnist.py on tiny synthetic MedMNIST files: the default recipe and the protocol over seeds, the
JSON rows and summary, the work folder per file, and the errors for files that are no MedMNIST 3D set."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
medmnist = pytest.importorskip("medmnist")

SIZE = 16
QUICK = ["--max-epochs", "1", "--num-workers", "0", "--threads", "1"]


def _npz(path: Path, *, classes: int = 2, n=(24, 8, 8), onehot: bool = False, channels_last: bool = False) -> Path:
    """A MedMNIST-like file: a bright 6^3 cube in a corner that depends on the class (separable), uint8."""
    rng = np.random.default_rng(classes)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        labels = np.arange(count) % classes
        images = rng.integers(0, 40, (count, SIZE, SIZE, SIZE), dtype=np.uint8)
        for i, label in enumerate(labels):
            at = 2 + 4 * int(label)
            images[i, at : at + 6, at : at + 6, at : at + 6] = 255
        arrays[f"{split}_images"] = images[..., None] if channels_last else images
        arrays[f"{split}_labels"] = np.eye(classes, dtype=np.uint8)[labels] if onehot else labels[:, None]
    np.savez_compressed(path, **arrays)
    return path


def _check_document(document: dict, nets: list[str], seeds: int) -> None:
    rows = document["rows"]
    assert len(rows) == len(nets) * seeds
    assert all(set(r) == {"net", "seed", "auroc", "accuracy", "balanced_accuracy"} for r in rows)
    assert sorted({r["net"] for r in rows}) == sorted(nets) and {r["seed"] for r in rows} == set(range(seeds))
    summaries = document["summary"] if len(nets) > 1 else {nets[0]: document["summary"]}
    for net, summary in summaries.items():
        assert set(summary) == set(medmnist.METRICS)
        for metric, s in summary.items():
            values = [r[metric] for r in rows if r["net"] == net]
            assert set(s) == {"mean", "ci_low", "ci_high", "n"} and s["n"] == seeds
            assert s["mean"] == pytest.approx(np.mean(values))
            if seeds > 1:
                assert s["ci_low"] <= s["mean"] <= s["ci_high"]
            else:
                assert s["ci_low"] is None and s["ci_high"] is None


def test_default_recipe_two_seeds_binary(tmp_path, capsys):
    npz = _npz(tmp_path / "tinyvessel3d_16.npz")
    out, results = tmp_path / "out.json", tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Speed\n\nfast\n\n## MedMNIST\n\nold table\n\n## Sweeps\n\nmany\n")
    argv = ["--npz", str(npz), "--work", str(tmp_path / "work"), "--seeds", "2", "--json", str(out), *QUICK]
    document = medmnist.main([*argv, "--results", str(results)])
    saved = json.loads(out.read_text())
    assert set(saved) == {"rows", "summary", "ensemble"} and saved["rows"] == document["rows"]
    # by default each model is scored over the flip views with labels at the class mix (prevalence decisions)
    runs = document["runs"]
    assert all(r["tta"] == "flip" and r["label"].endswith("(flip TTA), prevalence decisions") for r in runs)
    # the ensemble of the two seeds: their rescaled test probabilities averaged, scored once
    kept = sorted((tmp_path / "work" / "tinyvessel3d_16" / "results").glob("*-s?.csv"))
    tables = [
        medmnist.prevalence_decisions(r, pd.read_csv(t), pd.read_csv(t.with_name(f"{t.stem}-val.csv")))[1]
        for r, t in zip(runs, kept)
    ]
    assert len(tables) == 2 and saved["ensemble"] == medmnist.ensemble_scores(tables)
    assert set(saved["ensemble"]) == set(medmnist.METRICS)
    recipe_net = yaml.safe_load(medmnist.RECIPE.read_text())["model"]["net"]
    labels = [r["label"] for r in runs]
    assert labels == [f"{recipe_net} (flip TTA), prevalence decisions"] * 2
    _check_document(saved, labels[:1], seeds=2)
    # the work folder is named after the file, and holds this run's data and results
    folder = tmp_path / "work" / "tinyvessel3d_16"
    assert (folder / "prepared" / "meta.json").is_file() and (folder / "results.json").is_file()
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["tinyvessel3d_16"]
    runs = json.loads((folder / "results.json").read_text())["runs"]
    monitor = yaml.safe_load(medmnist.RECIPE.read_text())["monitor"]
    assert all(r["selected_on"] == monitor and r["epochs"] == 1 for r in runs)
    printed = capsys.readouterr()
    assert f"| **{labels[0]}: mean [95% CI]** | 2 seed(s)" in printed.out
    assert f"| {labels[0]}: ensemble of the seeds | 2 |" in printed.out
    assert "epoch 1/1" in printed.err and "seed 1" in printed.err
    # --results rewrote only the MedMNIST section of RESULTS.md
    text = results.read_text()
    assert "old table" not in text and "\n## Speed\n\nfast\n\n## MedMNIST\n\ntinyvessel3d_16 (16x16x16" in text
    assert "test classes class_0 4, class_1 4" in text and text.endswith("\n\n## Sweeps\n\nmany\n")


def test_the_recipe_is_read_when_the_benchmark_runs(tmp_path, monkeypatch):
    config = yaml.safe_load(medmnist.RECIPE.read_text())
    assert (config["model"]["net"], config["trainer"]["max_epochs"]) != ("vit3d_tiny", 2)
    config["model"]["net"], config["trainer"]["max_epochs"] = "vit3d_tiny", 2
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(medmnist, "RECIPE", recipe)
    npz = _npz(tmp_path / "tinyvessel3d.npz")
    document = medmnist.main(["--npz", str(npz), "--work", str(tmp_path), *QUICK[2:]])
    assert [(r["net"], r["epochs"]) for r in document["runs"]] == [("vit3d_tiny", 2)]
    assert document["summary"]["auroc"]["n"] == 1 and document["summary"]["auroc"]["ci_low"] is None


def test_folds_and_tta_score_the_fold_models_as_one_model(tmp_path):
    """--folds 2 --tta flip: a 2-fold CV on train + val, the official test held out, and the test probabilities
    the mean of both fold models' softmax over the 8 flip views (recomputed here from their checkpoints)."""
    import torch

    from leuko.data.prepared import load_prepared
    from leuko.training.module import VolumeClassifier

    npz = _npz(tmp_path / "tinyvessel3d.npz")
    argv = ["--npz", str(npz), "--work", str(tmp_path), "--folds", "2", "--tta", "flip", "--decisions", "balanced"]
    document = medmnist.main([*argv, *QUICK])
    (run,) = document["runs"]
    assert run["members"] == 2 and run["tta"] == "flip" and run["label"].endswith("(2 fold models, flip TTA)")
    folder = tmp_path / "tinyvessel3d"
    (work,) = (folder / "runs").iterdir()
    splits = pd.read_csv(work / "splits.csv", dtype=str).set_index("cell_id")
    assert (splits["fold"] == "test").sum() == 8 and all(
        i.startswith("test_") for i in splits.index[splits.fold == "test"]
    )
    dev = splits[splits["fold"] != "test"]
    assert sorted(dev["fold"].unique()) == ["0", "1"] and len(dev) == 32  # train + val, each volume in one fold
    assert (dev.groupby("fold")["label"].value_counts().unstack() == 8).all().all()  # class-stratified
    cells = pd.read_csv(next((folder / "results").glob("*.csv")))
    best = [work / f"fold_{f}" / "checkpoints" / "best.ckpt" for f in (0, 1)]
    members = [VolumeClassifier.load_from_checkpoint(b, map_location="cpu", weights_only=False).eval() for b in best]
    volumes, index, _ = load_prepared(folder / "prepared")
    rows = index.set_index("cell_id").loc[cells["cell_id"], "row"].to_numpy()
    x = torch.from_numpy(np.asarray(volumes[rows], dtype=np.float32))
    flips = [dims for n in range(4) for dims in itertools.combinations((2, 3, 4), n)]
    with torch.no_grad():
        expected = torch.stack([m(torch.flip(x, f) if f else x).softmax(-1) for m in members for f in flips]).mean(0)
    probs = cells[[f"prob_{c}" for c in members[0].class_names]].to_numpy()
    assert len(flips) == 8 and np.allclose(probs, expected.numpy(), atol=1e-5)
    assert run["auroc"] == medmnist.heldout_scores(cells, members[0].class_names)["auroc"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--folds", "1"], "--folds 1: a CV needs at least 2 folds"),
     (["--nets", "resnet3d_50_tiny", "--tta", "flip"], "--recipe, --folds, --tta and --decisions apply to a recipe"),
     (["--nets", "resnet3d_50_tiny", "--recipe", "conf/model/resnet3d_50_slim.yaml"], "apply to a recipe"),
     (["--nets", "resnet3d_50_tiny", "--decisions", "prevalence"], "drop --nets to use them"),
     (["--recipe", "conf/experiment/phantoms_tiny.yaml", "nope.yaml"], "--recipe nope.yaml: no such file"),
     (["--recipe", "Makefile"], "--recipe Makefile: not valid YAML")],
)  # fmt: skip
def test_folds_and_tta_refuse_what_they_cannot_do(extra, message, capsys):
    with pytest.raises(SystemExit):
        medmnist.parse_args(extra)
    assert message in capsys.readouterr().err


def test_protocol_nets_three_classes_onehot_channels_last_and_limit(tmp_path):
    npz = _npz(tmp_path / "tinyorgan3d.npz", classes=3, n=(30, 9, 9), onehot=True, channels_last=True)
    argv = ["--npz", str(npz), "--work", str(tmp_path), "--nets", "fishnet3d_tiny:2,vit3d_tiny", "--epochs", "1"]
    document = medmnist.main([*argv, "--limit", "12", "--batch-size", "8", *QUICK[2:]])
    _check_document(document, ["fishnet3d_tiny:2", "vit3d_tiny"], seeds=1)
    assert [r["epochs"] for r in document["runs"]] == [2, 1]
    assert all(r["selected_on"] == "val/auroc" for r in document["runs"])
    from leuko.data.prepared import load_prepared

    _, index, meta = load_prepared(tmp_path / "tinyorgan3d" / "prepared-train12")
    assert meta["classes"] == ["class_0", "class_1", "class_2"] and (index["cell_id"].str[:5] == "train").sum() == 12
    # a later run with the same settings reuses the kept results
    assert medmnist.main([*argv, "--limit", "12", "--batch-size", "8", *QUICK[2:]])["rows"] == document["rows"]


def test_confidence_interval_is_student_t_and_null_for_one_seed():
    from scipy import stats

    ci = medmnist.confidence_interval([0.8, 0.9, 0.85, None])
    low, high = stats.t.interval(0.95, 2, loc=0.85, scale=stats.sem([0.8, 0.9, 0.85]))
    assert ci == pytest.approx({"mean": 0.85, "ci_low": low, "ci_high": high, "n": 3})
    assert medmnist.confidence_interval([0.7]) == {"mean": 0.7, "ci_low": None, "ci_high": None, "n": 1}
    assert medmnist.confidence_interval([0.7, 0.7])["ci_low"] == 0.7


def test_ensemble_scores_average_the_probabilities():
    # each run alone calls one cell wrong; their mean calls both right (AUROC of prob_b: 1.0)
    one = pd.DataFrame({"cell_id": ["x", "y"], "label": ["a", "b"], "prob_a": [0.4, 0.1], "prob_b": [0.6, 0.9]})
    two = pd.DataFrame({"cell_id": ["y", "x"], "label": ["b", "a"], "prob_a": [0.6, 0.9], "prob_b": [0.4, 0.1]})
    scores = medmnist.ensemble_scores([one, two])
    assert scores == {"auroc": 1.0, "accuracy": 1.0, "balanced_accuracy": 1.0}
    assert medmnist.ensemble_scores([one])["accuracy"] == 0.5


def test_groups_score_disjoint_groups_of_seeds_as_one_model(tmp_path, capsys):
    """--seeds 4 --groups 2: seeds 0-1 and 2-3 each as one model (their cached test tables averaged), and the mean
    and t-interval over the two groups, in the JSON and the printed table."""
    npz = _npz(tmp_path / "tinyvessel3d.npz")
    out = tmp_path / "out.json"
    medmnist.main(
        ["--npz", str(npz), "--work", str(tmp_path), "--seeds", "4", "--groups", "2", "--json", str(out), *QUICK]
        + ["--tta", "none", "--decisions", "balanced"]  # the tables as kept, each seed's probabilities as fitted
    )
    saved = json.loads(out.read_text())["ensemble_groups"]
    tables = [pd.read_csv(t) for t in sorted((tmp_path / "tinyvessel3d" / "results").glob("*-s[0-3].csv"))]
    assert len(tables) == 4 and saved["k"] == 2 and [g["seeds"] for g in saved["groups"]] == [[0, 1], [2, 3]]
    for group, members in zip(saved["groups"], (tables[:2], tables[2:])):
        assert {m: group[m] for m in medmnist.METRICS} == medmnist.ensemble_scores(members)
    auroc = saved["summary"]["auroc"]
    assert auroc["n"] == 2 and auroc["mean"] == pytest.approx(np.mean([g["auroc"] for g in saved["groups"]]))
    assert ": 2 ensembles of 2 seeds, mean [95% CI]** | 4 |" in capsys.readouterr().out


@pytest.mark.parametrize(("groups", "seeds"), [("4", "9"), ("3", "3"), ("1", "4")])
def test_groups_must_split_the_seeds(groups, seeds, capsys):
    with pytest.raises(SystemExit):
        medmnist.parse_args(["--groups", groups, "--seeds", seeds])
    assert f"--groups {groups} --seeds {seeds}: give a group size of 2 or more" in capsys.readouterr().err


def test_binary_auroc_is_the_positive_class():
    import pandas as pd

    cells = pd.DataFrame({"label": ["a", "a", "b", "b"], "prob_b": [0.1, 0.6, 0.4, 0.9]})
    assert medmnist._binary_auroc(cells, "b") == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drop": "val_labels"}, "no key val_labels"),
        ({"test_images": np.zeros((8, 16, 16), np.uint8)}, "test_images has shape (8, 16, 16)"),
        ({"train_labels": np.zeros((23, 1), np.uint8)}, "train_labels has shape (23, 1) but train_images holds 24"),
        ({"val_labels": np.ones((8, 3), np.uint8)}, "val_labels is (8, 3) but not one-hot"),
    ],
)
def test_bad_files_are_refused_naming_the_file_and_key(tmp_path, change, message):
    from leuko.errors import LeukoError

    with np.load(_npz(tmp_path / "good.npz")) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.pop(change.pop("drop", None), None)
    arrays.update(change)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(LeukoError, match="bad.npz") as caught:
        medmnist.check_npz(bad)
    assert message in str(caught.value)


def test_main_exits_with_the_message_for_a_missing_or_unreadable_file(tmp_path):
    with pytest.raises(SystemExit, match=r"nothere\.npz: no such file; give --npz"):
        medmnist.main(["--npz", str(tmp_path / "nothere.npz"), "--work", str(tmp_path)])
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(SystemExit, match=r"text\.npz: not a readable \.npz file"):
        medmnist.main(["--npz", str(tmp_path / "text.npz"), "--work", str(tmp_path)])
    assert not (tmp_path / "nothere").exists()


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        medmnist.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--seeds 5 --json" in out and "--limit 64 --max-epochs 1" in out
    for bad in (["--seeds", "0"], ["--nets", "fishnet3d_tiny:ten"]):
        with pytest.raises(SystemExit):
            medmnist.parse_args(bad)
    assert "--nets 'fishnet3d_tiny:ten': give NAME[:EPOCHS]" in capsys.readouterr().err


def test_a_recipe_file_that_is_no_mapping_is_named(tmp_path, capsys):
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- data\n")
    with pytest.raises(SystemExit):
        medmnist.parse_args(["--recipe", str(listed)])
    assert f"--recipe {listed}: holds list, not a mapping; give a YAML mapping" in capsys.readouterr().err


def test_recipe_files_are_layered_in_order(tmp_path):
    """--recipe A B: B's settings over A's, as `leuko fit --config A --config B`; keyed apart from A alone."""
    layer = tmp_path / "layer.yaml"
    layer.write_text(yaml.safe_dump({"model": {"net": "vit3d_tiny"}}))
    npz = _npz(tmp_path / "tinyvessel3d.npz")
    argv = ["--npz", str(npz), "--work", str(tmp_path), *QUICK, "--recipe", str(medmnist.RECIPE), str(layer)]
    document = medmnist.main([*argv, "--tta", "none", "--decisions", "balanced"])
    assert [r["net"] for r in document["runs"]] == ["vit3d_tiny"]  # the recipe's own net is resnet3d_50_slim
    assert document["recipe"] == f"conf/experiment/real_volumes.yaml + {layer.as_posix()}"
    assert medmnist.recipe_key(medmnist.RECIPE, layer) != medmnist.recipe_key(medmnist.RECIPE)
    cached = sorted(p.name for p in (tmp_path / "tinyvessel3d" / "results").glob("*.json"))
    assert cached == [f"recipe-{medmnist.recipe_key(medmnist.RECIPE, layer)}-e1-s0.json"]


def test_results_are_kept_across_comment_edits_of_the_recipe(tmp_path):
    """Cached results are keyed on the recipe's settings: a comment edit keeps them, a changed value does not."""
    recipe = medmnist.RECIPE.read_text()
    first, commented, changed = (tmp_path / f"{n}.yaml" for n in ("first", "commented", "changed"))
    first.write_text(recipe)
    commented.write_text("# a new first line\n" + recipe.replace("\n", "  # note\n", 3))
    changed.write_text(recipe.replace("lr: 0.003", "lr: 0.002"))
    assert "lr: 0.003" in recipe
    assert medmnist.recipe_key(first) == medmnist.recipe_key(commented) == medmnist.recipe_key(medmnist.RECIPE)
    assert medmnist.recipe_key(changed) != medmnist.recipe_key(first)


def test_prevalence_decisions_fit_bcts_on_the_out_of_fold_validation_predictions(tmp_path):
    """--folds 2 --tta flip --decisions prevalence: every train + val volume predicted once by the fold model
    that did not train on it (its flip views averaged), a temperature and class biases fitted on that table, and
    the test metrics those of the rescaled test probabilities; the fit's own numbers kept, and the table reused."""
    import torch

    from leuko.data.prepared import load_prepared
    from leuko.evaluation.calibration import fit_bias_corrected, label_indices, scale
    from leuko.training.module import VolumeClassifier

    npz = _npz(tmp_path / "tinyvessel3d.npz")
    argv = ["--npz", str(npz), "--work", str(tmp_path), "--folds", "2", "--tta", "flip", *QUICK]
    (run,) = medmnist.main([*argv, "--decisions", "prevalence"])["runs"]
    folder = tmp_path / "tinyvessel3d"
    (cache,) = (folder / "results").glob("*-s0.json")
    val = pd.read_csv(cache.with_name(f"{cache.stem}-val.csv"))
    (work,) = (folder / "runs").iterdir()
    splits = pd.read_csv(work / "splits.csv", dtype=str).set_index("cell_id")
    assert sorted(val["cell_id"]) == sorted(splits.index[splits["fold"] != "test"])  # out of fold, each once
    assert (val["fold"].astype(str).to_numpy() == splits.loc[val["cell_id"], "fold"].to_numpy()).all()
    volumes, index, _ = load_prepared(folder / "prepared")
    flips = [dims for n in range(4) for dims in itertools.combinations((2, 3, 4), n)]
    for fold in (0, 1):
        best = work / f"fold_{fold}" / "checkpoints" / "best.ckpt"
        member = VolumeClassifier.load_from_checkpoint(best, map_location="cpu", weights_only=False).eval()
        mine = val[val["fold"] == fold]
        x = torch.from_numpy(np.asarray(volumes[index.set_index("cell_id").loc[mine["cell_id"], "row"]], np.float32))
        with torch.no_grad():
            expected = torch.stack([member(torch.flip(x, f) if f else x).softmax(-1) for f in flips]).mean(0)
        assert np.allclose(mine[["prob_class_0", "prob_class_1"]].to_numpy(), expected.numpy(), atol=1e-5)
    fitted = json.loads(cache.read_text())  # the cache keeps the uncalibrated model
    classes = ["class_0", "class_1"]
    columns = [f"prob_{c}" for c in classes]
    temperature, bias = fit_bias_corrected(val[columns].to_numpy(), label_indices(val, classes))
    cells = pd.read_csv(cache.with_suffix(".csv"))
    cells[columns] = scale(cells[columns].to_numpy(), temperature, bias)
    cells["pred_label"] = np.array(classes)[cells[columns].to_numpy().argmax(1)]
    assert {m: run[m] for m in medmnist.METRICS} == medmnist.heldout_scores(cells, classes)
    assert run["calibration"]["temperature"] == pytest.approx(temperature)
    assert run["calibration"]["uncalibrated"] == {m: fitted[m] for m in medmnist.METRICS}
    assert run["label"] == f"{fitted['label']}, prevalence decisions" and run["calibration"]["fitted_on"] == 32
    cache.with_name(f"{cache.stem}-val.csv").unlink()  # made again from the checkpoints: the same numbers
    assert medmnist.main([*argv, "--decisions", "prevalence"])["runs"] == [run]
    swapped = {"prob_class_0": "prob_class_1", "prob_class_1": "prob_class_0"}
    val.rename(columns=swapped).to_csv(cache.with_name(f"{cache.stem}-val.csv"), index=False)
    (reused,) = medmnist.main([*argv, "--decisions", "prevalence"])["runs"]  # a kept table is used as it is ...
    assert reused["calibration"]["temperature"] != pytest.approx(temperature)
    cache.unlink()  # ... until its fit is redone: then it is made again from the new checkpoints
    (refit,) = medmnist.main([*argv, "--decisions", "prevalence"])["runs"]
    assert refit["calibration"]["temperature"] == pytest.approx(temperature)
    assert {m: refit[m] for m in medmnist.METRICS} == {m: run[m] for m in medmnist.METRICS}
    balanced = medmnist.main([*argv, "--decisions", "balanced"])["runs"][0]
    assert balanced["label"] == fitted["label"]  # balanced: the fit as it was


def test_prevalence_decisions_name_the_missing_checkpoint(tmp_path, capsys):
    npz = _npz(tmp_path / "tinyvessel3d.npz")
    argv = ["--npz", str(npz), "--work", str(tmp_path), *QUICK, "--tta", "none"]
    medmnist.main([*argv, "--decisions", "balanced"])
    (checkpoint,) = (tmp_path / "tinyvessel3d" / "runs").glob("*/checkpoints/best.ckpt")
    checkpoint.unlink()
    with pytest.raises(SystemExit, match=r"best.ckpt: no such file, so no validation predictions.*delete the cached"):
        medmnist.main([*argv, "--decisions", "prevalence"])
