"""Segmentation training: ``python -m med3dvlm.train.seg [--model unet2d_dca] [--out DIR] ...``

Trains any registry segmentation model (``unet2d``, ``unet2d_dca``, ``unet3d``, ``unet3d_dca``,
``dcformer_unet3d_dca``, ...) with Dice + cross-entropy on synthetic shapes generated on the fly
(``med3dvlm.data.SyntheticShapes``; every training batch is new), evaluates hard Dice and IoU
over the foreground classes on a fixed validation set, and saves ``model.safetensors`` plus
``config.json`` (everything ``load_checkpoint`` needs to rebuild the model, and the metrics).
The defaults (a narrow 2D U-Net with DCA on 48×48 images, 150 steps) take one to two minutes on two
CPU cores; a progress bar shows the loss and steps/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from med3dvlm.data.synthetic import SyntheticShapes
from med3dvlm.models.registry import create_model, list_models
from med3dvlm.eval.metrics import dice_iou
from med3dvlm.losses import dice_ce_loss

__all__ = ["SegTrainConfig", "segmentation_models", "train", "evaluate", "save_checkpoint", "load_checkpoint",
           "main"]

# Widths for the ``unet*`` models when no model_args are given, fast on CPU: the registry's
# defaults (the paper's widths) have 63x the parameters and 18x the FLOPs at 48x48.
CPU_UNET_ARGS = {"channels": [8, 16, 32, 64]}


@dataclasses.dataclass
class SegTrainConfig:
    model: str = "unet2d_dca"
    model_args: dict | None = None  # None: CPU_UNET_ARGS for unet* models, {} for others
    size: tuple[int, ...] = (48, 48)
    num_classes: int = 2
    noise_std: float = 0.2
    steps: int = 150
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_samples: int = 32
    eval_every: int = 25
    seed: int = 0
    out: str | None = None

    def resolved_model_args(self) -> dict:
        if self.model_args is not None:
            return dict(self.model_args)
        return dict(CPU_UNET_ARGS) if self.model.startswith("unet") else {}


def segmentation_models() -> list[str]:
    """Registry names of the models that map an image to per-voxel logits: the U-Nets, plain or on a
    registry encoder. (The other registry models are encoders: they return feature maps.)"""
    return list_models("*unet*")


def build_model(config: SegTrainConfig) -> torch.nn.Module:
    if config.model not in segmentation_models():
        hint = (" is an encoder, not a segmentation model; to segment with it, use dcformer_unet3d or "
                f"dcformer_unet3d_dca with model_args {{\"encoder_name\": \"{config.model}\"}}"
                if config.model in list_models() else " is not a registered model")
        raise ValueError(f"model {config.model!r}{hint}. Models that segment: {', '.join(segmentation_models())}")
    model = create_model(config.model, in_channels=1, out_channels=config.num_classes,
                         **config.resolved_model_args())
    dims = getattr(model, "spatial_dims", None)
    if dims != len(config.size):
        raise ValueError(f"size {tuple(config.size)} has {len(config.size)} axes but model "
                         f"{config.model!r} is {dims}D")
    return model


def one_cycle_schedule(optimizer: torch.optim.Optimizer, lr: float,
                       steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """OneCycleLR over ``steps`` optimizer steps, warming up for the first 10 % of them.

    OneCycleLR divides by the warm-up's length in steps less one, so the warm-up is stretched to
    at least two steps (at exactly 10 steps, 10 % gave a ZeroDivisionError) and, with fewer than
    three steps, where no warm-up and annealing fit, the learning rate is held at ``lr``.
    """
    if steps < 3:
        for group in optimizer.param_groups:  # as OneCycleLR does, the schedule sets the rate
            group["lr"] = lr
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                               pct_start=max(0.1, 2 / steps))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, num_classes: int) -> dict[str, float]:
    """Loss, and hard Dice / IoU over the foreground classes, averaged over samples and classes."""
    was_training = model.training
    model.eval()
    losses, dices, ious = [], [], []
    for image, mask in loader:
        logits = model(image)
        losses.append(float(dice_ce_loss(logits, mask)) * len(image))
        dice, iou = dice_iou(logits.argmax(1), mask, num_classes)
        dices.append(dice)
        ious.append(iou)
    model.train(was_training)
    n = sum(len(d) for d in dices)
    return {"loss": sum(losses) / n, "dice": float(torch.cat(dices).mean()), "iou": float(torch.cat(ious).mean())}


def train(config: SegTrainConfig, log=tqdm.write, progress: bool = True) -> dict:
    """Train as ``config`` says; returns ``{"history": [...], "final": {...}}`` (and saves if ``out``).

    ``progress``: a progress bar on stderr with the training loss and steps/s."""
    config = dataclasses.replace(config, model_args=config.resolved_model_args())  # recorded as used
    torch.manual_seed(config.seed)
    model = build_model(config)
    data = dict(size=config.size, num_classes=config.num_classes, noise_std=config.noise_std)
    train_set = SyntheticShapes(length=config.steps * config.batch_size, seed=config.seed, **data)
    val_set = SyntheticShapes(length=config.val_samples, seed=config.seed + 10_000, **data)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = one_cycle_schedule(optimizer, config.lr, config.steps)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{config.model}: {n_params:,} parameters, {len(config.size)}D {tuple(config.size)}, "
        f"{config.steps} steps of {config.batch_size}")
    history, start = [], time.perf_counter()
    model.train()
    # rate_noinv: steps/s even below one step per second (tqdm's default turns that into s/step)
    bar = tqdm(train_loader, total=config.steps, unit="step", disable=not progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")
    for step, (image, mask) in enumerate(bar, start=1):
        loss = dice_ce_loss(model(image), mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % config.eval_every == 0 or step == config.steps:
            metrics = {"step": step, "train_loss": loss.item(),
                       **{f"val_{k}": v for k, v in evaluate(model, val_loader, config.num_classes).items()},
                       "seconds": round(time.perf_counter() - start, 1)}
            history.append(metrics)
            log("  ".join(f"{k} {v:.4f}" if k not in ("step", "seconds") else f"{k} {v}"
                          for k, v in metrics.items()))
    bar.close()
    result = {"history": history, "final": history[-1]}
    if config.out is not None:
        save_checkpoint(model, config, result, config.out)
        log(f"saved {config.out}/model.safetensors and config.json")
    return result


def save_checkpoint(model: torch.nn.Module, config: SegTrainConfig, result: dict, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    record = {"train": dataclasses.asdict(config), **result}
    (out / "config.json").write_text(json.dumps(record, indent=2))


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model a ``train`` run saved in ``path`` and load its weights (eval mode)."""
    path = Path(path)
    record = json.loads((path / "config.json").read_text())
    config = SegTrainConfig(**{**record["train"], "size": tuple(record["train"]["size"])})
    model = build_model(config)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval(), record


