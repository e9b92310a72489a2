"""gslm.attention: flash_attention equals naive attention and SDPA (causal or not, odd lengths, GQA, padding, fewer queries
than keys), plugged into SmolLM2 it gives the eager/SDPA logits and the same greedy tokens, the paged KV cache equals a
contiguous one, bad input fails clearly, and the memory benchmark runs."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from gslm.attention import (ATTENTION_BENCH_NAME, GSLM_ATTENTION, PagedKVCache, attention_mask_matrix, attention_peak_memory,
                            bench_attention_memory, compare_attn_implementations, flash_attention, naive_attention,
                            register_attention, tile_schedule)

pytestmark = pytest.mark.usefixtures("one_thread")       # small tensors on a shared 2-core machine: one thread is faster


def qkv(B, H, Hkv, Tq, Tk, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, t, D, generator=g).to(dtype) for h, t in ((H, Tq), (Hkv, Tk), (Hkv, Tk))]


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D", [(2, 4, 4, 37, 37, 16), (2, 6, 2, 101, 101, 32), (1, 9, 3, 130, 130, 64),
                                             (1, 4, 1, 7, 50, 16), (3, 4, 2, 1, 33, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_equals_naive_and_sdpa(B, H, Hkv, Tq, Tk, D, causal):
    q, k, v = qkv(B, H, Hkv, Tq, Tk, D, seed=Tq)
    ref = naive_attention(q, k, v, causal=causal)
    for bq, bk in ((16, 24), (128, 32), (1000, 1000)):
        assert_close(flash_attention(q, k, v, causal=causal, block_q=bq, block_k=bk), ref, atol=1e-5, rtol=1e-5)
    allowed = attention_mask_matrix(Tq, Tk, causal=causal)
    kw = dict(is_causal=causal) if Tq == Tk else dict(attn_mask=allowed)       # SDPA's is_causal aligns top-left
    assert_close(F.scaled_dot_product_attention(q, k, v, enable_gqa=H != Hkv, **kw), ref, atol=1e-5, rtol=1e-5)
    kpm = torch.rand(B, Tk, generator=torch.Generator().manual_seed(1)) > 0.3
    kpm[:, -1] = True                                                           # every query row sees at least one key
    assert_close(flash_attention(q, k, v, causal=causal, key_padding_mask=kpm, block_q=16, block_k=24),
                 naive_attention(q, k, v, causal=causal, key_padding_mask=kpm), atol=1e-5, rtol=1e-5)
    if not causal:
        assert_close(flash_attention(q, k, v, key_padding_mask=kpm),
                     F.scaled_dot_product_attention(q, k, v, attn_mask=kpm[:, None, None], enable_gqa=H != Hkv), atol=1e-5, rtol=1e-5)


def test_rows_without_keys_are_zero_and_half_precision_accumulates_in_fp32():
    q, k, v = qkv(2, 2, 2, 5, 5, 8)
    kpm = torch.tensor([[False, False, True, True, True], [True] * 5])
    out = flash_attention(q, k, v, causal=True, key_padding_mask=kpm, block_q=2, block_k=2)
    assert torch.isfinite(out).all() and (out[0, :, :2] == 0).all()            # left padding: queries 0, 1 of row 0 see nothing
    assert_close(out, naive_attention(q, k, v, causal=True, key_padding_mask=kpm))
    q, k, v = qkv(1, 4, 2, 300, 300, 64, seed=3)
    ref = naive_attention(q.double(), k.double(), v.double(), causal=True)
    out = flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert out.dtype == torch.bfloat16 and (out.double() - ref).abs().max() < 2e-2


def test_tile_schedule_skips_tiles_above_the_diagonal():
    g = tile_schedule(1000, 1000, 128, 128, causal=True)
    assert g.shape == (8, 8) and (g.diagonal() == 1).all() and (g[0, 1:] == 0).all() and g[7, 0] == 2
    assert (tile_schedule(300, 300, 64, 64, causal=False) == 2).all()


def test_bad_input_fails_clearly():
    q, k, v = qkv(1, 4, 3, 8, 8, 16)
    with pytest.raises(ValueError, match="multiple of the key/value heads"): flash_attention(q, k, v)
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="4-D tensor"): naive_attention(q[0], k, v)
    with pytest.raises(ValueError, match="positive int"): flash_attention(q, k, v, block_k=0)
    with pytest.raises(ValueError, match="key_padding_mask must be"): flash_attention(q, k, v, key_padding_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="head_dim"): flash_attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="flash"): register_attention("my_flash")


def test_tiled_memory_is_a_fraction_of_naive():
    q, k, v = qkv(1, 2, 1, 1024, 1024, 32)
    naive = attention_peak_memory(naive_attention, q, k, v, causal=True)
    tiled = attention_peak_memory(flash_attention, q, k, v, causal=True)
    inputs = sum(t.nbytes for t in (q, k, v)) + q.nbytes                        # q, k, v and the output
    assert naive > 2 * 2 * 1024 * 1024 * 4                                       # at least the scores and their softmax
    assert inputs <= tiled < inputs + 2 * 2 ** 20 and tiled * 8 < naive


def test_bench_attention_memory_runs():
    r = bench_attention_memory(quick=True, seq_len=1024)
    assert r.name == ATTENTION_BENCH_NAME and r.unit == "MiB" and r.target == 8.0
    assert r.gslm < r.peer and r.ratio == r.peer / r.gslm and r.info["max_abs_diff"] < 1e-4


def test_smollm2_logits_and_tokens_with_gslm_attention(smollm2):
    from gslm.decoding import encode_batch, generate
    model, tok = smollm2
    batch = encode_batch(tok, ["The capital of France is", "Write a haiku about the sea, please:", "Hi"])
    real = batch["attention_mask"].bool()
    before = model.config._attn_implementation
    register_attention()
    try:
        out = {}
        for impl in ("eager", "sdpa", GSLM_ATTENTION):
            model.set_attn_implementation(impl)
            with torch.no_grad(): out[impl] = model(**batch).logits
            if impl != "eager": out[impl + " tokens"] = generate(model, batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6)
    finally:
        model.set_attn_implementation(before)
    for impl in ("eager", "sdpa"): assert_close(out[GSLM_ATTENTION][real], out[impl][real], atol=1e-4, rtol=1e-4)
    assert torch.equal(out["sdpa tokens"], out[GSLM_ATTENTION + " tokens"])
    ids = torch.randint(100, 40000, (1, 64), generator=torch.Generator().manual_seed(0))
    tab = compare_attn_implementations(model, ids, repeats=1)
    assert list(tab.index) == ["eager", "sdpa", GSLM_ATTENTION] and (tab["max |Δ logits|"] < 1e-3).all()
    assert model.config._attn_implementation == before


def test_paged_kv_cache_equals_contiguous():
    torch.manual_seed(0)
    cache = PagedKVCache(num_blocks=12, block_size=4, kv_heads=2, head_dim=8)
    lens = {"a": 13, "b": 6, "c": 9}
    cont = {s: (torch.empty(2, 0, 8), torch.empty(2, 0, 8)) for s in lens}
    for s, n in lens.items():                                                   # prefill in two uneven chunks
        for chunk in (n // 3, n - n // 3):
            k, v, q = torch.randn(2, chunk, 8), torch.randn(2, chunk, 8), torch.randn(4, chunk, 8)
            cache.append(s, k, v)
            cont[s] = tuple(torch.cat([a, b], 1) for a, b in zip(cont[s], (k, v)))
            ref = naive_attention(q[None], cont[s][0][None], cont[s][1][None], causal=True)[0]
            assert_close(cache.attention(s, q, block_q=2, block_k=3), ref, atol=1e-6, rtol=0)
    assert cache.blocks_used == 4 + 2 + 3 and len(cache.free) == 3
    kb, vb = cache.gather("b")
    assert torch.equal(kb, cont["b"][0]) and torch.equal(vb, cont["b"][1])
    cache.free_sequence("a")
    assert len(cache.free) == 7
    cache.append("b", torch.randn(2, 20, 8), torch.randn(2, 20, 8))             # takes a's freed blocks
    assert cache.lengths["b"] == 26 and len(cache.tables["b"]) == 7
    with pytest.raises(MemoryError, match="paged KV cache is full"): cache.append("c", torch.randn(2, 40, 8), torch.randn(2, 40, 8))
    with pytest.raises(KeyError, match="no sequence"): cache.gather("a")
