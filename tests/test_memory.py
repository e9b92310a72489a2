"""gslm.memory: the estimate against published figures, against PyTorch's saved tensors and against measured peaks."""
import contextlib, os, tempfile

import pytest
import torch

from gslm.memory import (LLAMA_CONFIGS, MemoryTracker, ModelShape, activation_bytes, dtype_bytes, estimate_memory,
                         measure_memory_breakdown,
                         kv_cache_bytes, kv_cache_bytes_per_token, lora_params, measure_inference, measure_training_step,
                         model_shape, nf4_bytes_per_param, peak_rss, plot_memory, saved_activations, weight_bytes, zero_memory)
from gslm.models import tiny_model

torch.set_num_threads(1)
TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024)
TOL = (0.75, 1.25)      # the estimate must be within 25% of the measured peak


def batch(vocab, bs, sl, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (bs, sl), generator=g)
    return dict(input_ids=x, labels=x)


# ---------------------------------------------------------------- shapes and published figures
def test_dtype_bytes():
    assert [dtype_bytes(d) for d in (torch.float32, torch.bfloat16, "fp16", "int8", "nf4")] == [4, 2, 2, 1, 0.5]
    with pytest.raises(ValueError, match="not known"): dtype_bytes("float12")


@pytest.mark.parametrize("name,published", [("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320),
                                            ("llama-2-70b", 68_976_648_192), ("llama-3-8b", 8_030_261_248)])
def test_llama_param_counts_equal_transformers_and_published(name, published):
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA_CONFIGS[name]))
    assert model_shape(name).params == sum(p.numel() for p in m.parameters()) == published


def test_gpt2_names_and_count():
    from transformers import GPT2Config
    assert model_shape(GPT2Config()).params == 124_439_808
    assert model_shape(GPT2Config().to_dict()).params == 124_439_808


def test_model_config_and_dict_agree_with_tensors():
    m = tiny_model("qwen2", **TINY)     # qkv biases
    n = sum(p.numel() for p in m.parameters())
    assert model_shape(m).params == model_shape(m.config).params == model_shape(m.config.to_dict()).params == n
    g = tiny_model("gemma")             # tied embeddings, explicit head_dim
    assert model_shape(g.config).params == sum(p.numel() for p in g.parameters())


def test_config_json_path(tmp_path):
    tiny_model("llama", **TINY).config.save_pretrained(tmp_path)
    assert model_shape(tmp_path).hidden_size == 128 and model_shape(tmp_path / "config.json").num_kv_heads == 2


def test_weights_table_matches_published_figures():
    w7 = weight_bytes("llama-2-7b", "bf16")
    assert abs(w7 / 1e9 - 13.5) < 0.05 and abs(w7 / 2**30 - 12.55) < 0.01     # "13.5 GB" = 12.6 GiB
    assert abs(weight_bytes("llama-2-13b", "bf16") / 1e9 - 26.0) < 0.1
    assert abs(weight_bytes("llama-2-70b", "bf16") / 1e9 - 138.0) < 0.1
    assert abs(nf4_bytes_per_param() * 8 - 4.127) < 1e-3                        # QLoRA: 4.127 bits per parameter
    assert estimate_memory("llama-2-7b", mode="full").optimizer == 12 * 6_738_415_616   # ZeRO's K = 12
    assert estimate_memory("llama-2-7b", mode="full", gradient_checkpointing=True).sum > 16 * 6_738_415_616


def test_qlora_65b_fits_48gb_and_full_does_not():
    q = estimate_memory("llama-65b", mode="qlora", batch_size=1, seq_len=512, gradient_checkpointing=True)
    f = estimate_memory("llama-65b", mode="full", batch_size=1, seq_len=512, gradient_checkpointing=True)
    assert q.total < 48e9 and f.total > 780e9          # Dettmers et al. 2023: "<48GB" vs ">780GB"


