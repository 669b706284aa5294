"""Text metrics of reports and open answers (med3dvlm.eval.metrics.caption_scores), offline WordNet
(med3dvlm.eval.wordnet): hand-worked examples, the reference packages called directly, and what
happens without WordNet."""
import gzip
import math
import re
from pathlib import Path

import pytest

from med3dvlm.eval import wordnet as wordnet_module
from med3dvlm.eval.metrics import (TEXT_METRICS, caption_scores, caption_scores_per_sample,
                                   meteor_tokens)
from med3dvlm.eval.wordnet import (DATABASE_FILES, LEXNAMES, WordNetUnavailable,
                                   build_wordnet_folder, lexnames_text)

NO_WORDNET = ("WordNet not built for NLTK: apt-get install wordnet-base wordnet-sense-index, then "
              "python -m med3dvlm.eval.wordnet")


@pytest.fixture(scope="module")
def wordnet():
    try:
        return wordnet_module.load_wordnet()
    except WordNetUnavailable:
        pytest.skip(NO_WORDNET)


def one(prediction, reference):
    return {k: v[0] for k, v in caption_scores_per_sample([prediction], [reference]).items()}


# ---- BLEU: sacrebleu, tokenizer 13a, brevity penalty, no smoothing -----------------------------

def test_bleu_by_hand_with_brevity_penalty():
    # 5 prediction tokens against 6: brevity penalty exp(1 - 6/5). All 5 unigrams match (the
    # reference has "the" twice); bigrams the-cat, cat-sat, sat-on match, on-mat does not: 3/4;
    # trigrams 2/3; 4-grams 1/2.
    scores = one("the cat sat on mat", "the cat sat on the mat")
    bp = math.exp(1 - 6 / 5)
    assert scores["bleu1"] == pytest.approx(bp * 1.0)
    assert scores["bleu2"] == pytest.approx(bp * math.sqrt(1.0 * 3 / 4))
    assert scores["bleu3"] == pytest.approx(bp * (1.0 * 3 / 4 * 2 / 3) ** (1 / 3))
    assert scores["bleu4"] == pytest.approx(bp * (1.0 * 3 / 4 * 2 / 3 * 1 / 2) ** (1 / 4))


def test_bleu_13a_splits_punctuation_and_keeps_case():
    # "The cat sat." -> The, cat, sat, "." against the, cat, sat, ".": 3 of 4 unigrams, same length.
    scores = one("The cat sat.", "the cat sat.")
    assert scores["bleu1"] == pytest.approx(3 / 4)
    assert scores["bleu2"] == pytest.approx(math.sqrt(3 / 4 * 2 / 3))


def test_bleu_is_unsmoothed():
    # Two tokens have no trigram: BLEU-3 and BLEU-4 are 0 (HF evaluate's default), not smoothed up.
    scores = one("cat sat", "cat sat")
    assert scores["bleu1"] == pytest.approx(1.0) and scores["bleu2"] == pytest.approx(1.0)
    assert scores["bleu3"] == 0.0 and scores["bleu4"] == 0.0


@pytest.mark.filterwarnings("ignore::UserWarning:nltk.translate.bleu_score")  # its 0 notice
def test_bleu_agrees_with_nltk_and_sacrebleu_sentence_bleu():
    from nltk.translate.bleu_score import sentence_bleu
    import sacrebleu
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    pairs = [("The liver is enlarged, with a 3 cm hypodense lesion in segment 4.",
              "The liver is mildly enlarged. A 3 cm hypodense lesion is seen in segment 4."),
             ("No acute abnormality of the chest is seen on this CT scan of the chest.",
              "No acute abnormality in the chest."),
             ("Axial plane", "The axial plane")]
    per_sample = caption_scores_per_sample(*zip(*pairs))
    tokenize = Tokenizer13a()
    for i, (prediction, reference) in enumerate(pairs):
        for order in range(1, 5):  # NLTK's BLEU is an independent implementation of the same formula
            expected = sentence_bleu([tokenize(reference).split()], tokenize(prediction).split(),
                                     weights=(1 / order,) * order)
            assert per_sample[f"bleu{order}"][i] == pytest.approx(expected, abs=1e-9), (i, order)
        sentence = sacrebleu.sentence_bleu(prediction, [reference], smooth_method="none",
                                           use_effective_order=False)
        assert per_sample["bleu4"][i] == pytest.approx(sentence.score / 100)


