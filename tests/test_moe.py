"gslm.moe: the Mixtral oracles (block, auxiliary loss, whole model), upcycling equality, capacity, training the auxiliary loss, bad input."
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

from gslm.moe import (MoEConfig, MoELayer, route, capacity_mask, load_balancing_loss, router_z_loss, mixtral_block_state,
                      load_mixtral_block_state, upcycle, llama_to_moe, moe_layers, set_moe, moe_aux_loss, to_mixtral,
                      moe_param_counts, routing_stats, expert_load, load_cv)
from gslm.pretrain import tiny_llama, causal_lm_loss


def _mixtral_block(hidden=32, inter=48, experts=8, k=2, seed=0):
    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=k,
                        experts_implementation="eager")
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters(): p.normal_(0.0, 0.1)
    return block


@pytest.mark.parametrize("experts,k", [(8, 2), (4, 1), (4, 4)])
def test_mixtral_block_oracle(experts, k):
    block = _mixtral_block(experts=experts, k=k)
    ours = load_mixtral_block_state(MoELayer(MoEConfig(32, 48, experts, k)), block.state_dict()).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        y, logits = ours(x, return_router_logits=True)
        torch.testing.assert_close(y, block(x))
        torch.testing.assert_close(logits, block.gate(x)[0])
    # and back: our layout is transformers' layout
    for key, v in mixtral_block_state(ours).items(): torch.testing.assert_close(v, block.state_dict()[key])


def test_mixtral_block_oracle_detects_a_wrong_copy():
    block = _mixtral_block()
    state = dict(block.state_dict())
    gu = state["experts.gate_up_proj"]
    state["experts.gate_up_proj"] = torch.cat([gu[:, 48:], gu[:, :48]], 1)       # gate and up swapped
    ours = load_mixtral_block_state(MoELayer(MoEConfig(32, 48, 8, 2)), state).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad(): assert not torch.allclose(ours(x), block(x), atol=1e-4)


def test_aux_and_z_loss_oracle():
    torch.manual_seed(0)
    a, b = torch.randn(30, 8), torch.randn(30, 8) * 3
    mask = torch.ones(3, 10); mask[1, :4] = 0
    for k in (1, 2, 3):
        torch.testing.assert_close(load_balancing_loss(a, k), load_balancing_loss_func((a,), 8, k))
        torch.testing.assert_close(load_balancing_loss([a, b], k), load_balancing_loss_func((a, b), 8, k))
        torch.testing.assert_close(load_balancing_loss([a, b], k, attention_mask=mask), load_balancing_loss_func((a, b), 8, k, mask))
    torch.testing.assert_close(router_z_loss(a), router_z_loss_func(a.reshape(3, 10, 8)))
    assert load_balancing_loss(torch.zeros(64, 8), 2).item() == pytest.approx(2.0)      # even routing: the minimum, k
    sure = torch.full((64, 8), -30.0); sure[:, :2] = 30.0
    assert load_balancing_loss(sure, 2).item() == pytest.approx(8.0, rel=1e-4)          # collapsed: E


def test_whole_model_equals_mixtral_for_causal_lm():
    m = llama_to_moe(tiny_llama(128, hidden_size=64, num_hidden_layers=2, seed=0), 4, 2, upcycle_mlp=False,
                     intermediate_size=80, aux_loss_coef=0.02).eval()
    mix = to_mixtral(m)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        logits = m(ids).logits
        ref = mix(ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(logits, ref.logits)
    for layer, r in zip(moe_layers(m), ref.router_logits): torch.testing.assert_close(layer.stats.router_logits, r)
    torch.testing.assert_close(moe_aux_loss(m), ref.aux_loss)
    torch.testing.assert_close(causal_lm_loss(logits, ids) + 0.02 * moe_aux_loss(m), ref.loss)


def test_route_orders_and_renormalisation():
    logits = torch.randn(20, 6)
    for norm in (True, False):
        w1, e1 = route(logits, 3, "softmax_topk", norm)
        w2, e2 = route(logits, 3, "topk_softmax", norm)
        assert torch.equal(e1, e2); torch.testing.assert_close(w1, w2)
    torch.testing.assert_close(route(logits, 3)[0].sum(-1), torch.ones(20))
    assert (route(logits, 3, normalize=False)[0].sum(-1) < 1).all()
    with pytest.raises(ValueError, match="order"): route(logits, 2, "sorted")


def test_upcycled_layer_and_model_equal_the_dense_ones():
    from gslm.models import load_model
    tiny, _ = load_model("gslm-tiny")
    mlp = tiny.model.layers[1].mlp
    h = torch.randn(3, 20, tiny.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(upcycle(mlp, 4, 2, seed=1)(h), mlp(h))
        assert not torch.allclose(upcycle(mlp, 4, 2, noise_std=0.1)(h), mlp(h), atol=1e-4)   # noise breaks the equality
        assert not torch.allclose(upcycle(mlp, 4, 2, normalize_topk=False)(h), mlp(h), atol=1e-4)
    up = llama_to_moe(copy.deepcopy(tiny), 4, 2).eval()
    x = torch.randint(0, tiny.config.vocab_size, (2, 64))
    with torch.no_grad(): torch.testing.assert_close(up(x).logits, tiny(x).logits, atol=1e-4, rtol=1e-4)
    pc, pd_ = moe_param_counts(up), moe_param_counts(tiny)
    per_expert = 3 * tiny.config.hidden_size * tiny.config.intermediate_size
    assert pc["total"] - pd_["total"] == tiny.config.num_hidden_layers * (3 * per_expert + 4 * tiny.config.hidden_size)
    assert pc["active"] - pd_["active"] == tiny.config.num_hidden_layers * (per_expert + 4 * tiny.config.hidden_size)


def test_capacity_drops_and_passes_through():
    ex = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [2, 1]])
    assert capacity_mask(ex, 4, 2).tolist() == [[True, True], [True, True], [False, True], [True, False], [True, False]]
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(16, 24, 4, 2, init_std=0.3)).eval()
    x = torch.randn(64, 16)
    with torch.no_grad():
        free = layer(x); assert layer.stats.drop_rate == 0
        layer.config = MoEConfig(16, 24, 4, 2, capacity_factor=100.0)
        torch.testing.assert_close(layer(x), free)                    # a capacity nobody reaches changes nothing
        layer.config = MoEConfig(16, 24, 4, 2, capacity_factor=0.25)
        y = layer(x)
    st = layer.stats
    assert st.kept.max().item() <= layer.config.capacity(64) == 8
    assert st.drop_rate == pytest.approx(1 - st.kept.sum().item() / 128) and st.drop_rate > 0.5
    w, e = route(st.router_logits, 2)
    keep = capacity_mask(e, 4, 8)
    fully_dropped = ~keep.any(1)
    assert fully_dropped.any() and (y[fully_dropped] == 0).all()     # nothing added: the residual passes such tokens through
    assert not (y[~fully_dropped] == 0).all(1).any()


