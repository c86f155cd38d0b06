"""`leuko explain`: a registered model's saliency maps of chosen cells, as PNGs and an index."""

from __future__ import annotations

import json

import pandas as pd

from helpers.model_folder import model_folder
from leuko.cli.app import main


def test_explain_draws_the_chosen_cells_and_names_unknown_ones(tiny_cohort, tmp_path, capsys):
    folder = model_folder(tmp_path, net="vit3d_tiny")
    out = tmp_path / "expl"
    argv = ["explain", "--model", str(folder), "--input", str(tiny_cohort), "--out", str(out), "--quiet"]
    assert main([*argv, "--cells", "P02_C003,P01_C001", "--methods", "gradcam"]) == 0
    assert "explained 2 cells" in capsys.readouterr().out
    index = pd.read_csv(out / "explain.csv")
    assert list(index["cell_id"]) == ["P02_C003", "P01_C001"] and set(index["method"]) == {"gradcam"}
    assert all((out / png).is_file() for png in index["png"])
    assert json.loads((out / "explain.json").read_text())["net"] == "ViT3D"

    assert main([*argv, "--cells", "P01_C001,P77_C001"]) == 1
    assert "P77_C001 not in --input" in capsys.readouterr().err
    assert main([*argv, "--methods", "lime"]) == 1
    assert "choose from gradcam, occlusion" in capsys.readouterr().err
