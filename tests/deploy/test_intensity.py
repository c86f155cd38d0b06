"""cell_quantiles: np.quantile's values, bit for bit, without partitioning every voxel; the check of many cells."""

from __future__ import annotations

import numpy as np
import pytest

from leuko.deploy import intensity
from leuko.deploy.intensity import (
    LEVELS,
    SAMPLE,
    cell_quantiles,
    out_of_distribution,
    out_of_distribution_cells,
    training_intensities,
)


def test_intensity_quantiles_flag_cells_far_outside_the_training_range(tmp_path):
    rng = np.random.default_rng(0)
    volumes = rng.normal(0.0, 1.0, size=(40, 2, 8, 8, 8)).astype(np.float32)
    volumes[:, 1] += 5.0  # a second channel at another level
    np.save(tmp_path / "volumes.npy", volumes)
    reference = training_intensities(tmp_path / "volumes.npy", np.arange(30))
    assert reference["levels"] == list(LEVELS) and reference["n_cells"] == 30
    assert np.asarray(reference["low"]).shape == (2, len(LEVELS))
    assert all(out_of_distribution(cell_quantiles(v), reference) == "" for v in volumes[30:])  # unseen, same kind
    assert cell_quantiles(volumes[:3]).shape == (3, 2, len(LEVELS))
    shifted = volumes[30].copy()
    shifted[1] *= 100.0  # another scale in one channel
    reason = out_of_distribution(cell_quantiles(shifted), reference)
    assert reason.startswith("channel 1 ") and "training range" in reason


def _numpy(volumes: np.ndarray) -> np.ndarray:
    """The plain definition: np.quantile over each cell's channel, (..., C, L)."""
    volumes = np.asarray(volumes, dtype=np.float32)
    return np.moveaxis(np.quantile(volumes.reshape(*volumes.shape[:-3], -1), LEVELS, axis=-1), 0, -1)


def _volumes(kind: str, shape: tuple, rng) -> np.ndarray:
    if kind == "normal":
        return rng.normal(size=shape)
    if kind == "ties":  # three values only: every quantile sits in a run of equal voxels
        return rng.integers(0, 3, size=shape).astype(np.float32)
    if kind == "padded":  # half the field one constant, as a crop padded with the medium
        volume = rng.normal(size=shape)
        volume[..., : shape[-3] // 2, :, :] = 0.0
        return volume
    if kind == "sorted":  # voxels in rising order: a strided sample would see only a corner
        return np.sort(rng.normal(size=shape).ravel()).reshape(shape)
    return np.exp(rng.normal(0.0, 5.0, size=shape))  # heavy tailed


@pytest.mark.parametrize("kind", ["normal", "ties", "padded", "sorted", "heavy"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 1, 2, 3), (1, 8, 8, 8), (3, 2, 17, 33, 40), (2, 1, 32, 32, 32)])
def test_cell_quantiles_are_numpys_bit_for_bit(kind, shape):
    volumes = _volumes(kind, shape, np.random.default_rng(len(shape) + len(kind))).astype(np.float32)
    got, expected = cell_quantiles(volumes), _numpy(volumes)
    assert got.dtype == expected.dtype == np.float64 and got.shape == expected.shape == (*shape[:-3], len(LEVELS))
    assert np.array_equal(got, expected)


def test_when_the_sample_misses_the_ranks_the_whole_cell_is_used(monkeypatch):
    # The sampled voxels are all 1 and the others 0: the sample puts the median's bounds at 1, with more
    # than half the voxels below them, so the bounds miss and the whole cell is partitioned.
    volume = np.zeros(32 * 32 * 32, dtype=np.float32)
    volume[intensity._sample_index(volume.size)] = 1.0
    volume[:100] = -np.arange(100, dtype=np.float32)  # distinct low values for the 1% quantile
    volume = volume.reshape(1, 32, 32, 32)
    assert intensity._sample_index(volume.size).size == SAMPLE
    calls, partition = [], np.partition
    monkeypatch.setattr(np, "partition", lambda a, kth: calls.append((a.size, list(kth))) or partition(a, kth))
    got = cell_quantiles(volume)
    monkeypatch.undo()
    assert (volume.size, [16383, 16384]) in calls  # the median's ranks, taken from the whole cell
    assert np.array_equal(got, _numpy(volume))


def test_many_cells_are_checked_as_one_at_a_time(tmp_path):
    rng = np.random.default_rng(0)
    volumes = rng.normal(0.0, 1.0, size=(40, 2, 8, 8, 8)).astype(np.float32)
    np.save(tmp_path / "volumes.npy", volumes)
    reference = training_intensities(tmp_path / "volumes.npy", np.arange(30))
    cells = volumes[30:].copy()
    cells[2, 1] *= 100.0  # another scale in one channel
    cells[5] += 50.0  # another level in both
    quantiles = cell_quantiles(cells)
    reasons = out_of_distribution_cells(quantiles, reference)
    assert reasons == [out_of_distribution(q, reference) for q in quantiles]
    assert [i for i, r in enumerate(reasons) if r] == [2, 5] and reasons[2].startswith("channel 1 ")
    # a reference of another channel count: every cell says so
    one_channel = {**reference, "low": reference["low"][:1], "high": reference["high"][:1]}
    assert all("the training data had 1" in r for r in out_of_distribution_cells(quantiles, one_channel))
