"""gslm.metrics: every metric equal to its reference (SQuAD's script, scikit-learn, sacrebleu, rouge_score) on random and real inputs."""
import random

import pytest

from gslm.metrics import exact_match, normalize_text, token_f1


def _rand_texts(n, seed=0):
    rng = random.Random(seed)
    vocab = ["the", "The", "a", "an", "An", "cat", "Cat", "sat", "mat", "on", "theatre", "anna", "1889", "U.S.", "don't", "-", ",", "!", "é"]
    def one(): return rng.choice(["", " ", "\t"]).join(rng.choice(vocab) + rng.choice(["", " ", "  ", ".", ","]) for _ in range(rng.randint(1, 8)))
    return [(one(), one()) for _ in range(n)]


def test_squad_normalisation_and_f1_equal_the_official_script():
    from lm_eval.tasks.qasper.metrics import f1_abstractive, normalize_answer   # a verbatim copy of SQuAD v1.1's script
    for p, r in _rand_texts(3000):
        assert normalize_text(p) == normalize_answer(p)
        if normalize_text(p) and normalize_text(r):
            assert token_f1([p], [r]) == pytest.approx(f1_abstractive([p], [r]), abs=1e-12)
        assert exact_match([p], [r]) == float(normalize_answer(p) == normalize_answer(r))


def test_exact_match_and_f1_by_hand():
    assert normalize_text("  The  Eiffel-Tower, an icon! ") == "eiffeltower icon"
    preds = ["The Eiffel Tower.", "Paris, France", "1889", "Gustave"]
    refs = ["eiffel tower", ["Paris", "Paris, France"], "in 1889", "Gustave Eiffel"]
    assert exact_match(preds, refs) == 0.5
    assert exact_match(preds, refs, normalize=False) == 0.25
    assert token_f1(["1889"], ["in 1889"]) == pytest.approx(2 / 3)
    assert token_f1(["a b c"], [["x", "b c"]]) == 1.0            # max over references (articles dropped: "b c" vs "b c")
    assert token_f1([""], [""]) == 1.0 and token_f1(["x"], [""]) == 0.0


