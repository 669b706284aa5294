"""VolumePreprocessor: presets on a real scan, each step against its formula, the config that
travels with a checkpoint, and errors."""
import json

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")

from med3dvlm.data import PRESETS, VolumePreprocessor, load_volume  # noqa: E402


@pytest.mark.parametrize("name, size", [("med3dvlm", (128, 256, 256)), ("m3d", (32, 256, 256))])
def test_minmax_presets_on_a_real_scan(anatomical, name, size):
    out = VolumePreprocessor.from_preset(name)(anatomical)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.is_contiguous()
    assert out.shape == (1, *size)
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0.01


def test_ct_hu_preset_resamples_windows_and_pads(anatomical):
    """anatomical.nii: 2 mm voxels, 25x41x33 (canonical). At 4 mm it is floor(n / 2) = 12x20x16
    voxels, centred in 16x24x24 and padded with air (-1)."""
    pre = VolumePreprocessor.from_preset("ct_hu", target_spacing=(4.0, 4.0, 4.0), spatial_size=(16, 24, 24))
    out = pre(anatomical)
    assert out.shape == (1, 16, 24, 24) and out.dtype == torch.float32
    content = (slice(2, 14), slice(2, 22), slice(4, 20))
    inside = torch.zeros_like(out[0], dtype=torch.bool)
    inside[content] = True
    assert torch.all(out[0][~inside] == -1.0) and out[0][content].min() > -1.0 and out.max() <= 1.0
    # resampling keeps the intensities: the windowed content averages what the source does
    source = load_volume(anatomical).array
    window = np.clip((source + 1000.0) / 2000.0 * 2 - 1, -1, 1)
    assert abs(float(out[0][content].mean()) - float(window.mean())) < 0.02


def test_minmax_step_matches_its_formula():
    x = np.random.default_rng(0).normal(100, 50, (6, 7, 8)).astype(np.float32)
    pre = VolumePreprocessor(spatial_size=(6, 7, 8), intensity="minmax", crop_foreground=False,
                             size_mode="crop_pad")
    expected = (x - x.min()) / (x.max() - x.min())
    torch.testing.assert_close(pre(x)[0], torch.from_numpy(expected))


def test_hu_window_step_matches_its_formula():
    x = np.random.default_rng(0).uniform(-1500, 1500, (6, 7, 8)).astype(np.float32)
    pre = VolumePreprocessor(spatial_size=(6, 7, 8), intensity="hu_window", hu_window=(-160, 240),
                             crop_foreground=False, size_mode="crop_pad")
    expected = np.clip((x + 160) / 400 * 2 - 1, -1, 1)
    torch.testing.assert_close(pre(x)[0], torch.from_numpy(expected))


def test_crop_foreground_keeps_the_box_above_the_minimum():
    x = np.zeros((20, 20, 20), dtype=np.float32)
    block = np.random.default_rng(1).uniform(1, 2, (6, 8, 10)).astype(np.float32)
    x[3:9, 5:13, 7:17] = block
    pre = VolumePreprocessor(spatial_size=(6, 8, 10), intensity="minmax", crop_foreground=True,
                             size_mode="crop_pad")
    # min-max over the whole volume (background 0 is the minimum), then the box of the block
    torch.testing.assert_close(pre(x)[0], torch.from_numpy(block / block.max()))


def test_a_constant_volume_keeps_its_field_of_view():
    """Nothing lies above the minimum of a blank scan: no crop (MONAI would crop to nothing)."""
    out = VolumePreprocessor.from_preset("med3dvlm", spatial_size=(4, 6, 8))(np.full((5, 7, 9), -1000.0))
    assert out.shape == (1, 4, 6, 8) and torch.equal(out, torch.zeros_like(out))


def test_resize_is_monai_trilinear():
    import torch.nn.functional as F

    x = torch.randn(10, 12, 14)
    pre = VolumePreprocessor(spatial_size=(5, 6, 7), intensity="minmax", crop_foreground=False)
    scaled = (x - x.min()) / (x.max() - x.min())
    expected = F.interpolate(scaled[None, None], size=(5, 6, 7), mode="trilinear", align_corners=False)[0]
    torch.testing.assert_close(pre(x), expected)


