"""The experiment presets under conf/experiment: what each promises in its header holds in its settings."""

from __future__ import annotations

from pathlib import Path

import yaml

CONF = Path(__file__).resolve().parents[2] / "conf" / "experiment"


def _settings(name: str) -> dict:
    return yaml.safe_load((CONF / name).read_text())


def _callbacks(settings: dict) -> list[str]:
    return [c["class_path"].rsplit(".", 1)[-1] for c in settings["trainer"].get("callbacks", [])]


def test_real_volumes_is_the_phantoms_recipe_with_the_deeper_net_and_the_whole_schedule():
    """real_volumes.yaml = phantoms_tiny.yaml but ResNet-50's depth and no early stop: every other setting
    (optimiser, augmentation, sampler, EMA, monitor, epochs) is shared, so a change to one is seen in the other."""
    fast, real = _settings("phantoms_tiny.yaml"), _settings("real_volumes.yaml")
    assert (fast["model"].pop("net"), real["model"].pop("net")) == ("resnet3d_50_tiny", "resnet3d_50_slim")
    assert _callbacks(fast) == ["EMAWeights", "EarlyStopping"] and _callbacks(real) == ["EMAWeights"]
    assert fast["trainer"].pop("min_epochs") < real["trainer"]["max_epochs"] and "min_epochs" not in real["trainer"]
    fast["trainer"]["callbacks"] = fast["trainer"]["callbacks"][:1]
    assert fast == real


def test_every_preset_names_a_registered_net():
    from leuko.nets import NETS

    presets = sorted(CONF.glob("*.yaml"))
    assert len(presets) >= 4
    for preset in presets:
        assert yaml.safe_load(preset.read_text())["model"]["net"] in NETS, preset.name
