"""gslm.bench, performance chapter: FLOP counting against torch's FlopCounterMode, the memory-mapped TokenFile (round trip,
re-opening, truncation and corruption), and the FLOP/s-utilisation and data-I/O benchmarks in quick mode (never timings)."""
import pickle

import numpy as np
import pytest
import torch

from gslm.bench import (BENCHMARKS, FLOPS_BENCH_NAME, IO_BENCH_NAME, TOKEN_FILE_MAGIC, BenchResult, TokenFile, TokenFileError,
                        bench_data_io, bench_train_flops, counted_train_flops, matmul_flops, matmul_params, run_benchmarks,
                        train_flops, write_token_file)


def tiny_llama(attn: str, tied: bool = True, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied, attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tied", [True, False])
def test_train_flops_equals_flop_counter_mode_with_eager_attention(one_thread, tied):
    # eager attention is two bmm's per layer, which FlopCounterMode counts; nothing else either side counts: exact equality
    m = tiny_llama("eager", tied)
    x = torch.randint(0, 320, (3, 40))
    counted, mine = counted_train_flops(m, {"input_ids": x}), train_flops(m, 3, 40)
    assert sum(counted.values()) == mine["total"]
    assert counted["mm"] == mine["dense"] == 6 * matmul_params(m) * 120
    assert counted["bmm"] == mine["attention"] == 12 * 2 * 4 * 12 * 40 * 120
    assert all(p.grad is None for p in m.parameters())                  # counting leaves no gradients behind


def test_train_flops_against_the_cpu_sdpa_kernel(one_thread):
    # the CPU flash kernel recomputes the scores in its backward pass: FlopCounterMode (with torch's GPU formulas) counts 14/12
    m = tiny_llama("sdpa")
    mask = torch.ones(2, 32, dtype=torch.long); mask[1, 20:] = 0
    x = torch.randint(0, 320, (2, 32))
    counted, mine = counted_train_flops(m, {"input_ids": x, "attention_mask": mask}), train_flops(m, 2, 32)
    kernel = sum(v for k, v in counted.items() if "attention" in k)
    assert kernel > 0, f"the CPU attention kernel was not counted: {counted}"
    assert counted["mm"] == mine["dense"] and kernel * 12 == mine["attention"] * 14
    # the rule of thumb over all parameters is close for a tied model (norm weights are not products): within 1%
    assert abs(mine["6NT"] - mine["dense"]) / mine["dense"] < 0.01
    # the non-embedding rule misses the LM head (6 · vocab · hidden FLOPs per token) and counts the 5 RMSNorms' weights
    assert mine["dense"] - mine["6NT_non_embedding"] == 6 * 64 * (320 * 48 - 5 * 48)


def test_train_flops_bad_input(one_thread):
    m = tiny_llama("eager", layers=1)
    with pytest.raises(ValueError, match="seq_len"): train_flops(m, 2, 0)
    with pytest.raises(ValueError, match="batch_size"): train_flops(m, 1.5, 8)
    m.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen .*up_proj"): train_flops(m, 1, 8)
    with pytest.raises(TypeError, match="transformers causal LM"): train_flops(torch.nn.Linear(2, 2), 1, 8)


def test_matmul_flops(one_thread):
    r = matmul_flops(64, repeats=2)
    assert r["n"] == 64 and r["flops"] == pytest.approx(2 * 64 ** 3 / r["seconds"]) and r["threads"] == 1
    auto = matmul_flops(seconds=0.01, repeats=1)
    assert auto["n"] >= 256 and auto["n"] % 128 == 0 and auto["flops"] > 0
    with pytest.raises(ValueError, match="n must be"): matmul_flops(0)
    with pytest.raises(ValueError, match="repeats"): matmul_flops(64, repeats=0)


@pytest.fixture
def examples():
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 49_152, size=int(n)).tolist() for n in rng.integers(0, 300, size=500)]
    labels = [[-100] * (len(x) // 2) + x[len(x) // 2:] for x in ids]
    return {"input_ids": ids, "labels": labels}


def test_token_file_round_trips_and_reopens(tmp_path, examples):
    path = write_token_file(tmp_path / "d" / "train.tok", examples)
    assert [p.name for p in path.parent.iterdir()] == ["train.tok"]     # written via a temporary file, renamed, none left
    tf = TokenFile(path)
    assert len(tf) == 500 and tf.n_tokens == sum(map(len, examples["input_ids"])) and tf.columns == ["input_ids", "labels"]
    assert tf.header["columns"]["input_ids"]["dtype"] == "<u2" and tf.header["columns"]["labels"]["dtype"] == "<i4"
    for i in range(500):
        assert tf[i] == {"input_ids": examples["input_ids"][i], "labels": examples["labels"][i]}
    assert tf[-1] == tf[499] and tf.lengths.tolist() == [len(x) for x in examples["input_ids"]]
    with pytest.raises(IndexError, match="out of range"): tf[500]
    again = TokenFile(path).verify()                                    # a fresh open, and the full CRC check
    assert all(again[i] == tf[i] for i in range(0, 500, 37))
    clone = pickle.loads(pickle.dumps(tf))                              # DataLoader workers with spawn re-open by path
    assert clone[7] == tf[7]
    write_token_file(path, {"input_ids": [[1, 2, 3]]})                  # overwriting replaces the file as a whole
    assert len(TokenFile(path)) == 1 and TokenFile(path)[0] == {"input_ids": [1, 2, 3]}


def test_token_file_with_a_dataloader(tmp_path, examples):
    from torch.utils.data import DataLoader
    from gslm.train import PadCollator
    tf = TokenFile(write_token_file(tmp_path / "t.tok", examples))
    ref = [PadCollator()([{k: examples[k][i] for k in examples} for i in range(j, min(j + 64, 500))]) for j in range(0, 500, 64)]
    got = list(DataLoader(tf, batch_size=64, num_workers=2, collate_fn=PadCollator()))
    assert len(got) == len(ref) and all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
                                        for a, b in zip(got, ref))


def test_token_file_faults_name_the_file(tmp_path, examples):
    path = write_token_file(tmp_path / "good.tok", examples)
    raw = path.read_bytes()
    cut = tmp_path / "cut.tok"; cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TokenFileError, match=r"cut\.tok: truncated"): TokenFile(cut)
    tiny = tmp_path / "tiny.tok"; tiny.write_bytes(raw[:12])
    with pytest.raises(TokenFileError, match=r"tiny\.tok: not a gslm token file"): TokenFile(tiny)
    head = tmp_path / "head.tok"; head.write_bytes(raw[:16] + b"#" + raw[17:])   # the JSON header's first byte
    with pytest.raises(TokenFileError, match=r"head\.tok: corrupted header"): TokenFile(head)
    off = TokenFile(path).header["index_offset"] + 8 * 250 + 1                   # an offset in the middle of the index
    idx = tmp_path / "index.tok"; idx.write_bytes(raw[:off] + bytes([raw[off] ^ 0x40]) + raw[off + 1:])
    with pytest.raises(TokenFileError, match=r"index\.tok: corrupted index"): TokenFile(idx)
    off = TokenFile(path).header["columns"]["input_ids"]["offset"] + 1000        # a token
    tok = tmp_path / "token.tok"; tok.write_bytes(raw[:off] + bytes([raw[off] ^ 1]) + raw[off + 1:])
    with pytest.raises(TokenFileError, match=r"token\.tok: corrupted: CRC-32"): TokenFile(tok).verify()
    longer = tmp_path / "longer.tok"; longer.write_bytes(raw + b"\0")
    with pytest.raises(TokenFileError, match=r"longer\.tok: has extra bytes"): TokenFile(longer)
    with pytest.raises(FileNotFoundError, match=r"nope\.tok"): TokenFile(tmp_path / "nope.tok")
    assert raw.startswith(TOKEN_FILE_MAGIC)


