"""A model of several members with test-time augmentation: the mean of its members' calibrated probabilities
over its views, in PyTorch, in the loaded pyfunc, and in one ONNX graph; models of one weight file still load."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.model_folder import _ball, model_folder
from leuko.deploy import export as export_module
from leuko.deploy.ensemble import Ensemble
from leuko.deploy.export import export
from leuko.deploy.graph import probabilities, sidecar, write_graph
from leuko.deploy.onnx_model import PARITY, OnnxModel, cache_folder, cached, model_files
from leuko.deploy.predict import load_model, predict
from leuko.nets import build_net, constructor_kwargs
from leuko.tracking.registry import CODE, _signature

TEMPERATURE = 1.7
SHAPE = (16, 16, 16)


def tiny_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_net("fishnet3d_tiny", in_channels=1, num_classes=4, **constructor_kwargs("fishnet3d_tiny", {}, SHAPE))


def ensemble_folder(root: Path, *, members: int = 3, tta: str = "flip", bias: dict | None = None) -> Path:
    """root/model: a leuko model folder of `members` seeded fishnet3d_tiny nets and the given TTA, laid out as
    `leuko register --ensemble` logs one (weights, weights_1, ...; model_config.json ensemble and tta); bias:
    class biases in its calibration, as `--decisions prevalence` stores them."""
    model_folder(root / "first", temperature=TEMPERATURE, seed=0)  # member 0 and the config of a single net
    files = root / "first" / "files"
    config = json.loads((files / "model_config.json").read_text())
    artifacts = {"weights": str(files / "weights.safetensors")}
    for i in range(1, members):
        artifacts[f"weights_{i}"] = str(root / f"weights_{i}.safetensors")
        save_file({k: v.contiguous() for k, v in tiny_net(i).state_dict().items()}, artifacts[f"weights_{i}"])
    config["ensemble"] = {"weights": list(artifacts), "folds": [str(i) for i in range(members)], "cv_dir": "runs/cv"}
    config["tta"] = tta
    if bias is not None:
        config["calibration"]["bias"] = bias
    (root / "model_config.json").write_text(json.dumps(config))
    mlflow.pyfunc.save_model(
        str(root / "model"),
        python_model=str(CODE),
        artifacts={**artifacts, "model_config": str(root / "model_config.json")},
        signature=_signature(config),
        input_example=(_ball(SHAPE), {"preprocess": False}),
        pip_requirements=[],
    )
    return root / "model"


def members_of(folder: Path) -> list[torch.nn.Module]:
    """The member nets of a model folder, built here from its weight files."""
    nets = []
    for path in model_files(folder).values():
        if path.suffix == ".safetensors":
            net = tiny_net(0).eval()
            net.load_state_dict(load_file(path))
            nets.append(net)
    return nets


def calibrated(nets, x: np.ndarray) -> np.ndarray:
    """(members, N, classes): softmax(logits / T) of each net."""
    with torch.no_grad():
        return np.stack([(n(torch.from_numpy(x)) / TEMPERATURE).softmax(-1).numpy() for n in nets])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return ensemble_folder(tmp_path_factory.mktemp("ensemble"))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEUKO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(export_module, "SECONDS", 0.2)


def cells(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 1, *SHAPE)).astype(np.float32)


def test_one_member_without_tta_is_the_calibrated_softmax():
    net = tiny_net(0).eval()
    x = torch.from_numpy(cells())
    with torch.no_grad():
        assert torch.equal(Ensemble([net], TEMPERATURE)(x), (net(x) / TEMPERATURE).softmax(-1))


def test_class_biases_are_added_after_the_temperature():
    net, bias = tiny_net(0).eval(), [0.0, -1.5, 0.5, 2.0]
    x = torch.from_numpy(cells())
    with torch.no_grad():
        got = Ensemble([net], TEMPERATURE, bias=bias)(x)
        assert torch.allclose(got, (net(x) / TEMPERATURE + torch.tensor(bias)).softmax(-1), atol=1e-6)
        assert not torch.allclose(got, Ensemble([net], TEMPERATURE)(x), atol=1e-3)
    assert "bias" not in Ensemble([net], TEMPERATURE, bias=bias).state_dict()  # weights files stay the nets'


def test_a_model_with_class_biases_applies_them_in_torch_and_in_its_graph(tmp_path):
    bias = {"monocyte": 1.2, "neutrophil": 0.0, "lymphocyte": 0.7, "eosinophil": -2.0}  # not the class order
    folder = ensemble_folder(tmp_path, members=2, tta="none", bias=bias)
    _, impl = load_model(str(folder), runtime="torch")
    assert impl.bias == [bias[c] for c in impl.classes]
    x = cells(5, seed=2)
    with torch.no_grad():
        logits = np.stack([n(torch.from_numpy(x)).numpy() / TEMPERATURE for n in members_of(folder)])
    expected = torch.from_numpy(logits + np.array(impl.bias, dtype=np.float32)).softmax(-1).mean(0).numpy()
    got = impl.predict_proba(x)
    assert np.abs(got - expected).max() < 1e-5
    write_graph(probabilities(impl), impl.config, tmp_path / "b.onnx")
    assert sidecar(impl.config, tmp_path / "b.onnx", model_uri="m", parity={})["bias"] == impl.bias
    assert np.abs(OnnxModel(tmp_path / "b.onnx", impl.config).predict_proba(x) - got).max() < PARITY


def test_the_ensemble_averages_its_members_and_views():
    nets = [tiny_net(i).eval() for i in range(3)]
    x = cells()
    model = Ensemble(nets, TEMPERATURE, "flip").eval()
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
        terms = model.terms(torch.from_numpy(x)).numpy()
    assert terms.shape == (8, 3, 6, 4)
    np.testing.assert_allclose(terms[0], calibrated(nets, x), atol=1e-6)  # the identity view first
    assert np.abs(got - terms.mean(axis=(0, 1))).max() < 1e-6
    assert np.allclose(got.sum(-1), 1.0, atol=1e-6)


def test_the_loaded_model_is_the_mean_of_its_members_and_invariant_to_flips(folder):
    _, impl = load_model(str(folder), runtime="torch")
    assert impl.module.size == 3 and impl.module.tta == "flip"
    x = cells()
    got = impl.predict_proba(x)
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    members = members_of(folder)
    expected = np.mean([calibrated(members, np.flip(x, f).copy() if f else x) for f in flips], axis=(0, 1))
    assert np.abs(got - expected).max() < 1e-5
    for axis in (2, 3, 4):
        flipped = np.flip(x, axis).copy()
        assert np.abs(calibrated(members, flipped) - calibrated(members, x)).max() > 1e-3  # a member alone is not
        assert np.abs(impl.predict_proba(flipped) - got).max() < 1e-5  # the model with its views is


@pytest.mark.slow
def test_an_ensemble_with_tta_exports_as_one_graph_that_averages_inside(folder, tmp_path, tiny_cohort):
    out = tmp_path / "ens.onnx"
    result = export(str(folder), out, source=tiny_cohort, n_cells=6, batch_size=4)
    assert result["parity"] < PARITY
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["ensemble_size"] == 3 and meta["tta"] == "flip"
    _, impl = load_model(str(folder), runtime="torch")
    graph = OnnxModel(out, impl.config)
    x = cells(5, seed=1)
    assert np.abs(graph.predict_proba(x) - impl.predict_proba(x)).max() < PARITY
    flipped = np.flip(x, 3).copy()
    assert np.abs(graph.predict_proba(flipped) - graph.predict_proba(x)).max() < PARITY


@pytest.mark.slow
def test_predict_runs_the_ensemble_graph_from_a_cache_keyed_by_every_member(folder, tiny_cohort, tmp_path):
    files = model_files(folder)
    assert list(files) == ["weights", "weights_1", "weights_2", "model_config"]
    done = predict(str(folder), tiny_cohort, tmp_path / "p.csv", runtime="onnx", progress=False)
    assert done["runtime"] == "onnxruntime" and cached(folder) is not None
    key = cache_folder(files)
    save_file({k: v.contiguous() for k, v in tiny_net(9).state_dict().items()}, str(tmp_path / "other.safetensors"))
    assert cache_folder({**files, "weights_2": tmp_path / "other.safetensors"}) != key  # a member changed


@pytest.mark.slow
def test_a_flip_rot90_ensemble_exports_too(tmp_path):
    folder = ensemble_folder(tmp_path, members=2, tta="flip_rot90")
    _, impl = load_model(str(folder), runtime="torch")
    write_graph(probabilities(impl), impl.config, tmp_path / "r.onnx")
    x = cells(3)
    graph = OnnxModel(tmp_path / "r.onnx", impl.config)
    assert np.abs(graph.predict_proba(x) - impl.predict_proba(x)).max() < PARITY
    turned = np.rot90(x, 1, axes=(3, 4)).copy()
    assert np.abs(graph.predict_proba(turned) - graph.predict_proba(x)).max() < PARITY


# ---------------------------------------------------------------------------------------------- one weight file
# The inference code models carried before ensembles (leuko.deploy.pyfunc_model then): it has .net and no .module.
OLD_CODE = """
import json
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel
from safetensors.torch import load_file

