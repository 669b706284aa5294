"""The ``med3dvlm`` command: ``train`` (the three Med3DVLM stages) and ``synth`` (SynthCT data).

    med3dvlm train clip|projector|finetune --config FILE --output-dir DIR [--max-steps N]
                   [--resume auto|PATH] [section.key=value ...]
    med3dvlm synth --out DIR --n N [--size D H W] [--seed S]

Multi-process: ``torchrun --nproc-per-node 8 -m med3dvlm train ...`` (or ``accelerate launch``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from med3dvlm.train.config import ConfigError

# stage name -> the module that builds and trains it (imported only when that stage runs)
STAGES = {
    "clip": "med3dvlm.train.clip",
    "projector": "med3dvlm.train.vlm",
    "finetune": "med3dvlm.train.vlm",
}
STAGE_HELP = {
    "clip": "stage 1: SigLIP pre-training of the dual encoder (3D image encoder + BERT-family text encoder)",
    "projector": "stage 2: the projector (and input embeddings) on a frozen LM, from stage 1's vision tower",
    "finetune": "stage 3: LoRA on the LM plus the vision tower, projector, embeddings and LM head",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="med3dvlm", description="3D medical vision-language models: train, data.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,synth}")

    train = commands.add_parser("train", help="train one of the three stages",
                                description="Train one Med3DVLM stage with Hugging Face Trainer.")
    stages = train.add_subparsers(dest="stage", required=True, metavar="{" + ",".join(STAGES) + "}")
    for name, help_text in STAGE_HELP.items():
        stage = stages.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--config", required=True,
                           help=f"a YAML file, or a shipped config by name: '{name}' (the paper's values) or "
                                f"'demo/{name}' (sized for 2 CPU cores)")
        stage.add_argument("--output-dir", required=True,
                           help="checkpoints, metrics.jsonl, loss_curve.png and the final model folder")
        stage.add_argument("--max-steps", type=int, default=None,
                           help="stop after this many optimizer steps (overrides the config's epochs)")
        stage.add_argument("--resume", default=None, metavar="auto|PATH",
                           help="continue exactly from a checkpoint: 'auto' = the newest complete one in "
                                "--output-dir (a fresh start when there is none), or a checkpoint folder")
        stage.add_argument("overrides", nargs="*", metavar="section.key=value",
                           help="replace config values, e.g. training.learning_rate=5e-5 data.root=/data")

    synth = commands.add_parser("synth", help="generate SynthCT, the embedded CT-like data set", add_help=False)
    synth.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synth"]:  # its own parser, so `med3dvlm synth --help` shows its options
        from med3dvlm.data.synth import main as synth_main

        return synth_main(argv[1:]) or 0
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # key=value overrides may also follow the options
    stray = [token for token in extra if token.startswith("-") or "=" not in token]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *extra]
    stage = importlib.import_module(STAGES[args.stage])
    try:
        stage.run_stage(args.stage, args.config, args.output_dir, args.overrides, max_steps=args.max_steps,
                        resume=args.resume)
    except ConfigError as error:  # a bad config, path or option: a usage error, raised before anything is built
        parser.exit(2, f"med3dvlm train {args.stage}: error: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
