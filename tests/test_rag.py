"""gslm.rag: chunkers, pooling = sentence-transformers, VectorIndex = faiss, atomic save/load, BM25 = rank_bm25, nDCG = scikit-learn,
and retrieval lifting SmolLM2's exact match on the knowledge base."""
import json

import numpy as np
import pytest
import torch

from gslm.core import data_path
from gslm.data import read_records
from gslm import rag


@pytest.fixture(scope="module")
def kb():
    return read_records(data_path("knowledge/documents.jsonl")), read_records(data_path("knowledge/questions.jsonl"))


@pytest.fixture(scope="module")
def retriever(kb):
    return rag.Retriever.from_documents(kb[0], "sentences", size=128, show_progress=False)


def unit(rng, n, d=384):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_chunkers_spans_and_overlap():
    text = "# A\n\nOne two three. Four five six!\n\n## B\n\nSeven eight nine ten. Eleven twelve.\n"
    doc = {"id": "d", "title": "T", "text": text}
    for m in rag.CHUNKERS:
        for c in rag.chunk_documents([doc], m, size=5, overlap=2):
            assert c.text == text[c.start:c.end] and len(c.text.split()) <= 5
    w = rag.chunk_documents([doc], "tokens", size=5, overlap=2)
    assert all(a.text.split()[-2:] == b.text.split()[:2] for a, b in zip(w, w[1:]))
    heads = [h[0] for h in rag.headings(text)]
    assert not any(c.start < h < c.end for c in rag.chunk_documents([doc], "headings", size=5) for h in heads)
    with pytest.raises(ValueError, match="overlap"): rag.chunk_tokens(text, 3, 3)
    with pytest.raises(ValueError, match="method"): rag.chunk_documents([doc], "paragraphs")
    rst = "Title\n=====\n\nIntro.\n\nPart\n----\n\nBody.\n"
    assert [(l, t) for _, l, t in rag.headings(rst, "rst")] == [(1, "Title"), (2, "Part")]


def test_mean_pooling_equals_sentence_transformers():
    texts = ["Who founded the town of Bramo?", "Bramo was founded in 1295 by Yeva Nuith. " * 4, "x"]
    ours = rag.embed_from_scratch(texts)
    theirs = torch.from_numpy(rag.Embedder.cached().encode(texts, show_progress=False))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_vector_index_equals_faiss_and_argsort():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    X, Q = unit(rng, 3000), unit(rng, 40)
    s, i = rag.VectorIndex(384).add(X).search(Q, 7)
    s_f, i_f = rag.VectorIndex(384, backend="faiss").add(X).search(Q, 7)
    np.testing.assert_array_equal(i, i_f)
    np.testing.assert_allclose(s, s_f, atol=1e-5)
    np.testing.assert_array_equal(i, np.argsort(-(Q @ X.T), axis=1)[:, :7])
    with pytest.raises(ValueError, match="shape"): rag.VectorIndex(384).add(X[:, :10])


def test_index_save_is_atomic_and_bad_files_are_named(tmp_path):
    rng = np.random.default_rng(2)
    X, Q = unit(rng, 500), unit(rng, 5)
    ix = rag.VectorIndex(384, meta={"model": "m"}).add(X)
    p = ix.save(tmp_path / "ix.npz")
    back = rag.VectorIndex.load(p)
    np.testing.assert_array_equal(back.search(Q, 5)[1], ix.search(Q, 5)[1])
    assert back.meta == {"model": "m"}
    def crash(f): f.write(b"partial"); raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): rag._atomic_save(p, crash)
    np.testing.assert_array_equal(rag.VectorIndex.load(p).search(Q, 5)[1], ix.search(Q, 5)[1])
    assert [x.name for x in tmp_path.iterdir()] == ["ix.npz"]
    (tmp_path / "cut.npz").write_bytes(p.read_bytes()[:3000])
    with pytest.raises(rag.IndexFileError, match="cut.npz.*rebuild"): rag.VectorIndex.load(tmp_path / "cut.npz")
    np.savez(tmp_path / "lie.npz", vectors=X[:3], header=np.array(json.dumps({"format": rag.VectorIndex.FORMAT, "n": 9, "dim": 384})))
    with pytest.raises(rag.IndexFileError, match="lie.npz.*truncated"): rag.VectorIndex.load(tmp_path / "lie.npz")
    with pytest.raises(rag.IndexFileError, match="no such index file"): rag.VectorIndex.load(tmp_path / "missing.npz")


def test_bm25_equals_rank_bm25(kb):
    BM25Okapi = pytest.importorskip("rank_bm25").BM25Okapi
    docs, qs = kb
    toks = [rag.bm25_tokenize(d["title"] + " " + d["text"]) for d in docs]
    ours, ref = rag.BM25(toks), BM25Okapi(toks)
    for q in qs[::7]:
        t = rag.bm25_tokenize(q["question"])
        np.testing.assert_allclose(ours.get_scores(t), ref.get_scores(t), rtol=1e-9, atol=1e-9)


