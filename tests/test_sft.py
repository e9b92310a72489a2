"""gslm.sft: examples vs the chat template, exact match, the config schema and its errors, adapters vs peft, and `gslm sft`."""
import copy, json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch
import yaml

from gslm.core import data_path
from gslm.data import read_records
from gslm.peft import apply_method, load_trainable_state_dict
from gslm.prompts import alpaca_map_fn
from gslm.sft import (EXAMPLE_CONFIG, AdapterBank, ConfigError, SFTConfig, add_zero_biases, example_config_text,
                      evaluate_instructions, instruction_pair, load_sft_config, load_sft_model, lora_state,
                      merge_lora_states, normalize_answer, parse_sft_config, run_sft, sft_examples, stratified_sample)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "nbs" / "03_finetuning" / "sft_smollm2_lora.yaml"
GSLM = shutil.which("gslm")


def test_examples_equal_the_models_chat_template(smollm2):
    _, tok = smollm2
    for r in read_records(data_path("instructions/train.jsonl"))[:50]:
        ex = sft_examples([r], tok)
        ids, labels = ex["input_ids"][0], ex["labels"][0]
        want = list(tok.apply_chat_template(alpaca_map_fn(r)["messages"], tokenize=True, return_dict=True)["input_ids"])
        assert ids == want[:len(ids)] and tok.decode(want[len(ids):]) == "\n"
        answer = [t for t, l in zip(ids, labels) if l != -100]
        assert answer[-1] == tok.eos_token_id and tok.decode(answer[:-1]) == r["output"]


def test_normalize_answer_and_stratified_sample():
    assert normalize_answer(" 12.\nbecause") == "12"
    assert normalize_answer("A  b") == "A b" and normalize_answer("abc") != normalize_answer("ABC")
    recs = read_records(data_path("instructions/test.jsonl"))
    s = stratified_sample(recs, 40, seed=1)
    assert len(s) == 40 and s == stratified_sample(recs, 40, seed=1) and s != stratified_sample(recs, 40, seed=2)
    assert len({r["task"] for r in s}) == len({r["task"] for r in recs})
    assert stratified_sample(recs[:5], 10) == recs[:5]


def test_exact_match_scores_a_perfect_and_a_wrong_model(smollm2, monkeypatch):
    model, tok = smollm2
    recs = read_records(data_path("instructions/test.jsonl"))[:3]
    import gslm.sft as sft
    monkeypatch.setattr(sft, "generate_answers", lambda m, t, prompts, **kw: [r["output"] + ".\nmore" for r in recs])
    assert evaluate_instructions(model, tok, recs).correct.all()
    monkeypatch.setattr(sft, "generate_answers", lambda m, t, prompts, **kw: ["x"] * len(prompts))
    assert not evaluate_instructions(model, tok, recs).correct.any()


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, key, hint", [
    ("model: smollm2\nmethod: lorra\n", "method", "full, partial, bitfit"),
    ("epochs: 3\n", "epochs", "allowed keys"),
    ("seq_len: long\n", "seq_len", "an integer"),
    ("packing: 1\n", "packing", "true/false"),
    ("method: lora\nmethod_config:\n  rank: 8\n", "method_config.rank", "alpha"),
    ("method: bitfit\nmethod_config:\n  r: 8\n", "method_config", "no options"),
    ("method: partial\n", "method_config", "patterns"),
    ("train:\n  learning_rate: 0.1\n", "train.learning_rate", "max_steps"),
    ("train:\n  schedule: cosin\n", "train.schedule", "cosine"),
    ("train:\n  mixed_precision: fp8\n", "train.mixed_precision", "bf16"),
    ("train:\n  output_dir: x\n", "train.output_dir", "top-level"),
    ("train:\n  max_steps: 0\n", "train.max_steps", "≥ 1"),
    ("template: chatml2\n", "template", "chatml"),
    ("dtype: fp32\n", "dtype", "bfloat16"),
    ("method: prompt\n", "packing", "packing: false"),
])
def test_bad_configs_name_the_key_and_the_allowed_values(tmp_path, text, key, hint):
    with pytest.raises(ConfigError) as e: load_sft_config(write(tmp_path, text))
    msg = str(e.value)
    assert str(tmp_path / "c.yaml") in msg and f"'{key}'" in msg and hint in msg, msg


def test_config_errors_give_the_line_and_bad_yaml_is_located(tmp_path):
    with pytest.raises(ConfigError, match=r"line 3: key 'method'"):
        load_sft_config(write(tmp_path, "# a comment\nmodel: smollm2\nmethod: nope\n"))
    with pytest.raises(ConfigError, match=r"line 3, column 1: not valid YAML .*flow sequence at line 2"):
        load_sft_config(write(tmp_path, "model: smollm2\ntrain: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping"): load_sft_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="no such config file"): load_sft_config(tmp_path / "nope.yaml")
    cfg = load_sft_config(write(tmp_path, "train_file: nowhere.jsonl\nmax_test_examples: 2\n"))
    with pytest.raises(ConfigError, match="'train_file'.*looked at"): run_sft(cfg, verbose=False)


def test_example_config_file_is_the_built_in_one_and_valid():
    assert yaml.safe_load(EXAMPLE.read_text()) == EXAMPLE_CONFIG == yaml.safe_load(example_config_text())
    cfg = load_sft_config(EXAMPLE)
    assert cfg.method == "lora" and cfg.train_config().max_steps == EXAMPLE_CONFIG["train"]["max_steps"]
    assert load_sft_config(EXAMPLE, output_dir="elsewhere").output_dir == "elsewhere"
    assert parse_sft_config({}) == SFTConfig()


