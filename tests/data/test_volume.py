"""load_volume: real scans (nibabel's MR volumes, series built from pydicom's CT slice), the
canonical orientation, and every bad input's error."""
import gzip

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("pydicom")
pytest.importorskip("monai")

from med3dvlm.data import CANONICAL_AXCODES, Volume, as_volume, load_volume  # noqa: E402


def test_nifti_real_scan(anatomical):
    raw = nib.load(str(anatomical))
    volume = load_volume(anatomical)
    assert isinstance(volume, Volume)
    assert volume.array.dtype == np.float32 and volume.array.flags.c_contiguous
    assert volume.shape == (25, 41, 33)  # stored (x, y, z) = (33, 41, 25)
    assert volume.spacing == (2.0, 2.0, 2.0)
    assert nib.aff2axcodes(volume.affine) == CANONICAL_AXCODES
    data = raw.get_fdata()
    assert volume.array.min() == data.min() and volume.array.max() == data.max()
    # stored LAS: d = k (inferior->superior), h = flipped j (A -> P), w = i (already towards the left)
    np.testing.assert_array_equal(volume.array, data.transpose(2, 1, 0)[:, ::-1, :])
    # the affine maps canonical voxels to the same world points as the file's affine
    i, j, k = 3, 5, 7
    d, h, w = k, data.shape[1] - 1 - j, i
    np.testing.assert_allclose(volume.affine @ [d, h, w, 1], raw.affine @ [i, j, k, 1])


def test_canonical_convention_by_a_marker(tmp_path):
    """Identity affine (RAS+): voxel (0, 0, 0) is the patient's left, posterior, inferior corner; in
    (D, H, W) = (inferior->superior, anterior->posterior, right->left) that is (0, H-1, W-1)."""
    data = np.zeros((5, 6, 7), dtype=np.float32)
    data[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "ras.nii"))
    volume = load_volume(tmp_path / "ras.nii")
    assert volume.shape == (7, 6, 5)
    assert np.argwhere(volume.array == 1).tolist() == [[0, 5, 4]]


@pytest.mark.parametrize("target", ["RAS", "LPS", "PIR", "ASL"])
def test_same_scan_reoriented_on_disk_loads_identically(anatomical, tmp_path, target):
    raw = nib.load(str(anatomical))
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(raw.affine),
                                                nib.orientations.axcodes2ornt(tuple(target)))
    reoriented = raw.as_reoriented(transform)
    assert nib.aff2axcodes(reoriented.affine) == tuple(target)
    path = tmp_path / f"anatomical_{target}.nii.gz"
    nib.save(reoriented, str(path))
    original, copy = load_volume(anatomical), load_volume(path)
    np.testing.assert_array_equal(copy.array, original.array)
    np.testing.assert_allclose(copy.affine, original.affine, atol=1e-5)


def test_axes_permuted_in_the_file_by_hand(anatomical, tmp_path):
    """Axes permuted without nibabel's help: data transposed, affine columns permuted to match."""
    raw = nib.load(str(anatomical))
    data = np.asanyarray(raw.dataobj)
    affine = raw.affine[:, [2, 0, 1, 3]]
    nib.save(nib.Nifti1Image(data.transpose(2, 0, 1), affine), str(tmp_path / "permuted.nii"))
    np.testing.assert_array_equal(load_volume(tmp_path / "permuted.nii").array, load_volume(anatomical).array)


def test_dicom_series_real_ct_slices(tmp_path, write_ct_series):
    expected = write_ct_series(tmp_path / "series", n=4, gap=5.0)
    volume = load_volume(tmp_path / "series")
    assert volume.shape == (4, 128, 128)
    # ordered by position, not by file name or instance number (both reversed); HU = pixels - 1024
    np.testing.assert_array_equal(volume.array, expected)
    assert volume.array.min() < -500 and volume.array.max() > 500  # air and bone in HU
    np.testing.assert_allclose(volume.spacing, (5.0, 0.661468, 0.661468), rtol=1e-6)
    assert nib.aff2axcodes(volume.affine) == CANONICAL_AXCODES


def test_dicom_mirrored_columns_give_the_same_volume(tmp_path, write_ct_series):
    write_ct_series(tmp_path / "plain")
    write_ct_series(tmp_path / "mirrored", mirrored=True)
    plain, mirrored = load_volume(tmp_path / "plain"), load_volume(tmp_path / "mirrored")
    np.testing.assert_array_equal(mirrored.array, plain.array)
    np.testing.assert_allclose(mirrored.affine, plain.affine, atol=1e-4)


def test_dicom_and_nifti_of_one_scan_agree(tmp_path, write_ct_series):
    """The DICOM series written as NIfTI (RAS+, as converters do) loads to the same canonical array."""
    write_ct_series(tmp_path / "series")
    volume = load_volume(tmp_path / "series")
    image = nib.as_closest_canonical(nib.Nifti1Image(volume.array, volume.affine))
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    nib.save(image, str(tmp_path / "ct.nii.gz"))
    np.testing.assert_array_equal(load_volume(tmp_path / "ct.nii.gz").array, volume.array)


def test_npy_has_no_geometry(tmp_path):
    array = np.random.default_rng(0).random((1, 6, 8, 10), dtype=np.float32)
    np.save(tmp_path / "m3d.npy", array)
    volume = load_volume(tmp_path / "m3d.npy")
    assert volume.spacing is None and volume.affine is None
    np.testing.assert_array_equal(volume.array, array[0])


