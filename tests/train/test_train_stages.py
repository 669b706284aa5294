"""The three stages on SynthCT at test size, through the command line: each trains, writes what a
person reads (metrics, loss curve, resolved config) and hands the next stage a loadable folder."""
import json

import pytest
import torch
from train_parts import tiny_clip_overrides

from med3dvlm.cli import main


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def clip_run(synthct, tmp_path_factory):
    run = tmp_path_factory.mktemp("clip")
    main(["train", "clip", "--config", "demo/clip", "--output-dir", str(run), "--max-steps", "3",
          *tiny_clip_overrides(synthct, **{"training.eval_steps": 3})])
    return run


def test_clip_stage_trains_evaluates_and_hands_over_its_model(clip_run):
    from med3dvlm.data import VolumePreprocessor
    from med3dvlm.models import Med3DCLIPModel

    records = _records(clip_run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    held_out = [r for r in records if "eval_i2t_r1" in r]
    assert held_out and {"eval_loss", "eval_t2i_r1", "eval_i2t_r5"} <= set(held_out[-1])
    assert all(r["volumes_per_s"] > 0 for r in records if "loss" in r)
    assert (clip_run / "loss_curve.png").stat().st_size > 0 and (clip_run / "config.yaml").is_file()
    model = Med3DCLIPModel.from_pretrained(clip_run / "model")
    assert model.config.vision_config["image_size"] == [16, 32, 32]
    assert VolumePreprocessor.from_pretrained(clip_run / "model").spatial_size == (16, 32, 32)
    assert sorted(p.name for p in clip_run.glob("checkpoint-*")) == ["checkpoint-3"]  # keeps the last 1


@pytest.mark.parametrize("train_text_tower", [False, True])
def test_clip_text_tower_is_locked_or_trained_as_configured(synthct, tmp_path, train_text_tower):
    from med3dvlm.models import Med3DCLIPModel, offline_text_encoder

    run = tmp_path / "run"
    main(["train", "clip", "--config", "demo/clip", "--output-dir", str(run), "--max-steps", "2",
          *tiny_clip_overrides(synthct, **{"model.train_text_tower": str(train_text_tower).lower(),
                                            "data.eval_split": "null", "training.warmup_ratio": 0,
                                            "training.lr_scheduler": "constant"})])
    model = Med3DCLIPModel.from_pretrained(run / "model")
    pretrained = offline_text_encoder()[0].state_dict()
    unchanged = all(torch.equal(model.text_tower.state_dict()[k], pretrained[k]) for k in pretrained)
    assert unchanged is not train_text_tower  # the same run with the tower trained does change it



def test_clip_loss_falls_on_a_small_repeated_batch(synthct, tmp_path):
    captions = json.loads((synthct / "m3d_cap.json").read_text())
    small = tmp_path / "four.json"
    small.write_text(json.dumps({"train": captions["train"][:4]}))
    run = tmp_path / "run"
    main(["train", "clip", "--config", "demo/clip", "--output-dir", str(run), "--max-steps", "12",
          *tiny_clip_overrides(synthct, **{"data.path": str(small), "data.root": str(synthct),
                                            # the paper's setting (the demo config locks the text tower)
                                            "model.train_text_tower": "true", "model.siglip_init": "paper",
                                            "data.eval_split": "null", "training.save_steps": 100,
                                            "training.warmup_ratio": 0, "training.lr_scheduler": "constant"})])
    losses = [r["loss"] for r in _records(run) if "loss" in r]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0], losses


@pytest.fixture(scope="module")
def projector_run(clip_run, synthct, tmp_path_factory):
    run = tmp_path_factory.mktemp("projector")
    main(["train", "projector", "--config", "demo/projector", "--output-dir", str(run), "--max-steps", "2",
          f"model.vision_from={clip_run / 'model'}", "model.projector_options={low_token_sizes: [4, 4], "
          "high_token_sizes: [4, 4]}", "model.max_length=160", f"data.captions={synthct / 'm3d_cap.json'}",
          f"data.vqa={synthct / 'm3d_vqa_train.csv'}", "training.batch_size=2", "training.logging_steps=1"])
    return run


def test_projector_stage_trains_only_the_projector_and_embeddings(projector_run, clip_run, smollm):
    from med3dvlm.models import Med3DCLIPModel, Med3DVLMForConditionalGeneration, Med3DVLMProcessor

    vlm = Med3DVLMForConditionalGeneration.from_pretrained(projector_run / "model")
    clip = Med3DCLIPModel.from_pretrained(clip_run / "model")
    tower, stage1 = vlm.vision_tower.state_dict(), clip.vision_tower.state_dict()
    assert tower.keys() == stage1.keys()
    for name in tower:  # stage 1's tower, frozen in stage 2, BatchNorm statistics included
        assert torch.equal(tower[name], stage1[name]), name
    lm, _ = smollm
    trained = vlm.language_model.state_dict()
    for name, value in lm.state_dict().items():
        if "embed_tokens" in name or "lm_head" in name:  # the input embeddings learn (SmolLM2 ties the head)
            assert not torch.equal(trained[name][: value.shape[0]], value), name
        else:
            assert torch.equal(trained[name], value), name
    processor = Med3DVLMProcessor.from_pretrained(projector_run / "model")
    assert processor.image_seq_length == vlm.config.image_seq_length == 8
    assert [r["step"] for r in _records(projector_run) if "loss" in r] == [1, 2]


def _finetune(projector_run, synthct, out, *extra):
    main(["train", "finetune", "--config", "demo/finetune", "--output-dir", str(out),
          f"model.start_from={projector_run / 'model'}", "model.max_length=160",
          f"data.captions={synthct / 'm3d_cap.json'}", "training.batch_size=2", "training.logging_steps=1",
          "training.lr_scheduler=constant", "training.warmup_ratio=0", *extra])


def test_finetune_stage_merges_lora_into_a_plain_checkpoint_and_resumes_exactly(projector_run, synthct, tmp_path):
    from safetensors.torch import load_file

    from med3dvlm.models import Med3DVLMForConditionalGeneration

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _finetune(projector_run, synthct, straight, "--max-steps", "2", "training.save_steps=1", "training.save_total_limit=2")
    merged = Med3DVLMForConditionalGeneration.from_pretrained(straight / "model")
    before = Med3DVLMForConditionalGeneration.from_pretrained(projector_run / "model")
    assert not any("lora" in name for name in merged.state_dict())
    after_state, before_state = merged.state_dict(), before.state_dict()
    changed = [n for n in after_state if not torch.equal(after_state[n], before_state[n])]
    assert any(n.startswith("language_model.") and "layers" in n for n in changed)  # the merged LoRA deltas
    assert any(n.startswith("vision_tower.") for n in changed)  # trained in full in stage 3
    # From step 1's checkpoint to step 2: the same weights as the run that went straight through. The
    # checkpoint must hold the parts trained in full besides the LoRA adapters (peft saves only those).
    _finetune(projector_run, synthct, resumed, "--max-steps", "2", "--resume", str(straight / "checkpoint-1"))
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