def test_nf4_bytes_equal_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM
    from gslm.models import quantization_config
    tiny_model("llama", **TINY).save_pretrained(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization_config("4bit", torch.float32),
                                             dtype=torch.float32, device_map={"": "cpu"})
    stored = {}
    for p in q.parameters():
        stored[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.state2.absmax, qs.offset): stored[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    est = weight_bytes(q, "fp32", quantized="nf4")
    assert abs(est - sum(stored.values())) < 1e-3 * est


# ---------------------------------------------------------------- KV cache
def test_kv_cache_per_token_published():
    assert kv_cache_bytes_per_token("llama-2-7b") == 2**19                 # 0.5 MiB per token in 16 bits
    assert kv_cache_bytes_per_token("llama-2-70b") == 327_680              # GQA: 8 KV heads
    assert kv_cache_bytes_per_token("llama-3-8b") == 128 * 1024


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_kv_cache_equals_dynamic_cache(family):
    m = tiny_model(family, **TINY)
    tr, cache = measure_inference(m, batch(1024, 3, 50)["input_ids"])
    assert cache == kv_cache_bytes(m, batch_size=3, seq_len=50, dtype="fp32")


# ---------------------------------------------------------------- activations: the formula is exact
def _saved_per_layer(dtype=torch.float32, attn="sdpa", ctx=contextlib.nullcontext, lora=None):
    per = []
    for L in (1, 2):
        m = tiny_model("llama", **{**TINY, "num_hidden_layers": L}, attn_implementation=attn).to(dtype).train()
        if lora:
            from peft import LoraConfig, get_peft_model
            m = get_peft_model(m, LoraConfig(r=8, target_modules=lora))
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        keep = {}
        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params: keep[st.data_ptr()] = st
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx():
            m(**batch(1024, 2, 64))
        per.append(sum(s.nbytes() for s in keep.values()))
    return (per[1] - per[0]) / 128


CFG = {**TINY, "model_type": "llama"}

@pytest.mark.parametrize("case", ["fp32", "bf16", "eager", "autocast", "lora", "lora-qv", "lora-bf16"])
def test_saved_activations_equal_autograd(case):
    if case.startswith("lora"): pytest.importorskip("peft")
    spec = {"fp32": (dict(), dict()),
            "bf16": (dict(dtype=torch.bfloat16), dict(dtype="bf16")),
            "eager": (dict(attn="eager"), dict(attention="eager", seq_len=64)),
            "autocast": (dict(ctx=lambda: torch.autocast("cpu", dtype=torch.bfloat16)), dict(dtype="bf16", autocast=True)),
            "lora": (dict(lora="all-linear"), dict(mode="lora", lora_rank=8)),
            "lora-qv": (dict(lora=["q_proj", "v_proj"]), dict(mode="lora", lora_rank=8, lora_targets=["q_proj", "v_proj"])),
            "lora-bf16": (dict(lora="all-linear", dtype=torch.bfloat16), dict(mode="lora", lora_rank=8, dtype="bf16"))}[case]
    formula = sum(v for _, v in saved_activations(CFG, **spec[1]))
    if case == "autocast":      # autocast's cached bf16 copies of the layer's weights are saved too (not per token)
        formula += sum(a * b for a, b in model_shape(CFG).linears().values()) * 2 / 128
    assert _saved_per_layer(**spec[0]) == formula


def test_lora_params_equal_peft():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        pm = get_peft_model(tiny_model("llama", **TINY), LoraConfig(r=8, target_modules=targets))
        assert lora_params(CFG, 8, targets) == sum(p.numel() for p in pm.parameters() if p.requires_grad)


# ---------------------------------------------------------------- measured peaks
def test_tracker_counts_storages_once_and_frees():
    with MemoryTracker() as tr:
        a = torch.zeros(1000)
        b = a[10:]
        c = torch.ones(500, dtype=torch.float64)
        del a, c
        live = tr.live
    assert (tr.peak, live) == (8000, 4000)
    del b
    assert tr.live == 0


SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=4096)

@pytest.mark.parametrize("bs,sl,ckpt,dtype", [(1, 32, False, "fp32"), (4, 128, False, "fp32"), (4, 128, True, "fp32"),
                                              (4, 128, False, "bf16")])