from leuko.deploy.inputs import check_prepared, prepare_volume
from leuko.nets import build_net
from leuko.training.predictions import probability_table


class LeukoModel(PythonModel):
    _skip_type_hint_validation = True

    def load_context(self, context):
        self.config = json.loads(Path(context.artifacts["model_config"]).read_text())
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in self.config["net_kwargs"].items()}
        self.classes = list(self.config["classes"])
        self.temperature = float((self.config.get("calibration") or {}).get("temperature", 1.0))
        n = len(self.classes)
        self.net = build_net(self.config["net"], in_channels=self.config["in_channels"], num_classes=n, **kwargs)
        self.net.load_state_dict(load_file(context.artifacts["weights"]), strict=True)
        self.net.eval()

    def preprocess(self, volume, voxel_size=None):
        return prepare_volume(self.config, volume, voxel_size)

    def predict_proba(self, prepared):
        check_prepared(self.config, prepared)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(prepared))
            return (self.net(x).float() / self.temperature).softmax(-1).numpy()

    def predict(self, context, model_input, params=None):
        x = np.asarray(model_input, dtype=np.float32)
        return probability_table(self.predict_proba(x), self.classes)


mlflow.models.set_model(LeukoModel())
"""


def test_a_model_of_one_weight_file_loads_as_before(tmp_path, tiny_cohort):
    folder = model_folder(tmp_path, temperature=TEMPERATURE)  # no ensemble or tta in its config
    config = json.loads(model_files(folder)["model_config"].read_text())
    assert "ensemble" not in config and "tta" not in config
    _, impl = load_model(str(folder), runtime="torch")
    assert impl.module.size == 1 and impl.module.tta == "none"
    x = cells(4)
    np.testing.assert_allclose(impl.predict_proba(x), calibrated(members_of(folder), x)[0], atol=1e-6)
    assert list(model_files(folder)) == ["weights", "model_config"]

    # a model whose stored inference code predates ensembles: its graph is built from .net and the temperature
    code = tmp_path / "old_pyfunc_model.py"
    code.write_text(OLD_CODE)
    files = model_files(folder)
    old = tmp_path / "old"
    mlflow.pyfunc.save_model(
        str(old),
        python_model=str(code),
        artifacts={k: str(v) for k, v in files.items()},
        signature=_signature(config),
        input_example=(_ball(SHAPE), {"preprocess": False}),
        pip_requirements=[],
    )
    _, old_impl = load_model(str(old), runtime="torch")
    assert not hasattr(old_impl, "module")
    np.testing.assert_allclose(old_impl.predict_proba(x), impl.predict_proba(x), atol=1e-6)
    result = export(str(old), tmp_path / "old.onnx", source=tiny_cohort, n_cells=4, batch_size=2)
    assert result["parity"] < PARITY
    assert json.loads((tmp_path / "old.json").read_text())["ensemble_size"] == 1
