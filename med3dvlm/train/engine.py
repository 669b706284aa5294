"""The training engine every stage shares: Hugging Face ``Trainer`` with atomic checkpoints, exact
resume, and what a person watches (progress bar, JSONL metrics, a loss-curve PNG, epoch lines).

Why ``Trainer`` (not a loop of our own on ``accelerate``): it already keeps and restores everything
exact resume needs (model, optimizer, scheduler, gradient scaler, every RNG, the position in the
epoch's seeded data order), and it takes DeepSpeed ZeRO and FSDP configs, torchrun/DDP, gradient
accumulation, bf16 and gradient checkpointing as arguments; Med3DVLM's and LLaVA's own training
scripts use it, so its users know its knobs. What this module adds:

- checkpoints are written to ``<output>/.staging/checkpoint-N`` and renamed into place when complete,
  so a run killed mid-save never leaves a half checkpoint that ``--resume auto`` would pick;
- ``resume="auto"`` resumes from the newest complete checkpoint (or starts fresh when none);
- ``TrainingConfig``: the knobs a stage config exposes, mapped onto ``TrainingArguments``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

__all__ = ["TrainingConfig", "CheckpointingTrainer", "RunMonitor", "training_arguments", "resolve_resume",
           "STAGING_DIR"]

STAGING_DIR = ".staging"
TRAINED_BASE_WEIGHTS = "trained_base_weights.safetensors"


@dataclass
class TrainingConfig:
    """The optimisation knobs of a stage (per-stage paper values live in the stage's YAML)."""

    batch_size: int = 8  # per process
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    bf16: bool = False  # bf16 autocast (the paper trains in bf16 on GPUs)
    gradient_checkpointing: bool = False
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2  # keep the last K checkpoints
    eval_steps: int = 0  # > 0: evaluate on the held-out slice every N steps
    eval_batch_size: int = 8
    dataloader_num_workers: int = 0
    # Multi-process engines (``torchrun`` or ``accelerate launch`` starts the processes):
    deepspeed: str | None = None  # a DeepSpeed JSON config (configs/deepspeed/zero2.json, zero3.json)
    fsdp: str | None = None  # e.g. "full_shard auto_wrap"
    fsdp_config: str | None = None  # a JSON file of FSDP options
    ddp_backend: str | None = None  # "nccl" on GPUs, "gloo" for CPU processes


# transformers 5.x renamed TrainingArguments.gradient_checkpointing (kept as a deprecated alias).
_CHECKPOINTING_FIELD = next(f for f in ("activation_checkpointing", "gradient_checkpointing")
                            if f in TrainingArguments.__dataclass_fields__)


def training_arguments(config: TrainingConfig, output_dir: str | Path, *, drop_last: bool = False,
                       max_steps: int | None = None) -> TrainingArguments:
    """``TrainingArguments`` for one stage; ``max_steps`` (the command line's ``--max-steps``)
    overrides the config's."""
    steps = max_steps if max_steps is not None else config.max_steps
    evaluate = config.eval_steps > 0
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1): a share of the total steps
        num_train_epochs=config.epochs,
        max_steps=steps,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_grad_norm=config.max_grad_norm,
        bf16=config.bf16,
        **{_CHECKPOINTING_FIELD: config.gradient_checkpointing},
        seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=config.eval_steps if evaluate else None,
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_drop_last=drop_last,
        dataloader_pin_memory=torch.cuda.is_available(),
        deepspeed=config.deepspeed,
        fsdp=config.fsdp or "",
        fsdp_config=config.fsdp_config,
        use_cpu=not torch.cuda.is_available(),  # also what makes CPU processes under torchrun run DDP
        ddp_backend=config.ddp_backend if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        remove_unused_columns=False,  # our collators build exactly the model's inputs
        report_to="none",
        disable_tqdm=True,  # RunMonitor draws the progress bar
    )


