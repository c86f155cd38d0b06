import gzip
import io
import re
import struct
import time
import tracemalloc
import zipfile

import h5py
import nibabel
import numpy as np
import pytest
import tifffile

from leuko.data.io import SUPPORTED_SUFFIXES, VolumeError, read_volume, volume_suffix, write_volume

# Different sizes on every axis so that a transposed read cannot pass for a correct one.
SHAPE = (2, 3, 5, 7)  # (C, D, H, W)


@pytest.fixture
def volume():
    return np.random.default_rng(0).normal(1.35, 0.01, size=SHAPE).astype(np.float32)


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_round_trip_keeps_values_axes_and_channels(tmp_path, volume, suffix):
    path = write_volume(tmp_path / f"cell{suffix}", volume, voxel_size=(1.0, 0.5, 0.25))
    back = read_volume(path)
    assert back.dtype == np.float32
    assert back.shape == SHAPE
    np.testing.assert_array_equal(back, volume)


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_3d_volume_reads_as_one_channel(tmp_path, volume, suffix):
    path = write_volume(tmp_path / f"cell{suffix}", volume[1])
    np.testing.assert_array_equal(read_volume(path), volume[1:2])


def test_writes_are_byte_identical_over_time(tmp_path, volume):
    first = {s: write_volume(tmp_path / f"a{s}", volume, voxel_size=(1, 1, 1)).read_bytes() for s in SUPPORTED_SUFFIXES}
    time.sleep(1.1)  # timestamps in headers have one-second resolution
    for suffix, data in first.items():
        assert write_volume(tmp_path / f"a{suffix}", volume, voxel_size=(1, 1, 1)).read_bytes() == data, suffix


def test_tif_is_an_imagej_hyperstack_without_volatile_tags(tmp_path, volume):
    path = write_volume(tmp_path / "cell.tif", volume, voxel_size=(2.0, 0.5, 0.25))
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        assert tif.series[0].axes == "ZCYX"
        assert tif.imagej_metadata["spacing"] == 2.0
        tags = {tag.name for tag in tif.pages[0].tags.values()}
    assert "DateTime" not in tags and "Software" not in tags


def test_tif_axes_from_other_writers_map_to_cdhw(tmp_path, volume):
    # A TZCYX hyperstack with one time point, as ImageJ saves it.
    tifffile.imwrite(tmp_path / "t.tif", volume.transpose(1, 0, 2, 3)[None], imagej=True, metadata={"axes": "TZCYX"})
    np.testing.assert_array_equal(read_volume(tmp_path / "t.tif"), volume)
    # A plain multi-page stack with no metadata reads its pages as z.
    tifffile.imwrite(tmp_path / "plain.tif", volume[0], shaped=False, photometric="minisblack")
    np.testing.assert_array_equal(read_volume(tmp_path / "plain.tif"), volume[:1])


def test_nifti_stores_x_first_with_voxel_size(tmp_path, volume):
    path = write_volume(tmp_path / "cell.nii.gz", volume, voxel_size=(2.0, 0.5, 0.25))
    image = nibabel.load(path)
    assert image.shape == (7, 5, 3, 2)  # (X, Y, Z, C)
    assert image.header.get_zooms()[:3] == (0.25, 0.5, 2.0)
    with gzip.open(path) as f:
        f.read(1)
    assert path.read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime


def test_npz_key_option_and_missing_key(tmp_path, volume):
    np.savez(tmp_path / "two.npz", ri=volume, mask=volume > 1.35)
    np.testing.assert_array_equal(read_volume(tmp_path / "two.npz", key="ri"), volume)
    with pytest.raises(VolumeError, match=r"two\.npz.*no array 'volume'.*'ri', 'mask'.*key"):
        read_volume(tmp_path / "two.npz")
    np.savez(tmp_path / "one.npz", anything=volume)
    np.testing.assert_array_equal(read_volume(tmp_path / "one.npz"), volume)


def test_h5_dataset_option_and_missing_dataset(tmp_path, volume):
    with h5py.File(tmp_path / "cells.h5", "w") as h5:
        h5.create_dataset("exp/ri", data=volume)
        h5.create_dataset("exp/mask", data=volume > 1.35)
    np.testing.assert_array_equal(read_volume(tmp_path / "cells.h5", dataset="exp/ri"), volume)
    with pytest.raises(VolumeError, match=r"cells\.h5.*no dataset 'volume'.*'exp/mask', 'exp/ri'.*dataset"):
        read_volume(tmp_path / "cells.h5")
    write_volume(tmp_path / "v.h5", volume, voxel_size=(1, 0.5, 0.5))
    with h5py.File(tmp_path / "v.h5") as h5:
        np.testing.assert_array_equal(h5["volume"].attrs["voxel_size"], [1, 0.5, 0.5])


def test_missing_file(tmp_path):
    with pytest.raises(VolumeError, match=r"nope\.npy: file not found; check the path"):
        read_volume(tmp_path / "nope.npy")


def test_unsupported_suffix_lists_the_supported_ones(tmp_path):
    (tmp_path / "cell.mat").write_bytes(b"x")
    with pytest.raises(
        VolumeError, match=r"cell\.mat: unsupported file type '\.mat'.*\.npy, \.npz, \.tif.*\.nii\.gz.*\.h5"
    ):
        read_volume(tmp_path / "cell.mat")
    with pytest.raises(VolumeError, match="cannot write"):
        write_volume(tmp_path / "cell.mat", np.zeros((2, 2, 2)))


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("cell.npy", lambda p: _truncate(p, 0.5)),
        ("cell.npz", lambda p: _truncate(p, 0.5)),
        ("cell.tif", lambda p: p.write_bytes(b"this is not a tiff file at all" * 10)),
        ("cell.nii.gz", lambda p: _truncate(p, 0.6)),
        ("cell.nii", lambda p: _truncate(p, 0.6)),
        ("cell.h5", lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)),
    ],
)
def test_corrupt_or_truncated_files_name_the_file(tmp_path, volume, name, damage):
    path = write_volume(tmp_path / name, volume)
    damage(path)
    with pytest.raises(VolumeError, match=re.escape(name) + r": cannot be read .*corrupt or truncated.*re-export"):
        read_volume(path)