def test_aux_loss_reaches_the_router_gradient_and_balances():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 32)
    layer = MoELayer(MoEConfig(32, 48, 4, 2, aux_loss_coef=0.1, z_loss_coef=0.01)).train()
    plain = copy.deepcopy(layer); plain.config = MoEConfig(32, 48, 4, 2)
    layer(x).pow(2).mean().backward()
    y, lg = plain(x, return_router_logits=True)
    (y.pow(2).mean() + 0.1 * load_balancing_loss(lg, 2) + 0.01 * router_z_loss(lg)).backward()
    torch.testing.assert_close(layer.gate.weight.grad, plain.gate.weight.grad)
    # training on the auxiliary loss alone balances a skewed router
    skewed = MoELayer(MoEConfig(32, 48, 8, 2, aux_loss_coef=1.0)).train()
    tokens = torch.randn(512, 32) + 2.0
    with torch.no_grad(): skewed.gate.weight[:2] += 0.3
    opt = torch.optim.Adam(skewed.gate.parameters(), lr=0.02)
    cv0 = load_cv(expert_load(skewed.gate(tokens).detach(), 2)).item()
    for _ in range(60):
        opt.zero_grad(); (skewed(tokens) * 0).sum().backward(); opt.step()
    cv1 = load_cv(expert_load(skewed.gate(tokens).detach(), 2)).item()
    assert cv1 < 0.5 * cv0, (cv0, cv1)
    skewed.eval()                                                    # and in eval mode the auxiliary loss is not added
    out = skewed(tokens)
    assert out.grad_fn is None or "AddAuxiliaryLoss" not in type(out.grad_fn).__name__


def test_routing_stats_and_set_moe():
    m = llama_to_moe(tiny_llama(64, hidden_size=32, num_hidden_layers=2, seed=0), 4, 2, upcycle_mlp=False)
    ids = torch.randint(0, 64, (1000,))
    rs = routing_stats(m, ids, block_size=50, batch_size=4)
    assert rs.tokens == 1000 and rs.counts.sum().item() == 1000 * 2 * 2 and rs.drop_rate == 0
    torch.testing.assert_close(rs.load.sum(-1), torch.ones(2))
    torch.testing.assert_close(rs.by_token.sum(1), rs.counts)
    set_moe(m, capacity_factor=0.5)
    assert routing_stats(m, ids, block_size=50, batch_size=4).drop_rate > 0
    with pytest.raises(ValueError, match="capacity"): to_mixtral(m)
    with pytest.raises(ValueError, match="top_k"): set_moe(m, top_k=9)


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="top_k=3 is larger than num_experts=2"): MoEConfig(8, 8, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="top_k must be a positive integer"): MoEConfig(8, 8, top_k=0)
    with pytest.raises(ValueError, match="capacity_factor"): MoEConfig(8, 8, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="router_order"): MoEConfig(8, 8, router_order="random")
    with pytest.raises(ValueError, match="z_loss_coef"): MoEConfig(8, 8, z_loss_coef=-1)
    with pytest.raises(ValueError, match="needs"):
        load_mixtral_block_state(MoELayer(MoEConfig(32, 40, 8, 2)), _mixtral_block().state_dict())
    with pytest.raises(ValueError, match="hidden size 32"): MoELayer(MoEConfig(32, 48, 4, 2))(torch.randn(3, 16))
    with pytest.raises(TypeError, match="gate_proj/up_proj/down_proj"): upcycle(torch.nn.Linear(4, 4))
    m = tiny_llama(64, hidden_size=32, num_hidden_layers=2, seed=0)
    with pytest.raises(ValueError, match="width"): llama_to_moe(copy.deepcopy(m), 4, 2, intermediate_size=16)
    with pytest.raises(ValueError, match="every decoder layer"): to_mixtral(llama_to_moe(copy.deepcopy(m), 4, 2, layers=[0]))
    with pytest.raises(RuntimeError, match="call the model"): moe_aux_loss(llama_to_moe(copy.deepcopy(m), 4, 2))
    with pytest.raises(ValueError, match="no MoELayer"): routing_stats(m, torch.zeros(100, dtype=torch.long))
    with pytest.raises(TypeError, match="Llama-style"): llama_to_moe(torch.nn.Linear(2, 2))
