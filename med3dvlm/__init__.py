"""Med3DVLM: 3D medical vision-language models built on ``dcformer_kernels``."""
__version__ = "0.1.0"
