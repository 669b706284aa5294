"""Real scans for the data tests: nibabel's MR test volumes and pydicom's CT slice, turned into
series and reoriented copies in tmp_path (nothing is written into the project)."""
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def anatomical() -> Path:
    """nibabel's anatomical.nii: a real MR volume, 33x41x25 voxels of 2 mm, stored LAS."""
    from nibabel.testing import data_path

    return Path(data_path) / "anatomical.nii"


@pytest.fixture
def example4d() -> Path:
    from nibabel.testing import data_path

    return Path(data_path) / "example4d.nii.gz"


def ct_slice():
    import pydicom
    from pydicom.data import get_testdata_file

    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


@pytest.fixture
def write_ct_series():
    """The series writer below, for tests (conftest modules are not importable by name)."""
    return _write_ct_series


def _write_ct_series(folder: Path, n: int = 4, gap: float = 5.0, mirrored: bool = False,
                    series_uids=None) -> np.ndarray:
    """Write ``n`` axial slices made from pydicom's CT_small.dcm into ``folder``: slice k lies at
    ``gap * k`` mm above the first and has k * 7 added to its pixels (so the slices differ); files
    are named and numbered in reverse order of position. ``mirrored`` stores every slice with its
    columns running to the patient's right instead of left (pixels flipped, geometry changed to
    match: the same anatomy). Returns the expected canonical (D, H, W) array in HU."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = []
    for k in range(n):
        ds = ct_slice()
        pixels = ds.pixel_array.astype(np.int16) + 7 * k
        spacing_col = float(ds.PixelSpacing[1])
        position = [float(v) for v in ds.ImagePositionPatient]
        position[2] += gap * k
        if mirrored:
            # column c of the mirrored slice is column C-1-c of the original: first pixel moves to the
            # original's last column (+x in LPS is the patient's left) and columns run along -x
            position[0] += (pixels.shape[1] - 1) * spacing_col
            ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
            ds.PixelData = np.ascontiguousarray(pixels[:, ::-1]).tobytes()
        else:
            ds.PixelData = pixels.tobytes()
        ds.ImagePositionPatient = position
        ds.InstanceNumber = n - k
        if series_uids is not None:
            ds.SeriesInstanceUID = series_uids[k]
        ds.save_as(folder / f"slice_{n - k:03d}.dcm")
        expected.append(pixels.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(expected)
