"""gslm.optim: optimisers step for step against torch.optim, schedules against transformers.get_scheduler, Newton."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from gslm.optim import (GD, SCHEDULES, SGD, Adam, AdamW, Newton, Schedule, flat_hessian, get_schedule,
                        make_scheduler)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: see conftest.py


CONFIGS = {
    "GD": (lambda p: GD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "SGD+L2": (lambda p: SGD(p, lr=0.1, weight_decay=1e-2), lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-2)),
    "momentum": (lambda p: SGD(p, lr=0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "momentum-dampened": (lambda p: SGD(p, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-3),
                          lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-3)),
    "nesterov": (lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                 lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adam": (lambda p: Adam(p, lr=3e-3), lambda p: torch.optim.Adam(p, lr=3e-3)),
    "adam+L2": (lambda p: Adam(p, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=1e-2),
                lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=1e-2)),
    "adamw": (lambda p: AdamW(p, lr=3e-3, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1)),
    "adamw-default": (lambda p: AdamW(p), lambda p: torch.optim.AdamW(p)),
}


def train(make_opt, dtype, steps=100, groups=False, schedule=None):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(256, 6, generator=gen, dtype=dtype); y = torch.randint(0, 3, (256,), generator=gen)
    params = ([{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": 0.01}] if groups
              else net.parameters())
    opt = make_opt(params)
    sched = LambdaLR(opt, schedule) if schedule else None
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=gen)
        opt.zero_grad(); F.cross_entropy(net(X[idx]), y[idx]).backward(); opt.step()
        if sched: sched.step()
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_steps_equal_torch_optim(name, dtype):
    ours, theirs = CONFIGS[name]
    a, b = train(ours, dtype), train(theirs, dtype)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert not torch.equal(a, train(lambda p: GD(p, lr=0.0), dtype))    # the run really moved the parameters


@pytest.mark.parametrize("name", ["nesterov", "adamw"])
def test_param_groups_and_lambdalr_match_torch(name):
    ours, theirs = CONFIGS[name]
    sched = get_schedule("cosine", num_warmup_steps=10, num_training_steps=100)
    a = train(ours, torch.float64, groups=True, schedule=sched)
    b = train(theirs, torch.float64, groups=True, schedule=sched)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adam+L2", "adamw"])
def test_state_dict_resume_is_exact(name):
    make = CONFIGS[name][0]
    def run(split):
        torch.manual_seed(0); net = torch.nn.Linear(4, 2); gen = torch.Generator().manual_seed(2)
        opt = make(net.parameters()); sched = make_scheduler(opt, "linear", 5, 50)
        for s in range(40):
            if s == split:        # a restart: build optimiser and scheduler as at the start, then load both states
                so, ss = opt.state_dict(), sched.state_dict()
                opt = make(net.parameters()); sched = make_scheduler(opt, "linear", 5, 50)
                opt.load_state_dict(so); sched.load_state_dict(ss)
            x = torch.randn(8, 4, generator=gen)
            opt.zero_grad(); net(x).pow(2).mean().backward(); opt.step(); sched.step()
        return torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    assert torch.equal(run(None), run(25))


def test_hyperparameter_errors():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="lr=-0.1"): GD(p, lr=-0.1)
    with pytest.raises(ValueError, match="needs momentum > 0"): SGD(p, nesterov=True)
    with pytest.raises(ValueError, match="momentum=1.0"): SGD(p, momentum=1.0)
    with pytest.raises(ValueError, match="betas\\[1\\]"): Adam(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay"): AdamW(p, weight_decay=-1)


def test_adamw_decay_is_decoupled_and_l2_is_not():
    "A weight with zero data gradient: AdamW decays as (1 - lr·λ)^t; Adam + L2 ignores λ's size."
    def run(decoupled, lam, steps=200):
        w = torch.ones(1, dtype=torch.float64, requires_grad=True)
        opt = Adam([w], lr=1e-2, weight_decay=lam, decoupled=decoupled)
        for _ in range(steps): w.grad = torch.zeros_like(w); opt.step()
        return w.item()
    assert run(True, 0.1) == pytest.approx((1 - 1e-3) ** 200, rel=1e-12)
    assert run(False, 0.01) == pytest.approx(run(False, 1.0), abs=1e-6)      # equal up to the effect of eps
    assert run(True, 0.01) != pytest.approx(run(True, 1.0), rel=1e-3)


# ---------------------------------------------------------------- schedules

SCHEDULE_CASES = [
    ("constant", 0, None, {}, None),
    ("constant_with_warmup", 20, None, {}, None),
    ("constant_with_warmup", 0, None, {}, None),
    ("linear", 20, 200, {}, None),
    ("linear", 0, 50, {}, None),
    ("cosine", 20, 200, {}, None),
    ("cosine", 20, 200, dict(num_cycles=1.5), dict(num_cycles=1.5)),
    ("cosine_with_min_lr", 20, 200, dict(min_lr_rate=0.1), dict(min_lr_rate=0.1)),
    ("inverse_sqrt", 20, None, {}, None),
    ("inverse_sqrt", 0, None, {}, None),
    ("inverse_sqrt", 20, None, dict(timescale=50), dict(timescale=50)),
    ("warmup_stable_decay", 20, 200, dict(num_decay_steps=60), dict(num_decay_steps=60)),
    ("warmup_stable_decay", 20, 200, dict(num_decay_steps=60, decay_type="linear", min_lr_rate=0.1),
     dict(num_decay_steps=60, decay_type="linear", min_lr_ratio=0.1)),
    ("warmup_stable_decay", 10, 200, dict(num_decay_steps=100, decay_type="1-sqrt"),
     dict(num_decay_steps=100, decay_type="1-sqrt")),
]


@pytest.mark.parametrize("name,w,T,ours_kw,hf_kw", SCHEDULE_CASES)
def test_schedules_equal_transformers(name, w, T, ours_kw, hf_kw):
    from transformers import get_scheduler
    o1 = SGD([torch.zeros(1, requires_grad=True)], lr=0.3); o2 = SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    s1 = make_scheduler(o1, name, w, T, **ours_kw)
    s2 = get_scheduler(name, o2, num_warmup_steps=w, num_training_steps=T, scheduler_specific_kwargs=hf_kw)
    ours, ref = [], []
    for _ in range(260):
        ours.append(o1.param_groups[0]["lr"]); ref.append(o2.param_groups[0]["lr"])
        o1.step(); o2.step(); s1.step(); s2.step()
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=0)
    assert name in SCHEDULES


def test_schedule_is_plain_data_and_validates():
    s = get_schedule("linear", 10, 110)
    assert isinstance(s, Schedule) and [s(0), s(5), s(10), s(60), s(110), s(500)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    assert Schedule(**{k: v for k, v in vars(s).items()}) == s
    with pytest.raises(ValueError, match="choose one of"): get_schedule("cosin", 1, 10)
    with pytest.raises(ValueError, match="needs num_training_steps"): get_schedule("cosine", 10)
    with pytest.raises(ValueError, match="constant_with_warmup"): get_schedule("constant", 10)
    with pytest.raises(ValueError, match="num_decay_steps"): get_schedule("warmup_stable_decay", 10, 100)
    with pytest.raises(ValueError, match="exceed"): get_schedule("warmup_stable_decay", 50, 100, num_decay_steps=60)
    with pytest.raises(ValueError, match="decay_type"): get_schedule("warmup_stable_decay", 5, 100, num_decay_steps=10, decay_type="exp")
    with pytest.raises(ValueError, match="integer"): get_schedule("linear", -1, 10)


def test_accelerate_prepares_our_optimizer_and_schedule():
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    net = torch.nn.Linear(4, 1)
    opt = AdamW(net.parameters(), lr=1e-2)
    sched = LambdaLR(opt, get_schedule("cosine", 5, 50))
    net, opt, sched = acc.prepare(net, opt, sched)
    for _ in range(10):
        loss = net(torch.randn(8, 4)).pow(2).mean(); acc.backward(loss); opt.step(); sched.step(); opt.zero_grad()
    assert sched.get_last_lr()[0] == pytest.approx(1e-2 * get_schedule("cosine", 5, 50)(10), rel=1e-12)


# ---------------------------------------------------------------- Newton

def test_newton_solves_a_quadratic_in_one_step():
    torch.manual_seed(0)
    M = torch.randn(6, 6, dtype=torch.float64); A = M @ M.T + 6 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    loss = Newton([x]).step(lambda: 0.5 * x @ A @ x - b @ x)
    assert loss.requires_grad is False
    torch.testing.assert_close(x.detach(), torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)


def test_flat_hessian_matches_closed_form_and_torch():
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.normal(size=(50, 4))); y = torch.tensor(rng.integers(0, 2, 50), dtype=torch.float64)
    W = torch.tensor(rng.normal(size=(3,)), requires_grad=True); c = torch.tensor(rng.normal(size=(1,)), requires_grad=True)
    def loss_fn(W, c): return F.binary_cross_entropy_with_logits(X[:, :3] @ W + c, y)
    g, H = flat_hessian(loss_fn(W, c), [W, c])
    Z = torch.cat([X[:, :3], torch.ones(50, 1, dtype=torch.float64)], 1)
    p = torch.sigmoid(Z @ torch.cat([W, c]).detach())
    torch.testing.assert_close(H, Z.T @ (Z * (p * (1 - p))[:, None]) / 50, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, Z.T @ (p - y) / 50, rtol=1e-12, atol=1e-14)


def test_newton_converges_quadratically_on_logistic_regression():
    rng = np.random.default_rng(1)
    X = torch.tensor(rng.normal(size=(200, 5))); w_true = torch.tensor(rng.normal(size=5))
    y = (torch.sigmoid(X @ w_true) > torch.tensor(rng.random(200))).double()
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    def loss(): return F.binary_cross_entropy_with_logits(X @ w, y) + 1e-3 * (w @ w)
    opt = Newton([w]); losses = [opt.step(loss).item() for _ in range(10)]
    w.grad = None; loss().backward()
    assert w.grad.norm() < 1e-12 and opt.state["newton"]["step"] == 10
    gaps = np.array(losses) - losses[-1]
    assert gaps[5] < 1e-13
    assert all(gaps[k + 1] < 10 * gaps[k] ** 2 for k in range(2, 5))    # quadratic convergence: the digits double


def test_newton_errors():
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="closure"): Newton([x]).step(None)
    def bad():
        l = (x ** 2).sum(); l.backward(); return l
    with pytest.raises(RuntimeError, match="without calling"): Newton([x]).step(bad)
    with pytest.raises(RuntimeError, match="damping"): Newton([x]).step(lambda: (x.sum()) ** 2)    # rank-one Hessian
    Newton([x], damping=1e-3).step(lambda: (x.sum() - 1) ** 2)                                      # fine with damping
    with pytest.raises(ValueError, match="Hessian"): Newton(torch.nn.Linear(100, 100).parameters())
    with pytest.raises(ValueError, match="one group"): Newton([{"params": [x]}, {"params": [torch.zeros(1, requires_grad=True)]}])
