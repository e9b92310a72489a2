"""gslm.data: readers and their bad-input suite, atomic writes, backups, the cleaning pipeline, splits, tokenisation, packing."""
import codecs, json, os, random, stat

import numpy as np
import pytest
import torch

from gslm.data import (IGNORE_INDEX, DataError, ExactDedup, LengthFilter, MinHasher, NearDedup, Normalize, Pipeline,
                       RegexFilter, Safety, backup, check_fields, find_pii, jaccard, list_backups, make_instructions,
                       make_knowledge_base, make_preferences, normalize_text, pack, packed_attention_mask, packed_batch,
                       read_records, restore, shingles, split_records, to_dataset, tokenize_example, tokenize_pairs,
                       write_records)

# ---------------------------------------------------------------- the bad-input suite
# Each case: file name, raw bytes, keyword arguments for read_records, the 1-based line the error must name (or None),
# and a phrase the message must contain.
BAD = [
    ("broken_line.jsonl", b'{"a": 1}\n{"a": 2\n{"a": 3}\n', {}, 2, "invalid JSON"),
    ("trailing_comma_array.json", b'[{"a": 1},\n {"a": 2},\n]\n', {}, 3, "trailing comma"),
    ("trailing_comma_object.jsonl", b'{"a": 1}\n{"a": 1, "b": 2,}\n', {}, 2, "trailing comma"),
    ("two_objects_one_line.jsonl", b'{"a": 1} {"a": 2}\n', {}, 1, "one object per line"),
    ("pretty_printed.jsonl", b'{\n  "a": 1\n}\n', {}, 1, "invalid JSON"),
    ("array_line.jsonl", b'{"a": 1}\n[1, 2]\n', {}, 2, "got array"),
    ("scalar_record.json", b'[{"a": 1}, 7]', {}, None, "record 2"),
    ("single_number.json", b'42\n', {}, 1, "not records"),
    ("nan.jsonl", b'{"a": NaN}\n', {}, 1, "NaN is not valid JSON"),
    ("duplicate_key.jsonl", b'{"a": 1, "a": 2}\n', {}, 1, "appears twice"),
    ("unterminated_string.jsonl", b'{"a": "oops}\n', {}, 1, "Unterminated string"),
    ("wrong_type.jsonl", b'{"text": "x", "label": 1}\n{"text": "y", "label": "2"}\n', dict(fields={"text": str, "label": int}), 2, "expected int"),
    ("bool_is_not_int.jsonl", b'{"label": true}\n', dict(fields={"label": int}), 1, "expected int, got boolean"),
    ("missing_field.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', dict(fields=["instruction", "output"]), 2, "'output' is missing"),
    ("null_field.json", b'[{"output": "b"}, {"output": null}]', dict(fields=["output"]), None, "is null"),
    ("csv_not_a_number.csv", b'text,label\nhi,1\nho,one\n', dict(fields={"label": int}), 3, "expected int"),
    ("empty.jsonl", b"", {}, None, "empty"),
    ("whitespace_only.txt", b"  \n\n\t\n", {}, None, "only whitespace"),
    ("bom.jsonl", codecs.BOM_UTF8 + b'{"a": 1}\n', {}, 1, "byte-order mark"),
    ("utf16.txt", "hello\n".encode("utf-16"), {}, 1, "UTF-16"),
    ("latin1.jsonl", '{"a": "ok"}\n{"a": "café"}\n'.encode("latin-1"), {}, 2, "not valid utf-8"),
    ("cp1252_quotes.csv", 'text\n\u201cquoted\u201d\n'.encode("cp1252"), {}, 2, "not valid utf-8"),
    ("unbalanced_quotes.csv", b'a,b\n1,2\n3,"four\n5,6\n', {}, 3, "unexpected end of data"),
    ("stray_quote.csv", b'a,b\n1,"x"y\n', {}, 2, "CSV error"),
    ("wrong_column_count.csv", b'a,b\n1,2\n3,4,5\n', {}, 3, "3 columns but the header has 2"),
    ("too_few_columns.tsv", b'a\tb\n1\n', {}, 2, "1 columns but the header has 2"),
    ("empty_header_name.csv", b'a,,c\n1,2,3\n', {}, 1, "has no name"),
    ("duplicate_header.csv", b'a,b,a\n1,2,3\n', {}, 1, "repeats the column name"),
    ("nul_bytes.jsonl", b'{"a": 1}\n{"a": "x\x00y"}\n', {}, 2, "NUL byte"),
    ("huge_line.txt", b"short\n" + b"x" * 2_000_001 + b"\n", {}, 2, "characters long"),
    ("unknown_extension.xlsx", b"PK\x03\x04 not really", {}, None, "unknown extension"),
    ("no_extension", b'{"a": 1}\n', {}, None, "unknown extension"),
    ("corrupt.parquet", b"PAR1 this is not a parquet file", {}, None, "not a readable parquet file"),
    ("truncated.parquet", None, {}, None, "not a readable parquet file"),   # made from a real parquet file below
    ("unknown_encoding.txt", b"hello\n", dict(encoding="klingon-8"), None, "unknown encoding"),
]


@pytest.mark.parametrize("name,raw,kwargs,line,phrase", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_data_error_naming_file_and_line(tmp_path, name, raw, kwargs, line, phrase):
    p = tmp_path / name
    if raw is None:   # a real parquet file cut in half
        write_records([{"a": i, "b": "x" * 50} for i in range(200)], tmp_path / "full.parquet")
        full = (tmp_path / "full.parquet").read_bytes(); raw = full[: len(full) // 2]
    p.write_bytes(raw)
    with pytest.raises(DataError) as e: read_records(p, **kwargs)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert str(p) in msg, msg
    assert phrase in msg, msg
    if line is not None:
        assert e.value.line == line and f"line {line}" in msg, msg
    assert " — " in msg, f"no advice on what to do: {msg}"


def test_bad_input_suite_is_big_enough():
    assert len(BAD) + 3 >= 25   # + the three path cases below


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(DataError, match="no such file"): read_records(tmp_path / "nope.jsonl")
    (tmp_path / "adir.jsonl").mkdir()
    with pytest.raises(DataError, match="is a folder"): read_records(tmp_path / "adir.jsonl")
    with pytest.raises(DataError, match="is a folder"): read_records(tmp_path)


def test_encoding_escape_hatches_accept_what_strict_utf8_rejects(tmp_path):
    (tmp_path / "bom.csv").write_bytes(codecs.BOM_UTF8 + b"id,text\n1,hi\n")
    assert read_records(tmp_path / "bom.csv", encoding="utf-8-sig") == [{"id": "1", "text": "hi"}]
    (tmp_path / "l1.txt").write_bytes("café\n".encode("latin-1"))
    assert read_records(tmp_path / "l1.txt", encoding="latin-1") == [{"text": "café"}]
    (tmp_path / "long.txt").write_text("y" * 50 + "\n")
    with pytest.raises(DataError): read_records(tmp_path / "long.txt", max_line_chars=10)


def test_error_names_record_number_for_json_arrays(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"x": 1}, {"x": 2}, {"y": 3}]))
    with pytest.raises(DataError) as e: read_records(tmp_path / "a.json", fields=["x"])
    assert e.value.record == 3 and e.value.field == "x"


