"""Stage configs: YAML + key=value overrides, every bad value refused by name before any compute."""
import dataclasses
import os

import pytest
import yaml

from med3dvlm.cli import main
from med3dvlm.train.clip import ClipStageConfig
from med3dvlm.train.config import ConfigError, config_to_dict, load_config, parse_overrides
from med3dvlm.train.runner import find_config
from med3dvlm.train.vlm import VLMStageConfig


def test_overrides_parse_as_yaml_values():
    assert parse_overrides(["training.learning_rate=5e-5", "training.bf16=false", "model.image_size=[1, 2, 3]",
                            "data.root="]) == {
        "training": {"learning_rate": "5e-5", "bf16": False}, "model": {"image_size": [1, 2, 3]}, "data": {"root": ""}}
    with pytest.raises(ConfigError, match="overrides are key=value"):
        parse_overrides(["training.learning_rate"])


def test_shipped_configs_hold_the_paper_values():
    clip = load_config(ClipStageConfig, find_config("clip"), ["data.path=/x.json"])
    assert (clip.training.batch_size, clip.training.learning_rate, clip.training.weight_decay) == (64, 1e-4, 0.1)
    assert (clip.training.lr_scheduler, clip.training.warmup_ratio, clip.training.epochs, clip.training.bf16) == \
        ("cosine", 0.03, 100.0, True)
    assert clip.model.vision == "dcformer_small" and clip.model.image_size == [128, 256, 256]
    projector = load_config(VLMStageConfig, find_config("projector"), ["model.vision_from=/x"])
    assert (projector.training.batch_size, projector.training.learning_rate, projector.training.epochs) == (16, 1e-4, 3)
    finetune = load_config(VLMStageConfig, find_config("finetune"), ["model.start_from=/x"])
    assert (finetune.training.batch_size, finetune.training.learning_rate, finetune.training.epochs) == (8, 5e-5, 5)
    assert (finetune.model.max_length, finetune.model.lora_r, finetune.model.lora_alpha) == (512, 16, 32)
    assert finetune.model.lora_dropout == 0.05


def test_a_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(ClipStageConfig, find_config("clip"), ["data.path=/x.json", "training.epochs=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    assert load_config(ClipStageConfig, path) == config
    assert dataclasses.asdict(config)["training"]["epochs"] == 2.0


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.path=/x.json", "training.learning_rte=1"], r"unknown key\(s\) \['training.learning_rte'\]; section "
                                                       r"'training' accepts: batch_size, learning_rate"),
    (["data.path=/x.json", "training.batch_size=big"], "training.batch_size must be int; got str 'big'"),
    (["data.path=/x.json", "training.bf16=1"], "training.bf16 must be bool; got int 1"),
    (["data.path=/x.json", "model.image_size=128"], "model.image_size must be a list; got int 128"),
    (["data.path=/x.json", "model.image_size=[1, x, 3]"], r"model.image_size\[1\] must be int; got str 'x'"),
    (["data.path=/x.json", "model=3"], "model must be a section"),
    ([], r"data.path is required \(the config leaves it at '\?\?\?'\)"),
])
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ClipStageConfig, find_config("clip"), overrides)


@pytest.mark.parametrize(("stage", "overrides", "message"), [
    ("clip", ["data.path=/no/such.json"], r"data.path: '/no/such.json' does not exist"),
    ("clip", ["data.path=/no/such.json", "training.batch_size=0"], r"training.batch_size must be > 0; got 0"),
    ("clip", ["data.path=/no/such.json", "training.warmup_ratio=1.5"], r"training.warmup_ratio must be in \[0, 1\)"),
    ("clip", ["data.path=/no/such.json", "training.deepspeed=/no/ds.json"], r"training.deepspeed: no file at"),
    ("clip", ["data.path=/no/such.json", "training.lr_scheduler=cosinus"], r"training.lr_scheduler must be one of"),
    ("clip", ["data.path=/no/such.json", "model.vision=dcformer_huge"], r"model.vision must be one of \[.*dcformer_nano"),
    ("clip", ["data.path=/no/such.json", "model.siglip_init=clip"], r"model.siglip_init must be one of \['paper', 'released'\]"),
    ("clip", ["data.path=/no/such.json", "model.dist_impl=gathr"], r"model.dist_impl must be one of \['gather', 'ring'\]"),
    ("clip", ["data.path=/no/such.json", "data.preprocessing=hu"], r"data.preprocessing must be one of \['ct_hu'"),
    ("clip", ["data.path=/no/such.json", "data.format=csv"], r"data.format must be one of \['ct_rate', 'm3d_cap'\]"),
    ("clip", ["data.path=/no/such.json", "data.eval_split=null", "training.eval_steps=5"],
     r"training.eval_steps=5 asks for held-out evaluation, but the data section names no held-out set"),
    ("projector", ["model.vision_from=/no/clip", f"data.captions={__file__}"], r"model.vision_from: '/no/clip' does not exist"),
    ("projector", ["model.vision_from=/no/clip"], r"data.captions and data.vqa are both empty"),
    ("projector", ["model.vision_from=/no/clip", "model.projector=linear", f"data.captions={__file__}"],
     r"model.projector must be one of \['mixer', 'mlp'\]"),
    ("finetune", ["model.start_from=/no/stage2", f"data.vqa={__file__}"], r"model.start_from: '/no/stage2' does not exist"),
    ("finetune", [f"model.start_from={os.path.dirname(__file__)}", f"data.vqa={__file__}", "--resume", "/no/checkpoint-3"],
     r"--resume '/no/checkpoint-3': no such checkpoint folder"),
])
def test_the_command_refuses_bad_configs_before_any_compute(stage, overrides, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", stage, "--config", stage, "--output-dir", str(tmp_path / "run"), *overrides])
    assert exit_info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # nothing was built or written


def test_config_names_and_files(tmp_path):
    assert find_config("demo/clip").name == "clip.yaml" and find_config("clip.yaml") == find_config("clip")
    own = tmp_path / "mine.yaml"
    own.write_text("data: {path: /x.json}\n")
    assert find_config(own) == own
    with pytest.raises(ConfigError, match=r"no such file, nor a shipped config \(clip, demo/clip"):
        find_config("cllip")


def test_every_command_has_help(capsys):
    for argv in (["--help"], ["train", "--help"], ["train", "clip", "--help"], ["train", "projector", "--help"],
                 ["train", "finetune", "--help"], ["synth", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        assert "usage:" in capsys.readouterr().out