def test_as_volume_accepts_arrays_and_tensors():
    import torch

    array = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    for data in (array, array[None], torch.from_numpy(array), torch.from_numpy(array)[None]):
        volume = as_volume(data)
        assert volume.spacing is None and volume.array.dtype == np.float32
        np.testing.assert_array_equal(volume.array, array)
    with pytest.raises(TypeError, match="expected a path"):
        as_volume([1, 2, 3])


# ---- bad inputs --------------------------------------------------------------------------------

def test_missing_file_and_folder(tmp_path):
    for path in (tmp_path / "absent.nii.gz", tmp_path / "absent_series"):
        with pytest.raises(FileNotFoundError, match="absent") as info:
            load_volume(path)
        assert info.value.filename == str(path)


def test_truncated_nifti(anatomical, tmp_path):
    path = tmp_path / "truncated.nii.gz"
    nib.save(nib.load(str(anatomical)), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.nii.gz: cannot read it as NIfTI"):
        load_volume(path)


def test_corrupt_nifti(tmp_path):
    path = tmp_path / "noise.nii"
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(ValueError, match="noise.nii: cannot read it as NIfTI"):
        load_volume(path)
    gz = tmp_path / "noise.nii.gz"
    gz.write_bytes(gzip.compress(b"not a header" * 100))
    with pytest.raises(ValueError, match="noise.nii.gz: cannot read it as NIfTI"):
        load_volume(gz)


def test_2d_image(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), str(tmp_path / "flat.nii"))
    with pytest.raises(ValueError, match="flat.nii: a 2-D image"):
        load_volume(tmp_path / "flat.nii")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 1), np.float32), np.eye(4)), str(tmp_path / "slice.nii"))
    with pytest.raises(ValueError, match="slice.nii: .*one voxel, a 2-D image"):
        load_volume(tmp_path / "slice.nii")


def test_4d_series(example4d):
    with pytest.raises(ValueError, match=r"example4d.nii.gz: a 4-D series of shape \(128, 96, 24, 2\)"):
        load_volume(example4d)


def test_bad_npy(tmp_path):
    np.save(tmp_path / "image.npy", np.zeros((32, 32)))
    with pytest.raises(ValueError, match="image.npy: a 2-D image"):
        load_volume(tmp_path / "image.npy")
    np.save(tmp_path / "series.npy", np.zeros((2, 4, 8, 8)))
    with pytest.raises(ValueError, match=r"series.npy: a 4-D series of shape \(2, 4, 8, 8\)"):
        load_volume(tmp_path / "series.npy")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="junk.npy: cannot read it as a .npy array"):
        load_volume(tmp_path / "junk.npy")


def test_unsupported_format_and_single_dicom(tmp_path, write_ct_series):
    (tmp_path / "scan.mha").write_bytes(b"x")
    with pytest.raises(ValueError, match="scan.mha: unsupported volume format"):
        load_volume(tmp_path / "scan.mha")
    write_ct_series(tmp_path / "series", n=2)
    with pytest.raises(ValueError, match="slice_001.dcm: a single DICOM file is one 2-D slice"):
        load_volume(tmp_path / "series" / "slice_001.dcm")


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: the folder holds no DICOM files"):
        load_volume(tmp_path / "empty")


def test_mixed_series(tmp_path, write_ct_series):
    write_ct_series(tmp_path / "mixed", n=4, series_uids=["1.2.3.1", "1.2.3.1", "1.2.3.2", "1.2.3.1"])
    with pytest.raises(ValueError, match=r"mixed: the folder mixes 2 series .*1\.2\.3\.1, 1\.2\.3\.2"):
        load_volume(tmp_path / "mixed")


def test_single_slice_and_repeated_positions(tmp_path, write_ct_series):
    write_ct_series(tmp_path / "one", n=1)
    with pytest.raises(ValueError, match="one: one DICOM slice is a 2-D image"):
        load_volume(tmp_path / "one")
    write_ct_series(tmp_path / "repeat", n=3, gap=0.0)
    with pytest.raises(ValueError, match="repeat: .* lie at the same position"):
        load_volume(tmp_path / "repeat")


def test_missing_slice(tmp_path, write_ct_series):
    write_ct_series(tmp_path / "gap", n=5)
    (tmp_path / "gap" / "slice_003.dcm").unlink()
    with pytest.raises(ValueError, match=r"gap: uneven slice spacing \(5.000 to 10.000 mm\)"):
        load_volume(tmp_path / "gap")


def test_non_dicom_file_in_series(tmp_path, write_ct_series):
    write_ct_series(tmp_path / "series", n=3)
    (tmp_path / "series" / "notes.txt").write_text("not a slice")
    with pytest.raises(ValueError, match="notes.txt: not a DICOM file"):
        load_volume(tmp_path / "series")


def test_corrupt_dicom_pixels(tmp_path, write_ct_series):
    write_ct_series(tmp_path / "series", n=3)
    path = tmp_path / "series" / "slice_002.dcm"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])  # pixel data cut short
    with pytest.raises(ValueError, match="slice_002.dcm: cannot (decode its pixel data|read it as DICOM)"):
        load_volume(tmp_path / "series")
