"""Synthetic shapes with masks (the segmentation trainer's data)."""
import pytest
import torch

from med3dvlm.data.synthetic import SyntheticShapes


@pytest.mark.parametrize("size", [(37, 50), (12, 26, 20)])
def test_synthetic_shapes_are_reproducible_and_match_their_masks(size):
    data = SyntheticShapes(size, length=6, num_classes=3, noise_std=0.1, seed=3)
    image, mask = data[2]
    assert image.shape == (1, *size) and mask.shape == size and mask.dtype == torch.int64
    again, again_mask = SyntheticShapes(size, length=6, num_classes=3, noise_std=0.1, seed=3)[2]
    assert torch.equal(image, again) and torch.equal(mask, again_mask)
    assert not torch.equal(mask, data[3][1])
    labels = torch.cat([data[i][1].flatten() for i in range(6)]).unique().tolist()
    assert labels == [0, 1, 2]
    assert image[0][mask > 0].mean() > image[0][mask == 0].mean() + 0.3


def test_synthetic_shapes_bad_arguments():
    with pytest.raises(ValueError, match="num_classes must be 2"):
        SyntheticShapes((32, 32), 4, num_classes=4)
    with pytest.raises(ValueError, match=r"size must be 2 or 3 axes of at least 4 voxels; got \(32,\)"):
        SyntheticShapes((32,), 4)
    with pytest.raises(IndexError):
        SyntheticShapes((32, 32), 4)[4]
