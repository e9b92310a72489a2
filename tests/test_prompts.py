"""gslm.prompts: ChatML equal to SmolLM2's chat template token for token, every template, k-shot, ROUGE-L, map functions."""
import random

import pytest

from gslm.core import data_path
from gslm.data import DataError, read_records
from gslm.prompts import (MC_PHRASINGS, TEMPLATES, KShot, PromptTemplate, alpaca_map_fn, build_instructions,
                          chitchat_map_fn, lcs_length, mc_to_instruction, novelty_filter, oasst_map_fn, parse_instruction,
                          prompt_completion, prompt_completion_map_fn, render, rouge_l, template_map_fn)


def _conversations(n=24):
    """Real multi-turn chats from data/chats plus generated ones; every other one gets a system prompt."""
    convs = [r["messages"] for r in read_records(data_path("chats/test.jsonl"))][: n // 2]
    rng = random.Random(0)
    while len(convs) < n:
        k = rng.randrange(1, 5)
        convs.append([m for i in range(k) for m in ({"role": "user", "content": f"  Turn {i}: what is {i} * {k}?\n"},
                                                      {"role": "assistant", "content": f"{i * k}.\n\n{{braces}} <b>ok</b>"})])
    return [([{"role": "system", "content": f"System prompt {j}.\nBe brief."}] + c) if j % 2 else c for j, c in enumerate(convs)]


def test_chatml_equals_smollm2_chat_template_token_for_token(smollm2):
    _, tok = smollm2
    convs = _conversations(24)
    assert len(convs) >= 20 and all(len([m for m in c if m["role"] != "system"]) >= 2 for c in convs)
    assert sum(c[0]["role"] == "system" for c in convs) >= 10 and sum(c[0]["role"] != "system" for c in convs) >= 10
    n = 0
    for c in convs:
        for gen in (False, True):
            msgs = c[:-1] if gen else c
            ours = tok(render(msgs, "smollm2", add_generation_prompt=gen), add_special_tokens=False)["input_ids"]
            theirs = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)["input_ids"]
            assert ours == theirs
            n += 1
    assert n == 48


def test_chatml_without_default_system_differs_from_smollm2(smollm2):
    _, tok = smollm2
    msgs = [{"role": "user", "content": "hi"}]
    assert render(msgs, "chatml") != tok.apply_chat_template(msgs, tokenize=False)     # the check can fail
    assert render(msgs, "chatml", system="You are a helpful AI assistant named SmolLM, trained by Hugging Face") == \
        tok.apply_chat_template(msgs, tokenize=False)
    assert render(msgs, "tokenizer", tokenizer=tok, add_generation_prompt=True) == render(msgs, "smollm2", add_generation_prompt=True)
    with pytest.raises(ValueError, match="needs a tokenizer"): render(msgs, "tokenizer")