# ---------------------------------------------------------------- good input in every format

def test_every_format_round_trips(tmp_path):
    recs = [{"instruction": "Add, then \"quote\"", "input": "2\n3", "output": "5", "n": 3, "ok": True}]
    for ext in ("json", "jsonl", "parquet"):
        assert read_records(write_records(recs, tmp_path / f"r.{ext}")) == recs
    for ext in ("csv", "tsv"):
        back = read_records(write_records(recs, tmp_path / f"r.{ext}"), fields={"n": int, "ok": bool})
        assert back == recs
    write_records([{"text": "a\nb"}, {"text": "c"}], tmp_path / "b.txt")
    assert read_records(tmp_path / "b.txt") == [{"text": "a\nb"}, {"text": "c"}]
    (tmp_path / "lines.json").write_text('{"a": 1}\n{"a": 2}\n')       # object per line inside a .json file
    assert read_records(tmp_path / "lines.json") == [{"a": 1}, {"a": 2}]
    (tmp_path / "one.json").write_text('{\n "a": 1\n}\n')
    assert read_records(tmp_path / "one.json") == [{"a": 1}]
    assert len(to_dataset(recs)) == 1


def test_course_data_files_read_back_with_their_declared_fields():
    from gslm.core import data_path
    train = read_records(data_path("instructions/train.jsonl"), fields={"instruction": str, "input": str, "output": str, "task": str})
    test_csv = read_records(data_path("instructions/test.csv"), fields={"instruction": str, "input": str, "output": str, "task": str})
    assert test_csv == read_records(data_path("instructions/test.jsonl"))
    assert len(read_records(data_path("instructions/test.txt"))) == len(test_csv)
    key = lambda rs: {(r["instruction"], r["input"]) for r in rs}
    assert not key(train) & key(test_csv)
    read_records(data_path("multiple_choice/quartz_test.jsonl"), fields={"question": str, "choices": list, "answer": int})
    prefs = read_records(data_path("preferences/train.jsonl"), fields={"prompt": str, "chosen": str, "rejected": str})
    assert all(p["chosen"] != p["rejected"] for p in prefs)
    docs = {d["id"]: d for d in read_records(data_path("knowledge/documents.jsonl"))}
    for q in read_records(data_path("knowledge/questions.jsonl"), fields=["question", "answer", "doc_id"]):
        assert q["answer"] in docs[q["doc_id"]]["text"]


