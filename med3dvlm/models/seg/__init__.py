"""Segmentation: Dual Cross-Attention over U-Net skips, plain and encoder-based U-Nets (registered)."""
from .dca import DualCrossAttention
from .unet import EncoderUNet3D, UNet

__all__ = ["DualCrossAttention", "UNet", "EncoderUNet3D"]
