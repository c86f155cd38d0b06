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


def test_the_sanity_check_is_not_scored(tmp_path):
    """Lightning's sanity check runs a batch or two of validation before training: too few cells to hold every
    class, so scoring them would only warn that a class's AUROC is undefined (and log nothing)."""
    import warnings

    import lightning as L
    import torch

    def batches(labels):
        cells = [{"volume": torch.randn(1, 16, 16, 16), "label": label} for label in labels]
        return torch.utils.data.DataLoader(cells, batch_size=4)

    model = VolumeClassifier(net="vit3d_tiny", num_classes=4, input_shape=(16, 16, 16))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=1, default_root_dir=tmp_path)  # fmt: skip
    val = batches([0, 0, 0, 0, 0, 1, 2, 3])  # the sanity check sees class 0 only; the epoch's validation all four
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders=batches([0, 1, 2, 3]), val_dataloaders=val)
    assert not [w for w in caught if "No positive samples" in str(w.message)]
    assert "val/auroc" in trainer.callback_metrics  # the real validation is still scored


def test_mixup_mixes_the_volumes_and_the_two_labels_losses(monkeypatch):
    import torch
    import torch.nn.functional as F

    from leuko.errors import ConfigError

    model = VolumeClassifier(net="vit3d_tiny", num_classes=4, input_shape=(16, 16, 16), mixup=0.4).eval()
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)  # no trainer to log to
    x, labels = torch.randn(6, 1, 16, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    torch.manual_seed(3)
    loss = model.training_step({"volume": x, "label": labels}, 0)
    torch.manual_seed(3)  # the same draws, by hand
    lam = torch.distributions.Beta(torch.tensor(0.4), torch.tensor(0.4)).sample()
    perm = torch.randperm(6)
    with torch.no_grad():
        logits = model(lam * x + (1 - lam) * x[perm])
    expected = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[perm])
    assert 0 < lam < 1 and not torch.equal(perm, torch.arange(6))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    with torch.no_grad():
        plain = F.cross_entropy(model(x), labels)
    assert abs(float(loss) - float(plain)) > 1e-4  # an untrained net's losses are close, but not this close
    with pytest.raises(ConfigError, match=r"mixup=-0.2: give the alpha"):
        VolumeClassifier(net="vit3d_tiny", num_classes=4, mixup=-0.2)
