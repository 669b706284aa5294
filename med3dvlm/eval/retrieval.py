"""Image-text retrieval: recall@K in both directions, item i's text being text i (the official
Med3DVLM / M3D protocol: the first N test pairs, every image against every text)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["retrieval_recall"]


@torch.no_grad()
def retrieval_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"i2t_r1": ..., "t2i_r1": ..., ...}``: the share of images whose own text ranks in the top K
    of all N texts by dot product (and of texts whose own image does), for each K in ``ks``.

    Ties count against the query: a pair ranks behind every candidate scoring at least as high
    (so a collapsed, constant embedding scores 0 at K < N rather than 100 %).
    """
    if image_embeds.dim() != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image_embeds and text_embeds must both be (N, d) of one shape; got "
                         f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints; got {list(ks)}")
    scores = image_embeds.double() @ text_embeds.double().T  # (N images, N texts)
    out = {}
    for direction, s in (("i2t", scores), ("t2i", scores.T)):
        own = s.diagonal().unsqueeze(1)
        rank = (s > own).sum(1) + (s == own).sum(1)  # 1 = first; ties share the worse rank
        for k in ks:
            out[f"{direction}_r{k}"] = (rank <= k).double().mean().item()
    return out
