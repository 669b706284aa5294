"""The image tower both Med3DVLM models share: any registry encoder, described by a plain dict.

``vision_config`` = ``{"name": registry name, "options": create_model keyword options,
"image_size": [D, H, W] the volumes the checkpoint expects}``. The dict is what a config.json
stores; ``build_vision_tower`` turns it into the encoder.
"""
from __future__ import annotations

from ..encoder import Encoder3D, as_triple
from ..registry import create_model, list_models

# Med3DVLM's tower: DCFormer-small on 128 x 256 x 256 (D x H x W) CT volumes (REFERENCE 5).
DEFAULT_VISION_CONFIG = {"name": "dcformer_small", "options": {}, "image_size": [128, 256, 256]}


def normalize_vision_config(vision_config: dict | None) -> dict:
    """``vision_config`` with defaults filled in and each entry checked; errors name the entry."""
    given = dict(vision_config or {})
    unknown = sorted(set(given) - set(DEFAULT_VISION_CONFIG))
    if unknown:
        raise ValueError(f"vision_config has unknown entries {unknown}; accepted: {sorted(DEFAULT_VISION_CONFIG)}")
    config = {**DEFAULT_VISION_CONFIG, **given}
    if config["name"] not in list_models():
        raise ValueError(f"vision_config['name'] must be a registered encoder ({', '.join(list_models())}); "
                         f"got {config['name']!r}")
    if not isinstance(config["options"], dict):
        raise ValueError(f"vision_config['options'] must be a dict of create_model options; got {config['options']!r}")
    config["options"] = dict(config["options"])
    config["image_size"] = list(as_triple(config["image_size"], "vision_config['image_size']", minimum=1))
    return config


def build_vision_tower(vision_config: dict) -> Encoder3D:
    """The registry encoder ``vision_config`` names (without a classification head)."""
    config = normalize_vision_config(vision_config)
    tower = create_model(config["name"], **config["options"])
    if not isinstance(tower, Encoder3D):
        raise ValueError(f"vision_config['name']={config['name']!r} builds a {type(tower).__name__}, "
                         f"not an Encoder3D image encoder")
    return tower
