"""gslm.autodiff: scalar and tensor reverse mode against torch.autograd (float64), layers, training, graph drawing."""
import numpy as np
import pytest
import torch

from gslm.autodiff import MLP, Linear, Tensor, Value, cross_entropy, draw_graph, make_moons, mse_loss, numerical_grad


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: see conftest.py


def random_expr(leaves, rng, depth=5):
    "A random expression over `leaves` using only operations that Value, Tensor and torch tensors share."
    if depth == 0 or rng.random() < 0.15: return leaves[rng.integers(len(leaves))]
    a = random_expr(leaves, rng, depth - 1)
    k = rng.integers(12)
    if k >= 6: b = random_expr(leaves, rng, depth - 1)
    return [lambda: a.tanh(), lambda: a.sigmoid(), lambda: a.relu() + 0.5 * a, lambda: a.sin(),
            lambda: (0.5 * a.tanh()).exp(), lambda: (1 + a * a).log(),
            lambda: a + b, lambda: a - 2.5 * b, lambda: a * b, lambda: a / (1 + b * b),
            lambda: 1.5 / (2 + a.cos()) * b, lambda: (a ** 2) * 0.3 - b ** 3 * 0.1][k]()


# ---------------------------------------------------------------- Value

@pytest.mark.parametrize("seed", range(150))
def test_value_matches_torch_on_random_expressions(seed):
    xs = np.random.default_rng(seed).normal(size=4)
    vs = [Value(x) for x in xs]
    out = random_expr(vs, np.random.default_rng(seed + 1))
    out.backward()
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]
    tout = random_expr(ts, np.random.default_rng(seed + 1))
    grads = torch.autograd.grad(tout, ts, allow_unused=True)
    assert out.data == pytest.approx(tout.item(), rel=1e-12, abs=1e-12)
    for v, g in zip(vs, grads):
        assert v.grad == pytest.approx(0.0 if g is None else g.item(), rel=1e-10, abs=1e-12)


def test_value_by_hand_and_reuse():
    a, b, c = Value(2.0), Value(-3.0), Value(10.0)
    f = a * b + c; f.backward()
    assert (f.data, a.grad, b.grad, c.grad) == (4.0, -3.0, 2.0, 1.0)
    x = Value(3.0); y = x * x + x; y.backward()
    assert x.grad == 7.0                      # a value used twice gets both contributions
    y.backward()
    assert x.grad == 14.0                     # leaves accumulate across backward calls, inner nodes do not


def test_value_deep_graph_has_no_recursion_limit():
    x = Value(0.5); y = x
    for _ in range(5000): y = y * 1.0001 + 0.0
    y.backward()
    assert x.grad == pytest.approx(1.0001 ** 5000, rel=1e-9)


def test_value_errors():
    with pytest.raises(TypeError, match="Python numbers"): Value(1.0) + "2"
    with pytest.raises(TypeError, match="exp\\(b \\* log\\(a\\)\\)"): Value(2.0) ** Value(3.0)
    with pytest.raises(ValueError, match="non-positive"): Value(0.0).log()
    with pytest.raises(TypeError, match="pass the number"): Value(Value(1.0))


def test_numerical_grad_agrees_with_autodiff():
    def f(v): return (v * 1.3).tanh() * (v * 0.5).exp() + (1 + v * v).log()
    x = Value(0.7); f(x).backward()
    fd = numerical_grad(lambda a: f(Value(a[0])).data, [0.7], h=1e-6)[0]
    assert abs(fd - x.grad) < 1e-8
    assert abs(fd - x.grad) > 0               # finite differences are not exact


# ---------------------------------------------------------------- Tensor

SHAPES = [(3, 4), (4,), (3, 1), (1, 4)]

def tensor_case(seed, lib):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=s) for s in SHAPES] + [rng.normal(size=(4, 5)), rng.normal(size=(3, 4))]
    make = (lambda a: Tensor(a, requires_grad=True)) if lib == "gslm" else \
           (lambda a: torch.tensor(a, dtype=torch.float64, requires_grad=True))
    leaves = [make(a) for a in arrays]
    x, v, col, row, W, G = leaves
    expr = random_expr([x, v, col, row], np.random.default_rng(seed + 1)) + 0 * x
    h = (expr @ W).tanh() * (x.sum(dim=0, keepdim=True) @ W)
    z = (h.reshape(5, 3).transpose(0, 1) + col).log_softmax(dim=-1)
    picked = z[np.arange(3), np.array([0, 4, 2])]
    out = (expr * G).sum() + picked.mean() + (h ** 2).mean(dim=1).sum() * 0.1 + (x / (2 + row.sigmoid())).softmax(-1)[0, 1]
    return leaves, out


@pytest.mark.parametrize("seed", range(60))
def test_tensor_matches_torch_with_broadcasting(seed):
    ours, out = tensor_case(seed, "gslm"); out.backward()
    ref, tout = tensor_case(seed, "torch")
    grads = torch.autograd.grad(tout, ref, allow_unused=True)
    assert out.item() == pytest.approx(tout.item(), rel=1e-12, abs=1e-12)
    for leaf, g, r in zip(ours, grads, ref):
        expected = torch.zeros_like(r) if g is None else g
        got = torch.zeros_like(r) if leaf.grad is None else torch.from_numpy(leaf.grad)
        assert got.shape == r.shape
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_batched_matmul_broadcasts_and_reduces():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(4, 5))
    A, B = Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)
    (A @ B).cos().sum().backward()
    ta, tb = (torch.tensor(v, requires_grad=True) for v in (a, b))
    (ta @ tb).cos().sum().backward()
    torch.testing.assert_close(torch.from_numpy(A.grad), ta.grad)
    torch.testing.assert_close(torch.from_numpy(B.grad), tb.grad)
    assert B.grad.shape == (4, 5)


