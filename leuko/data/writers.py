"""Per-format writers of (C, D, H, W) float32 volumes, each producing deterministic bytes.

No timestamps, tool versions or file names go into a file, so writing the same volume again gives the
same bytes and DVC sees an unchanged file as unchanged. leuko.data.io.write_volume picks the writer
from the file suffix and checks the arguments; the writers here only lay out the bytes.
"""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import numpy as np

DEFAULT_KEY = "volume"  # npz array name and h5 dataset path; read_volume looks for it first

# The fixed date that zip (npz) entries carry instead of the wall clock; 1980-01-01 is
# the earliest date the zip format can store.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _write_npy(path: Path, volume: np.ndarray, voxel_size) -> None:
    np.save(path, volume, allow_pickle=False)


def _write_npz(path: Path, volume: np.ndarray, voxel_size) -> None:
    # np.savez stamps each zip entry with the current time; write the entries ourselves.
    arrays = {DEFAULT_KEY: volume}
    if voxel_size is not None:
        arrays["voxel_size"] = np.asarray(voxel_size, dtype=np.float64)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            archive.writestr(info, buffer.getvalue())


def _write_tif(path: Path, volume: np.ndarray, voxel_size) -> None:
    import tifffile  # optional formats load their library on first use (import time)

    # ImageJ hyperstack order is TZCYXS, so (C, D, H, W) goes in as ZCYX.
    metadata: dict = {"axes": "ZCYX"}
    resolution = None
    if voxel_size is not None:
        metadata.update(spacing=voxel_size[0], unit="um")
        resolution = (1.0 / voxel_size[2], 1.0 / voxel_size[1])
    tifffile.imwrite(
        path,
        np.transpose(volume, (1, 0, 2, 3)),
        imagej=True,
        metadata=metadata,
        resolution=resolution,
        software=False,  # no version string that changes with the tifffile release
        datetime=None,
    )


def _nifti_bytes(volume: np.ndarray, voxel_size) -> bytes:
    import nibabel  # optional formats load their library on first use (import time)

    z, y, x = voxel_size if voxel_size is not None else (1.0, 1.0, 1.0)
    # (C, D, H, W) -> (X, Y, Z, C): NIfTI's first axis is x; a single channel stays 3D.
    data = np.transpose(volume[0] if volume.shape[0] == 1 else volume)
    image = nibabel.Nifti1Image(data, affine=np.diag([x, y, z, 1.0]))
    image.header.set_xyzt_units(xyz="micron")
    return image.to_bytes()


def _write_nii(path: Path, volume: np.ndarray, voxel_size) -> None:
    path.write_bytes(_nifti_bytes(volume, voxel_size))


def _write_nii_gz(path: Path, volume: np.ndarray, voxel_size) -> None:
    # mtime=0 and no file name in the gzip header keep the bytes identical between writes.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(_nifti_bytes(volume, voxel_size))


def _write_h5(path: Path, volume: np.ndarray, voxel_size) -> None:
    import h5py  # optional formats load their library on first use (import time)

    with h5py.File(path, "w") as h5:
        data = h5.create_dataset(DEFAULT_KEY, data=volume, compression="gzip", track_times=False)
        data.attrs["axes"] = "CZYX"
        if voxel_size is not None:
            data.attrs["voxel_size"] = np.asarray(voxel_size, dtype=np.float64)


WRITERS = {
    ".npy": _write_npy,
    ".npz": _write_npz,
    ".tif": _write_tif,
    ".tiff": _write_tif,
    ".nii": _write_nii,
    ".nii.gz": _write_nii_gz,
    ".h5": _write_h5,
    ".hdf5": _write_h5,
}