def test_full_training_estimate_within_25pct(bs, sl, ckpt, dtype):
    m = tiny_model("llama", **SMALL).to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    if ckpt: m.config.use_cache = False; m.gradient_checkpointing_enable()
    tr = measure_training_step(m, batch(4096, bs, sl))
    est = estimate_memory(m, mode="full", dtype=dtype, mixed_precision="none", batch_size=bs, seq_len=sl,
                          gradient_checkpointing=ckpt)
    assert TOL[0] <= est.total / tr.peak <= TOL[1], (est.total, tr.peak)


def test_autocast_and_lora_estimates_within_25pct():
    m = tiny_model("llama", **SMALL)
    tr = measure_training_step(m, batch(4096, 4, 128), autocast_dtype=torch.bfloat16)
    est = estimate_memory(m, mode="full", dtype="bf16", mixed_precision="autocast", batch_size=4, seq_len=128)
    assert TOL[0] <= est.total / tr.peak <= TOL[1]
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(tiny_model("llama", **SMALL), LoraConfig(r=16, target_modules="all-linear"))
    tr = measure_training_step(pm, batch(4096, 4, 128))
    est = estimate_memory(pm, mode="lora", dtype="fp32", batch_size=4, seq_len=128, lora_rank=16)
    assert est.trainable_params == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert TOL[0] <= est.total / tr.peak <= TOL[1]


def test_smollm2_measured_within_25pct():
    from gslm.models import load_model
    model, _ = load_model("smollm2", device="cpu")   # its own copy: the training step changes the weights
    x = batch(model.config.vocab_size, 2, 64)
    tr, cache = measure_inference(model, x["input_ids"])
    est = estimate_memory(model, mode="inference", dtype="fp32", batch_size=2, seq_len=64)
    assert cache == est.kv_cache and TOL[0] <= est.total / tr.peak <= TOL[1]
    tr = measure_training_step(model, dict(input_ids=x["input_ids"][:1, :32], labels=x["labels"][:1, :32]))
    est = estimate_memory(model, mode="full", dtype="fp32", batch_size=1, seq_len=32)
    assert TOL[0] <= est.total / tr.peak <= TOL[1], (est.total, tr.peak)
    model.eval()


def test_peak_rss_is_the_childs_own():
    code = "import numpy as np\nmark_baseline()\na = np.ones(300_000_000 // 8)\n"
    r = peak_rss(code, timeout=120)
    assert 0.9 <= r["increase"] / 300e6 <= 1.15, r       # not inflated by this (large) test process


# ---------------------------------------------------------------- ZeRO
def test_zero_paper_figure_1():
    assert [round(zero_memory(7.5e9, s, 64).total / 1e9, 1) for s in range(4)] == [120.0, 31.4, 16.6, 1.9]
    assert round(zero_memory(7.5e9, 2, 4).total / 1e9, 2) == 41.25


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_estimate_zero_stages_two_devices(stage):
    m = tiny_model("llama", **TINY)
    P = sum(p.numel() for p in m.parameters())
    e = estimate_memory(m, mode="full", dtype="fp32", mixed_precision="master", zero_stage=stage, n_devices=2,
                        batch_size=1, seq_len=16)
    z = zero_memory(P, stage, 2, weight_bytes=4, grad_bytes=4, k=12)
    assert (e.weights, e.gradients, e.optimizer) == pytest.approx((z.weights, z.gradients, z.optimizer))
    one = estimate_memory(m, mode="full", dtype="fp32", mixed_precision="master", batch_size=1, seq_len=16)
    assert e.activations == one.activations        # each device keeps its own micro-batch's activations
    states = {0: 20 * P, 1: 4 * P + 4 * P + 12 * P / 2, 2: 4 * P + 16 * P / 2, 3: 20 * P / 2}[stage]
    assert e.weights + e.gradients + e.optimizer == pytest.approx(states)


# ---------------------------------------------------------------- mixed precision facts
def test_fp16_overflow_and_loss_scaling():
    assert torch.tensor(70000.0).half().item() == float("inf")
    assert torch.tensor(1e-8).half().item() == 0.0
    lin = torch.nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1)
    before = lin.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = lin(torch.full((2, 4), 1e4)).float().pow(2).mean()
    scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
    assert torch.equal(before, lin.weight) and scaler.get_scale() == 2.0**15      # skipped, scale halved