# ---------------------------------------------------------------- no output when processing fails

def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    dest = tmp_path / "out.jsonl"
    def broken():
        yield {"a": 1}
        raise DataError("bad record", "src.jsonl", line=2)
    with pytest.raises(DataError): write_records(broken(), dest)
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    write_records([{"a": "old"}], dest)
    with pytest.raises(TypeError): write_records([{"a": object()}], dest)      # not serialisable
    with pytest.raises(DataError): write_records([{"a": 1}, "not a dict"], dest)
    assert read_records(dest) == [{"a": "old"}] and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_read_process_write_writes_nothing_when_the_input_is_bad(tmp_path):
    src, dest = tmp_path / "in.jsonl", tmp_path / "clean.jsonl"
    src.write_text('{"text": "ok"}\n{"text": "broken"\n')
    def process(path, out):
        kept, _ = Pipeline([Normalize(), ExactDedup()]).run(read_records(path, fields={"text": str}))
        write_records(kept, out)
    with pytest.raises(DataError, match="line 2"): process(src, dest)
    assert not dest.exists()


def test_written_files_have_normal_permissions(tmp_path):
    p = write_records([{"a": 1}], tmp_path / "p.jsonl")
    assert stat.S_IMODE(p.stat().st_mode) & 0o044   # readable by others, not mkstemp's 0600


# ---------------------------------------------------------------- backups

def test_backup_snapshot_never_changes_when_the_source_is_edited(tmp_path):
    store, src = tmp_path / "store", tmp_path / "train.jsonl"
    write_records([{"text": "version one"}], src)
    s1 = backup(src, store)
    assert backup(src, store) == s1 and len(list_backups(store)) == 1          # same content: one snapshot
    before = s1.path.read_bytes()
    write_records([{"text": "version two"}], src)                                # edited in place
    s2 = backup(src, store)
    assert s2.id != s1.id and len(list_backups(store)) == 2
    assert s1.path.read_bytes() == before                                        # the old snapshot is untouched
    assert not os.access(s1.path, os.W_OK) or os.geteuid() == 0                  # objects are read-only
    out = restore(s1.id[:8], tmp_path / "restored.jsonl", store=store)
    assert read_records(out) == [{"text": "version one"}]
    with pytest.raises(DataError, match="destination exists"): restore(s1, out)
    restore(s2, out, overwrite=True)
    assert read_records(out) == [{"text": "version two"}]