def test_mlp_matches_torch_mlp():
    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                             torch.nn.Linear(16, 3)).double()
    mlp = MLP([5, 16, 16, 3], "tanh").load_torch(tm)
    x = torch.randn(32, 5, dtype=torch.float64); y = torch.randint(0, 3, (32,))
    tl = torch.nn.functional.cross_entropy(tm(x), y); tl.backward()
    loss = cross_entropy(mlp(x.numpy()), y.numpy()); loss.backward()
    assert loss.item() == pytest.approx(tl.item(), rel=1e-12)
    for ours, theirs in zip(mlp.parameters(), tm.parameters()):
        torch.testing.assert_close(torch.from_numpy(ours.grad), theirs.grad, rtol=1e-10, atol=1e-13)
    # and a regression head with relu and mse
    tr = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).double()
    reg = MLP([5, 8, 1], "relu").load_torch(tr)
    t = torch.randn(32, 1, dtype=torch.float64)
    torch.nn.functional.mse_loss(tr(x), t).backward()
    mse_loss(reg(x.numpy()), t.numpy()).backward()
    for ours, theirs in zip(reg.parameters(), tr.parameters()):
        torch.testing.assert_close(torch.from_numpy(ours.grad), theirs.grad, rtol=1e-10, atol=1e-13)


def test_linear_init_range_and_layout():
    lin = Linear(100, 7, rng=np.random.default_rng(0))
    assert lin.weight.shape == (7, 100) and lin.bias.shape == (7,)
    assert np.abs(lin.weight.data).max() <= 0.1 and np.abs(lin.weight.data).max() > 0.09
    assert Linear(3, 2, bias=False).parameters()[0].shape == (2, 3)


def test_training_on_moons_matches_torch_and_learns():
    X, y = make_moons(200, noise=0.1, seed=0)
    X = (X - X.mean(0)) / X.std(0)
    net = MLP([2, 16, 16, 2], "tanh", seed=0)
    tnet = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 2)).double()
    with torch.no_grad():
        for tp, op in zip(tnet.parameters(), net.parameters()): tp.copy_(torch.from_numpy(op.data))
    topt = torch.optim.SGD(tnet.parameters(), lr=0.5)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(300):
        net.zero_grad(); loss = cross_entropy(net(X), y); loss.backward()
        for p in net.parameters(): p.data -= 0.5 * p.grad
        topt.zero_grad(); tl = torch.nn.functional.cross_entropy(tnet(Xt), yt); tl.backward(); topt.step()
        assert loss.item() == pytest.approx(tl.item(), rel=1e-8)
    assert (net(X).data.argmax(1) == y).mean() > 0.95


def test_make_moons_is_seeded_and_balanced():
    a, b = make_moons(101, seed=3), make_moons(101, seed=3)
    assert np.array_equal(a[0], b[0]) and a[0].shape == (101, 2) and abs(a[1].sum() - 50.5) <= 0.5
    assert not np.array_equal(a[0], make_moons(101, seed=4)[0])


def test_tensor_errors():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(ValueError, match="reshape a vector"): x @ Tensor(np.ones(3))
    with pytest.raises(RuntimeError, match="scalar output"): (x * 2).backward()
    with pytest.raises(RuntimeError, match="requires_grad=True"): Tensor([1.0]).backward()
    with pytest.raises(ValueError, match="non-positive"): (x - 2).log()
    with pytest.raises(TypeError, match="not str"): x + "a"
    with pytest.raises(ValueError, match="logits \\(N, C\\)"): cross_entropy(x, [0, 1, 2])
    with pytest.raises(ValueError, match="unknown activation"): MLP([2, 2], "gelu")
    with pytest.raises(ValueError, match="Linear layers"): MLP([2, 2, 2]).load_torch(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_draw_graph_draws_every_node(monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x1, w1, b = Value(2.0, label="x1"), Value(-3.0, label="w1"), Value(1.0, label="b")
    o = (x1 * w1 + b).tanh(); o.backward()
    ax = draw_graph(o)
    texts = [t.get_text() for t in ax.texts if t.get_text()]
    assert sum("data" in t for t in texts) == 6           # 3 leaves + 3 results
    assert sorted(t for t in texts if "data" not in t) == ["*", "+", "tanh"]
    assert any(t.startswith("w1") and f"grad {w1.grad:.4g}" in t for t in texts)
    plt.close("all")
    net = MLP([2, 3, 1], seed=1)
    loss = mse_loss(net(np.ones((4, 2))), np.zeros((4, 1))); loss.backward()
    ax = draw_graph(loss)
    assert sum("grad ✓" in t.get_text() for t in ax.texts) == 4   # W1, b1, W2, b2
    plt.close("all")