# ---- ROUGE: rouge-score F-measure, no stemming -------------------------------------------------

def test_rouge_by_hand():
    # 7 prediction tokens, 6 reference tokens, 6 shared unigrams (and an LCS of 6):
    # P = 6/7, R = 1, F = 12/13.
    scores = one("the cat was found under the bed", "the cat was under the bed")
    assert scores["rouge1"] == pytest.approx(12 / 13)
    assert scores["rougeL"] == pytest.approx(12 / 13)
    # The same three words in another order: every unigram matches, the longest common
    # subsequence is 2 of 3 words.
    scores = one("cat the sat", "the cat sat")
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rougeL"] == pytest.approx(2 / 3)


def test_rouge_tokenizer_lowercases_drops_punctuation_and_does_not_stem():
    assert one("The CAT, sat!", "the cat sat")["rouge1"] == pytest.approx(1.0)
    # "lesions" vs "lesion": a stemmer would match them, no stemming does not (1 of 2 words each).
    assert one("lesions seen", "lesion seen")["rouge1"] == pytest.approx(0.5)


def test_rouge_agrees_with_rouge_score():
    from rouge_score.rouge_scorer import RougeScorer

    prediction, reference = "Hypodense lesion in the right lobe of the liver.", "A lesion of the right liver lobe."
    expected = RougeScorer(["rouge1", "rougeL"], use_stemmer=False).score(reference, prediction)
    scores = one(prediction, reference)
    assert scores["rouge1"] == pytest.approx(expected["rouge1"].fmeasure)
    assert scores["rougeL"] == pytest.approx(expected["rougeL"].fmeasure)


# ---- METEOR: NLTK, alpha 0.9, beta 3, gamma 0.5, WordNet synonyms ---------------------------------

def test_meteor_tokens_split_sentences_like_word_tokenize():
    # word_tokenize splits sentences first, so a sentence's final period becomes its own token;
    # NLTK's word tokenizer alone would leave "enlarged." whole.
    assert meteor_tokens("The liver is enlarged. No focal lesion, it's normal.") == [
        "The", "liver", "is", "enlarged", ".", "No", "focal", "lesion", ",", "it", "'s", "normal", "."]


@pytest.mark.parametrize("text, tokens", [("the liver is enlarged", 4), ("The liver is enlarged.", 5),
                                          ("The liver is enlarged. The spleen is normal.", 10)])
def test_meteor_exact_match_by_hand(wordnet, text, tokens):
    # Every token matches in one chunk: F-mean 1, fragmentation 1/n, score 1 - 0.5 (1/n)^3.
    assert one(text, text)["meteor"] == pytest.approx(1 - 0.5 * (1 / tokens) ** 3)


def test_meteor_synonyms_come_from_wordnet(wordnet):
    # "tumour" and "tumor" share WordNet's synset tumor.n.01: all 3 words match in one chunk.
    # Without WordNet only "a renal" would: P = R = 2/3 with fragmentation 1/2,
    # (1 - 0.5 (1/2)^3) 2/3 = 0.625.
    assert one("a renal tumour", "a renal tumor")["meteor"] == pytest.approx(1 - 0.5 / 27)
    assert wordnet.synset("dog.n.01").lexname() == "noun.animal"  # read through our lexnames


def test_meteor_agrees_with_nltk_and_hf_evaluate_example(wordnet):
    from nltk.translate.meteor_score import single_meteor_score

    # The example of HF evaluate's meteor metric card (the official scripts' METEOR): 0.6944.
    prediction = ("It is a guide to action which ensures that the military always obeys the "
                  "commands of the party")
    reference = "It is a guide to action that ensures that the military will forever heed Party commands"
    score = one(prediction, reference)["meteor"]
    assert round(score, 4) == 0.6944
    expected = single_meteor_score(meteor_tokens(reference), meteor_tokens(prediction),
                                   wordnet=wordnet, alpha=0.9, beta=3, gamma=0.5)
    assert score == pytest.approx(expected)


# ---- the function as a whole ---------------------------------------------------------------------

