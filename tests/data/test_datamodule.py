from types import SimpleNamespace

import numpy as np
import pytest
import torch

from leuko.data.datamodule import Augmentation, EpochSampler, LeukoDataModule
from leuko.data.folds import make_splits, write_splits
from leuko.data.prepared import PrepareError


def make_dm(prepared, **kwargs):
    defaults = dict(prepared_dir=str(prepared), k=2, test_fraction=0.2, batch_size=4, num_workers=0)
    return LeukoDataModule(**(defaults | kwargs))


def test_folds_partition_cells_by_patient(tiny_prepared):
    dm = make_dm(tiny_prepared)
    train, val, test = (set(dm.subset(s)["patient_id"]) for s in ("train", "val", "test"))
    assert train and val and test
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(dm.subset("train")) + len(dm.subset("val")) + len(dm.subset("test")) == len(dm.index)
    assert dm.in_channels == 1 and dm.num_classes == 4 and dm.shape == (16, 16, 16)


def test_loaders_slice_the_memmap(tiny_prepared):
    dm = make_dm(tiny_prepared)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["volume"].shape == (4, 1, 16, 16, 16)
    assert batch["volume"].dtype == torch.float32
    assert len(batch["cell_id"]) == 4
    volumes = np.load(tiny_prepared / "volumes.npy", mmap_mode="r")
    row = dm.index.set_index("cell_id").loc[batch["cell_id"][0], "row"]
    assert torch.equal(batch["volume"][0], torch.from_numpy(np.array(volumes[row])))


def test_splits_file_matches_computed_split(tiny_prepared, tmp_path):
    dm = make_dm(tiny_prepared, k=2, seed=3)
    path = write_splits(make_splits(dm.index, k=2, test_fraction=0.2, seed=3), tmp_path / "splits.csv")
    dm2 = make_dm(tiny_prepared, splits=str(path))
    for name in ("train", "val", "test"):
        assert np.array_equal(dm.masks[name], dm2.masks[name])


def test_fold_none_trains_on_all_non_test(tiny_prepared):
    dm = make_dm(tiny_prepared, fold=None)
    assert dm.masks["val"].sum() == 0
    assert dm.masks["train"].sum() + dm.masks["test"].sum() == len(dm.index)
    dm.setup("fit")
    assert dm.val_dataloader() == []


def test_balanced_sampling_evens_out_classes(tiny_prepared):
    dm = make_dm(tiny_prepared, balanced_sampling=True, batch_size=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    labels = []
    for epoch in range(20):
        loader.sampler.set_epoch(epoch)
        labels += [b["label"] for b in loader]
    labels = torch.cat(labels)
    counts = torch.bincount(labels, minlength=4).double()
    present = dm.class_counts("train") > 0
    share = counts[torch.as_tensor(present)] / counts.sum()
    assert share.max() / share.min() < 1.6, share


def test_augmentation_only_while_training(tiny_prepared):
    dm = make_dm(tiny_prepared, augment=Augmentation(noise=0.5, flip=0.5))
    x = torch.ones(2, 1, 16, 16, 16)

    progress = SimpleNamespace(ready=1)
    trainer = SimpleNamespace(
        training=False,
        current_epoch=0,
        global_rank=0,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=progress))),
    )
    dm.trainer = trainer
    assert torch.equal(dm.on_after_batch_transfer({"volume": x.clone()}, 0)["volume"], x)
    trainer.training = True
    first = dm.on_after_batch_transfer({"volume": x.clone()}, 0)["volume"]
    assert not torch.equal(first, x)
    # the same (epoch, batch) augments identically (what makes resumed fits exact); the next batch differs
    assert torch.equal(dm.on_after_batch_transfer({"volume": x.clone()}, 0)["volume"], first)
    progress.ready = 2
    assert not torch.equal(dm.on_after_batch_transfer({"volume": x.clone()}, 0)["volume"], first)


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(50, seed=1), EpochSampler(50, seed=1)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)


def test_missing_prepared_dir_says_what_to_do(tmp_path):
    with pytest.raises(PrepareError, match="leuko prepare"):
        make_dm(tmp_path / "nowhere")


def test_empty_fold_is_an_error(tiny_prepared, tmp_path):
    dm = make_dm(tiny_prepared)
    splits = make_splits(dm.index, k=2, test_fraction=0.2)
    splits.loc[splits["fold"] != "test", "fold"] = "0"  # fold 0 validates on every dev cell
    path = write_splits(splits, tmp_path / "s.csv")
    dm = make_dm(tiny_prepared, splits=str(path), fold=0)
    with pytest.raises(ValueError, match="no train cells"):
        dm.setup("fit")
