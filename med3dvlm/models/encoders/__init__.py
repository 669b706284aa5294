"""3D image encoders (registered at import): DCFormer and the DCFormer paper's baselines."""
from .convnext3d import ConvNeXt3D, ConvNeXt3DConfig
from .dcformer import DCFormer, DCFormerConfig, load_official_dcformer
from .poolformer3d import PoolFormer3D, PoolFormer3DConfig
from .vit3d import ViT3D, ViT3DConfig

__all__ = ["DCFormer", "DCFormerConfig", "load_official_dcformer", "ViT3D", "ViT3DConfig",
           "ConvNeXt3D", "ConvNeXt3DConfig", "PoolFormer3D", "PoolFormer3DConfig"]
