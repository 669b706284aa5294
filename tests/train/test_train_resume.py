"""Exact resume: a stage-1 run killed with SIGKILL after a checkpoint and resumed with --resume auto
ends with the same weights, bit for bit, as the same run left alone (CPU, one process)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_parts import tiny_clip_overrides
from safetensors.torch import load_file

STEPS = 8


def _command(synthct, out, *extra):
    # dropout on (MiniLM's own 0.1): the restored RNG state matters, not only the weights
    return [sys.executable, "-m", "med3dvlm", "train", "clip", "--config", "demo/clip", "--output-dir", str(out),
            "--max-steps", str(STEPS), *tiny_clip_overrides(synthct, **{"training.save_total_limit": 3}), *extra]


def _environment():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # one thread: one summation order


def test_killed_and_resumed_run_ends_bitwise_equal(synthct, tmp_path):
    alone, killed = tmp_path / "alone", tmp_path / "killed"
    subprocess.run(_command(synthct, alone), env=_environment(), check=True, capture_output=True)

    process = subprocess.Popen(_command(synthct, killed), env=_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint-4").is_dir():  # a checkpoint past the first epoch boundary's middle
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model").exists()  # it really died mid-run
    steps_logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    newest = max(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))

    resumed = subprocess.run(_command(synthct, killed, "--resume", "auto"), env=_environment(), check=True,
                             capture_output=True, text=True)
    assert f"| {newest}/{STEPS} [00:00<?, ?step/s]" in resumed.stderr  # it started at the checkpoint
    a, b = load_file(alone / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the resumed metrics continue the interrupted ones without repeating steps
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    losses = [r["step"] for r in records if "loss" in r]
    assert losses == list(range(1, STEPS + 1)), (steps_logged, losses)


def test_resume_auto_starts_fresh_without_checkpoints_and_a_named_one_must_exist(tmp_path):
    from med3dvlm.train.engine import resolve_resume

    assert resolve_resume("auto", tmp_path / "new") is None
    (tmp_path / ".staging" / "checkpoint-9").mkdir(parents=True)  # a save that never completed
    assert resolve_resume("auto", tmp_path) is None
    (tmp_path / "checkpoint-4").mkdir()
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "checkpoint-4")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        resolve_resume(str(tmp_path / "checkpoint-7"), tmp_path)
