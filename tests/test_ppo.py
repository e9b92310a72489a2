"Oracle checks for gslm.ppo: GAE = its definition, clipping zeroes the right gradients, the KL controller's direction, GRPO's advantage, and a tiny PPO run whose reward rises with bounded KL."
import copy

import pytest
import torch

from gslm.ppo import (PolicyWithValue, PPOConfig, PPOTrainer, AdaptiveKLController, FixedKLController, evaluate_policy,
                      gae, grpo_advantages, kl_penalized_rewards, masked_mean, masked_var, policy_loss, regex_reward,
                      response_mask, rollout, value_loss, whiten)


def gae_reference(rewards, values, lengths, gamma, lam):
    "A_t = Σ_l (γλ)^l δ_{t+l} over each response's own tokens, δ_t = r_t + γ V_{t+1} − V_t, V_L = 0."
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        L = int(lengths[b])
        V = [float(values[b, t]) for t in range(L)] + [0.0]
        delta = [float(rewards[b, t]) + gamma * V[t + 1] - V[t] for t in range(L)]
        for t in range(L):
            adv[b, t] = sum((gamma * lam) ** l * delta[t + l] for l in range(L - t))
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_definition(gamma, lam):
    g = torch.Generator().manual_seed(1)
    rew, val = torch.randn(5, 11, generator=g, dtype=torch.float64), torch.randn(5, 11, generator=g, dtype=torch.float64)
    lengths = torch.tensor([11, 1, 5, 8, 3])
    mask = (torch.arange(11) < lengths[:, None]).double()
    adv, ret = gae(rew, val, mask, gamma, lam)
    torch.testing.assert_close(adv, gae_reference(rew, val, lengths, gamma, lam))
    torch.testing.assert_close(ret, (adv + val) * mask)
    # values after a response's end must not leak into it
    val2 = val.clone(); val2[mask == 0] = 1e6
    torch.testing.assert_close(gae(rew, val2, mask, gamma, lam)[0], adv)


def test_response_mask_and_kl_rewards():
    assert response_mask(torch.tensor([[5, 0, 0, 7]]), 0).tolist() == [[1, 1, 0, 0]]
    r, kl = kl_penalized_rewards(torch.tensor([2.0]), torch.tensor([[-1.0, -1.0, -3.0]]), torch.tensor([[-2.0, -1.0, -1.0]]),
                                 torch.tensor([[1, 1, 0]]), beta=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.5, 2.0, 0.0]]))
    with pytest.raises(ValueError, match="no tokens"):
        kl_penalized_rewards(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), 0.1)


def test_whiten():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 5 + [0], [1] + [0] * 5], dtype=torch.float64)
    w = whiten(x, m)
    real = x[m.bool()]
    torch.testing.assert_close(w[m.bool()], (real - real.mean()) / real.std())
    assert w[~m.bool()].abs().max() == 0
    torch.testing.assert_close(masked_var(x, m), real.var())
    with pytest.raises(ValueError, match="at least 2"): masked_var(x, torch.zeros_like(m))


def test_policy_loss_gradient_zero_outside_clip():
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5] * 2)
    A = torch.tensor([1.0] * 5 + [-1.0] * 5)
    lp = torch.log(ratios).requires_grad_(True)
    loss, st = policy_loss(lp, torch.zeros(10), A, torch.ones(10), clip_range=0.2)
    loss.backward()
    zero = ((A > 0) & (ratios > 1.2)) | ((A < 0) & (ratios < 0.8))
    assert lp.grad[zero].abs().max() == 0
    torch.testing.assert_close(lp.grad[~zero], (-A * ratios / 10)[~zero])
    assert (lp.grad[~zero] != 0).all()
    assert abs(st["clipfrac"] - 0.2) < 1e-6
    # at the old policy (ratio 1) the loss is minus the mean advantage over real tokens
    adv = torch.tensor([[1.0, 2.0, 99.0]]); m = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), adv, m)[0], torch.tensor(-1.5))


def test_value_loss_clipping():
    v = torch.tensor([0.5, 0.1], requires_grad=True)
    vl, _ = value_loss(v, torch.zeros(2), torch.ones(2), torch.ones(2), clip_range_value=0.2)
    vl.backward()
    assert v.grad[0] == 0 and abs(v.grad[1].item() - (0.1 - 1.0) / 2) < 1e-6


def test_kl_controller_direction():
    up, down, same = (AdaptiveKLController(0.2, 6.0, 100) for _ in range(3))
    assert up.update(12.0, 10) > 0.2 and down.update(1.0, 10) < 0.2 and abs(same.update(6.0, 10) - 0.2) < 1e-12
    assert abs(AdaptiveKLController(0.2, 6.0, 100).update(1e9, 10) - 0.2 * 1.02) < 1e-12   # error capped at +20 %
    assert FixedKLController(0.0).update(50.0, 10) == 0.0
    with pytest.raises(ValueError, match="FixedKLController"): AdaptiveKLController(0.0, 6.0, 100)