def test_array_inputs_of_both_shapes_agree():
    x = np.random.default_rng(2).random((9, 10, 11)).astype(np.float32)
    pre = VolumePreprocessor.from_preset("m3d", spatial_size=(4, 5, 6))
    out = pre(x)
    for same in (x[None], torch.from_numpy(x), torch.from_numpy(x)[None]):
        torch.testing.assert_close(pre(same), out)


def test_reoriented_files_give_the_same_tensor(anatomical, tmp_path):
    raw = nib.load(str(anatomical))
    lps = raw.as_reoriented(nib.orientations.ornt_transform(nib.orientations.io_orientation(raw.affine),
                                                            nib.orientations.axcodes2ornt(("L", "P", "S"))))
    nib.save(lps, str(tmp_path / "lps.nii.gz"))
    for name in ("med3dvlm", "ct_hu"):
        pre = VolumePreprocessor.from_preset(name, spatial_size=(16, 32, 32))
        torch.testing.assert_close(pre(tmp_path / "lps.nii.gz"), pre(anatomical), rtol=0, atol=1e-6)


# ---- the config that travels with a checkpoint ----------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trip(name, tmp_path):
    pre = VolumePreprocessor.from_preset(name, spatial_size=(8, 16, 16))
    path = pre.save_pretrained(tmp_path / "checkpoint")
    assert path.name == "preprocessor_config.json"
    config = json.loads(path.read_text())
    assert config["preprocessor_type"] == "VolumePreprocessor" and config["preset"] == name
    assert config["spatial_size"] == [8, 16, 16]
    assert VolumePreprocessor.from_pretrained(tmp_path / "checkpoint") == pre
    assert VolumePreprocessor.from_pretrained(path) == pre
    assert VolumePreprocessor.from_dict(pre.to_dict()) == pre


def test_presets_say_what_their_sources_did():
    assert PRESETS["med3dvlm"].spatial_size == (128, 256, 256) and PRESETS["med3dvlm"].intensity == "minmax"
    assert PRESETS["med3dvlm"].crop_foreground and PRESETS["med3dvlm"].target_spacing is None
    assert PRESETS["m3d"].spatial_size == (32, 256, 256) and PRESETS["m3d"].intensity == "minmax"
    ct = PRESETS["ct_hu"]
    assert (ct.intensity, ct.hu_window, ct.size_mode) == ("hu_window", (-1000.0, 1000.0), "crop_pad")
    assert ct.target_spacing == (1.5, 0.75, 0.75)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'm3d_v2'; expected one of"):
        VolumePreprocessor.from_preset("m3d_v2")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['size'\]"):
        VolumePreprocessor.from_preset("m3d", size=(1, 2, 3))
    with pytest.raises(ValueError, match="spatial_size must be three positive ints"):
        VolumePreprocessor(spatial_size=(0, 4, 4))
    with pytest.raises(ValueError, match="intensity must be one of"):
        VolumePreprocessor(intensity="zscore")
    with pytest.raises(ValueError, match="hu_window must be"):
        VolumePreprocessor(hu_window=(100, -100))
    with pytest.raises(ValueError, match="target_spacing must be None or three positive"):
        VolumePreprocessor(target_spacing=(1, 1))
    with pytest.raises(ValueError, match="size_mode must be one of"):
        VolumePreprocessor(size_mode="pad")
    with pytest.raises(ValueError, match="preprocessor_type must be 'VolumePreprocessor'"):
        VolumePreprocessor.from_dict({"preprocessor_type": "CLIPImageProcessor"})
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        VolumePreprocessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json: not valid JSON"):
        VolumePreprocessor.from_pretrained(tmp_path)


# ---- errors while preprocessing ----------------------------------------------------------------

def test_loading_errors_surface_unchanged(tmp_path, example4d):
    pre = VolumePreprocessor.from_preset("m3d")
    with pytest.raises(FileNotFoundError) as info:
        pre(tmp_path / "absent.nii.gz")
    assert info.value.filename == str(tmp_path / "absent.nii.gz")
    with pytest.raises(ValueError, match="example4d.nii.gz: a 4-D series"):
        pre(example4d)


