"""Models behind one registry: 3D encoders (DCFormer family and baselines), DCA and U-Nets."""
from .registry import create_model, list_models, register_model
from .encoder import Encoder3D
from .dcformer import DCFormer, DCFormerConfig, load_official_dcformer
from .vit3d import ViT3D, ViT3DConfig
from .convnext3d import ConvNeXt3D, ConvNeXt3DConfig
from .poolformer3d import PoolFormer3D, PoolFormer3DConfig
from .dca import DualCrossAttention
from .unet import EncoderUNet3D, UNet

__all__ = [
    "create_model", "list_models", "register_model", "Encoder3D",
    "DCFormer", "DCFormerConfig", "load_official_dcformer",
    "ViT3D", "ViT3DConfig", "ConvNeXt3D", "ConvNeXt3DConfig", "PoolFormer3D", "PoolFormer3DConfig",
    "DualCrossAttention", "UNet", "EncoderUNet3D",
]
