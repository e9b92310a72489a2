"""gslm.nn: from-scratch attention, GPT-2, Llama and BERT give transformers' logits; conversion back to transformers; training helpers."""
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close
import torch.nn.functional as F

from gslm.models import tiny_model
from gslm.nn import (BertConfig, BertMLM, BigramLM, CharTokenizer, GPT2, GPT2Config, Llama, LlamaConfig, MultiHeadAttention,
                     RMSNorm, apply_rope, attention, causal_mask, estimate_loss, generate, get_batch, lm_loss,
                     llama_state_dict_from_hf, llama_state_dict_to_hf, mask_tokens, mlm_accuracy, rope_cos_sin, to_hf_llama,
                     train_lm, train_mlm)

ATOL = 1e-4


def test_attention_equals_sdpa_and_masks_the_future():
    q, k, v = torch.randn(3, 2, 3, 9, 8, dtype=torch.float64).unbind(0)
    out, w = attention(q, k, v, causal_mask(9), return_weights=True)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert w.triu(1).abs().sum() == 0
    assert_close(w.sum(-1), torch.ones(2, 3, 9, dtype=torch.float64))


def test_multihead_attention_equals_torch():
    torch.manual_seed(0)
    mha, ref = MultiHeadAttention(24, 3), nn.MultiheadAttention(24, 3, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(mha.qkv.weight); ref.in_proj_bias.copy_(mha.qkv.bias)
        ref.out_proj.weight.copy_(mha.proj.weight); ref.out_proj.bias.copy_(mha.proj.bias)
    x = torch.randn(2, 7, 24)
    assert_close(mha(x), ref(x, x, x, attn_mask=~causal_mask(7), need_weights=False)[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="divisible"): MultiHeadAttention(10, 3)


def test_gpt2_logits_equal_transformers():
    from transformers import GPT2Config as HF, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(HF(vocab_size=200, n_positions=32, n_embd=48, n_layer=2, n_head=3, bos_token_id=0, eos_token_id=0)).eval()
    ours = GPT2.from_hf(hf)
    ids = torch.randint(0, 200, (2, 32))
    with torch.no_grad(): assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="longer than n_positions"): ours(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("tie", [False, True])
def test_llama_logits_equal_transformers_and_round_trip(tie, tmp_path):
    hf = tiny_model("llama", tie_word_embeddings=tie, seed=2)
    ours = Llama.from_hf(hf)
    assert ours.config.tie_word_embeddings == tie and ours.config.num_key_value_heads == 2
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        assert_close(ours(ids), ref, atol=ATOL, rtol=0)
        back = to_hf_llama(ours)
        assert_close(back(ids).logits, ref, atol=0, rtol=0)
    back.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad(): assert_close(reloaded(ids).logits, ref, atol=1e-5, rtol=0)


def test_llama_trained_from_scratch_exports_to_transformers():
    "The pretraining chapter's path: a config-driven Llama, a few training steps, then LlamaForCausalLM with equal logits."
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = Llama(cfg)
    data = torch.randint(0, 50, (2000,))
    train_lm(model, data, steps=5, batch_size=4, block_size=16)
    hf = model.to_hf()
    assert hf.config.num_key_value_heads == 1 and hf.config.eos_token_id == 1 and hf.config.tie_word_embeddings
    assert LlamaConfig.from_hf(hf.config) == cfg
    x = get_batch(data, 3, 16)[0]
    with torch.no_grad(): assert_close(hf(x).logits, model(x), atol=1e-5, rtol=0)
    assert set(llama_state_dict_to_hf(model.state_dict(), cfg)) == set(hf.state_dict()) - {
        k for k in hf.state_dict() if k.endswith("inv_freq")}
    assert llama_state_dict_from_hf(llama_state_dict_to_hf(model.state_dict(), cfg), cfg).keys() == model.state_dict().keys()


def test_smollm2_logits_equal(smollm2):
    hf, tok = smollm2
    ours = Llama.from_hf(hf)
    ids = tok("To be, or not to be, that is the question.", return_tensors="pt").input_ids
    with torch.no_grad(): assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_greedy_generate_equals_transformers():
    hf = tiny_model("llama", seed=4)
    ours = Llama.from_hf(hf)
    prompt = torch.tensor([[1, 5, 300, 7]])
    hf_out = hf.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert generate(ours, prompt, 10, temperature=0).tolist() == hf_out.tolist()


def test_rope_is_a_relative_rotation_and_rmsnorm_matches_torch():
    d, T = 8, 12
    cos, sin = rope_cos_sin(d, torch.arange(T), theta=100.0)
    q, k = torch.randn(2, d, dtype=torch.float64).unbind(0)
    rq = apply_rope(q.expand(T, d), cos.double(), sin.double())
    rk = apply_rope(k.expand(T, d), cos.double(), sin.double())
    assert_close(rq.norm(dim=-1), q.norm().expand(T))
    dots = rq @ rk.T
    assert_close(dots[7, 3], dots[10, 6]) and assert_close(dots[2, 2], dots[9, 9])
    norm = RMSNorm(d, eps=1e-6); ref = nn.RMSNorm(d, eps=1e-6)
    with torch.no_grad(): norm.weight.uniform_(0.5, 2); ref.weight.copy_(norm.weight)
    x = torch.randn(4, d) * 5
    assert_close(norm(x), ref(x), atol=1e-5, rtol=1e-5)


def test_llama_config_errors():
    with pytest.raises(ValueError, match="multiple of"): LlamaConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="even"): LlamaConfig(hidden_size=60, num_attention_heads=4, num_key_value_heads=2)
    from transformers import LlamaConfig as HF
    with pytest.raises(NotImplementedError, match="RoPE scaling"):
        LlamaConfig.from_hf(HF(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    with pytest.raises(NotImplementedError, match="bias"): LlamaConfig.from_hf(HF(attention_bias=True))


def test_bert_logits_equal_transformers_with_padding():
    from transformers import BertConfig as HF, BertForMaskedLM
    torch.manual_seed(0)
    hf = BertForMaskedLM(HF(vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=40)).eval()
    ours = BertMLM.from_hf(hf)
    ids = torch.randint(0, 90, (3, 20)); am = torch.ones_like(ids); am[0, 12:] = 0; am[2, 5:] = 0
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)
        a, b = ours(ids, am), hf(ids, attention_mask=am).logits
    assert_close(a[am.bool()], b[am.bool()], atol=ATOL, rtol=0)


def test_mask_tokens_equals_transformers_collator_and_has_80_10_10_rates():
    from transformers import DataCollatorForLanguageModeling
    class Vocab:
        mask_token, pad_token = "[MASK]", None
        def convert_tokens_to_ids(self, t): return 50
        def __len__(self): return 50
    ids = torch.randint(0, 50, (128, 128))
    col = DataCollatorForLanguageModeling(Vocab(), mlm=True, mlm_probability=0.15)
    torch.manual_seed(7); ref = col.torch_mask_tokens(ids.clone(), special_tokens_mask=torch.zeros_like(ids))
    torch.manual_seed(7); ours = mask_tokens(ids, 50, 50)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    inputs, labels = ours
    picked = labels != -100
    assert abs(picked.float().mean().item() - 0.15) < 0.01
    assert torch.equal(labels[picked], ids[picked])
    assert abs((inputs[picked] == 50).float().mean().item() - 0.8) < 0.02
    assert abs(((inputs != 50) & (inputs != ids))[picked].float().mean().item() - 0.1 * 49 / 50) < 0.02
    assert torch.equal(inputs[~picked], ids[~picked])
    special = torch.zeros_like(ids); special[:, 0] = 1
    assert (mask_tokens(ids, 50, 50, special_tokens_mask=special)[1][:, 0] == -100).all()


def test_bigram_training_reaches_the_counting_optimum():
    text = "the cat sat on the mat. the dog sat on the log. " * 40
    tok = CharTokenizer(text)
    data = torch.tensor(tok.encode(text))
    counts = torch.zeros(len(tok), len(tok)).index_put_((data[:-1], data[1:]), torch.tensor(1.0), accumulate=True)
    p = counts / counts.sum(1, keepdim=True).clamp(min=1)
    best = -(counts[counts > 0] * p[counts > 0].log()).sum().item() / counts.sum().item()
    torch.manual_seed(0)
    model = BigramLM(len(tok))
    first = estimate_loss(model, data, block_size=16)
    hist = train_lm(model, data, steps=300, lr=0.1, batch_size=16, block_size=16, val_data=data, eval_every=100)
    assert abs(first - math.log(len(tok))) < 0.1 and hist["val"][-1] < first
    with torch.no_grad(): full = lm_loss(model(data[None, :-1]), data[None, 1:]).item()
    assert best - 1e-6 <= full < best + 0.05
    with pytest.raises(ValueError, match="not in the vocabulary"): tok.encode("Z")
    with pytest.raises(ValueError, match="needs more"): get_batch(data[:10], 2, 16)


def test_mlm_training_beats_chance():
    text = "abcdefghij" * 300
    tok = CharTokenizer(text)
    data = torch.tensor(tok.encode(text))
    torch.manual_seed(0)
    model = BertMLM(BertConfig(vocab_size=len(tok) + 1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=16))
    before = mlm_accuracy(model, data, len(tok), len(tok), block_size=16)
    train_mlm(model, data, len(tok), len(tok), steps=150, batch_size=32, block_size=16, lr=3e-3)
    after = mlm_accuracy(model, data, len(tok), len(tok), block_size=16)
    assert after > max(0.5, before + 0.3), (before, after)