def test_bad_input_says_what_to_do():
    with pytest.raises(TypeError, match="one string"): exact_match(["a"], "a")
    with pytest.raises(ValueError, match="2 predictions but 1 references"): token_f1(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one reference"): exact_match(["a"], [[]])
    with pytest.raises(ValueError, match="no predictions"): exact_match([], [])


# --- classification and regression: scikit-learn ---------------------------------------------------------------

import math
import warnings

import numpy as np
import torch

from gslm.metrics import (accuracy, confusion_matrix, precision_recall_f1, f1, precision, recall, mse, mae, r2,
                          Perplexity, perplexity, text_perplexity, window_spans, bleu, chrf, ter, corpus_bleu, tokenize_13a,
                          rouge, rouge_n, evaluate_module, write_evaluate_modules)
from gslm.prompts import rouge_l


def _class_cases():
    rng = np.random.default_rng(1)
    yield rng.integers(0, 2, 60), rng.integers(0, 2, 60), True
    yield rng.integers(0, 6, 90), rng.integers(0, 4, 90), False          # classes 4, 5 never predicted
    yield rng.integers(2, 5, 40), rng.integers(0, 7, 40), False          # classes never true
    yield np.array(list("xxyyyzz")), np.array(list("xyyzyzx")), False
    yield np.ones(7, int), np.ones(7, int), True                         # one class only
    yield np.array([0, 0, 0]), np.array([0, 0, 0]), True                  # pos_label 1 absent: 0/0 everywhere


def test_classification_equals_scikit_learn():
    skm = pytest.importorskip("sklearn.metrics")
    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t, p, binary in _class_cases():
            assert accuracy(t, p) == skm.accuracy_score(t, p)
            np.testing.assert_array_equal(confusion_matrix(t, p), skm.confusion_matrix(t, p))
            labels = list(dict.fromkeys([sorted(set(t.tolist()))[0], sorted(set(p.tolist()))[-1], "absent" if t.dtype.kind == "U" else 99]))
            np.testing.assert_array_equal(confusion_matrix(t, p, labels=labels), skm.confusion_matrix(t, p, labels=labels))
            for average in ["micro", "macro", "weighted", None] + (["binary"] if binary else []):
                for zd in ["warn", 0, 1, float("nan")]:
                    ours = precision_recall_f1(t, p, average=average, zero_division=zd)
                    ref = skm.precision_recall_fscore_support(t, p, average=average, zero_division=zd)[:3]
                    np.testing.assert_allclose(np.array(ours, dtype=float), np.array(ref, dtype=float), atol=1e-12, rtol=0, equal_nan=True)
                    ours_l = precision_recall_f1(t, p, average=average if average != "binary" else "macro", labels=labels, zero_division=zd)
                    ref_l = skm.precision_recall_fscore_support(t, p, average=average if average != "binary" else "macro", labels=labels, zero_division=zd)[:3]
                    np.testing.assert_allclose(np.array(ours_l, dtype=float), np.array(ref_l, dtype=float), atol=1e-12, rtol=0, equal_nan=True)
                    n += 1
    assert n > 60


def test_classification_warns_and_rejects_bad_input():
    t, p = np.array([0, 1, 2, 2]), np.array([0, 1, 1, 1])
    with pytest.warns(UserWarning, match="zero_division"): precision(t, p, average="macro")
    assert f1(t, p, average="micro") == accuracy(t, p) == 0.5
    assert recall(t, p, average="macro", zero_division=0) == pytest.approx((1 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="average='binary' needs at most two classes"): f1(t, p)
    with pytest.raises(ValueError, match="pos_label=5"): f1([0, 1], [1, 0], pos_label=5)
    with pytest.raises(ValueError, match="aligned"): accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="average='mean'"): f1(t, p, average="mean")
    with pytest.raises(ValueError, match="zero_division"): f1(t, p, average="macro", zero_division=2)


def test_regression_equals_scikit_learn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    for t, p in [(rng.normal(size=50), rng.normal(size=50)), (rng.normal(size=(30, 4)), rng.normal(size=(30, 4))),
                 (np.full(4, 3.0), np.full(4, 3.0)), (np.full(4, 3.0), np.arange(4.0)), ([1, 2, 3], [1, 2, 4])]:
        assert mse(t, p) == pytest.approx(skm.mean_squared_error(t, p), abs=1e-12)
        assert mae(t, p) == pytest.approx(skm.mean_absolute_error(t, p), abs=1e-12)
        assert r2(t, p) == pytest.approx(skm.r2_score(t, p), abs=1e-12)
    with pytest.raises(ValueError, match="must match"): mse([1, 2], [1])


# --- perplexity: transformers' loss ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from gslm.models import load_model
    return load_model("gslm-tiny", device="cpu")


def test_perplexity_equals_the_models_loss_and_the_guide_loop(tiny, one_thread):
    model, tok = tiny
    ids = torch.tensor(tok("ROMEO: But soft, what light through yonder window breaks? " * 12).input_ids)
    assert len(ids) > 100
    res = perplexity(model, ids[:100], window=256)
    with torch.no_grad(): loss = model(ids[None, :100], labels=ids[None, :100]).loss.item()
    assert res.tokens == 99 and res.nll_per_token == pytest.approx(loss, rel=1e-5) and res.ppl == pytest.approx(math.exp(loss), rel=1e-5)
    # sliding window: the transformers guide's loop, each window weighted by its exact count of scored tokens
    for window, stride in [(64, 16), (64, 64), (50, 7)]:
        nll, count, prev_end = 0.0, 0, 0
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids)); trg = end - prev_end
            x = ids[None, begin:end]; y = x.clone(); y[:, :-trg] = -100
            with torch.no_grad(): l = model(x, labels=y).loss.item()
            k = int((y[:, 1:] != -100).sum()); nll += l * k; count += k; prev_end = end
            if end == len(ids): break
        r = perplexity(model, ids, window=window, stride=stride, batch_size=3)
        assert r.tokens == count and r.nll == pytest.approx(nll, rel=1e-4)
    assert perplexity(model, ids, window=64, stride=16).tokens == len(ids) - 1      # stride < window: every token once


def test_window_spans_and_bits_per_byte(tiny):
    assert window_spans(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    for n, w, s in [(100, 16, 5), (17, 16, 16), (3, 2, 1), (64, 64, 64)]:
        scored = [i for _, e, f in window_spans(n, w, s) for i in range(f, e)]
        assert len(scored) == len(set(scored)) and set(scored) <= set(range(1, n))
        if s < w: assert scored == list(range(1, n))
    model, tok = tiny
    text = "KING: Now is the winter of our discontent. é"
    r = text_perplexity(model, tok, text)
    assert r.tokens == len(tok(text, add_special_tokens=False).input_ids) and r.n_bytes == len(text.encode())
    assert r.bits_per_byte == pytest.approx(r.nll / math.log(2) / r.n_bytes)
    both = r + r
    assert both.ppl == pytest.approx(r.ppl) and both.tokens == 2 * r.tokens
    with pytest.raises(ValueError, match="stride=9"): window_spans(10, 8, 9)
    with pytest.raises(ValueError, match="one sequence"): perplexity(model, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="bits_per_byte needs n_bytes"): Perplexity(1.0, 2).bits_per_byte


# --- BLEU, chrF, TER: sacrebleu; ROUGE: rouge_score -------------------------------------------------------------

def _sentences(n, seed):
    rng = random.Random(seed)
    words = "the a cat dog sat on mat . , quickly 3.5 - runs & (x) naïve".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 14))) for _ in range(n)], rng


