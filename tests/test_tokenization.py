"""gslm.tokenization: byte-level BPE equal to GPT-2's ids, to the tokenizers trainer, to SmolLM2's chat tokens; export to transformers."""
import json

import pytest
import torch

from gslm.tokenization import (BPETokenizer, GPT2_PATTERN, bytes_to_unicode, from_byte_chars, from_hf, gpt2_bpe_files,
                               gpt2_tokenizer, pretokenize, to_byte_chars, to_hf, train_bpe, varied_strings)

CORPUS = ("Now, fair Hippolyta, our nuptial hour draws on apace; four happy days bring in another moon: but, O, "
          "methinks, how slow this old moon wanes! She lingers my desires, like to a step-dame or a dowager "
          "long withering out a young man's revenue. 1600 A.D., naïve café — 東京 😀\n\n") * 20


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


def _tokenizers_bpe(texts, vocab_size, specials):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def test_byte_alphabet_and_pretokenizer_match_tokenizers():
    from tokenizers import pre_tokenizers
    assert set(bytes_to_unicode().values()) == set(pre_tokenizers.ByteLevel.alphabet())
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for s in varied_strings(300, seed=3):
        assert [to_byte_chars(p) for p in pretokenize(s)] == [w for w, _ in bl.pre_tokenize_str(s)], repr(s)
        assert from_byte_chars(to_byte_chars(s)) == s
    with pytest.raises(ValueError, match="not one of the 256"): from_byte_chars("你")


def test_gpt2_ids_equal_transformers_on_1000_varied_strings(gpt2):
    from transformers import GPT2Tokenizer
    enc, merges = gpt2_bpe_files()
    ref = GPT2Tokenizer(vocab=str(enc), merges=str(merges))
    assert len(ref) == len(gpt2) == 50257
    strings = varied_strings(1000, seed=0) + ["", " ", "\n\n\n", "a" * 500, " " * 300 + "x", "<|endoftext|>hi<|endoftext|>"]
    bad = [s for s in strings if gpt2.encode(s) != ref(s)["input_ids"]]
    assert bad == []
    assert all(gpt2.decode(gpt2.encode(s)) == s for s in strings)


def test_trained_bpe_equals_tokenizers_trainer():
    texts = [CORPUS] + varied_strings(200, seed=5)
    ours = train_bpe(texts, 400, special_tokens=["<|endoftext|>", "<pad>"])
    lib = _tokenizers_bpe(texts, 400, ["<|endoftext|>", "<pad>"])
    model = json.loads(lib.to_str())["model"]
    assert model["vocab"] == ours.vocab and len(ours) == 400
    assert [tuple(m) for m in model["merges"]] == ours.merges
    for s in varied_strings(100, seed=9) + [CORPUS[:300]]:
        assert lib.encode(s).ids == ours.encode(s), repr(s)


def test_alphabet_order_changes_ties_only_in_ids():
    a = train_bpe(CORPUS, 300)
    b = train_bpe(CORPUS, 300, alphabet="bytes")
    assert b.vocab[to_byte_chars("A")] == 65 and a.vocab[to_byte_chars("A")] != 65
    assert a.decode(a.encode(CORPUS)) == b.decode(b.encode(CORPUS)) == CORPUS
    with pytest.raises(ValueError, match="alphabet"): train_bpe(CORPUS, 300, alphabet="latin1")


def test_special_tokens_and_smollm2_chat_template(smollm2):
    _, tok = smollm2
    ours = from_hf(tok)
    msgs = [{"role": "user", "content": "Hi! 2+2=? 😀"}, {"role": "assistant", "content": "4.\n\nAnything else?"}]
    chat = tok.apply_chat_template(msgs, tokenize=False)
    assert ours.encode(chat) == tok(chat)["input_ids"]
    assert ours.encode("<|im_start|>") == [tok.convert_tokens_to_ids("<|im_start|>")]
    assert len(ours.encode("<|im_start|>", allowed_special="none")) > 1
    assert ours.decode(ours.encode(chat)) == chat
    for s in varied_strings(200, seed=11):
        assert ours.encode(s) == tok(s)["input_ids"], repr(s)
    with pytest.raises(ValueError, match="not special tokens"): ours.encode("x", allowed_special={"<nope>"})


def test_export_to_transformers_and_reload(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tok = train_bpe(CORPUS, 350, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf = to_hf(tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|im_start|>")
    assert isinstance(hf, PreTrainedTokenizerFast)
    tok.save(tmp_path, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    again = BPETokenizer.load(tmp_path)
    assert again.vocab == tok.vocab and again.merges == tok.merges and again.special_tokens == tok.special_tokens
    strings = varied_strings(300, seed=2) + [CORPUS, "<|im_start|>user\nhi<|im_end|><|endoftext|>"]
    for s in strings:
        ids = tok.encode(s)
        assert hf(s)["input_ids"] == ids and reloaded(s)["input_ids"] == ids, repr(s)
        assert reloaded.decode(ids) == s
    assert reloaded.eos_token == "<|endoftext|>" and reloaded.eos_token_id == tok.special_tokens["<|endoftext|>"]
    with pytest.raises(ValueError, match="not one of the special tokens"): to_hf(tok, eos_token="</s>")


def test_custom_pattern_exports_with_a_split_pre_tokenizer(tmp_path):
    pattern = r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+"       # digits one by one, no leading spaces
    tok = train_bpe(CORPUS, 320, pattern=pattern)
    hf = to_hf(tok)
    for s in varied_strings(200, seed=4):
        assert hf(s)["input_ids"] == tok.encode(s), repr(s)


def test_a_course_model_with_its_own_tokenizer_loads_with_load_model(tmp_path):
    "What the pretraining chapter does for gslm-tiny: a from-scratch Llama + a BPE trained here, saved for transformers."
    from gslm.models import load_model
    from gslm.nn import Llama, LlamaConfig
    tok = train_bpe(CORPUS, 320, special_tokens=["<|endoftext|>"])
    eos = tok.special_tokens["<|endoftext|>"]
    model = Llama(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    model.to_hf().save_pretrained(tmp_path)
    tok.save(tmp_path, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf_model, hf_tok = load_model(str(tmp_path), device="cpu")
    ids = hf_tok("Now, fair Hippolyta", return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode("Now, fair Hippolyta")
    with torch.no_grad(): torch.testing.assert_close(hf_model(ids).logits, model(ids), atol=1e-5, rtol=0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 257"): train_bpe("abc", 256, special_tokens=["<s>"])
    tok = train_bpe("hello world", 260)
    with pytest.raises(ValueError, match="not in the vocabulary"): tok.decode([99999])
    with pytest.raises(ValueError, match="pair of tokens"): BPETokenizer(tok.vocab, [("a", "b", "c")])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"): from_hf("/nonexistent/folder")
    with pytest.raises(NotImplementedError, match="BPE"): from_hf({"model": {"type": "WordPiece"}})
    with pytest.raises(NotImplementedError, match="ByteLevel"):
        from_hf({"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "Whitespace"}})
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert pretokenize("a  b's", GPT2_PATTERN) == ["a", " ", " b", "'s"]
