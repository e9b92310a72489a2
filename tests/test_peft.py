"""gslm.peft: every from-scratch PEFT method against the `peft` library (same config, same weights -> same logits)."""
import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import peft  # dev dependency: the oracle every check compares against
from peft import (IA3Config as PeftIA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType,
                  get_peft_model)

from gslm.models import tiny_model
from gslm.peft import (METHODS, Adapter, AdapterConfig, LoRAConfig, PrefixConfig, PrefixTuning, PromptConfig,
                       PromptTuning, apply_adapters, apply_bitfit, apply_ia3, apply_lora, apply_method,
                       copy_peft_weights, count_parameters, freeze_all_but, merge_lora, prefix_from_peft,
                       trainable_parameters, unmerge_lora)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 512, (2, 10), generator=g)
    mask = torch.ones_like(x); mask[1, :3] = 0          # left padding in row 2
    return x, mask


def logits(m, x, **kw):
    m.eval()
    with torch.no_grad(): return m(x, **kw).logits


def test_partial_and_bitfit():
    m = freeze_all_but(tiny_model("llama"), [r"layers\.1\.", "lm_head"])
    assert trainable_parameters(m) == sum(p.numel() for n, p in m.named_parameters() if "layers.1." in n or "lm_head" in n)
    with pytest.raises(ValueError, match="matches no parameter"): freeze_all_but(tiny_model("llama"), "nope_xyz")
    q = apply_bitfit(tiny_model("qwen2"))
    assert all(n.endswith("bias") for n, p in q.named_parameters() if p.requires_grad)
    # peft LoRA with bias="all" trains every bias besides the LoRA matrices
    pq = get_peft_model(tiny_model("qwen2"), LoraConfig(r=2, target_modules=["q_proj"], bias="all"))
    assert trainable_parameters(pq) - sum(p.numel() for n, p in pq.named_parameters() if "lora_" in n) == trainable_parameters(q) > 0
    with pytest.raises(ValueError, match="no bias"): apply_bitfit(tiny_model("llama"))


def test_lora_equals_peft_and_merges(batch):
    x, _ = batch
    base = tiny_model("llama")
    ref = logits(base, x)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    ours = apply_lora(copy.deepcopy(base), cfg)
    assert_close(logits(ours, x), ref)                              # B = 0 -> identity
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=list(cfg.target_modules)))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n: nn.init.normal_(p, std=0.1)
    copy_peft_weights(ours, theirs)
    assert trainable_parameters(ours) == trainable_parameters(theirs) > 0
    lo = logits(ours, x)
    assert_close(lo, logits(theirs, x))
    assert not torch.allclose(lo, ref)
    w0 = ours.model.layers[0].self_attn.q_proj.base.weight.clone()
    merge_lora(ours)
    assert_close(logits(ours, x), lo, rtol=1e-5, atol=1e-5)         # merged == unmerged
    assert_close(ours.model.layers[0].self_attn.q_proj.base.weight,
                 theirs.merge_and_unload().model.layers[0].self_attn.q_proj.weight)
    unmerge_lora(ours)
    assert_close(ours.model.layers[0].self_attn.q_proj.base.weight, w0)


def test_lora_gradients_equal_peft(batch):
    x, mask = batch
    base = tiny_model("llama")
    ours = apply_lora(copy.deepcopy(base), LoRAConfig(r=4, alpha=8))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n: nn.init.normal_(p, std=0.1)
    copy_peft_weights(ours, theirs)
    ours(x, attention_mask=mask, labels=x).loss.backward()
    theirs(input_ids=x, attention_mask=mask, labels=x).loss.backward()
    mine = dict(ours.named_parameters())
    for n, p in theirs.named_parameters():
        if p.requires_grad:
            assert_close(mine[n.replace("base_model.model.", "", 1).replace(".default", "")].grad, p.grad)