def test_ndcg_equals_sklearn_and_metrics():
    ndcg_score = pytest.importorskip("sklearn.metrics").ndcg_score
    rng = np.random.default_rng(3)
    for _ in range(10):
        rel, score = rng.integers(0, 4, 9).astype(float), rng.random(9)
        for k in (2, 5, 9):
            assert rag.ndcg_at_k(rel[np.argsort(-score)], rel, k) == pytest.approx(ndcg_score(rel[None], score[None], k=k), abs=1e-12)
    m = rag.retrieval_metrics([["a", "b"], ["b", "a"], ["c", "d"]], ["a", "a", "a"], ks=(1, 2))
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@2"] == pytest.approx(2 / 3) and m["mrr"] == pytest.approx(0.5)
    assert rag.rrf([[1, 2, 3], [3, 1, 4]]) == [1, 3, 2, 4]


def test_retrieval_on_the_knowledge_base(kb, retriever):
    qs = kb[1]
    dense = rag.evaluate_retriever(retriever, qs, mode="dense")
    bm25 = rag.evaluate_retriever(retriever, qs, mode="bm25")
    hybrid = rag.evaluate_retriever(retriever, qs, mode="hybrid")
    assert dense["recall@1"] >= 0.95 and bm25["recall@3"] >= 0.95 and hybrid["recall@1"] >= 0.95, (dense, bm25, hybrid)


def test_python_docs_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(rag, "_pydocs_dirs", lambda: [tmp_path / "nothing"])
    with pytest.raises(FileNotFoundError, match="apt-get install python3.11-doc"): rag.python_docs_dir(download=False)
    monkeypatch.setattr(rag.shutil, "which", lambda name: None)
    monkeypatch.setenv("GSLM_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="dpkg-deb -x"): rag.python_docs_dir(download=True)


def test_retrieval_lifts_exact_match(kb, retriever, smollm2):
    "Closed book vs dense top-2 on 18 knowledge-base questions (3 of each kind, seed 0): retrieval must add ≥ 40 points of exact match."
    from gslm.sft import stratified_sample
    model, tok = smollm2
    qs = [{**q, "kind": q["id"].rsplit("-", 1)[-1]} for q in kb[1]]
    sample = stratified_sample(qs, 18, key="kind", seed=0)
    _, closed = rag.evaluate_rag(sample, retriever, model, tok, k=0, max_new_tokens=8)
    df, dense = rag.evaluate_rag(sample, retriever, model, tok, k=2, max_new_tokens=8)
    assert closed["em"] <= 0.05, closed
    assert dense["em"] - closed["em"] >= 0.4, (closed, dense, df[["answer", "prediction"]].to_dict("records"))
    a = rag.rag_answer(sample[0]["question"], retriever, model, tok, k=2, max_new_tokens=8)
    assert len(a.passage_ids) == 2 and sample[0]["doc_id"] in a.doc_ids and "<<<" in a.prompt


def test_shared_prefix_first_lines_equal_whole_prompt_generation(kb, retriever, smollm2):
    "generate_first_lines (shared-prefix KV cache, stop after the first line) gives generate_answers' normalised answers."
    from gslm.sft import generate_answers, normalize_answer
    model, tok = smollm2
    assert rag.common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2 and rag.common_prefix_len([[5], [6]]) == 0
    qs = [q["question"] for q in kb[1][::108]]
    prompts = [rag.rag_prompt(q, h) for q, h in zip(qs, retriever.search(qs, k=1))] + [rag.rag_prompt(qs[0], [])]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert rag.common_prefix_len(ids[:-1]) > 100 and rag.common_prefix_len(ids) > 0     # the header + examples; closed book shares less
    plain = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=4)
    want = [normalize_answer(x) for x in plain]
    shared = rag.generate_first_lines(model, tok, prompts[:-1], max_new_tokens=8, batch_size=4)   # > 100 shared tokens
    assert [normalize_answer(x) for x in shared] == want[:-1], (plain, shared)
    assert all(x.lstrip().count("\n") <= 1 for x in shared)
    mixed = rag.generate_first_lines(model, tok, [prompts[0], prompts[-1]], max_new_tokens=8)       # a short shared prefix
    assert [normalize_answer(x) for x in mixed] == [want[0], want[-1]], (plain, mixed)
    one = rag.generate_first_lines(model, tok, prompts[-1:], max_new_tokens=8)          # no prefix to share with a single prompt
    assert normalize_answer(one[0]) == want[-1]
    with pytest.raises(TypeError, match="list of prompts"): rag.generate_first_lines(model, tok, prompts[0])


def test_query_embeddings_are_reused(retriever):
    emb = retriever.embedder
    qs = ["Who founded the town of Bramo?", "What is the emblem of Vencas?"]
    a = emb.encode_queries(qs)
    assert emb.encode_queries(list(qs)) is a
    np.testing.assert_array_equal(a, emb.encode(qs, show_progress=False))
    assert emb.encode_queries(qs[:1]) is not a
