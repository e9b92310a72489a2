"""gslm.quant: absmax / zero-point int8, block-wise quantization and NF4 against bitsandbytes, bad input, and a QLoRA smoke test."""
import logging, subprocess, sys

import pytest
import torch
from torch import nn

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from gslm.quant import (Quant4bit, absmax_dequantize, absmax_quantize, dequantize_4bit, dequantize_blockwise, dequantize_q4_1,
                        dynamic_code, fake_quantize, fp4_code, get_code, int_code, nf4_code, optimizer_state_bytes, pack_4bit,
                        qlora_model, quant_error, quantize_4bit, quantize_blockwise, unpack_4bit, weight_storage_bytes,
                        zeropoint_dequantize, zeropoint_quantize)

import bitsandbytes as bnb                      # a dev requirement: a missing install is a failure, not a skip
import bitsandbytes.functional as bnbF


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread): yield


def test_absmax_equals_llm_int8_and_zeropoint_equals_torch_fake_quant():
    g = torch.Generator().manual_seed(0)
    for shift in (0.0, 0.05):
        x = torch.randn(256, 200, generator=g) * 0.05 + shift
        q, s = absmax_quantize(x, dim=-1)
        CB, row_absmax, _ = bnbF.int8_vectorwise_quant(x)
        assert torch.equal(q, CB) and torch.equal(s.squeeze(1), row_absmax / 127)
        q, s, z = zeropoint_quantize(x)
        assert torch.equal(zeropoint_dequantize(q, s, z), torch.fake_quantize_per_tensor_affine(x, s.item(), int(z), 0, 255))
        q, s, z = zeropoint_quantize(x, dim=-1)
        theirs = torch.fake_quantize_per_channel_affine(x, s.squeeze(1), z.squeeze(1).int(), 0, 0, 255)
        assert torch.equal(zeropoint_dequantize(q, s, z), theirs)


def test_codes_are_bitsandbytes_tables():
    assert torch.equal(nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(fp4_code(), bnbF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbF.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_code(signed=False), bnbF.create_dynamic_map(signed=False))
    assert not torch.equal(nf4_code(offset=0.99), nf4_code())          # the derivation really depends on δ
    assert nf4_code()[7] == 0 and nf4_code()[0] == -1 and nf4_code()[-1] == 1


def _check_4bit(w, quant_type="nf4", blocksize=64):
    ours = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    packed, st = bnbF.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize)
    deq = bnbF.dequantize_4bit(packed, st)
    assert torch.equal(ours.packed, packed.reshape(-1)), "packed 4-bit codes differ"
    assert torch.equal(ours.absmax, st.absmax), "absmax scales differ"
    assert torch.equal(dequantize_4bit(ours).reshape(deq.shape), deq), "dequantized values differ"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_equals_bitsandbytes_random(quant_type):
    g = torch.Generator().manual_seed(1)
    for shape in [(128, 256), (4000,)]:                  # 4000 = 62.5 blocks: a short last block
        for bs in (64, 128):
            _check_4bit(torch.randn(*shape, generator=g) * 0.02, quant_type, bs)
    w = torch.randn(4001, generator=g)                   # odd count: padding nibble = code of 0.0
    packed, st = bnbF.quantize_4bit(w, quant_type=quant_type, blocksize=64)
    assert torch.equal(quantize_4bit(w, quant_type=quant_type).packed, packed.reshape(-1))


def test_nf4_equals_bitsandbytes_on_smollm2(smollm2):
    model, _ = smollm2
    layer = model.model.layers[3]
    for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
        _check_4bit(m.weight.detach())


def test_double_quant_against_bitsandbytes(smollm2):
    model, _ = smollm2
    w = model.model.layers[5].mlp.gate_proj.weight.detach()
    ours = quantize_4bit(w, double_quant=True)
    packed, st = bnbF.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    deq = bnbF.dequantize_4bit(packed, st)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.offset, st.offset) and torch.equal(ours.absmax2, st.state2.absmax)
    assert (ours.absmax == st.absmax).float().mean() > 0.98              # bitsandbytes' CPU search is sometimes one level off
    first = quantize_4bit(w).absmax - ours.offset
    level = lambda c: dynamic_code()[c.long()] * ours.absmax2.repeat_interleave(256)[:c.numel()]
    assert ((level(ours.absmax) - first).abs() <= (level(st.absmax) - first).abs() + 1e-9).all()   # ours: the nearest level
    theirs = Quant4bit(packed.reshape(-1), st.absmax, tuple(w.shape), w.dtype, offset=st.offset, absmax2=st.state2.absmax)
    assert torch.equal(dequantize_4bit(theirs), deq)                     # our decoder = theirs, bit for bit
    assert abs(quant_error(w, dequantize_4bit(ours)) - quant_error(w, deq)) < 1e-4


def test_roundtrip_error_bounds():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 512, generator=g)
    q, s = absmax_quantize(x, dim=-1)
    assert ((absmax_dequantize(q, s) - x).abs() <= s * (0.5 + 1e-4)).all()
    q, s, z = zeropoint_quantize(x, bits=4, dim=-1)
    assert ((zeropoint_dequantize(q, s, z) - x).abs() <= s * (0.5 + 1e-4)).all()
    code = nf4_code()
    half_gap = ((code[1:] - code[:-1]) / 2).max()
    blocks = x.reshape(-1, 64)
    err = (dequantize_4bit(quantize_4bit(x)).reshape(-1, 64) - blocks).abs()
    assert (err <= half_gap * blocks.abs().amax(1, keepdim=True) * (1 + 1e-5)).all()
    errs = [quant_error(x, fake_quantize(x, f"int{b}", 64)) for b in (8, 6, 4, 3, 2)]
    assert errs == sorted(errs) and errs[0] < 0.01 < errs[2] < errs[4]
    assert quant_error(x, fake_quantize(x, "nf4")) < quant_error(x, fake_quantize(x, "int4"))
    z = torch.zeros(3, 64)
    assert torch.equal(dequantize_4bit(quantize_4bit(z)), z) and torch.equal(absmax_dequantize(*absmax_quantize(z)), z)


