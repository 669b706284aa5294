"""Reading a CT/MR volume from disk into one canonical orientation.

``load_volume(path) -> Volume`` reads NIfTI (``.nii``, ``.nii.gz``, nibabel), NumPy (``.npy``, the
form M3D stores its volumes in) and a folder of DICOM slices of one series (pydicom).

Canonical orientation: the array that leaves the loader is indexed ``(D, H, W)`` with

    D: inferior -> superior,   H: anterior -> posterior,   W: patient's right -> patient's left

(nibabel axis codes ``("S", "P", "L")``). An axial slice ``array[d]`` is therefore shown the way
radiologists read CT: anterior at the top, the patient's right on the viewer's left; it is also
the order a plain axial DICOM series has when its slices are stacked inferior to superior. The
same scan stored as RAS, LPS or with its axes permuted in the file comes out as the same array.

``.npy`` files carry no geometry: their array is taken as already ``(D, H, W)`` in that
convention, and ``Volume.spacing`` / ``Volume.affine`` are ``None`` (unknown), not guessed.

Bad input never surfaces as a numpy traceback: a missing path is a ``FileNotFoundError`` naming
it; an unreadable, truncated, 2-D or 4-D file, an empty DICOM folder or one that mixes series is
a ``ValueError`` naming the file and what is wrong.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

__all__ = ["Volume", "load_volume", "as_volume", "CANONICAL_AXCODES", "VolumeLike"]

CANONICAL_AXCODES = ("S", "P", "L")
# nibabel's axis-code labels (the end each axis points away from, then towards): an affine in
# RAS+ world millimetres, which is what NIfTI stores and what MONAI's MetaTensor assumes.
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
# DICOM patient coordinates are LPS+: x and y point the other way from RAS+.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D scan in the canonical orientation (module docstring).

    array: (D, H, W) float32 (CT in Hounsfield units when the file stores them).
    spacing: voxel size in mm along (D, H, W), or None when the format has no geometry (``.npy``).
    affine: 4x4 float64 mapping a voxel index (d, h, w, 1) to RAS+ world mm, or None.
    source: the path it was read from, or None for an in-memory array.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] | None = None
    affine: np.ndarray | None = None
    source: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)


VolumeLike = Union[str, os.PathLike, Volume, np.ndarray, torch.Tensor]


def load_volume(path: str | os.PathLike) -> Volume:
    """Read the volume at ``path`` (``.nii``/``.nii.gz``/``.npy`` file or DICOM series folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no volume at this path", str(path))
    if path.is_dir():
        return _load_dicom_series(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _load_nifti(path)
    if name.endswith(".npy"):
        return _load_npy(path)
    if name.endswith(".dcm"):
        raise ValueError(f"{path}: a single DICOM file is one 2-D slice; pass the folder holding "
                         f"the whole series")
    raise ValueError(f"{path}: unsupported volume format; expected a .nii, .nii.gz or .npy file or a "
                     f"folder of DICOM slices")


def as_volume(data: VolumeLike) -> Volume:
    """A path is loaded; a Volume passes through; an array or tensor of shape (D, H, W) or
    (1, D, H, W) is taken as already canonical, with unknown spacing."""
    if isinstance(data, Volume):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_volume(data)
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if isinstance(data, np.ndarray):
        return Volume(np.ascontiguousarray(_checked_3d(data, "the array")), None, None, None)
    raise TypeError(f"expected a path, a Volume, a numpy array or a torch tensor; got "
                    f"{type(data).__name__}")


def _checked_3d(array: np.ndarray, what: str) -> np.ndarray:
    """(D, H, W) float32 from (D, H, W) or (1, D, H, W); ValueError naming ``what`` otherwise."""
    shape = array.shape
    if array.ndim == 4 and shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        kind = {2: "a 2-D image", 4: "a 4-D series"}.get(array.ndim, f"a {array.ndim}-D array")
        raise ValueError(f"{what}: {kind} of shape {shape}; expected a 3-D volume (D, H, W) or "
                         f"(1, D, H, W)")
    if min(array.shape) < 2:
        raise ValueError(f"{what}: shape {shape} has an axis of one voxel, a 2-D image; expected a "
                         f"3-D volume")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{what}: dtype {array.dtype} is not a real number type")
    return np.asarray(array, dtype=np.float32)  # any memory order: the caller makes one C-ordered copy


def _canonical(array: np.ndarray, affine: np.ndarray, source: Path) -> Volume:
    """Reorient (I, J, K) voxels with a voxel-to-RAS affine into canonical (D, H, W) with MONAI's
    ``Orientation``. The array comes in its file's memory order (NIfTI: Fortran) and is copied
    into C order once, after orienting; a C-order copy before it would be a second transposing
    copy of the whole volume, seconds for a CT."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{source}: its affine is singular or not finite, so the orientation is "
                         f"unknown:\n{affine}")
    image = MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(affine, dtype=torch.float64))
    image = Orientation(axcodes="".join(CANONICAL_AXCODES), labels=_RAS_LABELS)(image)
    out_affine = image.affine.numpy().astype(np.float64)
    spacing = tuple(float(s) for s in np.linalg.norm(out_affine[:3, :3], axis=0))
    return Volume(np.ascontiguousarray(image.as_tensor()[0].numpy(), dtype=np.float32), spacing, out_affine,
                  str(source))


def _load_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as e:  # nibabel, gzip and zlib each raise their own kinds on corrupt data
        raise _unreadable(path, "NIfTI", e) from e
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:  # a 3-D volume written with a singleton time axis
        image = image.slicer[..., 0]
    elif len(shape) >= 4:
        raise ValueError(f"{path}: a {len(shape)}-D series of shape {shape}; expected one 3-D volume")
    try:
        array = image.get_fdata(dtype=np.float32)
    except Exception as e:  # a truncated file fails here, when the voxels are read
        raise _unreadable(path, "NIfTI", e) from e
    return _canonical(_checked_3d(array, str(path)), image.affine, path)


def _unreadable(path: Path, form: str, error: Exception) -> ValueError:
    return ValueError(f"{path}: cannot read it as {form} ({type(error).__name__}: {error})")


def _load_npy(path: Path) -> Volume:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as e:
        raise _unreadable(path, "a .npy array", e) from e
    return Volume(np.ascontiguousarray(_checked_3d(array, str(path))), None, None, str(path))


def _load_dicom_series(folder: Path) -> Volume:
    """Slices ordered by position along the slice normal; CT rescale slope/intercept applied (HU).

    Read with pydicom rather than MONAI's PydicomReader so that each way a folder can be wrong (no
    DICOM, several series, one slice, repeated or missing positions, cut-off pixel data) gets its
    own error naming the file, rather than a stack or a failure from deep inside the reader."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR")
    if not files:
        raise ValueError(f"{folder}: the folder holds no DICOM files")
    slices = []
    for file in files:
        try:
            slices.append((file, pydicom.dcmread(file)))
        except InvalidDicomError as e:
            raise ValueError(f"{file}: not a DICOM file ({e}); a series folder must hold only the "
                             f"slices of one series") from e
        except Exception as e:
            raise _unreadable(file, "DICOM", e) from e

    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise ValueError(f"{folder}: the folder mixes {len(series)} series (SeriesInstanceUID "
                         f"{', '.join(sorted(series))}); expected the slices of one series")
    first_file, first = slices[0]
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{first_file}: a multi-frame DICOM object; only single-frame slice series "
                         f"are read")
    if len(slices) < 2:
        raise ValueError(f"{folder}: one DICOM slice is a 2-D image; expected a series of slices")

    geometry = [_slice_geometry(file, ds) for file, ds in slices]
    row_dir, col_dir, spacing_rc = geometry[0][:3]
    for (file, _), (r, c, s, _) in zip(slices, geometry):
        if not (np.allclose(r, row_dir, atol=1e-4) and np.allclose(c, col_dir, atol=1e-4)
                and np.allclose(s, spacing_rc, rtol=1e-4)):
            raise ValueError(f"{file}: its orientation or pixel spacing differs from {first_file}'s; "
                             f"expected one series on one grid")
    normal = np.cross(row_dir, col_dir)
    positions = np.array([g[3] for g in geometry])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    if np.any(gaps < 1e-3):
        i = int(np.argmin(gaps))
        raise ValueError(f"{folder}: {slices[order[i]][0].name} and {slices[order[i + 1]][0].name} lie at "
                         f"the same position; the folder holds repeated or mixed acquisitions")
    if gaps.max() - gaps.min() > 0.1 * np.median(gaps) + 1e-3:
        raise ValueError(f"{folder}: uneven slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm); "
                         f"slices are missing or the series is not one volume")

    arrays = []
    for index in order:
        file, ds = slices[index]
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as e:
            raise ValueError(f"{file}: cannot decode its pixel data ({type(e).__name__}: {e})") from e
        if pixels.ndim != 2 or (arrays and pixels.shape != arrays[0].shape):
            raise ValueError(f"{file}: pixel array of shape {pixels.shape} does not match the series")
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        arrays.append(pixels * slope + intercept)
    array = np.stack(arrays)  # (slice, row, column)

    # Voxel (k, r, c) -> LPS: position of slice 0 + k * slice step + r * row step + c * column step;
    # the row index moves along the column direction cosines and vice versa (DICOM C.7.6.2.1.1).
    lps = np.eye(4)
    lps[:3, 0] = normal * float(np.median(gaps))
    lps[:3, 1] = col_dir * spacing_rc[0]
    lps[:3, 2] = row_dir * spacing_rc[1]
    lps[:3, 3] = positions[order[0]]
    return _canonical(array, _LPS_TO_RAS @ lps, folder)


def _slice_geometry(file: Path, ds) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row direction, column direction, pixel spacing (between rows, between columns), position)."""
    try:
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        spacing = np.array([float(v) for v in ds.PixelSpacing])
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: lacks the geometry a volume needs (ImageOrientationPatient, "
                         f"ImagePositionPatient, PixelSpacing): {e}") from e
    if orientation.shape != (6,) or position.shape != (3,) or spacing.shape != (2,):
        raise ValueError(f"{file}: malformed geometry attributes (ImageOrientationPatient "
                         f"{orientation.tolist()}, ImagePositionPatient {position.tolist()}, "
                         f"PixelSpacing {spacing.tolist()})")
    return orientation[:3], orientation[3:], spacing, position
