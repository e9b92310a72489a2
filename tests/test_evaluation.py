"""Oracle checks for gslm.evaluation: token/sequence log-probabilities against log_softmax + gather and the model's own loss."""
import pytest
import torch

from gslm.evaluation import token_logprobs, sequence_logprobs


def _ref(logits, targets):
    return torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1).masked_fill(targets == -100, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_matches_log_softmax(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 9, 33, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 33, (2, 9), generator=g)
    targets[1, 3:6] = -100
    got = token_logprobs(logits, targets, chunk=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _ref(logits, targets))
    assert (got[1, 3:6] == 0).all()


def test_token_logprobs_bad_input():
    with pytest.raises(ValueError, match="shift them yourself"):
        token_logprobs(torch.zeros(1, 4, 5), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="-100"):
        token_logprobs(torch.zeros(1, 4, 5), torch.full((1, 4), 7))


def test_sequence_logprobs_equals_model_loss(smollm2):
    model, tok = smollm2
    ids = tok("Paris is the capital of France, and Rome is the capital of Italy.", return_tensors="pt")["input_ids"]
    labels = ids.clone(); labels[:, :4] = -100
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
        got = sequence_logprobs(model, ids, labels, average=True)
        total = sequence_logprobs(model, ids, labels)
    torch.testing.assert_close(-got[0], loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(total / (labels[:, 1:] != -100).sum(), got)


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logprobs_padding_equals_separate_forwards(smollm2, side):
    model, tok = smollm2
    rows = [tok(t)["input_ids"] for t in ["Ice is cold.", "The sun is a star at the centre of the solar system."]]
    with torch.no_grad():
        ref = []
        for r in rows:
            x = torch.tensor([r])
            ref.append(_ref(model(input_ids=x).logits[:, :-1], torch.tensor([[-100] + r[2:]])).sum())
        L, pad = max(map(len, rows)), tok.eos_token_id
        fill = (lambda r, v: r + [v] * (L - len(r))) if side == "right" else (lambda r, v: [v] * (L - len(r)) + r)
        x = torch.tensor([fill(r, pad) for r in rows]); m = torch.tensor([fill([1] * len(r), 0) for r in rows])
        lab = torch.tensor([fill([-100, -100] + r[2:], -100) for r in rows])
        got = sequence_logprobs(model, x, lab, attention_mask=m)
    torch.testing.assert_close(got, torch.stack(ref), atol=2e-4, rtol=1e-5)


# ---- multiple choice -------------------------------------------------------------------------------------------
import json, time

import numpy as np

from gslm.evaluation import (choice_logprobs, encode_pair, bootstrap_ci, load_task, evaluate_multiple_choice, mc_prompts,
                             evaluate_generation, parse_benchmark_jsonl, parse_mmlu_csv, Task)
from gslm.data import DataError


def _separate(model, ctxs, conts):
    out = []
    with torch.no_grad():
        for c, ks in zip(ctxs, conts):
            row = []
            for k in ks:
                lg = model(input_ids=torch.tensor([(c + k)[:-1]])).logits[0, -len(k):]
                row.append(torch.log_softmax(lg.float(), -1).gather(-1, torch.tensor(k)[:, None]).sum().item())
            out.append(row)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_choice_logprobs_equals_separate_forwards(family, one_thread):
    from gslm.models import tiny_model
    model = tiny_model(family, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()
    ctxs = [rand(5), rand(11), rand(1)]
    conts = [[rand(1), rand(3)], [rand(2), rand(2), rand(4)], [rand(5), rand(1)]]
    got = choice_logprobs(model, ctxs, conts, batch_size=2)
    torch.testing.assert_close(torch.tensor([x for r in got for x in r]), torch.tensor([x for r in _separate(model, ctxs, conts) for x in r]),
                               atol=1e-4, rtol=1e-5)


def test_choice_logprobs_bad_input():
    from gslm.models import tiny_model
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="at least one token"): choice_logprobs(model, [[1, 2]], [[[3], []]])
    with pytest.raises(ValueError, match="empty context"): choice_logprobs(model, [[]], [[[3]]])
    with pytest.raises(ValueError, match="contexts but"): choice_logprobs(model, [[1]], [])


def test_encode_pair_like_lm_eval(smollm2):
    _, tok = smollm2
    ctx, cont = encode_pair(tok, "Question: Is ice cold?\nAnswer: ", "yes")          # trailing space moves to the continuation
    assert ctx == tok.encode("Question: Is ice cold?\nAnswer:")
    assert cont == tok.encode("Question: Is ice cold?\nAnswer: yes")[len(ctx):]
    assert tok.convert_ids_to_tokens(cont) == ["Ġyes"]


def test_evaluate_multiple_choice_quartz(smollm2):
    model, tok = smollm2
    task = load_task("quartz", limit=4)
    df, s = evaluate_multiple_choice(model, tok, task, k_shot=1)
    prompts = mc_prompts(task, k_shot=1)
    pairs = [[encode_pair(tok, p, " " + c) for c in r["choices"]] for p, r in zip(prompts, task.records)]
    ref = _separate(model, [p[0][0] for p in pairs], [[k for _, k in p] for p in pairs])
    torch.testing.assert_close(torch.tensor(df.loglik.tolist()), torch.tensor(ref), atol=2e-4, rtol=1e-5)
    assert list(df.pred) == [int(np.argmax(r)) for r in ref]
    assert s["n"] == 4 and s["chance"] == 0.5 and s["accuracy"] == df.acc.mean()
    for p, r in zip(prompts, task.records):                                         # the demonstration is never the question
        assert p.count(r["question"]) == 1 and p.endswith("Question: " + r["question"] + "\nAnswer:")


def test_mc_prompts_kshot_and_errors():
    task = load_task("quartz", limit=3)
    p0, p3 = mc_prompts(task), mc_prompts(task, k_shot=3, seed=1)
    assert p0[0] == "Question: " + task.records[0]["question"] + "\nAnswer:"
    assert p3[0].count("Question:") == 4 and p3 == mc_prompts(task, k_shot=3, seed=1) and p3 != mc_prompts(task, k_shot=3, seed=2)
    assert mc_prompts(task, description="Pick one.")[0].startswith("Pick one.\n\nQuestion:")
    with pytest.raises(ValueError, match="pool"): mc_prompts(Task("x", "multiple_choice", task.records), k_shot=2)
    with pytest.raises(ValueError, match="normalize"): evaluate_multiple_choice(None, None, task, normalize="bytes")


def test_bootstrap_ci():
    v = (np.random.default_rng(0).random(3000) < 0.3).astype(float)
    lo, hi = bootstrap_ci(v, n=2000)
    half = 1.96 * np.sqrt(0.3 * 0.7 / 3000)
    assert abs(lo - (v.mean() - half)) < 0.004 and abs(hi - (v.mean() + half)) < 0.004
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    with pytest.raises(ValueError): bootstrap_ci([])


# ---- loaders ------------------------------------------------------------------------------------------------------
def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_course_tasks():
    q, i, k = load_task("quartz"), load_task("instructions"), load_task("knowledge")
    assert (q.kind, len(q), len(q.pool)) == ("multiple_choice", 1000, 500)
    assert i.kind == "generation" and len(i) == 510 and not i.squad_normalize
    assert k.kind == "generation" and len(k) == 216 and set(k.records[0]) >= {"instruction", "output"}


def test_arc_formats(tmp_path):
    ai2 = {"id": "a", "question": {"stem": "What do plants need?", "choices": [{"text": "light", "label": "A"},
                                                                             {"text": "noise", "label": "B"}]}, "answerKey": "A"}
    hub = {"id": "b", "question": "Which is a star?", "choices": {"text": ["Moon", "Sun", "Mars"], "label": ["1", "2", "3"]}, "answerKey": "2"}
    t = load_task(_write(tmp_path / "arc.jsonl", [ai2, hub]))
    assert [r["answer"] for r in t.records] == [0, 1] and t.records[1]["choices"] == ["Moon", "Sun", "Mars"]
    assert mc_prompts(t)[0] == "Question: What do plants need?\nAnswer:"
    with pytest.raises(DataError, match=r"line 2, field 'answerKey'"):
        load_task(_write(tmp_path / "bad.jsonl", [ai2, {**hub, "answerKey": "9"}]))
    with pytest.raises(DataError, match="line 1.*not valid JSON"):
        load_task(_write(tmp_path / "broken.jsonl", ['{"question": ']))


def test_hellaswag_format(tmp_path):
    rec = {"activity_label": "Baking cookies", "ctx_a": "A woman mixes flour.", "ctx_b": "she", "endings":
           ["puts the tray in the oven [title] Bake.", "eats the bowl.", "sings.", "runs away."], "label": "0"}
    t = load_task(_write(tmp_path / "hs.jsonl", [rec]))
    assert t.records[0]["question"] == "Baking cookies: A woman mixes flour. She"
    assert t.records[0]["choices"][0] == "puts the tray in the oven. Bake." and t.records[0]["answer"] == 0
    assert t.template == "{question}"
    with pytest.raises(DataError, match="line 1, field 'label'"):
        load_task(_write(tmp_path / "hs2.jsonl", [{**rec, "label": 7}]))
    with pytest.raises(DataError, match="field 'endings'"):
        parse_benchmark_jsonl(_write(tmp_path / "hs3.jsonl", [{"endings": "x", "ctx": "c", "label": 0}]), "hellaswag")


def test_mmlu_formats(tmp_path):
    csv = tmp_path / "high_school_physics_test.csv"
    csv.write_text('"What is the unit of force?",joule,newton,watt,pascal,B\n"2+2, in base 10?",3,4,5,22,B\n')
    t = load_task(csv)
    assert len(t) == 2 and t.records[0]["answer"] == 1 and t.choice_key == "letters"
    assert "about high school physics" in t.description
    assert mc_prompts(t)[1].endswith("2+2, in base 10?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
    bad = tmp_path / "bad.csv"; bad.write_text("q,a,b,c,d,B\nq,a,b,c,d,E\n")
    with pytest.raises(DataError, match=r"bad.csv, line 2, field 'answer'"): parse_mmlu_csv(bad)
    bad.write_text("q,a,b,c\n")
    with pytest.raises(DataError, match="line 1: expected 6 columns"): parse_mmlu_csv(bad)
    hub = {"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 3}
    assert load_task(_write(tmp_path / "mmlu.jsonl", [hub])).records[0]["letters"] == ["A", "B", "C", "D"]


def test_unknown_and_offline_fail_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="offline.*load_task\\('quartz'\\)"): load_task("hellaswag")
    assert time.perf_counter() - t0 < 2
    with pytest.raises(FileNotFoundError, match="Known tasks"): load_task("no_such_task")


def test_evaluate_generation_matches_sft(smollm2):
    from gslm.sft import evaluate_instructions, stratified_sample
    model, tok = smollm2
    recs = stratified_sample(load_task("instructions").records, 6, seed=1)
    df, s = evaluate_generation(model, tok, recs, max_new_tokens=12, normalize=False)
    ref = evaluate_instructions(model, tok, recs, max_new_tokens=12)
    assert list(df.em.astype(bool)) == list(ref.correct)
    assert s["n"] == 6 and 0 <= s["ci_low"] <= s["accuracy"] <= s["ci_high"] <= 1


def test_choice_probe_equals_sklearn_and_finds_a_planted_direction():
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from gslm.evaluation import fit_choice_probe, probe_multiple_choice, _pairwise
    rng = np.random.default_rng(3)
    S = rng.normal(size=(240, 3, 12)); y = rng.integers(0, 3, 240)           # three choices
    S[np.arange(240), y, 5] += 1.5
    probe = fit_choice_probe(S[:160], y[:160], C=0.05)
    d = _pairwise(S[:160], y[:160]); X = np.concatenate([d, -d]); sc = X.std(0)
    sk = LogisticRegression(C=0.05, fit_intercept=False, tol=1e-10, max_iter=10_000).fit(X / sc, np.r_[np.ones(len(d)), np.zeros(len(d))])
    np.testing.assert_allclose(probe.weight * sc, sk.coef_[0], rtol=1e-5, atol=1e-7)
    assert int(np.abs(probe.weight).argmax()) == 5
    assert (probe.predict(S[160:]) == y[160:]).mean() > 0.7
    # the protocol: layer chosen by cross-validation on the training questions — layer 1 carries the plant, layer 0 is noise
    H = np.stack([rng.normal(size=S.shape), S], 2)                           # [questions, choices, layers, hidden]
    cv, s = probe_multiple_choice(H[:160], y[:160], H[160:], y[160:], folds=4)
    assert s["layer"] == 1 and s["excludes_chance"] and s["ci_low"] > 1 / 3
    assert len(cv) == 2 * 3 and cv.cv_accuracy.between(0, 1).all()
    with pytest.raises(ValueError, match="questions, choices, layers, hidden"):
        probe_multiple_choice(S, y, S, y)


def test_choice_hidden_states_match_a_single_forward(smollm2):
    model, tok = smollm2
    from gslm.evaluation import choice_hidden_states, load_task, encode_pair, mc_prompts
    task = load_task("quartz", limit=3)
    H = choice_hidden_states(model, tok, task, layers=[0, -1], batch_size=4, show_progress=False)
    assert H.shape == (3, 2, 2, model.config.hidden_size)
    r = task.records[1]
    ctx, cont = encode_pair(tok, mc_prompts(task)[1], task.target_delimiter + r["choices"][1])
    with torch.no_grad():
        hs = model(torch.tensor([ctx + cont]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(torch.from_numpy(H[1, 1, 1]), hs[-1][0, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(H[1, 1, 0]), hs[0][0, -1])
