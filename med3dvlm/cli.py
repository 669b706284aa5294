"""The ``med3dvlm`` command: ``train`` (the three Med3DVLM stages), ``eval`` (the four
evaluations) and ``synth`` (SynthCT data).

    med3dvlm train clip|projector|finetune --config FILE --output-dir DIR [--max-steps N]
                   [--resume auto|PATH] [section.key=value ...]
    med3dvlm eval retrieval|zeroshot|report|vqa --model DIR --data FILE --output DIR [options]
    med3dvlm synth --out DIR --n N [--size D H W] [--seed S]

Multi-process: ``torchrun --nproc-per-node 8 -m med3dvlm train ...`` (or ``accelerate launch``).
"""
from __future__ import annotations

import argparse
import importlib
import shlex
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
    parser = argparse.ArgumentParser(prog="med3dvlm",
                                     description="3D medical vision-language models: train, evaluate, data.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,synth}")

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

    add_eval_parser(commands)
    synth = commands.add_parser("synth", help="generate SynthCT, the embedded CT-like data set", add_help=False)
    synth.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


EVAL_HELP = {
    "retrieval": "image-text retrieval R@1/5/10 of a stage-1 dual encoder (M3D-Cap JSON)",
    "zeroshot": "zero-shot multi-abnormality detection of a stage-1 dual encoder (CT-RATE reports + labels CSVs)",
    "report": "report generation of a VLM (M3D-Cap JSON): BLEU-1..4, ROUGE-1/L, METEOR, with a copy baseline",
    "vqa": "closed and open VQA of a VLM (M3D-VQA CSV)",
}


def add_eval_parser(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a trained model (writes <task>.json and <task>.md)",
                                   description="Evaluate a model folder from `med3dvlm train` under one fixed "
                                               "protocol (med3dvlm/eval/runner.py).")
    tasks = evaluate.add_subparsers(dest="task", required=True, metavar="{" + ",".join(EVAL_HELP) + "}")
    for task, help_text in EVAL_HELP.items():
        sub = tasks.add_parser(task, help=help_text, description=help_text)
        sub.add_argument("--model", required=True, help="a model folder (<train output-dir>/model)")
        sub.add_argument("--data", required=True, help={"zeroshot": "the CT-RATE reports CSV",
                                                        "vqa": "the M3D-VQA CSV"}.get(task, "the M3D-Cap JSON"))
        sub.add_argument("--data-root", default=None,
                         help="volume paths in --data are relative to this (default: --data's folder)")
        sub.add_argument("--output", required=True, help="folder for <task>.json and <task>.md")
        sub.add_argument("--batch-size", type=int, default=8 if task in ("report", "vqa") else 16)
        sub.add_argument("--device", default=None, help="default: cuda when available, else cpu")
        if task == "retrieval":
            sub.add_argument("--split", default="test")
            sub.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000, 2000], metavar="N",
                             help="evaluate the first N pairs for each N (default the official 100 500 1000 2000)")
            sub.add_argument("--max-text-length", type=int, default=512)
        else:
            sub.add_argument("--num-items", type=int, default=1000 if task == "report" else None,
                             help="evaluate the first N items (default: " +
                                  ("1000, as the official script)" if task == "report" else "all)"))
        if task == "zeroshot":
            sub.add_argument("--labels", required=True, help="the CT-RATE multi-abnormality label CSV")
        if task == "report":
            sub.add_argument("--split", default="test")
            sub.add_argument("--baseline-split", default="train",
                             help="the split the copy baseline's report comes from ('none': no baseline)")
        if task == "vqa":
            sub.add_argument("--mode", choices=("closed", "open", "both"), default="both")
            sub.add_argument("--prior-data", default=None, metavar="TRAIN_CSV",
                             help="training questions (M3D-VQA CSV) for the image-blind answer-prior baseline")
        if task in ("report", "vqa"):
            sub.add_argument("--max-new-tokens", type=int, default=256 if task == "report" else 64)
            sub.add_argument("--sample", action="store_true",
                             help="sample instead of greedy decoding (the official scripts sample at T = 1)")
            sub.add_argument("--temperature", type=float, default=1.0)
            sub.add_argument("--top-p", type=float, default=1.0)
            sub.add_argument("--seed", type=int, default=0, help="sampling seed")


def run_eval(args, command: str) -> int:
    from med3dvlm.eval import runner
    from med3dvlm.eval.generation import Decoding

    common = {"batch_size": args.batch_size, "device": args.device, "command": command, "data_root": args.data_root}
    if args.task in ("report", "vqa"):
        try:
            common["decoding"] = Decoding(max_new_tokens=args.max_new_tokens, sample=args.sample,
                                          temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        except ValueError as error:
            raise runner.EvalUsageError(f"decoding: {error}") from error
    if args.task == "retrieval":
        result = runner.evaluate_retrieval(args.model, args.data, args.split, args.sizes,
                                           max_text_length=args.max_text_length, **common)
    elif args.task == "zeroshot":
        result = runner.evaluate_zeroshot(args.model, args.data, args.labels, args.num_items, **common)
    elif args.task == "report":
        baseline = None if args.baseline_split == "none" else args.baseline_split
        result = runner.evaluate_report(args.model, args.data, args.split, args.num_items,
                                        baseline_split=baseline, **common)
    else:
        result = runner.evaluate_vqa(args.model, args.data, args.mode, args.num_items, prior_data=args.prior_data,
                                     **common)
    json_path, md_path = result.write(args.output)
    print(result.markdown())
    print(f"eval {args.task}: {json_path} and {md_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synth"]:  # its own parser, so `med3dvlm synth --help` shows its options
        from med3dvlm.data.synth import main as synth_main

        return synth_main(argv[1:], prog="med3dvlm synth") or 0
    parser = build_parser()
    if argv[:1] == ["eval"]:
        from med3dvlm.eval.runner import EvalUsageError

        args = parser.parse_args(argv)
        try:
            return run_eval(args, "med3dvlm " + shlex.join(argv))
        except EvalUsageError as error:  # a bad flag, model folder or data file: raised before any compute
            parser.exit(2, f"med3dvlm eval {args.task}: error: {error}\n")
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
