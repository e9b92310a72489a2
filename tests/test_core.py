"""gslm.core: device and dtype choice, seeding, offline detection, timing, the environment report."""
import os, random, time

import numpy as np
import pytest
import torch

from gslm import core
from gslm.core import (Timer, cache_dir, data_path, default_dtype, env_report, get_device, human_bytes,
                       human_seconds, is_offline, seed_everything)


def test_device_and_dtype():
    assert get_device("cpu") == torch.device("cpu")
    assert default_dtype("cpu") == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"): get_device("cuda")


def test_device_env_override(monkeypatch):
    monkeypatch.setenv("GSLM_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")


def test_seed_everything_repeats_all_generators():
    def draw(): return random.random(), np.random.rand(), torch.rand(4)
    seed_everything(123); a = draw()
    seed_everything(123); b = draw()
    seed_everything(124); c = draw()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert not torch.equal(a[2], c[2])
    with pytest.raises(TypeError): seed_everything("1")


def test_offline_flags(monkeypatch):
    monkeypatch.setenv("GSLM_OFFLINE", "1"); assert is_offline() is True
    monkeypatch.setenv("GSLM_OFFLINE", "0"); assert is_offline() is False
    monkeypatch.delenv("GSLM_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1"); assert is_offline() is True


def test_offline_probe_is_fast_and_bounded(monkeypatch):
    "Without any flag the probe makes one TCP connection with a hard time limit."
    for k in ("GSLM_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    t0 = time.perf_counter()
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never routed, so this either fails fast or hits the timeout
    assert is_offline(refresh=True, host="192.0.2.1", port=443, timeout=0.5) is True
    assert time.perf_counter() - t0 < 3


def test_timer_and_formatting(capsys):
    with Timer("nap") as t: time.sleep(0.02)
    assert t.elapsed >= 0.02 and "nap:" in capsys.readouterr().out
    assert human_bytes(1024**2 * 1.5) == "1.5 MiB" and human_bytes(10) == "10 B"
    assert human_seconds(0.0005) == "500 µs" and human_seconds(61) == "1 min 01 s"


def test_cache_and_data_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("GSLM_CACHE", str(tmp_path / "c"))
    assert cache_dir("models") == tmp_path / "c" / "models" and (tmp_path / "c" / "models").is_dir()
    monkeypatch.setenv("GSLM_DATA", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="GSLM_DATA"): data_path("x")
    monkeypatch.delenv("GSLM_DATA")
    assert data_path().is_dir()          # the repository's data/ folder (editable install)


def test_env_report():
    rep = env_report()
    assert rep.loc["torch", "value"] == torch.__version__
    assert rep.loc["device", "value"] == str(get_device())
    assert {"memory", "offline", "cpu cores"} <= set(rep.index)
