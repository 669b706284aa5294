"""What every stage's command does, in order: check the config (before any compute), build the stage,
train it on the engine, and save the folder the next stage starts from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from transformers import set_seed

from .config import ConfigError, config_to_dict, load_config
from .engine import RunMonitor, TrainingConfig, replace_default_callbacks, resolve_resume, training_arguments

__all__ = ["StageRun", "run_stage_config", "check_training", "check_held_out", "check_choice", "check_paths",
           "find_config",
           "kept_items", "volume_reader", "MODEL_FOLDER"]

MODEL_FOLDER = "model"  # <output_dir>/model: the stage's save_pretrained folder


@dataclass
class StageRun:
    """A stage, built: what the engine trains and what is saved beside the model."""

    model: Any
    train_dataset: Any
    eval_dataset: Any
    collator: Callable
    trainer_class: type
    save_with_model: list = field(default_factory=list)  # objects with save_pretrained (tokenizer, processor)
    drop_last: bool = False  # SigLIP across processes needs equal local batches
    finalize: Callable | None = None  # model -> the model to save (e.g. LoRA merged)


PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def find_config(value: str | Path) -> Path:
    """A config file: ``value`` itself, or a config shipped in ``med3dvlm/configs`` by name
    ("clip", "demo/clip", "finetune.yaml")."""
    path = Path(value)
    if path.is_file():
        return path
    name = str(value) if str(value).endswith(".yaml") else f"{value}.yaml"
    if (PACKAGED_CONFIGS / name).is_file():
        return PACKAGED_CONFIGS / name
    shipped = sorted(str(p.relative_to(PACKAGED_CONFIGS).with_suffix("")) for p in PACKAGED_CONFIGS.rglob("*.yaml"))
    raise ConfigError(f"--config {str(value)!r}: no such file, nor a shipped config ({', '.join(shipped)})")


def check_choice(key: str, value, choices) -> None:
    """A ConfigError naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {sorted(choices)}; got {value!r}")


def check_paths(paths: dict[str, str | None]) -> None:
    """A ConfigError naming the key of the first given path that does not exist."""
    for key, path in paths.items():
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{key}: {path!r} does not exist")


def volume_reader(preprocessor, cache_dir: str | None):
    """The preprocessor, or a memory-mapped cache of its outputs under ``cache_dir``."""
    from ..data import PreprocessedCache

    return PreprocessedCache(preprocessor, cache_dir) if cache_dir else preprocessor


def kept_items(items: list) -> list:
    """A batch's readable items (``skip_bad`` turns unreadable ones into None)."""
    kept = [item for item in items if item is not None]
    if not kept:
        raise ValueError("every item of this batch was skipped as unreadable (data.skip_bad)")
    return kept


def check_held_out(training: TrainingConfig, has_held_out: bool, where: str) -> None:
    """Evaluation every ``training.eval_steps`` needs a held-out set (``where`` says how to name one)."""
    if training.eval_steps > 0 and not has_held_out:
        raise ConfigError(f"training.eval_steps={training.eval_steps} asks for held-out evaluation, but the data "
                          f"section names no held-out set ({where}); set training.eval_steps=0 or name one")


def check_training(training: TrainingConfig) -> None:
    """Values the types allow but a run cannot use, named by key."""
    positive = {"batch_size": training.batch_size, "eval_batch_size": training.eval_batch_size,
                "learning_rate": training.learning_rate, "epochs": training.epochs,
                "gradient_accumulation_steps": training.gradient_accumulation_steps,
                "logging_steps": training.logging_steps, "save_steps": training.save_steps}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"training.{key} must be > 0; got {value!r}")
    for key in ("weight_decay", "eval_steps", "save_total_limit", "dataloader_num_workers"):
        if getattr(training, key) < 0:
            raise ConfigError(f"training.{key} must be >= 0; got {getattr(training, key)!r}")
    from transformers import SchedulerType

    check_choice("training.lr_scheduler", training.lr_scheduler, [t.value for t in SchedulerType])
    if not 0 <= training.warmup_ratio < 1:
        raise ConfigError(f"training.warmup_ratio must be in [0, 1); got {training.warmup_ratio!r}")
    for key in ("deepspeed", "fsdp_config"):
        path = getattr(training, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"training.{key}: no file at {path!r}")


def run_stage_config(stage: str, config_class: type, check: Callable[[Any], None],
                     prepare: Callable[[Any], StageRun], config_path, output_dir, overrides,
                     max_steps: int | None = None, resume: str | None = None):
    """Load the config and check it (``check(config)``: the stage's own values; every problem a
    ConfigError naming its key, before anything is built), build the stage with ``prepare(config)``,
    train, save ``<output_dir>/model``; returns the trainer."""
    config = load_config(config_class, find_config(config_path), overrides)
    check_training(config.training)
    check(config)
    if max_steps is not None and max_steps <= 0:
        raise ConfigError(f"--max-steps must be > 0; got {max_steps}")
    output_dir = Path(output_dir)
    try:
        checkpoint = resolve_resume(resume, output_dir)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from error
    set_seed(config.training.seed)  # the fresh parts' initialisation too, not only the training order
    run = prepare(config)
    args = training_arguments(config.training, output_dir, drop_last=run.drop_last, max_steps=max_steps)
    trainer = run.trainer_class(model=run.model, args=args, train_dataset=run.train_dataset,
                                eval_dataset=run.eval_dataset, data_collator=run.collator)
    samples_per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    replace_default_callbacks(trainer, RunMonitor(output_dir, samples_per_step, stage))
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump({"stage": stage, **config_to_dict(config)},
                                                               sort_keys=False))
    trainer.train(resume_from_checkpoint=checkpoint)
    folder = output_dir / MODEL_FOLDER
    if run.finalize is not None:
        run.finalize(trainer, folder)
    else:
        trainer.save_model(str(folder))
    if trainer.is_world_process_zero():
        for part in run.save_with_model:
            part.save_pretrained(folder)
        print(f"{stage}: {trainer.state.global_step} steps; model saved to {folder}")
    return trainer