CONV = [{"role": "system", "content": "Sys."}, {"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
EXPECTED = {
    "alpaca": "Sys.\n\n### Instruction:\n Hi \n\n### Response:\nHello\n\n### Instruction:\nBye\n\n### Response:\nBye!\n\n",
    "chatml": "<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
              "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nBye!<|im_end|>\n",
    "llama2_chat": "<s>[INST] <<SYS>>\nSys.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST] Bye! </s>",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSys.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nBye!<|eot_id|>",
    "mistral": "<s>[INST] Sys.\n\nHi [/INST] Hello</s>[INST] Bye [/INST] Bye!</s>",
    "phi3": "<|system|>\nSys.<|end|>\n<|user|>\n Hi <|end|>\n<|assistant|>\nHello<|end|>\n<|user|>\nBye<|end|>\n<|assistant|>\nBye!<|end|>\n",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_template_renders_the_documented_format(name):
    assert render(CONV, name) == EXPECTED[name]
    prompt, completion = prompt_completion(CONV, name)
    assert prompt + completion == EXPECTED[name] and "Bye!" in completion and "Hello" not in completion


def test_bad_conversations_are_rejected():
    with pytest.raises(DataError, match="role 'bot'"): render([{"role": "bot", "content": "x"}])
    with pytest.raises(DataError, match="only the first"): render([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(DataError, match="alternating"): render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "mistral")
    with pytest.raises(DataError, match="non-string"): render([{"role": "user", "content": 3}])
    with pytest.raises(DataError, match="end with an assistant"): prompt_completion([{"role": "user", "content": "a"}])
    with pytest.raises(KeyError, match="unknown chat template"): render(CONV, "vicuna")


def test_kshot_is_deterministic_and_selects_similar_examples():
    pool = [{"question": q, "answer": a} for q, a in [("How far is the moon from the earth?", "far"), ("What colour is the sky?", "blue"),
                                                      ("How heavy is an elephant?", "heavy"), ("Is the moon made of cheese?", "no"),
                                                      ("What colour is grass?", "green"), ("How old is the earth?", "old")]]
    q = {"question": "What colour is the sea?", "answer": "blue"}
    sim = KShot(pool, k=2, select="similar")
    assert {r["question"] for r in sim.select(q)} == {"What colour is grass?", "What colour is the sky?"}
    r1, r2 = KShot(pool, k=3, seed=0), KShot(pool, k=3, seed=0)
    assert r1(q) == r2(q) and r1(q).endswith("Q: What colour is the sea?\nA:") and r1(q).count("Q:") == 4
    assert any(KShot(pool, k=3, seed=s).select(q) != r1.select(q) for s in range(1, 5))
    assert pool[0] not in KShot(pool, k=5, select="similar").select(pool[0])
    with pytest.raises(ValueError): KShot(pool, select="best")


def test_prompt_template_fields():
    pt = PromptTemplate("{a} and {b}, not {{c}}")
    assert pt.fields == ["a", "b"] and pt.format(a=1, b=2) == "1 and 2, not {{c}}"
    with pytest.raises(DataError, match="needs field 'b'"): pt.format({"a": 1})


def test_rouge_l_equals_rouge_score():
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    words = "the a cat dog sat on mat reverse word add numbers sort list 1 2 3 Hello, world! it's".split()
    for _ in range(300):
        a = " ".join(rng.choice(words) for _ in range(rng.randrange(0, 15)))
        b = " ".join(rng.choice(words) for _ in range(rng.randrange(0, 15)))
        assert rouge_l(a, b) == pytest.approx(scorer.score(b, a)["rougeL"].fmeasure, abs=1e-12)
    assert lcs_length("abcbdab", "bdcaba") == 4


def test_novelty_filter_and_parsing():
    pool = ["Add the two numbers.", "Reverse the letters of the word."]
    d = novelty_filter(["Add the two numbers together.", "Translate the sentence into French.", "Hi", "Translate the sentence into French!"], pool)
    assert [x["decision"].split(" (")[0] for x in d] == ["too similar", "kept", "fewer than 3 words", "too similar"]
    assert parse_instruction("\n2. Task: Name three fruits.\nmore") == "Name three fruits."
    assert parse_instruction('"Count the vowels."') == "Count the vowels."


def test_instruction_buildup_from_multiple_choice():
    recs = read_records(data_path("multiple_choice/quartz_train.jsonl"))[:40]
    for p in MC_PHRASINGS:
        ex = mc_to_instruction(recs[0], p)
        assert set(ex) == {"instruction", "input", "output", "phrasing"} and ex["output"]
    assert mc_to_instruction(recs[0], "letter")["output"] == recs[0]["label"]
    built = build_instructions(recs, per_record=3, seed=1)
    assert len(built) == 120 and built == build_instructions(recs, per_record=3, seed=1)
    with pytest.raises(KeyError): mc_to_instruction(recs[0], "haiku")


def test_map_functions_compose_with_datasets(smollm2):
    _, tok = smollm2
    from gslm.data import to_dataset
    ds = to_dataset(read_records(data_path("instructions/test.jsonl"))[:20])
    out = ds.map(alpaca_map_fn).map(template_map_fn("smollm2")).map(prompt_completion_map_fn("smollm2"))
    for ex in out:
        assert ex["text"] == tok.apply_chat_template(ex["messages"], tokenize=False) == ex["prompt"] + ex["completion"]
        assert ex["completion"] == ex["output"] + "<|im_end|>\n"


def test_oasst_and_chitchat_map_functions():
    oa = oasst_map_fn({"text": "### Human: A? ### Assistant: B. ### Human: C? ### Assistant: D. ### Human: unanswered"})
    assert [m["content"] for m in oa["messages"]] == ["A?", "B.", "C?", "D."]
    assert oasst_map_fn({"text": "### Human: only a question"})["messages"] == []
    with pytest.raises(DataError, match="starts with an Assistant"): oasst_map_fn({"text": "### Assistant: hi ### Human: x"})
    with pytest.raises(DataError, match="no 'text'"): oasst_map_fn({"body": "x"})
    cc = chitchat_map_fn({"messages": [[{"text": "hi", "sender": "a"}], [{"text": "yo", "sender": "b"}, {"text": "sup", "sender": "b"}],
                                       [{"text": "nm", "sender": "a"}], [{"text": "k", "sender": "b"}]]})
    assert cc["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo sup"},
                              {"role": "user", "content": "nm"}, {"role": "assistant", "content": "k"}]
    with pytest.raises(DataError, match="turn 1"): chitchat_map_fn({"messages": [[]]})
    assert alpaca_map_fn({"instruction": "Do.", "input": "", "output": "ok"}, system="S")["messages"][0] == {"role": "system", "content": "S"}


def test_course_chats_are_valid_alternating_conversations():
    for split in ("train", "test"):
        for r in read_records(data_path(f"chats/{split}.jsonl"), fields={"id": str, "messages": list}):
            roles = [m["role"] for m in r["messages"]]
            assert roles[0] == "user" and roles[-1] == "assistant" and 4 <= len(roles) <= 8
            assert all(a != b for a, b in zip(roles, roles[1:]))
