"""VolumeClassifier: the net it builds from the data's shape, and the optimizer groups the net decides."""

from types import SimpleNamespace

import pytest

from leuko.nets import NETS
from leuko.training.module import VolumeClassifier, parameter_groups


@pytest.mark.parametrize("name", [n for n in NETS if n.endswith("_tiny")])
def test_optimizer_groups_follow_no_weight_decay(name):
    model = VolumeClassifier(net=name, num_classes=4, input_shape=(32, 32, 32), weight_decay=0.05)
    model._trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=2)  # what the schedule reads
    decay, no_decay = model.configure_optimizers()["optimizer"].param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    named = dict(model.net.named_parameters())
    undecayed = {n for n, p in named.items() if any(p is q for q in no_decay["params"])}
    assert model.net.no_weight_decay() <= undecayed
    assert undecayed == {n for n, p in named.items() if p.ndim <= 1 or n in model.net.no_weight_decay()}
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def test_frozen_parameters_are_left_out():
    model = VolumeClassifier(net="vit3d_tiny", num_classes=4)
    model.net.pos_embed.requires_grad_(False)
    groups = parameter_groups(model.net, 0.1)
    assert not any(p is model.net.pos_embed for g in groups for p in g["params"])


def test_vit_img_size_comes_from_the_input_shape_unless_net_kwargs_give_one():
    assert VolumeClassifier(net="vit3d_tiny", input_shape=(16, 32, 32)).net.grid == (2, 4, 4)
    given = VolumeClassifier(net="vit3d_tiny", input_shape=(16, 32, 32), net_kwargs={"img_size": [32, 32, 32]})
    assert given.net.grid == (4, 4, 4)
