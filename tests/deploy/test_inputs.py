"""A model's inputs: many volumes prepared at once equal each prepared alone; read_cells reports what it skips."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from helpers.cells import N_MEDIUM, ri_cell
from leuko.data import preprocess
from leuko.data.io import VolumeError, write_volume
from leuko.data.preprocess import centre_crop_or_pad
from leuko.deploy import inputs
from leuko.deploy.inputs import prepare_volume, prepare_volumes, read_cells


def _config(modality: str, channels: int = 1, shape=(12, 12, 12), target=None) -> dict:
    return {
        "in_channels": channels,
        "preprocessing": {
            "modality": modality,
            "shape": list(shape),
            "target_voxel_size": target,
            "n_medium": N_MEDIUM,
            "ri_scale": 0.01,
            "read_options": {},
        },
    }


def _ri_volumes(rng) -> list[np.ndarray]:
    """RI cells of three raw sizes (some larger than the crop, one off the field's edge) and an empty field."""
    volumes = []
    for i in range(9):
        shape = [(16, 20, 18), (10, 9, 11), (24, 24, 24)][i % 3]
        centre = [rng.integers(2, n - 2) for n in shape]
        volume = ri_cell(shape, centre, radius=float(rng.uniform(2, 6)))
        volumes.append(volume + rng.normal(0, 1e-4, size=shape).astype(np.float32))
    empty = np.full((14, 14, 14), N_MEDIUM, dtype=np.float32) + rng.normal(0, 1e-4, size=(14, 14, 14))
    volumes.append(empty.astype(np.float32))  # no voxel above the cell threshold: the field's centre
    return volumes


def _hhg_volumes(rng, channels: int) -> list[np.ndarray]:
    out = []
    for shape in [(16, 20, 18), (10, 9, 11)] * 3:
        cell = ri_cell(shape, [n // 2 for n in shape], radius=3.0) - N_MEDIUM  # (D, H, W), cell ~0.03
        gains = rng.uniform(1e3, 1e4, size=(channels, 1, 1, 1))
        out.append((cell[None] * gains + rng.normal(100, 5, size=(channels, *shape))).astype(np.float32))
    return out


@pytest.mark.parametrize(
    "modality, channels, target",
    [("ri", 1, None), ("ri", 1, [0.4, 0.3, 0.25]), ("hhg", 2, None), ("hhg", 3, None), ("other", 2, None)],
)
def test_volumes_prepared_together_equal_each_prepared_alone(modality, channels, target):
    rng = np.random.default_rng(channels)
    volumes = _ri_volumes(rng) if modality == "ri" else _hhg_volumes(rng, channels)
    sizes = [(0.5, 0.2, 0.2) if i % 2 else (0.3, 0.3, 0.3) for i in range(len(volumes))]
    config = _config(modality, channels, target=target)
    together = prepare_volumes(config, volumes, sizes)
    alone = np.stack([prepare_volume(config, v, s) for v, s in zip(volumes, sizes)])
    assert together.dtype == np.float32 and together.shape == (len(volumes), channels, 12, 12, 12)
    assert np.array_equal(together, alone)


def test_ri_cells_are_centred_on_scipys_centre_of_mass():
    volumes = _ri_volumes(np.random.default_rng(0))
    got = prepare_volumes(_config("ri"), volumes, [None] * len(volumes))
    for volume, window in zip(volumes, got):
        mask = volume > 1.35
        centre = ndimage.center_of_mass(mask) if mask.any() else [(n - 1) / 2 for n in volume.shape]
        expected = centre_crop_or_pad(volume[None], centre, (12, 12, 12), fill=np.float32([N_MEDIUM]))
        expected -= np.float32(N_MEDIUM)
        expected /= np.float32(0.01)
        assert np.array_equal(window, expected)


def test_volumes_a_model_cannot_take_are_refused_with_the_reason():
    config = _config("ri", target=[0.3, 0.3, 0.3])
    with pytest.raises(ValueError, match=r"C=1 \(ri data\)"):
        prepare_volumes(config, [ri_cell(), np.stack([ri_cell()] * 2)], [(0.3,) * 3] * 2)
    with pytest.raises(ValueError, match="give each volume's voxel size"):
        prepare_volumes(config, [ri_cell()], [None])
    assert prepare_volumes(config, [], []).shape == (0, 1, 12, 12, 12)


def test_read_cells_keeps_file_order_and_reports_each_file_it_skips(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "STACK_BYTES", 20_000)  # a few cells per stack: several stacks per call
    volumes = _ri_volumes(np.random.default_rng(1))
    paths = []
    for i, volume in enumerate(volumes):
        paths.append(write_volume(tmp_path / f"c{i}.npy", volume))
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    write_volume(tmp_path / "two.npy", np.stack([volumes[0]] * 2))  # two channels: not this model's input
    paths[3:3] = [tmp_path / "broken.npy"]
    paths[7:7] = [tmp_path / "two.npy", tmp_path / "missing.npy"]
    windows, kept, errors = read_cells(_config("ri"), [str(p) for p in paths], [None] * len(paths))
    assert kept == [i for i in range(len(paths)) if i not in (3, 7, 8)] and list(errors) == [3, 7, 8]
    assert isinstance(errors[3], VolumeError) and "corrupt or truncated" in str(errors[3])
    assert isinstance(errors[7], ValueError) and "C=1" in str(errors[7])
    assert isinstance(errors[8], VolumeError) and "file not found" in str(errors[8])
    assert np.array_equal(windows, np.stack([prepare_volume(_config("ri"), v) for v in volumes]))


def test_a_stack_that_fails_falls_back_to_single_cells(tmp_path, monkeypatch):
    volumes = _ri_volumes(np.random.default_rng(2))[:4]
    paths = [str(write_volume(tmp_path / f"c{i}.npy", v)) for i, v in enumerate(volumes)]
    real = preprocess.process_cells

    def refuse_stacks(stack, *args, **kwargs):  # a volume the stack cannot take: the cells go one at a time
        if len(stack) > 1:
            raise ValueError("one stack cannot take these volumes")
        return real(stack, *args, **kwargs)

    monkeypatch.setattr(inputs, "process_cells", refuse_stacks)
    windows, kept, errors = read_cells(_config("ri"), paths, [None] * 4)
    assert kept == [0, 1, 2, 3] and not errors
    assert np.array_equal(windows, np.stack([prepare_volume(_config("ri"), v) for v in volumes]))
