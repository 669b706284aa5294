"""Training-step benchmark: Med3DVLM's stage 1 (DCFormer-small + the offline MiniLM + SigLIP) and
stage 3 (DCFormer-small + the offline SmolLM2 with LoRA) steps per second and peak memory.

    python -m bench.ops.train_step [--out bench/results/local] [--size 32 64 64] [--batch 2] [--stages clip finetune]

A step is forward, backward and an AdamW update of what the stage trains (stage 3: LoRA + the vision
tower, projector, embeddings and LM head), on random volumes and fixed-length token batches
(``--text-tokens``). Variants:

- ``fused``: the vision tower's decomposed convs and training-mode BatchNorm and the SigLIP loss on
  ``dcformer_kernels``' Triton kernels (CUDA only);
- ``unfused``: the same model on the PyTorch paths (three ``F.conv3d`` per decomposed conv, unfused
  BatchNorms, the chunked PyTorch SigLIP).

On a CPU only the PyTorch path runs (the kernels need CUDA), so CPU rows are ``unfused`` and say
nothing about GPUs; GPU rows come only from a GPU run. Medians of ``--reps`` steps after one warm-up
(bench.common.time_fn); peak memory of one step (bench.common.peak_memory). Writes
``train_{cpu,gpu}.csv`` first, then the Markdown from it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..common import DEFAULT_OUT, Row, environment, markdown_pivot, peak_memory, read_csv, spread_flag, time_fn, \
    write_csv

STAGES = ("clip", "finetune")


def _variants(cuda: bool) -> list[str]:
    return ["fused", "unfused"] if cuda else ["unfused"]


def _set_backend(model: torch.nn.Module, backend: str) -> None:
    """Every decomposed conv and the SigLIP loss on ``backend`` ("auto": Triton on CUDA; "torch")."""
    for module in model.modules():
        if hasattr(module, "backend") and isinstance(module.backend, str):
            module.backend = backend


def clip_step(size, batch: int, text_tokens: int, device: str):
    """A stage-1 model and one training step of it on random inputs."""
    from med3dvlm.models.vlm import Med3DCLIPModel, offline_text_encoder

    text_model, _ = offline_text_encoder()
    model = Med3DCLIPModel.from_text_model(text_model, vision_config={"name": "dcformer_small",
                                                                      "image_size": list(size)}).to(device).train()
    inputs = {"pixel_values": torch.rand(batch, 1, *size, device=device),
              "input_ids": torch.randint(1000, 20000, (batch, text_tokens), device=device),
              "attention_mask": torch.ones(batch, text_tokens, dtype=torch.long, device=device)}
    return model, inputs


def finetune_step(size, batch: int, text_tokens: int, device: str):
    """A stage-3 model (LoRA on SmolLM2 + the fully trained parts) and its inputs."""
    from med3dvlm.models.vlm import Med3DVLMForConditionalGeneration, offline_lm, set_trainable

    lm, tokenizer = offline_lm()
    model = Med3DVLMForConditionalGeneration.from_language_model(
        lm, tokenizer, vision_config={"name": "dcformer_small", "image_size": list(size)},
        projector_config={"low_token_sizes": [64, 32], "high_token_sizes": [32, 32]})
    model = set_trainable(model, "finetune").to(device).train()
    seq = model.config.image_seq_length
    ids = torch.randint(1000, 20000, (batch, seq + text_tokens), device=device)
    ids[:, :seq] = model.config.image_token_id
    labels = ids.clone()
    labels[:, :seq] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
              "pixel_values": torch.rand(batch, 1, *size, device=device)}
    return model, inputs


BUILDERS = {"clip": clip_step, "finetune": finetune_step}


def measure(stage: str, size, batch: int, text_tokens: int, reps: int, cuda: bool) -> list[Row]:
    device = "cuda" if cuda else "cpu"
    env = environment(cuda)
    model, inputs = BUILDERS[stage](size, batch, text_tokens, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()

    rows = []
    shape = f"{batch}x1x{'x'.join(map(str, size))} + {text_tokens} tokens"
    for variant in _variants(cuda):
        _set_backend(model, "auto" if variant == "fused" else "torch")
        timing = time_fn(step, warmup_ms=0, rep_ms=0, min_reps=reps, cuda=cuda)
        flag = spread_flag(timing)
        peak, measure_name = peak_memory(step, cuda=cuda)
        common = dict(model=f"stage {stage}", variant=variant, input=shape, dtype="bf16 autocast" if cuda else "fp32",
                      backend="train step", env=env)
        rows += [Row(**common, metric="step time", value=round(timing.median_ms, 1), unit="ms",
                     p20=round(timing.p20_ms, 1), p80=round(timing.p80_ms, 1), flag=flag),
                 Row(**common, metric="volumes/s", value=round(1000 * batch / timing.median_ms, 3), unit="1/s",
                     flag=flag),
                 Row(**common, metric="peak memory", value=round(peak, 1), unit=f"MiB ({measure_name})")]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="volume size (default: 32 64 64 on CPU, Med3DVLM's 128 256 256 on CUDA)")
    parser.add_argument("--batch", type=int, default=2, help="volumes per step (default: %(default)s)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per variant (default: %(default)s)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    size = tuple(args.size or ((128, 256, 256) if cuda else (32, 64, 64)))
    rows = [row for stage in args.stages for row in measure(stage, size, args.batch, args.text_tokens, args.reps, cuda)]
    csv_path = write_csv(rows, args.out / f"train_{'gpu' if cuda else 'cpu'}.csv")
    text = markdown_pivot(read_csv(csv_path), ["model", "variant", "input", "dtype"], "metric",
                          "Training steps (bench/ops/train_step.py)")
    csv_path.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