def test_ia3_equals_peft(batch):
    x, _ = batch
    base = tiny_model("llama")
    ours = apply_ia3(copy.deepcopy(base))
    assert_close(logits(ours, x), logits(base, x))
    theirs = get_peft_model(copy.deepcopy(base), PeftIA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                               feedforward_modules=["down_proj"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "ia3_l" in n: nn.init.normal_(p, mean=1.0, std=0.5)
    copy_peft_weights(ours, theirs)
    assert trainable_parameters(ours) == trainable_parameters(theirs) > 0
    assert_close(logits(ours, x), logits(theirs, x))
    assert not torch.allclose(logits(ours, x), logits(base, x))


def test_prompt_tuning_equals_peft(batch):
    x, mask = batch
    theirs = get_peft_model(tiny_model("llama"), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    ours = PromptTuning(tiny_model("llama"), PromptConfig(num_virtual_tokens=4))
    with torch.no_grad(): ours.prompt.copy_(theirs.prompt_encoder["default"].embedding.weight)
    assert trainable_parameters(ours) == trainable_parameters(theirs) == 4 * 64
    ours.eval(); theirs.eval()
    with torch.no_grad():
        a, b = ours(x, attention_mask=mask, labels=x), theirs(input_ids=x, attention_mask=mask, labels=x)
    assert_close(a.logits, b.logits); assert_close(a.loss, b.loss)


def test_prefix_tuning_equals_peft(batch):
    x, mask = batch
    theirs = get_peft_model(tiny_model("llama"), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5))
    ours = PrefixTuning(tiny_model("llama"), PrefixConfig(num_virtual_tokens=5))
    prefix_from_peft(ours, theirs)
    assert trainable_parameters(ours) == trainable_parameters(theirs) > 0
    ours.eval(); theirs.eval()
    with torch.no_grad():
        a, b = ours(x, attention_mask=mask, labels=x), theirs(input_ids=x, attention_mask=mask, labels=x)
    assert_close(a.logits, b.logits); assert_close(a.loss, b.loss)
    with torch.no_grad(): ours.prefix.add_(1.0)                     # the check can fail
    with torch.no_grad(): assert not torch.allclose(ours(x, attention_mask=mask).logits, b.logits)


def test_adapter_equals_hand_forward(batch):
    x, _ = batch
    base = tiny_model("llama")
    ad = apply_adapters(copy.deepcopy(base), AdapterConfig(bottleneck=4))
    assert_close(logits(ad, x), logits(base, x))                    # W_up = 0 -> identity
    hooked = copy.deepcopy(base)
    with torch.no_grad():
        for name, mod in ad.named_modules():
            if isinstance(mod, Adapter):
                nn.init.normal_(mod.up.weight, std=0.5)
                hooked.get_submodule(name).register_forward_hook(
                    lambda m, i, y, a=mod: y + torch.nn.functional.gelu(y @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
    assert_close(logits(ad, x), logits(hooked, x))
    assert not torch.allclose(logits(ad, x), logits(base, x))
    pf = apply_adapters(tiny_model("llama"), AdapterConfig(bottleneck=4, placement="pfeiffer"))
    assert trainable_parameters(pf) * 2 == trainable_parameters(ad)


def test_apply_method_all(batch):
    x, mask = batch
    seen = {}
    for meth in METHODS:
        m = tiny_model("qwen2") if meth == "bitfit" else tiny_model("llama")
        kw = {"partial": dict(patterns=["lm_head"])}.get(meth, {})
        m = apply_method(m, meth, **kw)
        out = m(x, attention_mask=mask, labels=x)
        out.loss.backward()
        tr = [p for p in m.parameters() if p.requires_grad]
        assert tr and all(p.grad is not None for p in tr), meth
        seen[meth] = trainable_parameters(m)
    assert seen["full"] == count_parameters(tiny_model("llama"))["total"]
    assert max(v for k, v in seen.items() if k != "full") < seen["full"]
    with pytest.raises(ValueError, match="not one of"): apply_method(tiny_model("llama"), "qlora")
    with pytest.raises(TypeError, match="allowed"): apply_method(tiny_model("llama"), "lora", rank=4)


def test_greedy_generate_equals_generate(batch):
    from gslm.peft import greedy_generate
    x, mask = batch
    plain = tiny_model("llama").eval()
    assert torch.equal(greedy_generate(plain, x, mask, max_new_tokens=5),
                       plain.generate(input_ids=x, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0))
    theirs = get_peft_model(tiny_model("llama"), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)).eval()
    ours = PromptTuning(tiny_model("llama"), PromptConfig(num_virtual_tokens=4)).eval()
    with torch.no_grad(): ours.prompt.copy_(theirs.prompt_encoder["default"].embedding.weight)
    assert torch.equal(greedy_generate(ours, x, mask, max_new_tokens=5),
                       theirs.generate(input_ids=x, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0))
    theirs = get_peft_model(tiny_model("llama"), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)).eval()
    with torch.no_grad(): theirs.prompt_encoder["default"].embedding.weight.mul_(30)
    ours = PrefixTuning(tiny_model("llama"), PrefixConfig(num_virtual_tokens=4)).eval()
    prefix_from_peft(ours, theirs)
    g = theirs.generate(input_ids=x[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy_generate(ours, x[:1], max_new_tokens=5), g)
    assert not torch.equal(greedy_generate(plain, x[:1], max_new_tokens=5), g)


def test_trainable_state_dict_roundtrip(batch):
    from gslm.peft import load_trainable_state_dict, trainable_state_dict
    x, mask = batch
    for meth in ("lora", "ia3", "adapter", "prefix", "prompt"):
        torch.manual_seed(1)
        src = apply_method(tiny_model("llama"), meth)
        with torch.no_grad():
            for p in src.parameters():
                if p.requires_grad: p.add_(torch.randn_like(p) * 0.1)
        sd = trainable_state_dict(src)
        dst = load_trainable_state_dict(apply_method(tiny_model("llama"), meth), sd)
        src.eval(); dst.eval()
        with torch.no_grad(): assert_close(dst(x, attention_mask=mask).logits, src(x, attention_mask=mask).logits)
    with pytest.raises(KeyError, match="not prepared like"):
        load_trainable_state_dict(apply_method(tiny_model("llama"), "ia3"), sd)


def test_adapters_on_a_4bit_base_stay_float_and_train():
    "QLoRA: on a bitsandbytes 4-bit base (packed uint8 weights) the adapters are fp32, get gradients, and merging refuses."
    from gslm.models import load_model
    for method in ("lora", "ia3", "adapter"):
        m, tok = load_model("gslm-tiny", device="cpu", quantization="4bit", dtype=torch.bfloat16)
        m = apply_method(m, method)
        x = tok("To be, or not to be", return_tensors="pt").input_ids
        out = m(x, labels=x)
        assert out.logits.dtype == torch.bfloat16                  # the adapters cast back to the base's dtype
        out.loss.backward()
        trained = [p for p in m.parameters() if p.requires_grad]
        assert trained and all(p.dtype == torch.float32 and p.grad is not None for p in trained), method
    q = apply_lora(load_model("gslm-tiny", device="cpu", quantization="4bit")[0])
    with pytest.raises(TypeError, match="quantized"): merge_lora(q)
