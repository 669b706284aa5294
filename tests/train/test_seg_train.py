"""The segmentation training entry point, ``python -m med3dvlm.train.seg``."""
import json

import pytest
import torch
import torch.nn as nn

from med3dvlm.data.synthetic import SyntheticShapes
from med3dvlm.losses import dice_ce_loss
from med3dvlm.models.seg.unet import UNet
from med3dvlm.train.seg import SegTrainConfig, build_model, evaluate, load_checkpoint, main


@pytest.mark.parametrize("dca", [False, True])
def test_a_few_training_steps_reduce_the_loss(seed, dca):
    data = SyntheticShapes((32, 40), length=4, seed=1)
    image = torch.stack([data[i][0] for i in range(4)])
    mask = torch.stack([data[i][1] for i in range(4)])
    model = UNet(2, 1, 2, channels=[4, 8, 16, 32], dca=dca)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = dice_ce_loss(model(image), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_training_entry_point_saves_a_checkpoint_that_reloads(tmp_path):
    out = tmp_path / "run"
    result = main(["--model", "unet2d_dca", "--model-args", '{"channels": [4, 8, 16]}', "--size", "24", "20",
                   "--steps", "3", "--batch-size", "2", "--val-samples", "3", "--eval-every", "2",
                   "--out", str(out)])
    assert [h["step"] for h in result["history"]] == [2, 3]
    assert (out / "model.safetensors").is_file()
    record = json.loads((out / "config.json").read_text())
    assert record["train"]["model"] == "unet2d_dca" and record["train"]["size"] == [24, 20]
    model, _ = load_checkpoint(out)
    config = SegTrainConfig(size=(24, 20), val_samples=3, batch_size=2)
    val = SyntheticShapes(config.size, config.val_samples, seed=config.seed + 10_000)
    loader = torch.utils.data.DataLoader(val, batch_size=2)
    metrics = evaluate(model, loader, 2)
    assert metrics["dice"] == pytest.approx(record["final"]["val_dice"], abs=1e-6)
    assert metrics["loss"] == pytest.approx(record["final"]["val_loss"], rel=1e-5)


def test_training_config_rejects_a_size_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"size \(32, 32\) has 2 axes but model 'unet3d' is 3D"):
        build_model(SegTrainConfig(model="unet3d", size=(32, 32)))


TINY_RUN = ["--model", "unet2d", "--model-args", '{"channels": [4, 8, 16]}', "--size", "24", "20",
            "--batch-size", "2", "--val-samples", "2"]


@pytest.mark.parametrize("steps", [1, 2, 10])
def test_training_entry_point_runs_any_number_of_steps(steps):
    # 10 steps once made OneCycleLR's warm-up zero steps long: ZeroDivisionError
    result = main(TINY_RUN + ["--steps", str(steps), "--eval-every", "5", "--no-progress"])
    assert result["final"]["step"] == steps


def test_one_cycle_schedule_for_every_step_count():
    from med3dvlm.train.seg import one_cycle_schedule

    for steps in range(1, 41):
        optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = one_cycle_schedule(optimizer, 2e-3, steps)
        lrs = []
        for _ in range(steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        # the peak may fall between two steps (OneCycleLR's warm-up ends at 10 % of the steps, less one)
        assert all(0 < lr <= 2e-3 for lr in lrs) and max(lrs) == pytest.approx(2e-3, rel=0.02), (steps, lrs)
        if steps >= 3:  # a warm-up and an annealing phase
            assert lrs[0] < max(lrs) and lrs[-1] < max(lrs) and lrs.index(max(lrs)) >= 1, (steps, lrs)
        if steps >= 20:  # where 10 % is at least two steps, the schedule of the documented runs
            reference = torch.optim.lr_scheduler.OneCycleLR(
                torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0), max_lr=2e-3, total_steps=steps,
                pct_start=0.1)
            expected = []
            for _ in range(steps):
                expected.append(reference.get_last_lr()[0])
                reference.optimizer.step()
                reference.step()
            assert lrs == expected


@pytest.mark.parametrize("argv, message", [
    (["--model", "dcformer_small"],
     r"model 'dcformer_small' is an encoder, not a segmentation model; to segment with it, use dcformer_unet3d "
     r"or dcformer_unet3d_dca with model_args \{\"encoder_name\": \"dcformer_small\"\}\. Models that segment: "
     r"dcformer_unet3d, dcformer_unet3d_dca, unet2d, unet2d_dca, unet3d, unet3d_dca"),
    (["--model", "no_such_model"], r"model 'no_such_model' is not a registered model\. Models that segment: "),
    (["--model", "unet3d", "--size", "32", "32"], r"size \(32, 32\) has 2 axes but model 'unet3d' is 3D"),
    (["--model", "unet2d", "--size", "24", "20", "16"], r"size \(24, 20, 16\) has 3 axes but model 'unet2d' is 2D"),
    (["--model", "unet2d", "--size", "6", "6"], r"needs at least 8 voxels per axis; got spatial size \(6, 6\)"),
])
def test_training_entry_point_reports_bad_arguments_as_usage_errors(capsys, argv, message):
    import re

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2  # argparse's usage error, not a traceback
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m med3dvlm.train.seg") and re.search("error: .*" + message, err), err


def test_training_entry_point_help_names_the_models_and_every_option(capsys):
    from med3dvlm.train.seg import _parser, segmentation_models

    assert segmentation_models() == ["dcformer_unet3d", "dcformer_unet3d_dca", "unet2d", "unet2d_dca", "unet3d",
                                     "unet3d_dca"]
    undocumented = [a.option_strings for a in _parser()._actions if not a.help]
    assert not undocumented
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ("--model NAME segmentation model, one of: dcformer_unet3d, dcformer_unet3d_dca, unet2d, unet2d_dca, "
            "unet3d, unet3d_dca (default: unet2d_dca)") in help_text


def test_training_shows_a_progress_bar_with_loss_and_steps_per_second(capsys):
    main(TINY_RUN + ["--steps", "3"])
    err = capsys.readouterr().err
    assert "3/3" in err and "step/s" in err and "loss=" in err, err
    main(TINY_RUN + ["--steps", "3", "--no-progress"])
    assert capsys.readouterr().err == ""