@pytest.mark.parametrize("shape", [(4, 5), (1, 2, 3, 4, 5)])
def test_wrong_number_of_dimensions(tmp_path, shape):
    np.save(tmp_path / "bad.npy", np.random.default_rng(0).random(shape))
    with pytest.raises(
        VolumeError, match=rf"bad\.npy: has shape \({shape[0]}, .*{len(shape)} dimensions.*\(C, D, H, W\)"
    ):
        read_volume(tmp_path / "bad.npy")


def test_2d_tif_is_rejected(tmp_path):
    tifffile.imwrite(tmp_path / "flat.tif", np.random.default_rng(0).random((5, 7)).astype(np.float32))
    with pytest.raises(VolumeError, match=r"flat\.tif: is a 2D image"):
        read_volume(tmp_path / "flat.tif")


def test_nan_and_inf_voxels(tmp_path, volume):
    volume[1, 2, 3, 4] = np.nan
    volume[0, 0, 0, 1] = np.inf
    path = write_volume(tmp_path / "cell.npy", volume)
    with pytest.raises(
        VolumeError, match=r"cell\.npy: has 1 NaN and 1 Inf voxels \(first at .* \(0, 0, 0, 1\)\); fill"
    ):
        read_volume(path)
    assert np.isnan(read_volume(path, check=False)).sum() == 1


def test_constant_volume_is_empty(tmp_path):
    path = write_volume(tmp_path / "blank.tif", np.full((4, 5, 6), 1.337, dtype=np.float32))
    with pytest.raises(VolumeError, match=r"blank\.tif: is empty: every voxel is 1\.337; check"):
        read_volume(path)
    assert read_volume(path, check=False).shape == (1, 4, 5, 6)


def test_integer_volumes_become_float32(tmp_path):
    np.save(tmp_path / "u16.npy", np.arange(60, dtype=np.uint16).reshape(3, 4, 5))
    back = read_volume(tmp_path / "u16.npy")
    assert back.dtype == np.float32 and back.shape == (1, 3, 4, 5) and back[0, 2, 3, 4] == 59


def test_volume_suffix():
    assert volume_suffix("a/b.NII.GZ") == ".nii.gz"
    assert volume_suffix("x.tar.gz") == ".gz"
    assert volume_suffix("cell.tiff") == ".tiff"


# ---------------------------------------------------------------- forged headers

HUGE = (10_000, 10_000, 10_000)  # 10^12 float32 voxels: 3.6 TiB


def _npy_header(shape=HUGE, data=b"\0" * 64) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def _forge_npy(path):
    path.write_bytes(_npy_header())


def _forge_npz(path):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("volume.npy", _npy_header())


def _forge_h5(path):
    with h5py.File(path, "w") as h5:  # chunks never written: the file stays a few kB
        h5.create_dataset("volume", shape=HUGE, dtype="f4", chunks=(1, 100, 100), compression="gzip")


def _nifti_header() -> bytes:
    header = nibabel.Nifti1Header()
    header.set_data_shape(HUGE)
    header.set_data_dtype(np.float32)
    header.set_data_offset(352)
    return header.binaryblock + b"\0" * 4 + b"\0" * 64


def _forge_nii(path):
    path.write_bytes(_nifti_header())


def _forge_nii_gz(path):
    path.write_bytes(gzip.compress(_nifti_header()))


def _forge_tif(path):
    """A real one-page tif whose width and height tags say 10^6: 10^12 float32 pixels."""
    write_volume(path, np.random.default_rng(0).random((1, 1, 4, 4)))
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        for name in ("ImageWidth", "ImageLength"):
            offset = tif.pages[0].tags[name].valueoffset
            data[offset : offset + 4] = struct.pack("<I", 1_000_000)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("name", "forge"),
    [
        ("cell.npy", _forge_npy),
        ("cell.npz", _forge_npz),
        ("cell.h5", _forge_h5),
        ("cell.nii", _forge_nii),
        ("cell.nii.gz", _forge_nii_gz),
        ("cell.tif", _forge_tif),
    ],
)
def test_a_header_claiming_more_data_than_the_file_holds_is_refused_before_allocating(tmp_path, name, forge):
    path = tmp_path / name
    forge(path)
    tracemalloc.start()
    try:
        with pytest.raises(VolumeError) as info:
            read_volume(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text = str(info.value)
    assert text.startswith(f"{path}: ") and "TiB" in text, text
    assert re.search(r": its header claims shape \(.*TiB\) but the file holds only .* of (compressed )?data", text), (
        text
    )
    assert peak < 50e6  # nothing near the claimed size was allocated


def test_a_truncated_npy_says_how_much_is_missing(tmp_path, volume):
    path = write_volume(tmp_path / "cell.npy", volume)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(
        VolumeError, match=r"cell\.npy: cannot be read as \.npy \(corrupt or truncated file\?\): .*claims"
    ):
        read_volume(path)


def test_an_npy_of_python_objects_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(VolumeError, match=r"obj\.npy: .*Python objects"):
        read_volume(tmp_path / "obj.npy")
