import pickle

import pytest
import torch

from leuko.data.augment import BatchAugment

# the strengths a user would train with on 32^3 to 96^3 cells
MODERATE = dict(elastic=2.0, crop=0.1, noise=0.05, gain=0.1, flip=0.5, rot90=0.5)


def ellipsoids(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size, size) cells: value 3 inside a random ellipsoid near the centre, 0 outside."""
    gen = torch.Generator().manual_seed(seed)
    axis = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    cells = torch.zeros(n, 1, size, size, size)
    for i in range(n):
        centre = (torch.rand(3, generator=gen) - 0.5) * 4
        radii = 6 + 4 * torch.rand(3, generator=gen)
        inside = sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radii)) <= 1
        cells[i, 0][inside] = 3.0
    return cells


def foreground_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: voxels above 1.5 (half the cell value) and their mean value."""
    fg = x > 1.5
    volume = fg.sum(dim=(1, 2, 3, 4)).float()
    return volume, (x * fg).sum(dim=(1, 2, 3, 4)) / volume


def test_zero_strengths_return_the_input():
    x = torch.randn(2, 1, 8, 12, 12)
    out = BatchAugment(seed=0)(x)
    assert out is x
    assert torch.equal(BatchAugment()(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "strengths",
    [
        dict(elastic=2.0),
        dict(crop=0.2),
        dict(noise=0.1),
        dict(gain=0.2),
        dict(flip=0.5),
        dict(rot90=1.0),
        dict(rotate=180.0),
        MODERATE,
    ],
    ids=lambda s: ",".join(s),
)
def test_shape_and_dtype_kept_and_input_untouched(strengths, dtype):
    x = torch.randn(3, 2, 8, 12, 12).to(dtype)
    before = x.clone()
    out = BatchAugment(seed=0, **strengths)(x)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.isfinite(out.float()).all()
    assert torch.equal(x, before), "augmentation must not write into its input"


def test_moderate_strengths_keep_cells_plausible():
    x = ellipsoids(16)
    out = BatchAugment(seed=0, **MODERATE)(x)
    volume0, mean0 = foreground_stats(x)
    volume, mean = foreground_stats(out)
    # crop alone zooms by up to 1 / 0.9^3 = 1.37 (cropping only enlarges) and a 2-voxel warp on a 10-voxel
    # lattice changes a cell's volume by about +-25% (0.76-1.30 measured over 640 cells), so every cell stays
    # within 0.65-1.7 of its volume, and the batch median within +-35%
    ratio = volume / volume0
    assert ((ratio > 0.65) & (ratio < 1.7)).all(), ratio
    assert 0.65 < ratio.median() < 1.35, ratio
    # gain moves intensity by up to 10%, interpolation blurs the rim by about 5% more
    assert ((mean / mean0 > 0.8) & (mean / mean0 < 1.15)).all(), mean / mean0
    assert not torch.equal(out, x)


def test_crop_only_zooms_in_by_at_most_the_crop_fraction():
    x = ellipsoids(16)
    out = BatchAugment(crop=0.1, seed=1)(x)
    ratio = foreground_stats(out)[0] / foreground_stats(x)[0]
    # keeping 90-100% of each side and resizing back scales each axis by 1 to 1/0.9; 2% slack for the rim
    assert (ratio > 0.98).all() and (ratio < 0.9**-3 * 1.02).all(), ratio


def test_elastic_displacement_is_in_voxels_and_bounded():
    depth, size, elastic = 16, 24, 2.0
    d, h, w = torch.meshgrid(
        torch.arange(depth).float(), torch.arange(size).float(), torch.arange(size).float(), indexing="ij"
    )
    ramps = torch.stack([d, h, w]).expand(4, 3, depth, size, size)  # channel k holds the voxel index along axis k
    out = BatchAugment(elastic=elastic, seed=0)(ramps)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))  # zero padding only reaches 2 voxels
    shift = (out - ramps)[inner].abs()
    assert shift.amax() <= elastic + 1e-4
    assert shift.amax() > 0.5 * elastic  # it really moves by the order of `elastic`


def test_flip_one_is_torch_flip():
    x = torch.randn(4, 2, 6, 10, 12)
    assert torch.equal(BatchAugment(flip=1.0)(x), torch.flip(x, dims=(2, 3, 4)))


def test_rot90_turns_each_sample_exactly_in_a_square_plane():
    x = torch.randn(32, 1, 6, 10, 10)  # only H x W is square
    out = BatchAugment(rot90=1.0, seed=0)(x)
    seen = set()
    for xi, oi in zip(x, out):
        matches = [k for k in (1, 2, 3) if torch.equal(oi, torch.rot90(xi, k, dims=(2, 3)))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {1, 2, 3}


def test_rot90_uses_every_plane_of_a_cube():
    x = torch.randn(48, 1, 8, 8, 8)
    out = BatchAugment(rot90=1.0, seed=0)(x)
    planes = set()
    for xi, oi in zip(x, out):
        for dims in ((1, 2), (1, 3), (2, 3)):
            if any(torch.equal(oi, torch.rot90(xi, k, dims=dims)) for k in (1, 2, 3)):
                planes.add(dims)
    assert planes == {(1, 2), (1, 3), (2, 3)}


@pytest.mark.parametrize("strengths", [dict(flip=0.5), dict(rot90=1.0), dict(flip=0.5, rot90=0.7)])
def test_flips_and_turns_folded_into_resampling_match_the_exact_ones(strengths):
    # a negligible crop sends flips and turns through the sampling grid instead of torch.flip / torch.rot90;
    # the same seed draws the same flips and turns, so both paths must agree up to interpolation rounding
    x = torch.randn(16, 2, 8, 8, 8)
    exact = BatchAugment(seed=3, **strengths)(x)
    resampled = BatchAugment(seed=3, crop=1e-7, **strengths)(x)
    torch.testing.assert_close(resampled, exact, atol=1e-4, rtol=0)
    assert not torch.equal(exact, x)


def _rod_directions(x: torch.Tensor) -> torch.Tensor:
    """(B, 3) unit principal axis of the mass in each sample, sign-free (first nonzero component positive)."""
    size = x.shape[-1]
    axis = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    coords = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).view(3, -1)  # (3, V) in (D, H, W)
    out = []
    for xi in x[:, 0].clamp_min(0).view(x.shape[0], -1):
        w = xi / xi.sum()
        centred = coords - (coords * w).sum(1, keepdim=True)
        direction = torch.linalg.eigh((centred * w) @ centred.T).eigenvectors[:, -1]
        out.append(direction * direction[direction.abs().argmax()].sign())
    return torch.stack(out)


