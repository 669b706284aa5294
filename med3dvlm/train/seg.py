"""Segmentation training: ``python -m med3dvlm.train.seg [--model unet2d_dca] [--out DIR] ...``

Trains any registry segmentation model (``unet2d``, ``unet2d_dca``, ``unet3d``, ``unet3d_dca``,
``dcformer_unet3d_dca``, ...) with Dice + cross-entropy on synthetic shapes generated on the fly
(``med3dvlm.data.SyntheticShapes``; every training batch is new), evaluates hard Dice and IoU
over the foreground classes on a fixed validation set, and saves ``model.safetensors`` plus
``config.json`` (everything ``load_checkpoint`` needs to rebuild the model, and the metrics).
The defaults (a narrow 2D U-Net with DCA on 48×48 images, 150 steps) take one to two minutes on two
CPU cores.
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

from med3dvlm.data.synthetic import SyntheticShapes
from med3dvlm.models.registry import create_model
from med3dvlm.train.losses import dice_ce_loss, dice_iou

__all__ = ["SegTrainConfig", "train", "evaluate", "save_checkpoint", "load_checkpoint", "main"]

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


def build_model(config: SegTrainConfig) -> torch.nn.Module:
    model = create_model(config.model, in_channels=1, out_channels=config.num_classes,
                         **config.resolved_model_args())
    dims = getattr(model, "spatial_dims", None)
    if dims != len(config.size):
        raise ValueError(f"size {tuple(config.size)} has {len(config.size)} axes but model "
                         f"{config.model!r} is {dims}D")
    return model


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


def train(config: SegTrainConfig, log=print) -> dict:
    """Train as ``config`` says; returns ``{"history": [...], "final": {...}}`` (and saves if ``out``)."""
    config = dataclasses.replace(config, model_args=config.resolved_model_args())  # recorded as used
    torch.manual_seed(config.seed)
    model = build_model(config)
    data = dict(size=config.size, num_classes=config.num_classes, noise_std=config.noise_std)
    train_set = SyntheticShapes(length=config.steps * config.batch_size, seed=config.seed, **data)
    val_set = SyntheticShapes(length=config.val_samples, seed=config.seed + 10_000, **data)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps,
                                                   pct_start=0.1)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{config.model}: {n_params:,} parameters, {len(config.size)}D {tuple(config.size)}, "
        f"{config.steps} steps of {config.batch_size}")
    history, start = [], time.perf_counter()
    model.train()
    for step, (image, mask) in enumerate(train_loader, start=1):
        loss = dice_ce_loss(model(image), mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % config.eval_every == 0 or step == config.steps:
            metrics = {"step": step, "train_loss": loss.item(),
                       **{f"val_{k}": v for k, v in evaluate(model, val_loader, config.num_classes).items()},
                       "seconds": round(time.perf_counter() - start, 1)}
            history.append(metrics)
            log("  ".join(f"{k} {v:.4f}" if k not in ("step", "seconds") else f"{k} {v}"
                          for k, v in metrics.items()))
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


def parse_args(argv=None) -> SegTrainConfig:
    defaults = SegTrainConfig()
    p = argparse.ArgumentParser(prog="python -m med3dvlm.train.seg", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=defaults.model, help="registry name")
    p.add_argument("--model-args", default=None, type=json.loads,
                   help="JSON keyword overrides for the model factory, e.g. '{\"channels\": [8, 16, 32, 64, 128]}'; "
                        f"default: {json.dumps(CPU_UNET_ARGS)} for unet* models, {{}} otherwise")
    p.add_argument("--size", type=int, nargs="+", default=list(defaults.size),
                   help="image size: 2 values (2D) or 3 (3D, D H W)")
    p.add_argument("--num-classes", type=int, default=defaults.num_classes, choices=(2, 3),
                   help="2: background/shape; 3: background/ellipsoid/box")
    p.add_argument("--noise-std", type=float, default=defaults.noise_std)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak of a one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--val-samples", type=int, default=defaults.val_samples)
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="directory for model.safetensors and config.json")
    args = vars(p.parse_args(argv))
    threads = args.pop("threads")
    if threads:
        torch.set_num_threads(threads)
    args["size"] = tuple(args["size"])
    for name in ("steps", "batch_size", "val_samples", "eval_every"):
        if args[name] < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1; got {args[name]}")
    return SegTrainConfig(**args)


def main(argv=None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
