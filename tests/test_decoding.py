"""gslm.decoding: the processors equal transformers' on random logits, generate equals model.generate token for token (greedy, beam, sampling with a seed), stream equals generate, bad input fails clearly, the benchmarks run."""
import pytest
import torch
from torch.testing import assert_close

from gslm.decoding import (BeamTrace, DecodingConfig, RepetitionPenalty, Temperature, TopK, TopP, apply_processors, bench_generate,
                           bench_kv_cache, compare_strategies, encode_batch, frequent_tokens, generate, random_prompts, same_as_hf,
                           stream, to_generation_config)
from gslm.models import tiny_model


def test_processors_equal_transformers():
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 500, generator=g) * 3
    logits[:, 7:9] = logits[:, :1]
    ids = torch.randint(0, 500, (32, 20), generator=g)
    pairs = [(Temperature(0.6), TemperatureLogitsWarper(0.6)), (TopK(7), TopKLogitsWarper(7)), (TopK(2, 4), TopKLogitsWarper(2, min_tokens_to_keep=4)),
             (TopP(0.3), TopPLogitsWarper(0.3)), (TopP(0.95), TopPLogitsWarper(0.95)), (RepetitionPenalty(1.4), RepetitionPenaltyLogitsProcessor(1.4)),
             (RepetitionPenalty(0.8), RepetitionPenaltyLogitsProcessor(0.8))]
    for ours, theirs in pairs:
        assert_close(ours(ids, logits.clone()), theirs(ids, logits.clone()), rtol=0, atol=0)
    chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8), TopKLogitsWarper(40), TopPLogitsWarper(0.9)])
    assert_close(apply_processors([RepetitionPenalty(1.2), Temperature(0.8), TopK(40), TopP(0.9)], ids, logits.clone()), chain(ids, logits.clone()), rtol=0, atol=0)


def test_top_p_edge_case_keeps_the_token_that_crosses():
    edge = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    out = TopP(0.6)(None, edge)
    assert torch.isfinite(out).tolist() == [[False, False, True, True]]
    assert torch.isfinite(TopP(0.3)(None, edge)).tolist() == [[False, False, False, True]]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3", "gemma"])
def test_greedy_and_beam_equal_model_generate_on_tiny_models(family, one_thread):
    m = tiny_model(family).eval()
    batch = random_prompts(20, m.config.vocab_size, seed=3)
    eos = frequent_tokens(m, batch)
    for s in ({}, dict(strategy="beam", num_beams=3), dict(strategy="beam", num_beams=2, length_penalty=0.5, early_stopping=True),
              dict(strategy="beam", num_beams=3, length_penalty=2.0, early_stopping="never"), dict(repetition_penalty=1.3)):
        assert same_as_hf(m, batch, 10, eos_token_id=eos, pad_token_id=1, **s), (family, s)
    assert same_as_hf(m, batch, 10, eos_token_id=eos, pad_token_id=1, use_cache=False, strategy="beam", num_beams=2)


def test_sampling_reproducible_and_equal_to_hf_with_the_same_seed(one_thread):
    m = tiny_model("qwen2").eval()
    batch = random_prompts(20, m.config.vocab_size, seed=4)
    eos = frequent_tokens(m, batch)
    for s in (dict(strategy="sample", temperature=0.7, top_k=20, top_p=0.9), dict(strategy="beam_sample", num_beams=3, top_p=0.8)):
        kw = dict(eos_token_id=eos, pad_token_id=1, attention_mask=batch["attention_mask"], max_new_tokens=10, **s)
        a = generate(m, batch["input_ids"], generator=torch.Generator().manual_seed(5), **kw)
        b = generate(m, batch["input_ids"], generator=torch.Generator().manual_seed(5), **kw)
        c = generate(m, batch["input_ids"], generator=torch.Generator().manual_seed(6), **kw)
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert same_as_hf(m, batch, 10, seed=5, eos_token_id=eos, pad_token_id=1, **s)


def test_smollm2_greedy_and_beam_equal_model_generate(smollm2):
    model, tok = smollm2
    qs = ["What is the capital of France?", "Name a primary colour.", "Who wrote Hamlet?", "What is 7 times 8?",
          "What is the largest ocean?", "Which animal barks?"]
    batch = encode_batch(tok, [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) for q in qs])
    assert same_as_hf(model, batch, 12)
    assert same_as_hf(model, batch, 8, strategy="beam", num_beams=2)
    out = generate(model, batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=12)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].size(1):])


def test_stream_equals_generate_and_trace(one_thread):
    m = tiny_model("llama").eval()
    ids = random_prompts(3, m.config.vocab_size, seed=0, min_len=5, max_len=5)["input_ids"]
    streamed = torch.stack(list(stream(m, ids, max_new_tokens=7, eos_token_id=[])), 1)
    assert torch.equal(streamed, generate(m, ids, max_new_tokens=7, eos_token_id=[])[:, 5:])
    tr = BeamTrace()
    out = generate(m, ids[:1], max_new_tokens=6, strategy="beam", num_beams=3, eos_token_id=[], trace=tr)
    assert len(tr.steps) == 6 and all(len(s["token"]) == 3 for s in tr.steps)
    assert tr.best == out[0, 5:].tolist() and tr.finished


def test_to_generation_config_switches_off_the_default_top_k():
    gc = to_generation_config(max_new_tokens=5, strategy="sample")
    assert gc.top_k == 0 and gc.top_p == 1.0 and gc.do_sample
    gc = to_generation_config(max_new_tokens=5, strategy="beam", num_beams=4, length_penalty=0.5, early_stopping="never", eos_token_id=7)
    assert (gc.num_beams, gc.length_penalty, gc.early_stopping, gc.eos_token_id, gc.do_sample) == (4, 0.5, "never", [7], False)


def test_bad_input_fails_clearly():
    m = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7], [8, 9, 1]])
    with pytest.raises(ValueError, match="left padding"): generate(m, ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="2-D"): generate(m, ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="num_beams >= 2"): generate(m, ids, max_new_tokens=2, strategy="beam")
    with pytest.raises(ValueError, match="choose one of"): DecodingConfig(strategy="nucleus")
    with pytest.raises(ValueError, match="max_new_tokens"): DecodingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="use generate"): next(stream(m, ids, max_new_tokens=2, strategy="beam"))
    with pytest.raises(ValueError, match=r"\(0, 1\]"): TopP(1.5)


def test_benchmarks_run_on_a_tiny_model(one_thread):
    m = tiny_model("llama").eval()
    r = bench_generate((m, None), max_new_tokens=6, repeats=1)
    assert r.higher_is_better and r.unit == "tokens/s" and r.gslm > 0 and r.peer > 0 and r.info["new_tokens"] == 6
    k = bench_kv_cache((m, None), max_new_tokens=8)
    assert k.gslm > 0 and k.peer > 0 and k.target == 5.0 and "quick mode" in k.detail
    from gslm.bench import BENCHMARKS
    assert BENCHMARKS["decode: greedy vs model.generate"] is bench_generate and BENCHMARKS["decode: KV cache vs none"] is bench_kv_cache


def test_compare_strategies_table(smollm2):
    model, tok = smollm2
    t = compare_strategies(model, tok, "Name a colour.", {"greedy": {}, "beam": dict(strategy="beam", num_beams=2)}, max_new_tokens=6)
    assert list(t.index) == ["greedy", "beam"] and {"text", "tokens", "mean_logprob", "tokens_per_s"} <= set(t.columns)
    assert (t.tokens > 0).all()