def test_backup_errors(tmp_path):
    store = tmp_path / "store"
    with pytest.raises(DataError, match="no such file"): backup(tmp_path / "missing.txt", store)
    with pytest.raises(DataError, match="not a regular file"): backup(tmp_path, store)
    with pytest.raises(DataError, match="no snapshot"): restore("abcdef12", tmp_path / "x", store=store)
    with pytest.raises(DataError, match="not a snapshot id"): restore("xyz", tmp_path / "x", store=store)
    (tmp_path / "f.txt").write_text("data\n")
    s = backup(tmp_path / "f.txt", store)
    os.chmod(s.path, 0o644); s.path.write_text("tampered\n")
    with pytest.raises(DataError, match="corrupted"): restore(s, tmp_path / "y.txt")


# ---------------------------------------------------------------- the pipeline

def test_pipeline_counts_and_reasons():
    recs = [{"t": "The quick brown fox jumps over the lazy dog near the river bank today"},
            {"t": "the quick  brown fox jumps over the lazy dog near the river bank today"},     # exact dup after canon
            {"t": "The quick brown fox jumps over the lazy dog near the river bank yesterday"},   # near dup
            {"t": "hi"},                                                                         # too short
            {"t": "Contact me: someone@example.com, a completely different sentence about cats"},
            {"t": "my key is ghp_" + "A" * 36 + " do not share it with anyone ever please"},
            {"t": "Lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod"}]
    kept, rep = Pipeline([Normalize(), LengthFilter(min_tokens=3), RegexFilter(r"(?i)lorem ipsum", "placeholder"),
                          ExactDedup(), NearDedup(threshold=0.5, ngram=3), Safety()]).run(recs)
    table = rep.table()
    assert list(table["removed"]) == [0, 1, 1, 1, 1, 1]
    assert rep[1].removed == {"shorter than 3 words": 1} and rep[5].removed == {"contains a secret key": 1}
    assert rep[5].modified == 1 and any("[EMAIL]" in r["t"] for r in kept)
    assert len(kept) == 2 and table["records_out"].iloc[-1] == 2
    rep.plot()


def test_minhash_estimates_exact_jaccard():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    h = MinHasher(256, seed=3)
    errs = []
    for _ in range(100):
        a = set(rng.sample(words, 80)); b = set(rng.sample(sorted(a), rng.randrange(10, 80))) | set(rng.sample(words, 30))
        errs.append(abs(MinHasher.similarity(h.signature(a), h.signature(b)) - jaccard(a, b)))
    assert np.mean(errs) < 0.03 and max(errs) < 0.15


def test_near_dedup_finds_what_exact_jaccard_finds():
    rng = random.Random(1)
    base = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]) + str(rng.randrange(50))
                     for _ in range(40)) for _ in range(30)]
    docs = base + [d.replace(d.split()[5], "changed", 1) for d in base[:10]]    # 10 near copies
    step = NearDedup(threshold=0.7, ngram=3)
    dup = step.duplicates(step.signatures([{"t": d} for d in docs]))
    exact = {i for i in range(30, 40) if jaccard(shingles(docs[i], 3), shingles(docs[i - 30], 3)) >= 0.7}
    assert set(dup) == exact and len(exact) == 10
    assert all(k == i - 30 for i, (k, _) in dup.items())


def test_safety_patterns():
    assert find_pii("write to a.b@c.org")["email"] == ["a.b@c.org"]
    assert find_pii("call (808) 782-1557 or +44 20 7946 0958")["phone"] == ["(808) 782-1557", "+44 20 7946 0958"]
    assert find_pii("12 + 345 = 357 in 2024-05-01")["phone"] == []
    assert find_pii("AKIA" + "ABCDEFGHIJKLMNOP")["key"]
    with pytest.raises(ValueError): Safety(email="delete")


