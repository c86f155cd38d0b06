"""Read and write single-cell volumes as (C, D, H, W) float32 arrays.

One reader per format, chosen from the file suffix; the writers (deterministic bytes, so DVC sees an
unchanged file as unchanged) are in leuko.data.writers. Every reader checks what the file's header
claims (shape x dtype) against the bytes the file holds before it allocates anything: a forged or
damaged header is a VolumeError that names the file, not a MemoryError for terabytes.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leuko.data.writers import DEFAULT_KEY, WRITERS
from leuko.errors import LeukoError

SUPPORTED_SUFFIXES = (".npy", ".npz", ".tif", ".tiff", ".nii", ".nii.gz", ".h5", ".hdf5")
# Deflate (npz, nii.gz, gzip in h5, zlib in tif) never expands its input more than 1032:1 (zlib
# technical details); compressed data held to this bound cannot ask for more memory than that.
# Other codecs can pack tighter, but only nearly constant data does, and a constant volume is
# rejected anyway.
MAX_EXPANSION = 1032


class VolumeError(LeukoError, ValueError):
    """A volume file that cannot be used; the message names the file, the problem and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str = "") -> None:
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{path}: {problem}" + (f"; {fix}" if fix else ""))


def volume_suffix(path: str | Path) -> str:
    """The format suffix of path, lower case; ".nii.gz" counts as one suffix."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def read_volume(
    path: str | Path, *, key: str | None = None, dataset: str | None = None, check: bool = True
) -> np.ndarray:
    """Read one cell volume as a (C, D, H, W) float32 array; a 3D array becomes C=1.

    key: the array inside an .npz (default "volume", or the only array).
    dataset: the dataset path inside an .h5 (default "volume", or the only dataset).
    check: also reject NaN/Inf voxels and constant (empty) volumes.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix not in SUPPORTED_SUFFIXES:
        raise VolumeError(
            path,
            f"unsupported file type {suffix or '(no suffix)'!r}",
            f"convert it to one of {', '.join(SUPPORTED_SUFFIXES)}",
        )
    if not path.is_file():
        raise VolumeError(
            path, "file not found", "check the path (manifest paths are relative to the manifest's folder)"
        )
    reader = _READERS[suffix]
    try:
        if suffix == ".npz":
            array, axes = reader(path, key)
        elif suffix in (".h5", ".hdf5"):
            array, axes = reader(path, dataset)
        else:
            array, axes = reader(path)
    except (VolumeError, MemoryError):  # out of memory for a volume its file really holds: not corrupt
        raise
    except Exception as exc:  # every library raises its own types for a damaged file
        reason = " ".join(str(exc).split())  # one line, whatever the library wrote
        raise VolumeError(
            path,
            f"cannot be read as {suffix} (corrupt or truncated file?): {type(exc).__name__}: {reason}",
            "re-export or re-copy the file",
        ) from exc
    volume = _to_cdhw(path, np.asarray(array), axes)
    if check:
        check_volume(path, volume)
    return volume


def check_volume(path: str | Path, volume: np.ndarray) -> None:
    """Raise VolumeError for NaN/Inf voxels or a constant (empty) volume."""
    finite = np.isfinite(volume)
    if not finite.all():
        n_nan = int(np.isnan(volume).sum())
        n_inf = int(volume.size - finite.sum()) - n_nan
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise VolumeError(
            path,
            f"has {n_nan} NaN and {n_inf} Inf voxels (first at (C, D, H, W) index {first})",
            "fill them (e.g. with the medium or background value) or leave the cell out",
        )
    lo, hi = float(volume.min()), float(volume.max())
    if lo == hi:
        raise VolumeError(
            path,
            f"is empty: every voxel is {lo:g}",
            "check that the file holds the cell and not a blank frame, or leave the cell out",
        )