def test_zero_biases_keep_the_function_and_give_bitfit_something_to_train():
    from gslm.models import tiny_model
    m = tiny_model("llama", seed=0)
    x = torch.randint(0, m.config.vocab_size, (2, 7))
    with torch.no_grad(): ref = m(x).logits
    m = add_zero_biases(m)
    with torch.no_grad(): torch.testing.assert_close(m(x).logits, ref, rtol=0, atol=0)
    m = apply_method(m, "bitfit")
    assert all(n.endswith("bias") for n, p in m.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="no bias-free linear"): add_zero_biases(m, patterns=("nothing_matches",))


def test_adapter_switching_and_merging_equal_peft():
    from peft import LoraConfig, get_peft_model
    from gslm.models import tiny_model
    base = tiny_model("qwen2", seed=3)
    lcfg = dict(r=2, lora_alpha=6, target_modules=["q_proj", "o_proj", "up_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**lcfg), adapter_name="one")
    pm.add_adapter("two", LoraConfig(**lcfg))
    state = lambda n: {k.replace("base_model.model.", "").replace(f".{n}.", "."): p.detach().clone()
                       for k, p in pm.named_parameters() if f".{n}." in k}
    ours = apply_method(copy.deepcopy(base), "lora", r=2, alpha=6, target_modules=("q_proj", "o_proj", "up_proj"))
    bank = AdapterBank(ours)
    bank.add("one", state("one")); bank.add("two", state("two"))
    x = torch.randint(0, base.config.vocab_size, (3, 9))
    with torch.no_grad():
        for n in ["one", "two", "two", "one"]:
            pm.set_adapter(n); bank.use(n)
            torch.testing.assert_close(ours(x).logits, pm(x).logits)
        pm.add_weighted_adapter(["one", "two"], [1.5, -0.5], "mix", combination_type="cat"); pm.set_adapter("mix")
        merged = apply_method(copy.deepcopy(base), "lora", r=4, alpha=4, target_modules=("q_proj", "o_proj", "up_proj"))
        load_trainable_state_dict(merged, merge_lora_states([bank.adapters["one"], bank.adapters["two"]], [1.5, -0.5], [3.0, 3.0]))
        torch.testing.assert_close(merged(x).logits, pm(x).logits)
    with pytest.raises(KeyError, match="no adapter"): bank.use("c")
    with pytest.raises(ValueError, match="does not fit"): bank.add("bad", {k: v[:1] for k, v in lora_state(ours).items()})
    with pytest.raises(ValueError, match="no trainable LoRA"): AdapterBank(tiny_model("llama"))


def tiny_config(tmp_path, **kw):
    cfg = {"model": "gslm-tiny", "system": "", "max_train_examples": 64, "max_eval_examples": 8, "max_test_examples": 8,
           "method": "lora", "method_config": {"r": 4, "alpha": 8}, "seq_len": 128,
           "train": {"max_steps": 4, "batch_size": 2, "lr": 3e-3, "save_every": 2}, "output_dir": str(tmp_path / "run")}
    cfg.update(kw)
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_run_sft_writes_everything_and_resumes(tmp_path):
    p = tiny_config(tmp_path)
    m = run_sft(load_sft_config(p), verbose=False)
    out = tmp_path / "run"
    for f in ("metrics.json", "loss.png", "predictions.jsonl", "predictions_before.jsonl", "before.json",
              "model/weights.safetensors", "model/sft_model.json"):
        assert (out / f).exists(), f
    assert not list(out.glob(".tmp*")) and m["steps"] == 4 and json.loads((out / "metrics.json").read_text())["steps"] == 4
    assert m["trainable_parameters"] < m["total_parameters"] / 10
    # a second run with a larger budget continues from checkpoint-4 instead of starting again
    cfg = load_sft_config(p); cfg.train = {**cfg.train, "max_steps": 6}
    m2 = run_sft(cfg, verbose=False)
    h = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())["history"]
    assert h["step"] == [1, 2, 3, 4, 5, 6] and h["loss"][:4] == pytest.approx(
        json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())["history"]["loss"])
    assert m2["exact_match_before"] == m["exact_match_before"]
    # the saved model reloads and answers as the run's model did
    model, tok = load_sft_model(out)
    recs = stratified_sample(read_records(data_path("instructions/test.jsonl"), fields=["instruction", "output"]), 8)
    preds = [json.loads(l)["prediction"] for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert list(evaluate_instructions(model, tok, recs, system="").prediction) == preds


def test_full_fine_tuning_saves_a_whole_model(tmp_path):
    p = tiny_config(tmp_path, method="full", method_config={}, max_test_examples=4, eval_file=None,
                    train={"max_steps": 2, "batch_size": 2, "lr": 1e-3, "save_every": 2})
    run_sft(load_sft_config(p), verbose=False)
    model, _ = load_sft_model(tmp_path / "run")
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "run" / "model" / "weights.safetensors"))
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in saved.items()) and len(saved) >= len(sd) - 1


@pytest.mark.skipif(GSLM is None, reason="the gslm console script is not installed (pip install -e .)")
def test_gslm_sft_example_config_beats_the_base_model(tmp_path):
    """The acceptance run: `gslm sft` on the example config (SmolLM2 + LoRA), from the repository, on a fixed seed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GSLM_PROGRESS": "0"}
    r = subprocess.run([GSLM, "sft", str(EXAMPLE), "--output-dir", str(tmp_path / "run")], capture_output=True, text=True,
                       env=env, timeout=1800, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["exact_match_after"] - m["exact_match_before"] >= 0.08, m
    assert "exact match after" in r.stdout and (tmp_path / "run" / "loss.png").stat().st_size > 10_000
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\nmethod_config:\n  rank: 8\n")
    r = subprocess.run([GSLM, "sft", str(bad)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "method_config.rank" in r.stderr and "Traceback" not in r.stderr