def check_config(config: SegTrainConfig) -> None:
    """Raise the ValueError (or TypeError, for unknown model arguments) that ``train`` would meet
    in building the data or the model, or in the first forward, without computing anything:
    the model is built and run on the meta device."""
    SyntheticShapes(config.size, 1, num_classes=config.num_classes, noise_std=config.noise_std)
    with torch.device("meta"):
        model = build_model(config)
        model(torch.empty(config.batch_size, 1, *config.size))


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return f"{action.help} (default: %(default)s)"


def _parser() -> argparse.ArgumentParser:
    defaults = SegTrainConfig()
    p = argparse.ArgumentParser(prog="python -m med3dvlm.train.seg", description=__doc__.split("\n\n")[1],
                                formatter_class=_HelpFormatter)
    p.add_argument("--model", default=defaults.model, metavar="NAME",
                   help=f"segmentation model, one of: {', '.join(segmentation_models())}")
    p.add_argument("--model-args", default=None, type=json.loads,
                   help="JSON keyword overrides for the model factory, e.g. '{\"channels\": [8, 16, 32, 64, 128]}' or, "
                        "for dcformer_unet3d*, '{\"encoder_name\": \"dcformer_small\"}'; "
                        f"default: {json.dumps(CPU_UNET_ARGS)} for unet* models, {{}} otherwise")
    p.add_argument("--size", type=int, nargs="+", default=list(defaults.size),
                   help="image size: 2 values (H W) for a 2D model or 3 (D H W) for a 3D one")
    p.add_argument("--num-classes", type=int, default=defaults.num_classes, choices=(2, 3),
                   help="2: background/shape; 3: background/ellipsoid/box")
    p.add_argument("--noise-std", type=float, default=defaults.noise_std,
                   help="standard deviation of the Gaussian noise added to the synthetic images")
    p.add_argument("--steps", type=int, default=defaults.steps,
                   help="optimizer steps, each on a new batch")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate of AdamW's one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW's weight decay")
    p.add_argument("--val-samples", type=int, default=defaults.val_samples,
                   help="images in the fixed validation set")
    p.add_argument("--eval-every", type=int, default=defaults.eval_every,
                   help="validate (loss, Dice, IoU) every this many steps, and after the last")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the weights and of the data")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None,
                   help="directory for model.safetensors and config.json (default: save nothing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (loss, steps/s) on stderr")
    return p


def parse_args(argv=None) -> tuple[SegTrainConfig, bool]:
    """The training config and whether to show a progress bar; a bad combination of arguments
    (an encoder as --model, a 3D model with a 2D --size, ...) is a usage error, not a traceback."""
    p = _parser()
    args = vars(p.parse_args(argv))
    threads = args.pop("threads")
    progress = not args.pop("no_progress")
    if threads:
        torch.set_num_threads(threads)
    args["size"] = tuple(args["size"])
    for name in ("steps", "batch_size", "val_samples", "eval_every"):
        if args[name] < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1; got {args[name]}")
    config = SegTrainConfig(**args)
    try:
        check_config(config)
    except (ValueError, TypeError) as exc:
        p.error(str(exc))
    return config, progress


def main(argv=None) -> dict:
    config, progress = parse_args(argv)
    return train(config, progress=progress)


if __name__ == "__main__":
    main()