def test_normalize_text():
    assert normalize_text("ﬁne\u00a0\u00a0tuning\u200b\r\n\r\n\r\nok\x00") == "fine tuning\n\nok"
    assert normalize_text("e\u0301") == "é"


# ---------------------------------------------------------------- splits

def test_splits_are_deterministic_and_stable_when_data_is_added():
    recs = make_instructions(2000, seed=5)
    a = split_records(recs, key=["instruction", "input"])
    b = split_records(recs + make_instructions(500, seed=6), key=["instruction", "input"])
    for name in a:
        old = {json.dumps(r, sort_keys=True) for r in a[name]}
        assert old <= {json.dumps(r, sort_keys=True) for r in b[name]}
    assert 0.75 < len(a["train"]) / len(recs) < 0.85
    with pytest.raises(ValueError): split_records(recs, {"train": -1, "test": 2})


def test_generators_are_deterministic():
    assert make_instructions(50, seed=1) == make_instructions(50, seed=1)
    assert make_instructions(50, seed=1) != make_instructions(50, seed=2)
    prefs = make_preferences(make_instructions(500, seed=3))
    assert all(p["chosen"] != p["rejected"] for p in prefs)
    docs, qs = make_knowledge_base()
    assert len(qs) == 6 * 36 and len({q["id"] for q in qs}) == len(qs)


# ---------------------------------------------------------------- tokenisation and packing

