"""The `gslm` console script, run as a user runs it."""
import os, shutil, subprocess, sys

import pytest

GSLM = shutil.which("gslm")
pytestmark = pytest.mark.skipif(GSLM is None, reason="the gslm console script is not installed (pip install -e .)")


def run(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GSLM_PROGRESS": "0"}
    return subprocess.run([GSLM, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_quickstart_answers_offline():
    r = run("quickstart", "--question", "What is the capital of France?", "--max-new-tokens", "12", "--sft-steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for part in ("== environment", "== model: smollm2", "134,515,008 parameters", "== answer", "== generation log",
                 "== a retrieval-augmented answer", "retrieved: Bramo",
                 "== a short fine-tuning: smollm2 + LoRA, 2 steps", "exact match on 16 held-out instructions"):
        assert part in out
    assert "Paris" in out.split("== answer", 1)[1]
    assert "answer: Yeva Nuith" in out.split("== a retrieval-augmented answer", 1)[1]   # the founder is only in the passages


def test_bad_model_is_a_clear_error_not_a_traceback():
    r = run("quickstart", "--model", "no-such-org/no-such-model", "--max-new-tokens", "2")
    assert r.returncode == 1
    assert "Offline choices" in r.stderr and "Traceback" not in r.stderr


def test_usage_errors():
    assert run().returncode == 2
    r = run("quickstart", "--max-new-tokens", "0")
    assert r.returncode == 2 and "at least 1" in r.stderr
    r = run("env")
    assert r.returncode == 0 and "torch" in r.stdout


def test_sft_and_bench_commands_answer_usage_and_bad_input():
    r = run("sft", "--example")
    assert r.returncode == 0 and "method: lora" in r.stdout and "max_steps" in r.stdout
    r = run("sft")
    assert r.returncode == 2 and "CONFIG.yaml" in r.stderr
    r = run("sft", "no/such/config.yaml")
    assert r.returncode == 1 and "no such config file" in r.stderr and "Traceback" not in r.stderr
    r = run("quickstart", "--sft-steps", "-1")
    assert r.returncode == 2 and "--sft-steps" in r.stderr
    r = run("bench", "--list")
    assert r.returncode == 0 and "data: tokenise + pack" in r.stdout
    r = run("bench", "no-such-benchmark")
    assert r.returncode == 1 and "unknown benchmark" in r.stderr
