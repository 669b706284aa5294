"""Fused Triton kernels for 3D medical vision-language models.

- ``decomposed_conv3d`` / ``DecomposedConv3d``: DCFormer's depthwise decomposed 3D convolution
  (and ``decomposed_conv3d_batchnorm_train``: its training-mode form with per-branch BatchNorm).
- ``siglip_loss`` / ``SigLIPLoss``: fused SigLIP pairwise-sigmoid loss (single process, "gather", "ring").
"""
from .decomposed_conv import DecomposedConv3dFunction, decomposed_conv3d, fvcore_op_handles
from .decomposed_conv_bn import decomposed_conv3d_batchnorm_train
from .layers import DecomposedConv3d
from .reference import decomposed_conv3d_batchnorm_train_reference, decomposed_conv3d_reference, siglip_loss_reference
from .siglip import SigLIPLoss, SigLIPLossFunction, siglip_loss, siglip_loss_gather, siglip_loss_ring

__all__ = [
    "decomposed_conv3d",
    "DecomposedConv3d",
    "DecomposedConv3dFunction",
    "decomposed_conv3d_reference",
    "decomposed_conv3d_batchnorm_train",
    "decomposed_conv3d_batchnorm_train_reference",
    "fvcore_op_handles",
    "siglip_loss",
    "siglip_loss_gather",
    "siglip_loss_ring",
    "SigLIPLoss",
    "SigLIPLossFunction",
    "siglip_loss_reference",
]
__version__ = "0.1.0"