def test_resampling_needs_a_spacing():
    from med3dvlm.data import Volume

    pre = VolumePreprocessor.from_preset("ct_hu", spatial_size=(4, 8, 8))
    with pytest.raises(ValueError, match=r"the array: has no voxel spacing .* target_spacing=\(1.5, 0.75, 0.75\)"):
        pre(np.full((8, 8, 8), -500.0))
    # a spacing without an affine is enough: 8 voxels of 0.75 mm along D are 4 of 1.5 mm
    volume = Volume(np.full((8, 8, 8), -500.0, dtype=np.float32), spacing=(0.75, 0.75, 0.75))
    torch.testing.assert_close(pre(volume), torch.full((1, 4, 8, 8), -0.5))


def test_hu_window_refuses_normalised_data(tmp_path):
    np.save(tmp_path / "m3d.npy", np.random.default_rng(0).random((1, 8, 16, 16), dtype=np.float32))
    pre = VolumePreprocessor.from_preset("ct_hu", target_spacing=None)
    with pytest.raises(ValueError, match=r"m3d.npy: values lie in \[.*\], already normalised"):
        pre(tmp_path / "m3d.npy")
    assert VolumePreprocessor.from_preset("m3d")(tmp_path / "m3d.npy").shape == (1, 32, 256, 256)


def test_axis_aligned_and_oblique_resampling_agree(tmp_path, monkeypatch):
    """A scan whose voxel axes are world axes resamples through MONAI Zoom (interpolate), an oblique
    one through MONAI Spacing (grid_sample, several times slower): on a smooth volume the two agree
    to within the sub-voxel offset of their grids."""
    import monai.transforms

    spacing, target = (1.5, 1.0, 2.0), (1.5, 1.5, 3.0)  # NIfTI (x, y, z); canonical (D, H, W) = (z, y, x)
    x, y, z = np.meshgrid(*(np.arange(n) * s for n, s in zip((34, 32, 30), spacing)), indexing="ij")
    hu = (300 * np.sin(2 * np.pi * z / 60) + 300 * np.cos(2 * np.pi * y / 50) + 200 * np.sin(2 * np.pi * x / 40))
    affine = np.diag([*spacing, 1.0])
    oblique = affine.copy()
    oblique[0, 1] = 1e-3  # a shear of 0.03 mm over the volume: too small to matter, enough to take Spacing
    for name, a in (("straight", affine), ("oblique", oblique)):
        nib.save(nib.Nifti1Image(hu.astype(np.float32), a), str(tmp_path / f"{name}.nii"))
    size = (20, 21, 34)  # (D, H, W) = floor(n * spacing / target)
    pre = VolumePreprocessor(spatial_size=size, intensity="hu_window", target_spacing=(3.0, 1.5, 1.5),
                             crop_foreground=False, size_mode="crop_pad")
    spaced = pre(tmp_path / "oblique.nii")
    monkeypatch.setattr(monai.transforms, "Spacing", None)  # the straight scan must not need it
    zoomed = pre(tmp_path / "straight.nii")
    assert zoomed.shape == spaced.shape == (1, *size)
    # both resample, neither pads: the window of the source's extremes stays within [-0.8, 0.8]
    assert zoomed.abs().max() < 0.8 and spaced.abs().max() < 0.8
    # Zoom keeps the field of view's edges, Spacing the first voxel's centre: the grids differ by
    # under half an output voxel per axis, so by at most sum(max slope x half a voxel) in HU
    slopes = (300 * 2 * np.pi / 60, 300 * 2 * np.pi / 50, 200 * 2 * np.pi / 40)  # HU per mm along D, H, W
    moved = (0.5 * 3.0, 0.5 * 1.5, 0.0)  # W keeps its spacing: no shift
    bound = sum(g * m for g, m in zip(slopes, moved)) / 1000  # HU -> the window's units
    difference = (zoomed - spaced).abs()
    assert 0 < difference.max() < bound and difference.mean() < bound / 3