# ---------------------------------------------------------------- bad input and the breakdown object
def test_bad_input_messages():
    with pytest.raises(ValueError, match="mode="): estimate_memory("llama-2-7b", mode="train")
    with pytest.raises(ValueError, match="storage format"): estimate_memory("llama-2-7b", dtype="nf4")
    with pytest.raises(ValueError, match="not Linear"): estimate_memory("llama-2-7b", mode="lora", lora_targets=["qkv"])
    with pytest.raises(ValueError, match="stages"): estimate_memory("llama-2-7b", mode="full", zero_stage=4)
    with pytest.raises(ValueError, match="lacks"): model_shape({"hidden_size": 64})
    with pytest.raises(ValueError, match="preset"): model_shape("llama-9000")
    with pytest.raises(ValueError, match="mixed_precision"): estimate_memory("llama-2-7b", mode="full", mixed_precision="fp8")
    with pytest.raises(TypeError): model_shape(3.14)


def test_breakdown_frame_and_plot():
    import matplotlib
    matplotlib.use("Agg")
    e = estimate_memory("llama-2-7b", mode="inference", batch_size=2, seq_len=1024)
    df = e.to_frame()
    assert df.loc["total (peak)", "bytes"] == round(e.total) and df.loc["kv_cache", "bytes"] == 2 * 1024 * 2**19
    assert abs(df.loc["weights", "GiB"] - 12.55) < 0.01
    ax = plot_memory({"a": e, "b": estimate_memory("llama-2-7b", mode="qlora")}, measured={"a": e.total})
    assert len(ax.patches) > 0


# ---------------------------------------------------------------- the step by component; the optimizer's implementation
@pytest.mark.parametrize("bs,sl,autocast", [(4, 256, False), (4, 256, True), (1, 32, False)])
def test_measure_memory_breakdown_matches_the_estimate(bs, sl, autocast):
    m = tiny_model("llama", **TINY)
    mb = measure_memory_breakdown(m, batch(1024, bs, sl), autocast_dtype=torch.bfloat16 if autocast else None)
    e = estimate_memory(m, mode="full", dtype="bf16" if autocast else "fp32", mixed_precision="autocast" if autocast else "none",
                        batch_size=bs, seq_len=sl)
    assert 0 <= mb["weights"] - e.weights <= 1024 and 0 <= mb["optimizer"] - e.optimizer <= 8 * len(list(m.parameters()))
    assert abs(mb["gradients"] - e.gradients) <= 16                      # + the 4-byte loss
    fwd_bwd = max(e.activations + e.other, e.gradients)                  # large batch: activations; small: the gradients
    assert abs(fwd_bwd / mb["activations"] - 1) < 0.02 and abs(e.total / mb["peak"] - 1) < 0.02, (mb, e)


def test_autocast_copy_of_a_tied_head_is_counted():
    "autocast caches a 16-bit copy of the output head's weight for its matmul whether or not it is tied to the embedding."
    m = tiny_model("llama", **TINY, tie_word_embeddings=True)
    mb = measure_memory_breakdown(m, batch(1024, 4, 256), autocast_dtype=torch.bfloat16)
    e = estimate_memory(m, mode="full", dtype="bf16", mixed_precision="autocast", batch_size=4, seq_len=256)
    assert e.other == (model_shape(m).quantizable_params + 1024 * 128) * 2
    assert abs(e.total / mb["peak"] - 1) < 0.01


def test_optimizer_impl_scratch():
    kw = dict(mode="full", dtype="fp32", batch_size=1, seq_len=16)
    P = model_shape("llama-2-7b").params
    loop, each, fused = (estimate_memory("llama-2-7b", optimizer_impl=i, **kw) for i in ("for-loop", "foreach", "fused"))
    assert each.details["optimizer_scratch"] == 4 * P                     # one fp32 temporary for every parameter
    assert loop.details["optimizer_scratch"] == 2 * 4 * 32000 * 4096      # two the size of the largest tensor (the embedding)
    assert "optimizer_scratch" not in fused.details
    assert each.total > loop.total > fused.total
    with pytest.raises(ValueError, match="optimizer_impl"): estimate_memory("llama-2-7b", optimizer_impl="vectorized")
