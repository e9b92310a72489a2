"""gslm.bench: the registry, the ratio's direction, and the benchmarks' correctness checks (never timings: those live in the notebook)."""
import pytest
import torch

from gslm.bench import BENCHMARKS, BenchResult, bench_data, bench_train, padding_efficiency, register, results_table, run_benchmarks


def test_registry_and_table():
    @register("_test")
    def _b(): return BenchResult("_test", gslm=2.0, peer=1.0, peer_name="peer", target=1.0)
    try:
        t = run_benchmarks(["_test"])
        assert t.loc["_test", "ratio"] == 0.5 and not t.loc["_test", "met"]
        assert list(t.columns[:6]) == ["gslm", "peer", "peer_name", "unit", "ratio", "target"]
        with pytest.raises(KeyError, match="unknown benchmarks"): run_benchmarks(["nope"])
    finally:
        del BENCHMARKS["_test"]
    assert "data: tokenise + pack" in BENCHMARKS and "train: packed fit vs Trainer" in BENCHMARKS


def test_bench_data_runs_both_pipelines_and_checks_they_agree(smollm2):
    _, tok = smollm2
    r = bench_data(300, seq_len=256, tokenizer=tok)   # raises if the two tokenisations differ or packing loses tokens
    row = r.row()
    assert row["gslm"] > 0 and row["peer"] > 0 and row["ratio"] == round(r.peer / r.gslm, 2)
    assert "300 records" in row["detail"]
    assert results_table([r]).index.tolist() == ["data: tokenise + pack"]


def test_throughput_ratio_is_gslm_over_peer():
    r = BenchResult("_tp", gslm=300.0, peer=200.0, peer_name="peer", unit="tokens/s", target=1.5, higher_is_better=True)
    assert r.ratio == 1.5 and r.met and r.row()["unit"] == "tokens/s"
    assert BenchResult("_s", gslm=300.0, peer=200.0, peer_name="peer").ratio == 200 / 300    # seconds: peer / gslm, as before


def test_run_benchmarks_passes_quick():
    @register("_quick")
    def _b(quick: bool = False): return BenchResult("_quick", gslm=1.0, peer=2.0 if quick else 1.0, peer_name="peer")
    try:
        assert run_benchmarks(["_quick"], quick=True).loc["_quick", "ratio"] == 2.0
        assert run_benchmarks(["_quick"]).loc["_quick", "ratio"] == 1.0
        assert run_benchmarks(["_quick"], quick=True, _quick={"quick": False}).loc["_quick", "ratio"] == 1.0   # explicit arguments win
    finally:
        del BENCHMARKS["_quick"]


def test_padding_efficiency():
    assert padding_efficiency([5, 5, 5, 5], 2) == 1.0
    assert padding_efficiency([1, 3], 2) == pytest.approx(4 / 6)
    lens = [10, 100] * 32
    assert padding_efficiency(lens, 8, "group_by_length") > padding_efficiency(lens, 8, "random")
    with pytest.raises(ValueError, match="choose one of"): padding_efficiency(lens, 8, "sorted")


@pytest.fixture(scope="module")
def tiny():
    from gslm.models import load_model
    return load_model("gslm-tiny")


@pytest.mark.parametrize("sampling, lockstep", [("random", True), ("group_by_length", False)])
def test_bench_train_runs_both_sides_on_the_same_examples(tiny, sampling, lockstep):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = bench_train(tiny, n_examples=48, batch_size=8, lr=1e-3, sampling=sampling, lockstep=lockstep, num_threads=1)   # raises if a check fails
    i = r.info
    assert r.unit == "tokens/s" and r.higher_is_better and r.ratio == pytest.approx(r.gslm / r.peer)
    assert r.gslm > 0 and r.peer > 0 and i["sampling"] == sampling and i["lockstep"] == lockstep
    assert i["steps_gslm"] >= 3 and i["steps_peer"] >= 3 and i["examples"] <= 48
    assert sum(i["per_step"]["gslm"]["tokens"]) <= i["tokens"] and sum(i["per_step"]["peer"]["tokens"]) <= i["tokens"]
    assert 0 < i["fill_peer"] < 1 and i["fill_gslm"] <= 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the caller's model was trained in place"


def test_turns_alternate_steps_and_propagate_errors():
    from gslm.bench import _Turns
    turns, order = _Turns(("a", "b")), []
    def loop(side, n):
        def run():
            for _ in range(n): order.append(side); turns.step_end(side)
            return side
        return run
    assert turns.run({"a": loop("a", 3), "b": loop("b", 2)}) == {"a": "a", "b": "b"}
    assert order == ["a", "b", "a", "b", "a"] and [len(turns.seconds[s]) for s in "ab"] == [3, 2]
    turns = _Turns(("a", "b"))
    def boom(): turns.step_end("b"); raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"): turns.run({"a": loop("a", 3), "b": boom})   # no deadlock: a finishes alone


def test_check_catches_different_work():
    from gslm.bench import _Recorder, _check_same_work
    a, b = _Recorder(None, packed=False), _Recorder(None, packed=False)
    a.examples.update([(1, 2, 3), (4, 5)]); a.real = [5]
    b.examples.update([(1, 2, 3), (4, 6)]); b.real = [5]
    with pytest.raises(AssertionError, match="different examples"): _check_same_work(a, b, 5, 1.0, 1.0)
    b.examples = a.examples.copy(); b.real = [4]
    with pytest.raises(AssertionError, match="real tokens differ"): _check_same_work(a, b, 5, 1.0, 1.0)
    b.real = [5]
    with pytest.raises(AssertionError, match="same range"): _check_same_work(a, b, 5, 1.0, 2.0)
    _check_same_work(a, b, 5, 1.0, 1.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampling="sorted"), "sampling='sorted'"),
    (dict(method="nope"), "method='nope'"),
    (dict(batch_size=0), "batch_size must be"),
    (dict(n_examples=20, batch_size=8), "fewer than 3 steps"),
    (dict(seq_len=32), "shorter than the longest example"),
])
def test_bench_train_bad_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match): bench_train(tiny, **{"n_examples": 48, "batch_size": 8, **kwargs})
