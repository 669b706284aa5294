"""Fused Triton kernels for 3D medical vision-language models.

- ``decomposed_conv3d`` / ``DecomposedConv3d``: DCFormer's depthwise decomposed 3D convolution
  (and ``decomposed_conv3d_batchnorm_train``: its training-mode form with per-branch BatchNorm;
  ``replace_depthwise_conv3d``: swaps a model's depthwise nn.Conv3d layers for DecomposedConv3d).
- ``siglip_loss`` / ``SigLIPLoss``: fused SigLIP pairwise-sigmoid loss (single process; "gather" and
  "ring" over several processes: ``siglip_dist``).

Layout: one module per op (``decomposed_conv``, ``decomposed_conv_bn``, ``siglip``; ``siglip_dist``
its multi-process forms) holding its checks, kernels, registered op, autograd Function and functional
form; ``conv_common`` what the two conv ops share; ``reference`` the PyTorch oracles; ``layers`` the
nn.Modules; ``dispatch`` backend selection and launch helpers.
"""
from .decomposed_conv import DecomposedConv3dFunction, decomposed_conv3d, fvcore_op_handles
from .decomposed_conv_bn import decomposed_conv3d_batchnorm_train
from .layers import DecomposedConv3d, ReplacementReport, SigLIPLoss, replace_depthwise_conv3d
from .reference import decomposed_conv3d_batchnorm_train_reference, decomposed_conv3d_reference, siglip_loss_reference
from .siglip import SigLIPLossFunction, siglip_loss
from .siglip_dist import siglip_loss_gather, siglip_loss_ring

__all__ = [
    "decomposed_conv3d",
    "DecomposedConv3d",
    "DecomposedConv3dFunction",
    "replace_depthwise_conv3d",
    "ReplacementReport",
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
