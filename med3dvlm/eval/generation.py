"""Batched answer generation with a Med3DVLM model: greedy by default, seeded sampling on request.

The official scripts sample at temperature 1 (REFERENCE 5), so their numbers move from run to
run; greedy decoding is this project's default, and ``Decoding(sample=True, seed=...)`` gives
the official kind of run reproducibly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["Decoding", "generate_answers"]


@dataclass(frozen=True)
class Decoding:
    """How answers are decoded: greedy, or sampled at ``temperature`` (top-p ``top_p``) with a seed."""

    max_new_tokens: int = 256
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")

    def describe(self) -> str:
        if not self.sample:
            return f"greedy, at most {self.max_new_tokens} new tokens"
        return (f"sampled (temperature {self.temperature:g}, top-p {self.top_p:g}, seed {self.seed}), at most "
                f"{self.max_new_tokens} new tokens")

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def generate_answers(model, processor, prompts: list[str], pixel_values: torch.Tensor, decoding: Decoding,
                     batch_index: int = 0) -> list[str]:
    """The model's answer to each prompt (one image token each) about its volume in ``pixel_values``
    (N, 1, D, H, W, preprocessed): new tokens only, special tokens dropped, stripped.

    Sampling draws from a generator seeded with (``decoding.seed``, ``batch_index``), so a batch's
    answers do not depend on the batches generated before it.
    """
    if len(prompts) != pixel_values.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {pixel_values.shape[0]} volumes; give one of each per answer")
    device = next(model.parameters()).device
    inputs = processor(prompts, pixel_values=pixel_values).to(device)
    options = {"max_new_tokens": decoding.max_new_tokens, "do_sample": decoding.sample,
               "pad_token_id": processor.tokenizer.pad_token_id}
    if decoding.sample:
        options.update(temperature=decoding.temperature, top_p=decoding.top_p)
        torch.manual_seed(decoding.seed * 1_000_003 + batch_index)
    else:  # greedy: no sampling knobs, so transformers does not warn about ones the LM's config sets
        options.update(temperature=None, top_p=None, top_k=None)
    output = model.generate(**inputs, **options)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