def test_rotate_turns_a_rod_by_at_most_the_angle_and_keeps_it_whole():
    size = 25
    x = torch.zeros(64, 1, size, size, size)
    c = size // 2
    x[:, :, c - 1 : c + 2, c - 1 : c + 2, 4:-4] = 1.0  # a 3 x 3 x 17 rod along W through the centre
    for max_angle in (30.0, 180.0):
        out = BatchAugment(rotate=max_angle, seed=0)(x)
        # trilinear resampling keeps the rod's mass to within a few percent
        torch.testing.assert_close(out.sum(dim=(1, 2, 3, 4)), x.sum(dim=(1, 2, 3, 4)), atol=0, rtol=0.05)
        cosine = _rod_directions(out) @ torch.tensor([0.0, 0.0, 1.0])  # against the rod's own axis
        angle = torch.rad2deg(torch.arccos(cosine.abs().clamp(max=1.0)))
        # the rod's axis moves by at most the rotation angle (less when the random axis is near the rod's own)
        assert (angle <= min(max_angle, 90.0) + 2.0).all(), angle.max()
        assert angle.max() > 0.6 * min(max_angle, 90.0), angle.max()  # and really turns by the order of it
    # 180 degrees reaches every orientation: the rod ends up closest to each of the three axes in some sample
    assert set(_rod_directions(out).abs().argmax(dim=1).tolist()) == {0, 1, 2}


def test_gain_scales_each_sample_by_one_factor_within_range():
    x = torch.rand(16, 2, 4, 6, 6) + 1.0
    out = BatchAugment(gain=0.2, seed=0)(x)
    factor = out / x
    per_sample = factor.flatten(1)
    torch.testing.assert_close(per_sample, per_sample[:, :1].expand_as(per_sample))
    assert ((per_sample > 0.8 - 1e-6) & (per_sample < 1.2 + 1e-6)).all()
    assert per_sample[:, 0].unique().numel() == 16


def test_noise_has_the_requested_std():
    x = torch.zeros(4, 1, 16, 16, 16)
    out = BatchAugment(noise=0.05, seed=0)(x)
    assert abs(out.std().item() - 0.05) < 0.003 and abs(out.mean().item()) < 0.003


def test_seed_makes_batches_reproducible_and_successive_batches_differ():
    x = ellipsoids(4)
    first, second = BatchAugment(seed=7, **MODERATE), BatchAugment(seed=7, **MODERATE)
    a1, a2 = first(x), first(x)
    assert torch.equal(a1, second(x)) and torch.equal(a2, second(x))
    assert not torch.equal(a1, a2)
    assert not torch.equal(a1, BatchAugment(seed=8, **MODERATE)(x))


def test_samples_in_a_batch_get_different_transforms():
    x = ellipsoids(1).expand(8, 1, 32, 32, 32)
    for strengths in (dict(elastic=2.0), dict(crop=0.1), dict(gain=0.1), dict(noise=0.05), MODERATE):
        out = BatchAugment(seed=0, **strengths)(x)
        distinct = {tuple(sample.flatten()[::97].tolist()) for sample in out}
        assert len(distinct) == 8, strengths


def test_pickles_after_use():
    aug = BatchAugment(seed=0, **MODERATE)
    aug(torch.randn(2, 1, 8, 8, 8))
    assert pickle.loads(pickle.dumps(aug)).crop == 0.1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(elastic=-1.0), "elastic"),
        (dict(noise=-0.1), "noise"),
        (dict(gain=1.0), "gain"),
        (dict(flip=1.5), "flip"),
        (dict(rot90=-0.1), "rot90"),
        (dict(crop=1.0), "crop"),
        (dict(rotate=200.0), "rotate"),
        (dict(elastic_grid=1), "elastic_grid"),
    ],
)
def test_bad_strengths_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}="):
        BatchAugment(**kwargs)


def test_bad_inputs_say_what_is_expected():
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        BatchAugment(noise=0.1)(torch.randn(2, 8, 8, 8))
    with pytest.raises(ValueError, match="float"):
        BatchAugment(noise=0.1)(torch.ones(2, 1, 8, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="rot90=0"):
        BatchAugment(rot90=0.5)(torch.randn(2, 1, 6, 8, 10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_runs_without_host_syncs(dtype):
    x = ellipsoids(8).to("cuda", dtype)
    aug = BatchAugment(seed=0, **MODERATE)
    aug(x)  # the first batch copies the per-shape constants to the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = aug(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == x.device and out.dtype == dtype and out.shape == x.shape
    again = BatchAugment(seed=0, **MODERATE)
    again(x)
    assert torch.equal(again(x), out)
    volume, _ = foreground_stats(out.float())
    ratio = volume / foreground_stats(x.float())[0]
    assert ((ratio > 0.65) & (ratio < 1.7)).all(), ratio