def write_volume(path: str | Path, volume: np.ndarray, *, voxel_size: Sequence[float] | None = None) -> Path:
    """Write a (C, D, H, W) or (D, H, W) volume as float32; the format follows the suffix.

    voxel_size: (z, y, x) in micrometres, stored where the format has a place for it
    (npz array "voxel_size", tif ImageJ spacing/resolution, nii zooms, h5 attribute).
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix not in SUPPORTED_SUFFIXES:
        raise VolumeError(
            path, f"cannot write file type {suffix or '(no suffix)'!r}", f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    volume = np.asarray(volume)
    if volume.ndim == 3:
        volume = volume[None]
    if volume.ndim != 4:
        raise ValueError(f"write_volume({path}): expected (C, D, H, W) or (D, H, W), got shape {volume.shape}")
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    if voxel_size is not None:
        voxel_size = tuple(float(v) for v in voxel_size)
        if len(voxel_size) != 3 or not all(v > 0 for v in voxel_size):
            raise ValueError(
                f"write_volume({path}): voxel_size must be three positive (z, y, x) values, got {voxel_size}"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[suffix](path, volume, voxel_size)
    return path


# ---------------------------------------------------------------- axes


def _to_cdhw(path: Path, array: np.ndarray, axes: str | None) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise VolumeError(path, f"holds {array.dtype} values, not real numbers", "store the volume as real numbers")
    if axes is not None:
        array = _reorder_axes(path, array, axes.upper())
    elif array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise VolumeError(
            path,
            f"has shape {array.shape} ({array.ndim} dimensions)",
            "leuko expects a 3D volume (D, H, W) or a channel-first 4D volume (C, D, H, W)",
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def _reorder_axes(path: Path, array: np.ndarray, axes: str) -> np.ndarray:
    """Map labelled axes (tifffile series axes such as "ZCYX", "TZCYX", "QYX") to (C, D, H, W).

    Z, C, Y, X are taken at their word; S (samples) counts as channels when there is no C.
    Other axes (T, Q, I, ...) of size 1 are dropped; if Z or C is missing, the remaining
    unlabelled axes fill them, the last one as Z, so a plain multi-page stack reads as Z.
    No C axis means one channel; no Z axis means a 2D image, which is an error.
    """
    if len(axes) != array.ndim:
        raise VolumeError(path, f"axes {axes!r} do not match shape {array.shape}", "re-export the file")
    labels = list(axes)
    if "C" not in labels and "S" in labels:
        labels[labels.index("S")] = "C"
    keep = [i for i, a in enumerate(labels) if a in "ZCYX" or array.shape[i] > 1]
    array = array.reshape([array.shape[i] for i in keep])
    labels = [labels[i] for i in keep]
    unlabelled = [i for i, a in enumerate(labels) if a not in "ZCYX"]
    for name in "ZC":
        if name not in labels and unlabelled:
            labels[unlabelled.pop()] = name
    if unlabelled or "Y" not in labels or "X" not in labels or len(set(labels)) != len(labels):
        raise VolumeError(
            path,
            f"has axes {axes!r} with shape {array.shape}, which do not map to (C, Z, Y, X)",
            "save a 3D stack (ZYX) or a channel hyperstack (ZCYX)",
        )
    if "Z" not in labels:
        raise VolumeError(
            path,
            f"is a 2D image (axes {axes!r}, shape {array.shape}), not a 3D volume",
            "save the z-stack as a multi-page or ImageJ hyperstack file",
        )
    if "C" not in labels:
        array = array[None]
        labels.insert(0, "C")
    return np.transpose(array, [labels.index(a) for a in "CZYX"])


# ---------------------------------------------------------------- readers


def _read_npy(path: Path):
    with open(path, "rb") as f:
        shape, fortran_order, dtype = _npy_header(path, f, os.fstat(f.fileno()).st_size)
        # what np.load does after the header (np.lib.format.read_array), without opening and parsing it again
        array = np.fromfile(f, dtype=dtype, count=math.prod(shape))
    return (array.reshape(shape[::-1]).transpose() if fortran_order else array.reshape(shape)), None


def _read_npz(path: Path, key: str | None):
    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        if key is None:
            key = DEFAULT_KEY if DEFAULT_KEY in names or len(names) != 1 else names[0]
        if key not in names:
            raise VolumeError(
                path,
                f"has no array {key!r}; it holds {', '.join(map(repr, names)) or 'no arrays'}",
                "pick one with the npz key option (read_volume(..., key=NAME))",
            )
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{key}.npy" if f"{key}.npy" in zf.namelist() else key)
            expansion = 1 if info.compress_type == zipfile.ZIP_STORED else MAX_EXPANSION
            with zf.open(info) as member:
                _npy_header(path, member, min(info.file_size, info.compress_size * expansion), info.compress_size)
        return archive[key], None


def _npy_header(path: Path, f, size: int, stored: int | None = None) -> tuple[tuple, bool, np.dtype]:
    """Check an .npy header at f against the size bytes (of which stored are on disk, if compressed); return
    its (shape, fortran_order, dtype), with f at the first byte of data."""
    version = np.lib.format.read_magic(f)
    # Version 3.0 differs from 2.0 only in allowing utf-8 in the header; volume headers are ascii.
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(f)
    if dtype.hasobject:
        raise VolumeError(path, "holds Python objects, not numbers", "store the volume as real numbers")
    _check_claim(path, shape, dtype, available=size - f.tell(), stored=stored)
    return shape, fortran_order, dtype


def _read_tif(path: Path):
    import tifffile  # optional formats load their library on first use (import time)

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise VolumeError(path, "holds no image series", "re-export the stack")
        series = tif.series[0]
        size = os.path.getsize(path)
        if series.keyframe.compression == tifffile.COMPRESSION.NONE:
            _check_claim(path, series.shape, series.dtype, size)
        else:
            _check_claim(path, series.shape, series.dtype, size * MAX_EXPANSION, size)
        return series.asarray(), series.axes


def _read_nii(path: Path):
    import nibabel  # optional formats load their library on first use (import time)

    image = nibabel.load(path)
    header, size = image.header, os.path.getsize(path)
    if volume_suffix(path) == ".nii.gz":
        _check_claim(path, header.get_data_shape(), header.get_data_dtype(), size * MAX_EXPANSION, size)
    else:
        offset = getattr(image.dataobj, "offset", header.get_data_offset())  # where the voxels start
        _check_claim(path, header.get_data_shape(), header.get_data_dtype(), size - offset)
    # NIfTI stores (X, Y, Z[, C]); reversing gives ([C,] Z, Y, X), what write_volume put in.
    array = np.asanyarray(image.dataobj)
    if array.ndim == 5 and array.shape[3] == 1:  # (X, Y, Z, T=1, C): drop the time axis
        array = array[:, :, :, 0]
    return np.transpose(array), None


def _read_h5(path: Path, dataset: str | None):
    import h5py  # optional formats load their library on first use (import time)

    with h5py.File(path, "r") as h5:
        names: list[str] = []
        h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        if dataset is None:
            dataset = DEFAULT_KEY if DEFAULT_KEY in names or len(names) != 1 else names[0]
        if dataset.strip("/") not in names:
            raise VolumeError(
                path,
                f"has no dataset {dataset!r}; it holds {', '.join(map(repr, names)) or 'no datasets'}",
                "pick one with the h5 dataset option (read_volume(..., dataset=PATH))",
            )
        data = h5[dataset]
        stored = data.id.get_storage_size()  # bytes written for this dataset; unwritten chunks take none
        if data.id.get_create_plist().get_nfilters() == 0:  # no compression filter
            _check_claim(path, data.shape, data.dtype, stored)
        else:
            _check_claim(path, data.shape, data.dtype, stored * MAX_EXPANSION, stored)
        axes = data.attrs.get("axes")
        if isinstance(axes, bytes):
            axes = axes.decode()
        return data[()], axes if isinstance(axes, str) else None


def _check_claim(path: Path, shape, dtype, available: int, stored: int | None = None) -> None:
    """Refuse a header whose shape x dtype needs more than the available bytes; stored: the compressed bytes."""
    shape = tuple(int(n) for n in shape)
    claimed = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow
    if claimed <= max(available, 0):
        return
    holds = f"{_bytes(max(available, 0))} of data"
    if stored is not None:
        holds = f"{_bytes(stored)} of compressed data, which unpack to at most {_bytes(available)}"
    raise VolumeError(
        path,
        f"cannot be read as {volume_suffix(path)} (corrupt or truncated file?): its header claims shape {shape}"
        f" of {np.dtype(dtype)} ({_bytes(claimed)}) but the file holds only {holds}",
        "re-export or re-copy the file",
    )


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_READERS = {
    ".npy": _read_npy,
    ".npz": _read_npz,
    ".tif": _read_tif,
    ".tiff": _read_tif,
    ".nii": _read_nii,
    ".nii.gz": _read_nii,
    ".h5": _read_h5,
    ".hdf5": _read_h5,
}
