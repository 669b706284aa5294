"""``med3dvlm eval`` on saved tiny models and the session's SynthCT set: each task's numbers equal
the same computation done by hand, the files it writes, and its usage errors."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from med3dvlm.cli import main as cli_main
from med3dvlm.data import CTRATEDataset, M3DCapDataset, VolumePreprocessor
from med3dvlm.data.synth.phantom import LABELS
from med3dvlm.eval.generation import Decoding
from med3dvlm.eval.retrieval import retrieval_recall
from med3dvlm.eval.runner import EvalUsageError, evaluate_report, evaluate_retrieval, evaluate_vqa, evaluate_zeroshot
from med3dvlm.eval.zeroshot import detection_scores, zeroshot_probabilities, zeroshot_prompts
from med3dvlm.models.vlm import Med3DCLIPConfig, Med3DCLIPModel
from vlm_parts import IMAGE_SIZE, TINY_VISION, make_tokenizer, make_vlm, tiny_bert_config


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A saved tiny dual encoder with its tokenizer and preprocessor (as stage 1 leaves it)."""
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model = Med3DCLIPModel(Med3DCLIPConfig(vision_config=TINY_VISION, text_config=tiny_bert_config(),
                                           projection_dim=16)).eval()
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    VolumePreprocessor.from_preset("med3dvlm", spatial_size=IMAGE_SIZE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A saved tiny VLM with its processor (as stages 2 and 3 leave it)."""
    folder = tmp_path_factory.mktemp("vlm")
    model, processor = make_vlm()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _by_hand_embeddings(clip_dir, texts, volumes):
    model = Med3DCLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        images = torch.cat([model.encode_image(v[None]) for v in volumes])  # one at a time: batching is not the point
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")  # its positions
        return model, tokenizer, images, model.encode_text(tokens["input_ids"], tokens["attention_mask"])


def test_retrieval_equals_the_computation_by_hand(clip_dir, synthct, tmp_path):
    result = evaluate_retrieval(clip_dir, synthct / "m3d_cap.json", split="train", sizes=[5, 100], batch_size=3)
    data = M3DCapDataset(synthct / "m3d_cap.json", "train",
                         preprocessor=VolumePreprocessor.from_pretrained(clip_dir))
    items = [data[i] for i in range(5)]
    _, _, images, texts = _by_hand_embeddings(clip_dir, [i["text"] for i in items], [i["pixel_values"] for i in items])
    expected = retrieval_recall(images, texts)
    assert set(result.metrics) == {"5"}  # 100 > the 12 training items: left out, and said so
    assert result.metrics["5"] == pytest.approx(expected, abs=1e-6)
    assert result.reference["5"] == {"r1": 0.2, "r5": 1.0, "r10": 1.0}
    assert any("N = 100 left out" in note for note in result.notes)
    json_path, md_path = result.write(tmp_path)
    assert json.loads(json_path.read_text())["metrics"]["5"] == result.metrics["5"]
    markdown = md_path.read_text()
    assert "- protocol: first N pairs" in markdown and "- command:" in markdown and "| 5 |" in markdown


def test_zeroshot_equals_the_computation_by_hand(clip_dir, synthct):
    reports, labels = synthct / "ctrate_reports_train.csv", synthct / "ctrate_labels_train.csv"
    result = evaluate_zeroshot(clip_dir, reports, labels, num_items=6, batch_size=4, data_root=synthct / "volumes")
    data = CTRATEDataset(reports, labels, synthct / "volumes", preprocessor=VolumePreprocessor.from_pretrained(clip_dir))
    items = [data[i] for i in range(6)]
    prompts = [zeroshot_prompts(name) for name in LABELS]
    model, _, images, _ = _by_hand_embeddings(clip_dir, ["x"], [i["pixel_values"] for i in items])
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        embed = lambda texts: model.encode_text(**tokenizer(texts, padding=True, return_tensors="pt"))  # noqa: E731
        probabilities = zeroshot_probabilities(images, embed([p for p, _ in prompts]), embed([a for _, a in prompts]),
                                               model.siglip.logit_scale.exp().item())
    expected = detection_scores(probabilities, torch.stack([i["labels"] for i in items]), LABELS)
    assert list(result.metrics["per_label"]) == list(LABELS)
    for key, value in expected["overall"].items():
        assert result.metrics["overall"][key] == pytest.approx(value, abs=1e-6), key


def test_report_batched_greedy_equals_one_at_a_time(vlm_dir, synthct, tmp_path):
    decoding = Decoding(max_new_tokens=4)
    batched = evaluate_report(vlm_dir, synthct / "m3d_cap.json", split="train", num_items=5, batch_size=3,
                              decoding=decoding)
    single = evaluate_report(vlm_dir, synthct / "m3d_cap.json", split="train", num_items=5, batch_size=1,
                             decoding=decoding, baseline_split=None)
    assert [s["prediction"] for s in batched.samples] == [s["prediction"] for s in single.samples]
    assert len(batched.samples) == 5 and all(s["reference"] for s in batched.samples)
    assert set(batched.reference["copy_baseline"]) >= {"bleu1", "rougeL", "meteor"}
    assert batched.reference["copy_baseline_report"] in [r["text"] for r in json.loads(
        (synthct / "m3d_cap.json").read_text())["train"]]
    assert single.reference == {}
    batched.samples = batched.samples[:1]  # as demo/results.md shows them: the count stays the evaluated one
    markdown = batched.markdown()
    assert "copy baseline" in markdown and "**Volume 0**" in markdown and "model (5 reports)" in markdown


def test_report_sampling_is_seeded(vlm_dir, synthct):
    run = lambda seed: [s["prediction"] for s in evaluate_report(  # noqa: E731
        vlm_dir, synthct / "m3d_cap.json", split="train", num_items=3, batch_size=2, baseline_split=None,
        decoding=Decoding(max_new_tokens=6, sample=True, seed=seed)).samples]
    first = run(3)
    assert run(3) == first


def test_vqa_scores_every_question_of_both_forms(vlm_dir, synthct):
    rows = sum(1 for _ in open(synthct / "m3d_vqa_test.csv")) - 1
    result = evaluate_vqa(vlm_dir, synthct / "m3d_vqa_test.csv", mode="both", batch_size=4,
                          decoding=Decoding(max_new_tokens=3), prior_data=synthct / "m3d_vqa_train.csv")
    assert result.metrics["closed"]["count"] == rows and result.metrics["open"]["count"] == rows
    assert len(result.samples) == 2 * rows
    assert sum(part["count"] for part in result.metrics["closed"]["per_type"].values()) == rows
    assert result.reference["closed_chance"] == 0.25
    prior = result.reference["answer_prior"]
    assert prior["closed"]["count"] == rows and prior["closed"]["no_single_choice"] == 0  # always one choice
    markdown = result.markdown()
    assert "accuracy, strict rule" in markdown and "answer prior, no image" in markdown


def test_a_task_refuses_the_other_stage_s_model(clip_dir, vlm_dir, synthct):
    with pytest.raises(EvalUsageError, match="'med3d_clip' model; `med3dvlm eval report` needs a 'med3dvlm'"):
        evaluate_report(clip_dir, synthct / "m3d_cap.json")
    with pytest.raises(EvalUsageError, match="needs a 'med3d_clip'"):
        evaluate_retrieval(vlm_dir, synthct / "m3d_cap.json")


def test_bad_data_and_counts_are_usage_errors_before_the_model_loads(clip_dir, vlm_dir, synthct, monkeypatch):
    from med3dvlm.eval import runner

    def no_loading(*args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(runner, "_load_clip", no_loading)
    monkeypatch.setattr(runner, "_load_vlm", no_loading)
    with pytest.raises(EvalUsageError, match=r"--data .*no split 'nosuch'"):
        evaluate_retrieval(clip_dir, synthct / "m3d_cap.json", split="nosuch")
    with pytest.raises(EvalUsageError, match="--num-items must be >= 1; got 0"):
        evaluate_vqa(vlm_dir, synthct / "m3d_vqa_test.csv", num_items=0)
    with pytest.raises(EvalUsageError, match="--batch-size must be >= 1"):
        evaluate_zeroshot(clip_dir, synthct / "ctrate_reports_test.csv", synthct / "ctrate_labels_test.csv",
                          batch_size=0)
    with pytest.raises(EvalUsageError, match=r"--baseline-split .*no split 'other'"):
        evaluate_report(vlm_dir, synthct / "m3d_cap.json", baseline_split="other")


def test_cli_usage_errors_exit_2_naming_the_flag(clip_dir, synthct, tmp_path, capsys):
    cases = [
        (["eval", "retrieval", "--model", str(tmp_path), "--data", str(synthct / "m3d_cap.json"), "--output",
          str(tmp_path)], "--model"),
        (["eval", "retrieval", "--model", str(clip_dir), "--data", str(tmp_path / "none.json"), "--output",
          str(tmp_path)], "--data"),
        (["eval", "report", "--model", str(clip_dir), "--data", str(synthct / "m3d_cap.json"), "--output",
          str(tmp_path), "--sample", "--temperature", "0"], "temperature"),
    ]
    for argv, flag in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 2
        assert flag in capsys.readouterr().err


def test_cli_writes_both_files(clip_dir, synthct, tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run([sys.executable, "-m", "med3dvlm", "eval", "retrieval", "--model", str(clip_dir),
                                "--data", str(synthct / "m3d_cap.json"), "--split", "train", "--sizes", "4",
                                "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    saved = json.loads((out / "retrieval.json").read_text())
    assert saved["command"].startswith("med3dvlm eval retrieval --model")
    assert set(saved["metrics"]["4"]) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert (out / "retrieval.md").read_text().startswith("# retrieval")
