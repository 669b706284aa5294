"""Fused Triton kernels for 3D medical vision-language models.

- ``decomposed_conv3d`` / ``DecomposedConv3d``: DCFormer's depthwise decomposed 3D convolution.
"""
from .decomposed_conv import DecomposedConv3dFunction, decomposed_conv3d, fvcore_op_handles
from .layers import DecomposedConv3d
from .reference import decomposed_conv3d_reference

__all__ = [
    "decomposed_conv3d",
    "DecomposedConv3d",
    "DecomposedConv3dFunction",
    "decomposed_conv3d_reference",
    "fvcore_op_handles",
]
__version__ = "0.1.0"