def test_completion_only_masks_the_prompt(smollm2):
    _, tok = smollm2
    ex = tokenize_example("### Instruction:\nReverse.\n\n### Input:\ncat\n\n### Response:\n", "tac", tok)
    n_prompt = len(tok("### Instruction:\nReverse.\n\n### Input:\ncat\n\n### Response:\n", add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert tok.decode(ex["input_ids"][n_prompt:]) == "tac" + tok.eos_token
    full = tokenize_example("Q: hi\nA: ", "hello", tok, completion_only=False, add_eos=False)
    assert full["labels"] == full["input_ids"]
    with pytest.raises(ValueError, match="completions"): tokenize_pairs(["a", "b"], ["c"], tok)


def test_pack_layout_and_truncation():
    toy = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], "labels": [[-100, 2, 3], [4, 5], [-100, -100, 8, 9], [10]]}
    p = pack(toy, 5)
    assert p["input_ids"].tolist() == [[6, 7, 8, 9, 10], [1, 2, 3, 4, 5]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert p["example_ids"].tolist() == [[2, 2, 2, 2, 3], [0, 0, 0, 1, 1]]
    g = pack(toy, 6, strategy="greedy")
    assert g["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 0]] and g["labels"][0, -1] == IGNORE_INDEX
    assert pack({"input_ids": [[1] * 9]}, 4)["input_ids"].tolist() == [[1, 1, 1, 1]]
    with pytest.raises(DataError, match="record 1"): pack({"input_ids": [[1] * 9]}, 4, truncate=False)
    with pytest.raises(ValueError): pack(toy, 5, strategy="random")
    assert pack({"input_ids": []}, 8)["input_ids"].shape == (0, 8)


def test_bfd_packs_tighter_than_greedy_and_keeps_every_token():
    rng = random.Random(0)
    ex = {"input_ids": [[rng.randrange(1, 99) for _ in range(rng.randrange(5, 120))] for _ in range(2000)]}
    bfd, greedy = pack(ex, 256), pack(ex, 256, strategy="greedy")
    total = sum(map(len, ex["input_ids"]))
    for p in (bfd, greedy):
        assert p["attention_mask"].sum() == total
        for i in (0, 17, 1999):   # each example's tokens appear, in order, in one row
            r, c = np.nonzero(p["example_ids"] == i)
            assert len(set(r)) == 1 and p["input_ids"][r, c].tolist() == ex["input_ids"][i]
    assert len(bfd["input_ids"]) <= len(greedy["input_ids"])
    assert len(bfd["input_ids"]) <= int(np.ceil(total / 256 * 1.02)) + 1


def _packed_vs_alone(model, examples, seq_len):
    packed = pack({"input_ids": examples}, seq_len, pad_id=0)
    batch = packed_batch(packed)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
        plain = model(input_ids=batch["input_ids"]).logits
        worst = worst_plain = 0.0
        for i, ids in enumerate(examples):
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            r, c = np.nonzero(packed["example_ids"] == i)
            worst = max(worst, (out[r[0], c] - alone).abs().max().item())
            worst_plain = max(worst_plain, (plain[r[0], c] - alone).abs().max().item())
    return worst, worst_plain, len(packed["input_ids"])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packing_with_boundary_mask_gives_the_same_logits_tiny(attn):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attn)
    model = LlamaForCausalLM(cfg).eval()
    rng = random.Random(0)
    examples = [[rng.randrange(1, 128) for _ in range(rng.randrange(3, 30))] for _ in range(12)]
    worst, worst_plain, rows = _packed_vs_alone(model, examples, 48)
    assert rows < len(examples)           # several examples share a row
    assert worst < 1e-4, worst
    assert worst_plain > 1e-3             # without the mask the logits do change: the check can fail


def test_packing_with_boundary_mask_gives_the_same_logits_smollm2(smollm2):
    model, tok = smollm2
    tk = tokenize_pairs([f"Add {a} and {b}.\n" for a, b in [(1, 2), (30, 12), (7, 9), (100, 1)]] + ["Reverse: cat\n", "Hi\n"],
                        ["3", "42", "16", "101", "tac", "Hello!"], tok)
    worst, worst_plain, rows = _packed_vs_alone(model, tk["input_ids"], 32)
    assert rows < 6 and worst < 1e-3 and worst_plain > 1e-2


def test_packed_attention_mask_shape():
    m = packed_attention_mask(torch.tensor([[1, 1, 2, 0], [1, 1, 1, 1]]))
    assert m.shape == (2, 1, 4, 4)
    assert (m[0, 0] == 0).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert (m[1, 0] == 0).int().tolist() == torch.ones(4, 4).tril().int().tolist()


def test_encode_texts_equals_the_tokenizer_call(smollm2):
    from gslm.data import encode_texts
    _, tok = smollm2
    texts = ["hello <|im_end|> world", "<|im_start|>user\nHi<|im_end|>\n", "  spaces  ", "", "café ﬁ 日本", "\n\n### Response:\n"] * 3
    want = tok(texts, add_special_tokens=False)["input_ids"]
    assert encode_texts(texts, tok, chunk=4) == want            # the Rust backend, in chunks
    class NoBackend:                                              # a tokenizer without a fast backend takes the plain call
        def __call__(self, t, **kw): return tok(t, **kw)
    assert encode_texts(texts, NoBackend()) == want

def test_encode_texts_ignores_padding_left_on_by_an_earlier_tokenizer_call():
    # transformers leaves padding/truncation switched on in the Rust backend after tokenizer(..., padding=True):
    # encode_texts must not pad (a padded completion taught a model to answer with a run of end tokens)
    from gslm.models import load_model
    from gslm.data import encode_texts
    _, tok = load_model("gslm-tiny")
    texts = ["a", "hello there world", "x y"]
    clean = encode_texts(texts, tok)
    side = tok.padding_side
    try:
        tok.padding_side = "left"
        tok(["x", "y z w v u"], padding=True, truncation=True, max_length=3)
        assert tok.backend_tokenizer.padding is not None
        test = encode_texts(texts, tok)
        assert test == clean and len({len(t) for t in test}) > 1
        assert tokenize_pairs(["p q r", "p"], ["a", "b c d e"], tok)["input_ids"] == [
            encode_texts(["p q r"], tok)[0] + encode_texts(["a"], tok)[0] + [tok.eos_token_id],
            encode_texts(["p"], tok)[0] + encode_texts(["b c d e"], tok)[0] + [tok.eos_token_id]]
        assert tok.backend_tokenizer.padding is not None      # the caller's setting is restored
    finally:
        tok.backend_tokenizer.no_padding(); tok.backend_tokenizer.no_truncation(); tok.padding_side = side
