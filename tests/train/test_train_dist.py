"""Stage 1 on two gloo processes (torchrun) agrees with one process on the same global batch.

What the maths says must agree: with the SigLIP loss gathering every process's embeddings
(``dist_impl="gather"``: each process returns world x its share, DDP averages the gradients), the
loss and the gradients of a global batch are those of one process holding it all. What legitimately
differs, and is kept out of this comparison: per-process BatchNorm statistics (DCFormer normalises
each process's batch on its own unless SyncBatchNorm is used: here a LayerNorm ViT tower), dropout
masks (drawn per process: off here), and float summation order (a tolerance, not bitwise).
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from train_parts import SIZE, tiny_clip_overrides
from safetensors.torch import load_file


def _overrides(synthct, eight, batch_size):
    return tiny_clip_overrides(synthct, **{
        "model.vision": "vit3d_naive",
        "model.vision_options": "{img_size: [16, 32, 32], patch_size: [8, 16, 16], dim: 32, depth: 4, num_heads: 2, "
                                "head_dim: 16}",
        "model.text_model_options": "{hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}",
        "data.path": str(eight), "data.root": str(synthct), "data.eval_split": "null",
        "training.batch_size": batch_size, "training.save_steps": 100, "training.ddp_backend": "gloo"})


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun is not installed beside this Python")
def test_two_gloo_processes_equal_one_process_on_the_global_batch(synthct, tmp_path):
    assert SIZE == (16, 32, 32)
    captions = json.loads((synthct / "m3d_cap.json").read_text())
    eight = tmp_path / "eight.json"  # one global batch of 8: each step sees the same 8 pairs
    eight.write_text(json.dumps({"train": captions["train"][:8]}))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["-m", "med3dvlm", "train", "clip", "--config", "demo/clip", "--max-steps", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *args, "--output-dir", str(one), *_overrides(synthct, eight, 8)],
                   env=env, check=True, capture_output=True)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    with socket.socket() as free:  # a port no other test run holds
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(port), *args, "--output-dir", str(two),
                    *_overrides(synthct, eight, 4)], env=env, check=True, capture_output=True)

    def logged(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    for a, b in zip(logged(one), logged(two), strict=True):
        assert a["step"] == b["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # the global loss, not one process's share
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    single, double = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=1e-4, atol=1e-4, msg=name)
