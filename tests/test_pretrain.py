"""gslm.pretrain: the causal-LM loss equals transformers'; the committed gslm-tiny loads, generates and round-trips text."""
import time

import pytest
import torch

from gslm.pretrain import (PretrainConfig, causal_lm_loss, encode_corpus, evaluate_lm, fit_power_law, format_scene,
                           parse_play, pretrain, sample_text, tiny_llama)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_causal_lm_loss_equals_transformers():
    from gslm.models import tiny_model
    hf = tiny_model("llama", seed=1).eval()
    ids = torch.randint(0, hf.config.vocab_size, (4, 23), generator=torch.Generator().manual_seed(3))
    labels = ids.clone(); labels[0, :7] = -100; labels[3, -4:] = -100
    with torch.no_grad():
        out = hf(ids, labels=labels)
        plain = hf(ids, labels=ids).loss
    torch.testing.assert_close(causal_lm_loss(out.logits, ids, labels), out.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(causal_lm_loss(out.logits, ids), plain, rtol=1e-6, atol=1e-6)
    # not shifting would be a different (wrong) number
    unshifted = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids.flatten())
    assert abs(unshifted.item() - plain.item()) > 1e-3


def test_causal_lm_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="disagree"):
        causal_lm_loss(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


def test_parse_play_formats_speeches():
    md = ("# A Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n_Enter two Witches_\n\n**First Witch**  \nWhen shall we meet?  \n"
          "Anon.\n\n**ALL**  \nFair is foul.\n\n_Exeunt_\n")
    title, scenes = parse_play(md)
    assert title == "A Play" and [s["scene"] for s in scenes] == ["ACT I", "SCENE I. A heath."]
    assert format_scene(scenes[1]["speeches"]) == "FIRST WITCH:\nWhen shall we meet?\nAnon.\n\nALL:\nFair is foul."


def test_fit_power_law_recovers_exponent():
    n = [1e3, 3e3, 1e4, 1e5]
    a, alpha = fit_power_law(n, [4.0 * x ** -0.2 for x in n])
    assert abs(alpha - 0.2) < 1e-9 and abs(a - 4.0) < 1e-9


def test_pretrain_learns_a_repeating_sequence():
    torch.manual_seed(0)
    data = torch.arange(40).repeat(60) % 40
    model = tiny_llama(64, hidden_size=32, num_hidden_layers=1, max_position_embeddings=64)
    res = pretrain(model, data, data, PretrainConfig(steps=40, batch_size=8, block_size=32, lr=1e-2, warmup_steps=4,
                                                     eval_every=20, eval_batches=2))
    assert res.val_loss[-1] < 0.5 * res.val_loss[0]
    assert res.tokens == 40 * 8 * 32 and len(res.train_loss) == 40


@pytest.fixture(scope="module")
def gslm_tiny():
    from gslm.models import load_model
    t0 = time.perf_counter()
    model, tok = load_model("gslm-tiny")
    return model, tok, time.perf_counter() - t0


def test_gslm_tiny_loads_and_generates(gslm_tiny):
    model, tok, seconds = gslm_tiny
    assert type(model).__name__ == "LlamaForCausalLM"
    assert seconds < 5, f"gslm-tiny took {seconds:.2f} s to load (the notebook measures < 1 s on an idle machine)"
    text = sample_text(model, tok, "ROMEO:\n", max_new_tokens=40, seed=0)
    assert text.startswith("ROMEO:\n") and len(text) > len("ROMEO:\n") + 20
    ids = tok("KING LEAR:\nBlow, winds, and crack your cheeks!", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 10


def test_gslm_tiny_is_better_than_chance(gslm_tiny):
    model, tok, _ = gslm_tiny
    text = "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    ids = encode_corpus([text * 3], tok)
    loss = evaluate_lm(model, ids, block_size=len(ids) - 1)
    assert loss < 0.75 * torch.log(torch.tensor(float(len(tok)))).item()


@pytest.mark.parametrize("text", ["ROMEO:\nBut, soft! what light through yonder window breaks?",
                                  "  two  spaces, tabs\tand\nnew lines\n\n", "naïve café — 東京 😀 1600 A.D.", ""])
def test_gslm_tiny_tokenizer_round_trips(gslm_tiny, text):
    _, tok, _ = gslm_tiny
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>" and tok.convert_ids_to_tokens(tok.eos_token_id) == "<|endoftext|>"
