"""Reading parts of released checkpoints, whatever module prefix the releasing code gave them."""
from __future__ import annotations

__all__ = ["state_dict_under_anchor"]


def state_dict_under_anchor(state_dict: dict, anchor: str, what: str) -> dict:
    """The entries of a full checkpoint under the prefix of the one key ending in ``anchor``
    (``encoder.``, ``model.mm_projector.``, ``module.vision_encoder.`` ...), with that prefix removed;
    keys without it belong to other modules and are left out. ``what`` names the part in errors."""
    anchors = [k for k in state_dict if k.endswith(anchor)]
    if len(anchors) != 1:
        raise KeyError(f"expected exactly one {what} key ending in {anchor!r} in the state dict; "
                       f"found {len(anchors)}: {anchors[:5]}")
    prefix = anchors[0][: -len(anchor)]
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