def test_write_token_file_bad_input_keeps_the_old_file(tmp_path):
    path = write_token_file(tmp_path / "a.tok", {"input_ids": [[1, 2]]})
    with pytest.raises(ValueError, match="must align"): write_token_file(path, {"input_ids": [[1, 2]], "labels": [[1]]})
    with pytest.raises(ValueError, match="examples"): write_token_file(path, {"input_ids": [[1]], "labels": []})
    with pytest.raises(ValueError, match="non-empty dict"): write_token_file(path, {})
    with pytest.raises(ValueError, match="do not fit"): write_token_file(path, {"input_ids": [[70_000]]}, dtype="uint16")
    assert TokenFile(path)[0] == {"input_ids": [1, 2]} and sorted(p.name for p in tmp_path.iterdir()) == ["a.tok"]


def test_new_benchmarks_are_registered():
    assert BENCHMARKS[FLOPS_BENCH_NAME] is bench_train_flops and BENCHMARKS[IO_BENCH_NAME] is bench_data_io


def test_bench_train_flops_quick():
    from gslm.models import load_model
    tiny = load_model("gslm-tiny")
    before = {k: v.clone() for k, v in tiny[0].state_dict().items()}
    r = bench_train_flops(tiny, quick=True, steps=2, matmul_seconds=0.05, num_threads=1)   # raises if the FLOP count check fails
    i = r.info
    assert isinstance(r, BenchResult) and r.name == FLOPS_BENCH_NAME and r.unit == "FLOP/s" and r.higher_is_better
    assert r.gslm > 0 and r.peer > 0 and r.ratio == pytest.approx(i["mfu"]) and r.target == 0.3
    assert i["steps"] == 2 and len(i["step_seconds"]) == 2 and len(i["matmul_between_steps"]) == 2 and i["threads"] == 1
    assert r.peer == pytest.approx(2 / sum(1 / x for x in i["matmul_between_steps"]))   # the rate over the products between steps
    assert i["matmul_best"] > 0 and i["mfu_of_best"] == pytest.approx(r.gslm / i["matmul_best"])
    assert i["flops_per_step"] == train_flops(tiny[0], i["rows_per_step"], i["seq_len"])["total"]
    assert r.gslm == pytest.approx(i["flops_per_step"] * 2 / sum(i["step_seconds"]))
    assert all(np.isfinite(i["loss"]))
    assert all(torch.equal(v, tiny[0].state_dict()[k]) for k, v in before.items()), "the caller's model was trained in place"
    with pytest.raises(ValueError, match="steps"): bench_train_flops(tiny, steps=0)