def test_bleu_from_scratch_equals_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    t13 = Tokenizer13a()
    rng = random.Random(3)
    chars = list("ab Z09 .,-;:!?'\"()[]{}&/<>\n") + ["&amp;", "&lt;", "<skipped>", " 2.5 ", "-\n", "ü"]
    for _ in range(1000):
        line = "".join(rng.choice(chars) for _ in range(rng.randint(0, 30)))
        assert tokenize_13a(line) == t13(line.rstrip()).split()
    for trial in range(150):
        m = rng.randint(1, 6)
        hyps, _ = _sentences(m, trial)
        refs = [_sentences(rng.randint(1, 3), 1000 * trial + i)[0] for i in range(m)]
        streams = [[r[i] if i < len(r) else None for r in refs] for i in range(max(map(len, refs)))]
        for kw in [{}, {"lowercase": True}, {"smooth_method": "none"}]:
            ref = sacrebleu.corpus_bleu(hyps, streams, **kw)
            ours = corpus_bleu(hyps, refs, lowercase=kw.get("lowercase", False), smooth="none" if "smooth_method" in kw else "exp")
            assert ours.score == pytest.approx(ref.score, abs=1e-9) and (ours.sys_len, ours.ref_len) == (ref.sys_len, ref.ref_len)
            assert bleu(hyps, refs, **kw) == ref.score


def test_sacrebleu_wrappers_take_references_per_prediction():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["the cat sat on the mat", "a dog runs"]
    refs = [["the cat sat on a mat", "a cat sat on the mat"], "the dog runs"]
    streams = [["the cat sat on a mat", "the dog runs"], ["a cat sat on the mat", None]]
    assert bleu(hyps, refs) == sacrebleu.corpus_bleu(hyps, streams).score
    assert chrf(hyps, refs) == sacrebleu.corpus_chrf(hyps, streams).score
    assert chrf(hyps, refs, word_order=2) == sacrebleu.corpus_chrf(hyps, streams, word_order=2).score
    assert ter(hyps, refs) == sacrebleu.corpus_ter(hyps, streams).score
    assert bleu(["x y z w"], ["x y z w"]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 predictions but 1 references"): bleu(hyps, ["a"])


def test_rouge_equals_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"])
    preds, _ = _sentences(300, 5); refs, _ = _sentences(300, 6)
    refs = [r + "\nThe cat. " + r[::-1] for r in refs]
    for c, r in zip(preds, refs):
        s = sc.score(r, c)
        assert rouge_l(c, r) == pytest.approx(s["rougeL"].fmeasure, abs=1e-12)
        assert rouge_n(c, r, 1) == pytest.approx(s["rouge1"].fmeasure, abs=1e-12)
        assert rouge_n(c, r, 2) == pytest.approx(s["rouge2"].fmeasure, abs=1e-12)
    got = rouge(preds, refs)
    for k in ["rouge1", "rouge2", "rougeL", "rougeLsum"]:
        assert got[k] == pytest.approx(np.mean([sc.score(r, c)[k].fmeasure for c, r in zip(preds, refs)]), abs=1e-12)
    multi = rouge(["the cat sat"], [["a dog", "the cat sat"]])
    assert multi["rougeL"] == 1.0


# --- evaluate offline -------------------------------------------------------------------------------------------

def test_evaluate_modules_load_offline_and_equal_gslm(tmp_path):
    evaluate = pytest.importorskip("evaluate")
    paths = write_evaluate_modules(tmp_path)
    assert set(paths) >= {"exact_match", "bleu", "chrf", "ter", "rouge", "classification", "regression"}
    preds, refs = ["The cat sat.", "a dog runs fast"], ["the cat sat", "the dog runs"]
    got = evaluate.load(str(paths["exact_match"].parent)).compute(predictions=preds, references=refs)
    assert got == {"exact_match": exact_match(preds, refs), "f1": token_f1(preds, refs)}
    got = evaluate.load(evaluate_module("bleu")).compute(predictions=preds, references=[[r] for r in refs])
    assert got["bleu"] == bleu(preds, refs)
    got = evaluate.load(evaluate_module("classification")).compute(predictions=[0, 1, 1], references=[0, 1, 0], average="macro")
    assert got["f1"] == pytest.approx(f1([0, 1, 0], [0, 1, 1], average="macro"))
    with pytest.raises(ValueError, match="choose one of"): evaluate_module("meteor")