def test_grpo_advantages():
    r = torch.tensor([4.0, 0.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    a = grpo_advantages(r, 4)
    g = r.view(2, 4)
    torch.testing.assert_close(a, ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1))
    assert a[4:].abs().max() == 0                                   # a group with equal rewards teaches nothing
    with pytest.raises(ValueError, match="groups of 3"): grpo_advantages(r, 3)


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of mini_batch_size"): PPOConfig(batch_size=10, mini_batch_size=4)
    from gslm.models import tiny_model
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="frozen copy"): PPOTrainer(PolicyWithValue(m), m, None, regex_reward("a"))


def test_ppo_reward_rises_with_bounded_kl():
    "gslm-tiny learns to say thou/thee/thy: held-out reward rises, KL to the reference stays bounded."
    from gslm.models import load_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)             # a shared 2-core CPU: one thread per process avoids OpenMP oversubscription
    try: _tiny_ppo_run(load_model)
    finally: torch.set_num_threads(threads)

def _tiny_ppo_run(load_model):
    torch.manual_seed(0)
    tiny, tok = load_model("gslm-tiny")
    ref = copy.deepcopy(tiny).requires_grad_(False)
    speakers = ["ROMEO", "JULIET", "HAMLET", "MACBETH", "OTHELLO", "PORTIA", "FALSTAFF", "BRUTUS", "IAGO", "PUCK"]
    openers = ["What", "O", "My lord", "I", "Come", "Now", "Good", "Why"]
    prompts = [f"{s}:\n{o}" for s in speakers for o in openers]
    train, heldout = prompts[:60], prompts[60:]
    reward_fn = regex_reward(r"\b(?:thou|thee|thy)\b", cap=3)
    cfg = PPOConfig(batch_size=32, mini_batch_size=16, ppo_epochs=4, lr=3e-4, max_new_tokens=16, seed=0)
    policy = PolicyWithValue(copy.deepcopy(tiny))
    # at the start the policy is the reference: the KL is exactly zero
    ro = rollout(policy, ref, tok, heldout[:4], reward_fn, cfg, torch.Generator().manual_seed(0))
    assert (ro.logprobs - ro.ref_logprobs).abs().max() == 0
    before = evaluate_policy(policy, ref, tok, heldout, reward_fn, cfg, samples=4)
    trainer = PPOTrainer(policy, ref, tok, reward_fn, cfg)
    hist = trainer.train(train, 10)
    after = evaluate_policy(policy, ref, tok, heldout, reward_fn, cfg, samples=4)
    print(f"held-out reward {before['reward']:.3f} -> {after['reward']:.3f}, KL {after['kl']:.2f}, max training KL {hist.kl.max():.2f}")
    assert after["reward"] > before["reward"] + 0.3, (before["reward"], after["reward"])
    assert 0 < after["kl"] < 3 * cfg.target_kl and hist.kl.max() < 3 * cfg.target_kl, (after["kl"], hist.kl.max())


def test_grpo_advantages_and_clipped_loss_equal_trl():
    "TRL's GRPOTrainer: its advantages = grpo_advantages of the same rewards; its bnpo loss (β = 0) = policy_loss, gradients too."
    import re, tempfile, warnings
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from gslm.evaluation import token_logprobs
    from gslm.models import load_model
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        tiny, tok = load_model("gslm-tiny")
        recorded = []
        def reward(completions, **kwargs):
            r = [float(min(len(re.findall(r"e", c)), 6)) for c in completions]; recorded.append(r); return r
        prompts = ["ROMEO:\nWhat", "HAMLET:\nO"]                       # equal token lengths: no padding in TRL's forward
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, num_generations=4,
                                  max_completion_length=8, use_cpu=True, report_to=[], seed=0, beta=0.0, loss_type="bnpo",
                                  epsilon=0.2, save_strategy="no", bf16=False)
            grpo = trl.GRPOTrainer(model=copy.deepcopy(tiny), reward_funcs=reward, args=args, processing_class=tok,
                                   train_dataset=Dataset.from_dict({"prompt": prompts}))
            out = grpo._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(4)])
        torch.testing.assert_close(grpo_advantages(torch.tensor(recorded[-1]), 4), out["advantages"])
        grpo.model.eval()
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        P = out["prompt_ids"].size(1)
        with torch.no_grad():
            cur = token_logprobs(grpo.model(input_ids=ids, attention_mask=am).logits[:, P - 1:-1], out["completion_ids"])
        old = cur + 0.3 * torch.randn(cur.shape, generator=torch.Generator().manual_seed(0))
        theirs = grpo._compute_loss(grpo.model, {**out, "old_per_token_logps": old})
        lp = token_logprobs(grpo.model(input_ids=ids, attention_mask=am).logits[:, P - 1:-1], out["completion_ids"])
        ours, st = policy_loss(lp, old, out["advantages"][:, None].expand_as(lp), out["completion_mask"], 0.2)
        assert 0 < st["clipfrac"] < 1                                   # both branches of the clip are exercised
        torch.testing.assert_close(ours, theirs)
    finally:
        torch.set_num_threads(threads)