def test_pack_and_storage_accounting():
    codes = torch.randint(0, 16, (999,))
    assert torch.equal(unpack_4bit(pack_4bit(codes), 999), codes.to(torch.uint8))
    assert pack_4bit(torch.tensor([1, 2, 15])).tolist() == [0x12, 0xF0]
    from gslm.memory import nf4_bytes_per_param
    w = torch.randn(512, 512)
    for dq in (False, True):
        q = quantize_4bit(w, double_quant=dq)
        assert abs(q.nbytes() / q.numel - nf4_bytes_per_param(dq)) < 1e-4


def test_bad_input_errors():
    x = torch.randn(8, 64)
    with pytest.raises(TypeError, match="dtype torch.int64"): absmax_quantize(torch.arange(8))
    with pytest.raises(TypeError, match="dtype torch.int32"): quantize_4bit(torch.arange(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN"): quantize_4bit(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="empty"): zeropoint_quantize(torch.empty(0))
    with pytest.raises(ValueError, match="bits=1"): absmax_quantize(x, bits=1)
    with pytest.raises(ValueError, match="bits=9"): zeropoint_quantize(x, bits=9)
    for bs in (0, -64, 64.0, True):
        with pytest.raises(ValueError, match="blocksize"): quantize_blockwise(x, nf4_code(), blocksize=bs)
    with pytest.raises(ValueError, match="magnitude"): quantize_blockwise(x, torch.tensor([-2.0, 0.0, 2.0]))
    idx, am = quantize_blockwise(x, nf4_code(), 64)
    with pytest.raises(ValueError, match="blocksize they were quantized with"): dequantize_blockwise(idx, am, nf4_code(), 128)
    with pytest.raises(ValueError, match="does not fit in 4 bits"): pack_4bit(torch.tensor([3, 16]))
    with pytest.raises(ValueError, match="choose one of"): quantize_4bit(x, quant_type="int4")
    with pytest.raises(ValueError, match="is not known"): get_code("int9")
    with pytest.raises(ValueError, match="positive integer"): qlora_model(r=0)
    with pytest.raises(ValueError, match="list of module names"): qlora_model(target_modules="q_proj")
    with pytest.raises(TypeError, match="uint8"): dequantize_q4_1(torch.zeros(20, dtype=torch.int16), (32,))


def test_q4_1_equals_gguf(smollm2):
    import gguf
    from gguf.quants import dequantize
    from gslm.models import find_smollm2_gguf
    reader = gguf.GGUFReader(find_smollm2_gguf())
    t = next(t for t in reader.tensors if t.name == "blk.2.ffn_up.weight")
    ours = dequantize_q4_1(torch.from_numpy(t.data.copy()), (1536, 576))
    assert torch.equal(ours, torch.from_numpy(dequantize(t.data, t.tensor_type)))
    assert torch.equal(ours, smollm2[0].model.layers[2].mlp.up_proj.weight.detach())


def test_optimizer_state_bytes():
    m = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    n = sum(p.numel() for p in m.parameters())
    for opt, lo, hi in ((torch.optim.AdamW(m.parameters()), 8 * n, 8 * n + 64), (bnb.optim.AdamW8bit(m.parameters()), 0, 0.4 * 8 * n)):
        m(torch.randn(4, 64)).sum().backward(); opt.step()
        assert lo <= optimizer_state_bytes(opt) <= hi


def test_gslm_quant_imports_without_bitsandbytes():
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "import torch, gslm.quant as q\n"
            "x = torch.randn(4, 64); r = q.dequantize_4bit(q.quantize_4bit(x, double_quant=True))\n"
            "assert q.quant_error(x, r) < 0.2; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_qlora_smoke_on_gslm_tiny():
    from gslm.core import data_path, seed_everything
    from gslm.data import pack, read_records
    from gslm.sft import sft_examples
    from gslm.train import TrainConfig, fit
    seed_everything(0)
    model, tok = qlora_model("gslm-tiny", r=4, alpha=8)
    lin = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(lin.base_layer, bnb.nn.Linear4bit)
    assert weight_storage_bytes(model) > model.get_memory_footprint()      # quantization states counted too
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    recs = read_records(data_path("instructions/train.jsonl"))[:64]
    data = pack(sft_examples(recs, tok, system="", max_length=128), 128, pad_id=tok.pad_token_id)
    data = {k: v[:1] for k, v in data.items()}                          # one row, seen again and again: the loss must fall
    model.eval()
    with torch.no_grad(): model(input_ids=torch.tensor(data["input_ids"][:1]))   # evaluate first: must not repack the 4-bit weights
    assert not getattr(lin.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    hist = fit(model, data, config=TrainConfig(max_steps=8, batch_size=1, lr=1e-2, progress_bar=False))
    assert hist.loss[-1] < 0.9 * hist.loss[0], hist.loss
    for n, p in model.named_parameters():
        if n in frozen: assert torch.equal(p.detach(), frozen[n]), f"frozen {n} changed"
    assert any(not torch.equal(p.detach(), lora[n]) for n, p in model.named_parameters() if n in lora)
