"""gslm.bench: the registry and the data benchmark's correctness check (never timings: those live in the notebook)."""
import pytest

from gslm.bench import BENCHMARKS, BenchResult, bench_data, register, results_table, run_benchmarks


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
    assert "data: tokenise + pack" in BENCHMARKS


def test_bench_data_runs_both_pipelines_and_checks_they_agree(smollm2):
    _, tok = smollm2
    r = bench_data(300, seq_len=256, tokenizer=tok)   # raises if the two tokenisations differ or packing loses tokens
    row = r.row()
    assert row["gslm"] > 0 and row["peer"] > 0 and row["ratio"] == round(r.peer / r.gslm, 2)
    assert "300 records" in row["detail"]
    assert results_table([r]).index.tolist() == ["data: tokenise + pack"]