def resolve_resume(resume: str | None, output_dir: str | Path) -> str | None:
    """``None`` -> fresh; ``"auto"`` -> the newest complete checkpoint in ``output_dir`` (or fresh);
    a path -> that checkpoint, which must exist."""
    if resume is None:
        return None
    if resume == "auto":
        return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint folder")
    return str(resume)


class CheckpointingTrainer(Trainer):
    """``Trainer`` whose checkpoints appear atomically: each is written under ``.staging/`` and
    renamed into ``output_dir`` once every process has finished writing it."""

    _staging: str | None = None

    def _get_output_dir(self, trial) -> str:
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging = os.path.join(run_dir, STAGING_DIR)
        staged, final = os.path.join(self._staging, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(staged):  # left by a run killed while saving
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            rotate_checkpoints(run_dir, save_total_limit=self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


    # peft saves a PeftModel's adapters only, but stage 3 also trains base modules in full (the vision
    # tower, projector, embeddings, LM head): a checkpoint keeps those and the buffers too, and resume
    # restores them.
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if _is_peft(model) and self.args.should_save:
            keep = {name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name}
            keep |= {name for name, _ in model.named_buffers()}  # BatchNorm statistics of the trained tower
            trained = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items() if name in keep}
            if trained:
                save_file(trained, os.path.join(output_dir or self.args.output_dir, TRAINED_BASE_WEIGHTS))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, TRAINED_BASE_WEIGHTS)
        if os.path.isfile(path):
            target = self.accelerator.unwrap_model(model if model is not None else self.model)
            unexpected = target.load_state_dict(load_file(path), strict=False).unexpected_keys
            if unexpected:
                raise KeyError(f"{path} holds weights this model lacks: {unexpected[:5]}")


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class RunMonitor(TrainerCallback):
    """What a person sees: a progress bar (loss, learning rate, volumes/s, ETA), one line per epoch,
    ``metrics.jsonl`` (every log), and ``loss_curve.png`` at the end. Only the main process writes."""

    def __init__(self, output_dir: str | Path, samples_per_step: int, stage: str) -> None:
        self.output_dir = Path(output_dir)
        self.samples_per_step = samples_per_step  # batch x processes x accumulation
        self.stage = stage
        self.bar = None
        self._mark: tuple[float, int] | None = None
        self._epoch_losses: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from tqdm.auto import tqdm

        self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.output_dir / "metrics.jsonl"
        if metrics.exists():  # a resumed run: drop what the interrupted run logged after its checkpoint
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= state.global_step]
            metrics.write_text("".join(line + "\n" for line in kept))
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=f"train {self.stage}",
                        unit="step", dynamic_ncols=True, mininterval=0.5)
        self._mark = (time.perf_counter(), state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        now = time.perf_counter()
        if "loss" in logs and self._mark is not None and state.global_step > self._mark[1]:
            seconds, steps = now - self._mark[0], state.global_step - self._mark[1]
            record["volumes_per_s"] = steps * self.samples_per_step / seconds
            self._mark = (now, state.global_step)
            self._epoch_losses.append(logs["loss"])
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}",
                                     vol_s=f"{record['volumes_per_s']:.2f}")
        elif self.bar is not None and any(k.startswith("eval_") for k in logs):
            self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in logs.items()))
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self._epoch_losses:
            line = (f"{self.stage} epoch {math.ceil(state.epoch or 0)}: step {state.global_step}/{state.max_steps}, "
                    f"mean logged loss {sum(self._epoch_losses) / len(self._epoch_losses):.4f}")
            (self.bar.write if self.bar is not None else print)(line)
            self._epoch_losses = []

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        write_loss_curve(self.output_dir / "metrics.jsonl", self.output_dir / "loss_curve.png", self.stage)


def write_loss_curve(metrics_path: Path, png_path: Path, title: str) -> None:
    """Training (and evaluation) loss against the step, from ``metrics.jsonl``."""
    if not metrics_path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key, label in (("loss", "train loss"), ("eval_loss", "held-out loss")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def replace_default_callbacks(trainer: Trainer, monitor: RunMonitor) -> None:
    """Our progress bar and metrics instead of Trainer's printed dicts and bar."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(monitor)
