"""``make demo``: the whole Med3DVLM pipeline on SynthCT, as the commands a user would type.

    python -m med3dvlm.demo [--work demo/run] [--results demo/results.md] [--scale cpu|gpu|quick]

1. ``med3dvlm synth``: SynthCT volumes with reports, VQA and labels;
2. ``med3dvlm train clip``, ``projector``, ``finetune`` with the shipped ``demo/*`` configs (DCFormer-nano,
   the offline all-MiniLM-L6-v2 and SmolLM2-135M-Instruct);
3. ``med3dvlm eval retrieval``, ``zeroshot``, ``report``, ``vqa`` on the held-out test split;
4. ``demo/results.md``: every number beside its chance level or baseline, the learning checks, a few
   generated reports next to their references, the machine, each command and its time.

Scales: ``cpu`` (default; about 10 minutes on 2 cores), ``gpu`` (more cases, larger volumes, more
epochs, bf16: ``make demo GPU=1``) and ``quick`` (a handful of steps per stage: checks that the
pipeline runs end to end, as CI does; its numbers mean nothing and are not checked). Each step runs
as its own process, so the commands in the results file are exactly what ran. A learning check that
fails is reported (results file and stderr); with ``--require-learning`` it also fails the command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SCALES", "Scale", "main"]


@dataclass(frozen=True)
class Scale:
    """The sizes of one demo run; the stage configs themselves are ``med3dvlm/configs/demo/*.yaml``."""

    cases: int
    volume_size: tuple[int, int, int]  # SynthCT voxels (D, H, W); the configs' image_size is what the models see
    stage_overrides: dict = field(default_factory=dict)  # stage -> extra key=value overrides
    max_steps: int | None = None  # per stage (quick)
    eval_items: tuple[int | None, int | None, int | None] = (None, 50, 200)  # zero-shot, report, VQA (None: all)
    max_new_tokens: tuple[int, int] = (128, 24)  # report, VQA
    checked: bool = True  # whether the learning checks mean anything at this size


SCALES = {
    "cpu": Scale(cases=1000, volume_size=(32, 64, 64)),
    # not yet run: no GPU was lent while this was written
    "gpu": Scale(cases=3000, volume_size=(64, 128, 128), eval_items=(None, 300, 1000),
                 stage_overrides={"clip": ["training.bf16=true", "model.image_size=[64,128,128]", "training.epochs=30",
                                           "training.batch_size=64", "model.train_text_tower=true",
                                           "training.learning_rate=1e-4", "model.siglip_init=paper"],
                                  "projector": ["training.bf16=true", "training.max_steps=1500"],
                                  "finetune": ["training.bf16=true", "training.max_steps=3000"]}),
    "quick": Scale(cases=24, volume_size=(16, 32, 32), max_steps=2, eval_items=(4, 4, 4), max_new_tokens=(8, 4),
                   checked=False),
}


class Pipeline:
    """Runs the steps in order, recording each command and its time."""

    def __init__(self, work: Path, scale: Scale) -> None:
        self.work, self.scale = work, scale
        self.steps: list[dict] = []

    def run(self, name: str, args: list[str]) -> None:
        command = [sys.executable, "-m", "med3dvlm", *args]
        shown = "med3dvlm " + shlex.join(args)
        print(f"\n==> {name}: {shown}", flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True)
        self.steps.append({"step": name, "command": shown, "seconds": time.perf_counter() - start})

    def train(self, stage: str, overrides: list[str]) -> Path:
        out = self.work / stage
        args = ["train", stage, "--config", f"demo/{stage}", "--output-dir", str(out)]
        if self.scale.max_steps is not None:
            args += ["--max-steps", str(self.scale.max_steps)]
        self.run(f"train {stage}", [*args, *overrides, *self.scale.stage_overrides.get(stage, [])])
        return out / "model"

    def evaluate(self, task: str, model: Path, args: list[str]) -> dict:
        out = self.work / "eval"
        self.run(f"eval {task}", ["eval", task, "--model", str(model), "--output", str(out), *args])
        return json.loads((out / f"{task}.json").read_text())


def run_pipeline(work: Path, scale: Scale) -> tuple[Pipeline, dict]:
    pipeline = Pipeline(work, scale)
    data = work / "synthct"
    pipeline.run("synth", ["synth", "--out", str(data), "--n", str(scale.cases), "--size",
                           *map(str, scale.volume_size), "--seed", "0"])
    cache = f"data.cache_dir={work / 'cache'}"
    caption_json, vqa_train = data / "m3d_cap.json", data / "m3d_vqa_train.csv"
    clip = pipeline.train("clip", [f"data.path={caption_json}", cache])
    projector = pipeline.train("projector", [f"model.vision_from={clip}", f"data.captions={caption_json}", cache])
    vlm = pipeline.train("finetune", [f"model.start_from={projector}", f"data.captions={caption_json}",
                                      f"data.vqa={vqa_train}", cache])
    zeroshot_items, report_items, vqa_items = (["--num-items", str(n)] if n else [] for n in scale.eval_items)
    report_tokens, vqa_tokens = scale.max_new_tokens
    results = {
        "retrieval": pipeline.evaluate("retrieval", clip, ["--data", str(caption_json)]),
        "zeroshot": pipeline.evaluate("zeroshot", clip, ["--data", str(data / "ctrate_reports_test.csv"),
                                                         "--labels", str(data / "ctrate_labels_test.csv"),
                                                         "--data-root", str(data / "volumes"), *zeroshot_items]),
        "report": pipeline.evaluate("report", vlm, ["--data", str(caption_json), "--max-new-tokens",
                                                    str(report_tokens), *report_items]),
        "vqa": pipeline.evaluate("vqa", vlm, ["--data", str(data / "m3d_vqa_test.csv"), "--prior-data", str(vqa_train),
                                              "--max-new-tokens", str(vqa_tokens), *vqa_items]),
    }
    return pipeline, results


def learning_checks(results: dict) -> list[dict]:
    """The claims the demo makes (issue 18): each a value, its bar, and whether it clears it."""
    retrieval = results["retrieval"]
    n = max(retrieval["metrics"], key=int)
    r1 = retrieval["metrics"][n]
    chance = retrieval["reference"][n]["r1"]
    closed = results["vqa"]["metrics"].get("closed", {})
    zeroshot_auc = results["zeroshot"]["metrics"]["overall"]["auc"]
    meteor = results["report"]["metrics"].get("meteor")
    baseline = results["report"]["reference"].get("copy_baseline", {}).get("meteor")
    checks = [
        ("retrieval I→T R@1", r1["i2t_r1"], 3 * chance, f"3 × chance (1/{n})"),
        ("retrieval T→I R@1", r1["t2i_r1"], 3 * chance, f"3 × chance (1/{n})"),
        ("zero-shot mean AUC", zeroshot_auc, 0.5, "0.5 (chance)"),
        ("closed VQA accuracy (strict rule)", closed.get("strict"), 0.25, "25 % (chance)"),
        ("report METEOR", meteor, baseline, "the copy baseline"),
    ]
    return [{"check": name, "value": value, "bar": bar, "bar_text": text,
             "passed": value is not None and bar is not None and value > bar} for name, value, bar, text in checks]


def machine_line() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {cores} usable cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def write_results(path: Path, scale_name: str, pipeline: Pipeline, results: dict, checks: list[dict]) -> None:
    from med3dvlm.eval.runner import EvalResult

    total = sum(step["seconds"] for step in pipeline.steps)
    lines = ["# Med3DVLM demo results", "",
             f"Scale `{scale_name}` ({pipeline.scale.cases} SynthCT cases at "
             f"{'x'.join(map(str, pipeline.scale.volume_size))} voxels), written by `python -m med3dvlm.demo "
             f"--scale {scale_name}` on {time.strftime('%Y-%m-%d')}.", "",
             f"Machine: {machine_line()}. Whole pipeline: {total / 60:.1f} min.", ""]
    if not pipeline.scale.checked:
        lines += ["**A `quick` run: a handful of steps per stage, to show that every part runs. Its numbers "
                  "mean nothing.**", ""]
    lines += ["## Learning checks", "",
              "| check | value | bar | cleared |", "|---|---|---|---|",
              *(f"| {c['check']} | {_percent(c['value'])} | {_percent(c['bar'])} = {c['bar_text']} | "
                f"{'yes' if c['passed'] else '**no**'} |" for c in checks), "",
              "## Steps", "", "| step | command | time |", "|---|---|---|",
              *(f"| {s['step']} | `{s['command']}` | {s['seconds']:.0f} s |" for s in pipeline.steps), ""]
    for task in ("retrieval", "zeroshot", "report", "vqa"):
        result = EvalResult(**results[task])
        result.samples = result.samples[:3]
        lines.append(result.markdown(heading_level=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m med3dvlm.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="demo/run", help="data, checkpoints and evaluation outputs (default demo/run)")
    parser.add_argument("--results", default="demo/results.md", help="the summary (default demo/results.md)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--require-learning", action="store_true",
                        help="exit with status 1 when a learning check fails (not at --scale quick)")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale]
    pipeline, results = run_pipeline(Path(args.work), scale)
    checks = learning_checks(results)
    write_results(Path(args.results), args.scale, pipeline, results, checks)
    print(f"\ndemo: {Path(args.results)}")
    failed = [c["check"] for c in checks if not c["passed"]]
    if failed and scale.checked:
        print(f"demo: learning not shown for: {', '.join(failed)} (see {args.results})", file=sys.stderr)
        return 1 if args.require_learning else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