def test_bench_data_io_quick():
    from gslm.models import load_model
    _, tok = load_model("gslm-tiny")
    r = bench_data_io(160, tokenizer=tok, repeats=1, workers=(0, 2))      # raises if any path's batches differ
    i = r.info
    assert r.name == IO_BENCH_NAME and r.unit == "examples/s" and r.higher_is_better and r.target == 1.0
    assert r.gslm > 0 and r.peer > 0 and r.ratio == pytest.approx(r.gslm / r.peer)
    assert set(i["rates"]) == {"memmap, workers=0", "memmap, workers=2", "on the fly, workers=0", "on the fly, workers=2",
                               "in memory, workers=0"}
    assert r.gslm == max(i["rates"]["memmap, workers=0"], i["rates"]["memmap, workers=2"])
    assert i["file_bytes"] > 0 and i["tokens"] > 0
    with pytest.raises(ValueError, match="workers"): bench_data_io(160, tokenizer=tok, workers=(-1,))
    with pytest.raises(ValueError, match="batch_size"): bench_data_io(4, tokenizer=tok)


def test_run_benchmarks_quick_runs_the_new_benchmarks():
    t = run_benchmarks([FLOPS_BENCH_NAME, IO_BENCH_NAME], quick=True)   # what `gslm bench --quick` runs for them
    assert t.index.tolist() == [FLOPS_BENCH_NAME, IO_BENCH_NAME]
    assert (t["gslm"] > 0).all() and (t["peer"] > 0).all() and t.loc[IO_BENCH_NAME, "unit"] == "examples/s"


def test_suite_timing_reads_make_nbtest_output(tmp_path):
    from gslm.bench import parse_suite_timing, read_suite_timing
    log = tmp_path / "nbtest.log"
    log.write_text("Success.\n10_a.ipynb: 12 secs\n20_b.ipynb: 340 secs\nindex.ipynb: 0 secs\n\n"
                   "nbtest: nbdev_test wall time 355 s (two notebooks at once, a core each)\n")
    df, wall = read_suite_timing(log)
    assert df.notebook.tolist() == ["20_b.ipynb", "10_a.ipynb", "index.ipynb"] and df.seconds.tolist() == [340, 12, 0] and wall == 355
    assert parse_suite_timing("x.ipynb: 1.5 secs")[1] is None
    (tmp_path / "empty.log").write_text("nbdev_test ran without --timing\n")
    with pytest.raises(ValueError, match=r"empty\.log: no 'NAME\.ipynb: N secs' lines"): read_suite_timing(tmp_path / "empty.log")
    with pytest.raises(FileNotFoundError, match=r"nope\.log: no such file"): read_suite_timing(tmp_path / "nope.log")
    # the excerpt the performance chapter reads is a real one
    from pathlib import Path
    df, _ = read_suite_timing(Path(__file__).parents[1] / "nbs" / "08_performance" / "suite_timing.txt")
    assert len(df) >= 28 and "80_benchmarks.ipynb" in df.notebook.tolist()