def test_caption_scores_is_the_mean_of_per_sample_scores(wordnet):
    predictions = ["the cat sat on mat", "a renal tumour", "The CAT, sat!"]
    references = ["the cat sat on the mat", "a renal tumor", "the cat sat"]
    per_sample = caption_scores_per_sample(predictions, references)
    scores = caption_scores(predictions, references)
    assert set(per_sample) == set(TEXT_METRICS)
    assert scores["missing"] == {}
    for metric in TEXT_METRICS:
        assert len(per_sample[metric]) == 3
        assert scores[metric] == pytest.approx(sum(per_sample[metric]) / 3)
        assert 0.0 <= scores[metric] <= 1.0


def test_empty_prediction_scores_zero(wordnet):
    scores = caption_scores(["", "   "], ["The liver is normal.", "No lesion."])
    assert {k: scores[k] for k in TEXT_METRICS} == dict.fromkeys(TEXT_METRICS, 0.0)


def test_mismatched_lengths_name_both():
    with pytest.raises(ValueError, match="2 predictions and 1 references"):
        caption_scores(["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"predictions\[1\] must be a str; got NoneType"):
        caption_scores(["a", None], ["a", "b"])
    with pytest.raises(ValueError, match="non-empty"):
        caption_scores([], [])


def test_without_wordnet_meteor_is_reported_missing(monkeypatch):
    def unavailable():
        raise WordNetUnavailable(f"no WordNet here. Install it: {wordnet_module.INSTALL_HINT}")

    monkeypatch.setattr(wordnet_module, "load_wordnet", unavailable)
    per_sample = caption_scores_per_sample(["the cat sat on mat"], ["the cat sat on the mat"])
    assert per_sample["meteor"] == [None]
    scores = caption_scores(["the cat sat on mat"], ["the cat sat on the mat"])
    assert scores["meteor"] is None
    assert "apt-get install wordnet-base wordnet-sense-index" in scores["missing"]["meteor"]
    assert scores["bleu1"] == pytest.approx(math.exp(1 - 6 / 5))  # the others are still computed


# ---- the WordNet folder --------------------------------------------------------------------------

def test_lexnames_match_the_wordnet_manual():
    assert len(LEXNAMES) == 45 and len(set(LEXNAMES)) == 45
    lines = lexnames_text().splitlines()
    assert lines[0] == "00\tadj.all\t3" and lines[2] == "02\tadv.all\t4"
    assert lines[3] == "03\tnoun.Tops\t1" and lines[29] == "29\tverb.body\t2" and lines[44] == "44\tadj.ppl\t3"
    manual = Path("/usr/share/man/man5/lexnames.5WN.gz")  # installed with wordnet-base
    if not manual.is_file():
        pytest.skip("the lexnames(5WN) manual page is not installed (wordnet-base)")
    table = re.findall(r"^(\d\d)\t(\S+)\s*\t", gzip.decompress(manual.read_bytes()).decode(), re.M)
    assert [(f"{i:02d}", name) for i, name in enumerate(LEXNAMES)] == table


def test_build_refuses_a_folder_without_wordnet(tmp_path):
    with pytest.raises(WordNetUnavailable, match="data.noun.*apt-get install wordnet-base"):
        build_wordnet_folder(source=tmp_path, nltk_data=tmp_path / "nltk_data")


def test_load_says_how_to_install_when_nltk_finds_no_wordnet(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(WordNetUnavailable, match="python -m med3dvlm.eval.wordnet"):
        wordnet_module.load_wordnet.__wrapped__()  # uncached: the session's reader stays


def test_build_copies_the_database_and_is_idempotent(tmp_path):
    source = wordnet_module.source_dir()
    if not all((source / name).is_file() for name in DATABASE_FILES):
        pytest.skip(NO_WORDNET)
    folder = build_wordnet_folder(source=source, nltk_data=tmp_path)
    assert folder == tmp_path / "corpora" / "wordnet"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*DATABASE_FILES, "lexnames"])
    for name in DATABASE_FILES:  # copies, not links: NLTK refuses files outside the corpus root
        assert not (folder / name).is_symlink()
        assert (folder / name).stat().st_size == (source / name).stat().st_size
    assert (folder / "lexnames").read_text() == lexnames_text()
    before = {p.name: p.stat().st_ino for p in folder.iterdir()}
    assert build_wordnet_folder(source=source, nltk_data=tmp_path) == folder
    assert {p.name: p.stat().st_ino for p in folder.iterdir()} == before  # nothing rewritten
