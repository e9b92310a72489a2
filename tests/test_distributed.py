"""gslm.distributed: the torchrun launcher (results, a failing rank, a hang), DeepSpeed configs checked by DeepSpeed's own parser,
a real 2-process ZeRO-3 run against one process, and gslm.train.fit under DeepSpeed with a sharded checkpoint and resume."""
import json, os, random, sys, time
from pathlib import Path
import pytest
import torch

from gslm.distributed import (OFFLOAD, ZERO_STAGES, DistributedError, check_deepspeed_config, deepspeed_config, extensions_dir,
                              launch, reference_training, worker_env, write_script)
from gslm.train import TrainConfig, deepspeed_dict, fit

import deepspeed  # noqa: F401,E402 — a dev dependency: the 2-process ZeRO-3 run must fail, not skip, when it is missing


def test_deepspeed_configs_parse_with_deepspeed():
    for stage in ZERO_STAGES:
        for off in OFFLOAD:
            if (off and stage == 0) or (off == "params" and stage != 3): continue
            for lr in (None, 1e-3):
                cfg = deepspeed_config(stage, offload=off, lr=lr, bf16=stage == 2)
                parsed = check_deepspeed_config(cfg, micro_batch_size=2, grad_accum=2)
                assert parsed.zero_optimization_stage == stage
                assert (parsed.zero_config.offload_optimizer is not None) == (off in ("optimizer", "cpu"))
                assert (parsed.zero_config.offload_param is not None) == (off == "params" or (off == "cpu" and stage == 3))
                assert parsed.bfloat16_config.enabled == (stage == 2)
    full = deepspeed_config(3, micro_batch_size=2, grad_accum=3, world_size=1, lr=1e-3, gradient_clipping=1.0)   # the parser runs in 1 process
    assert check_deepspeed_config(full).train_batch_size == 6


@pytest.mark.parametrize("kwargs, field", [({"stage": 4}, "stage=4"), ({"stage": 2, "offload": "gpu"}, "offload='gpu'"),
                                           ({"stage": 0, "offload": "cpu"}, "stage ≥ 1"), ({"stage": 2, "offload": "params"}, "stage=3"),
                                           ({"stage": 1, "micro_batch_size": 0}, "micro_batch_size"),
                                           ({"stage": 1, "bf16": True, "fp16": True}, "bf16"), ({"stage": 1, "lr": -1.0}, "lr")])
def test_bad_deepspeed_config_values(kwargs, field):
    with pytest.raises(ValueError, match="deepspeed_config") as e: deepspeed_config(**kwargs)
    assert field in str(e.value)


def test_train_config_deepspeed_checks(tmp_path):
    with pytest.raises(ValueError, match="TrainConfig.deepspeed"): TrainConfig(deepspeed=5)
    cfg = TrainConfig(batch_size=2, grad_accum=3, max_grad_norm=0.5, deepspeed=deepspeed_config(2))
    ds = deepspeed_dict(cfg, 2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"], ds["gradient_clipping"]) == (2, 3, 12, 0.5)
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=4 disagrees"):
        deepspeed_dict(TrainConfig(batch_size=2, deepspeed={"train_micro_batch_size_per_gpu": 4}), 2)
    with pytest.raises(ValueError, match="remove 'optimizer'"): deepspeed_dict(TrainConfig(deepspeed=deepspeed_config(2, lr=1e-3)), 2)
    with pytest.raises(ValueError, match="bf16.enabled"): deepspeed_dict(TrainConfig(deepspeed={"bf16": {"enabled": True}}), 2)
    with pytest.raises(FileNotFoundError, match="no such file"): deepspeed_dict(TrainConfig(deepspeed=str(tmp_path / "nope.json")), 2)
    (tmp_path / "bad.json").write_text("{stage: 2")
    with pytest.raises(ValueError, match="not valid JSON"): deepspeed_dict(TrainConfig(deepspeed=str(tmp_path / "bad.json")), 2)
    if "LOCAL_RANK" not in os.environ:
        from gslm.models import tiny_model
        with pytest.raises(RuntimeError, match="torchrun"):
            fit(tiny_model("llama"), [{"input_ids": [1, 2, 3]}] * 4, config=TrainConfig(max_steps=1, batch_size=2, deepspeed=deepspeed_config(2)))


def test_sft_config_names_a_missing_deepspeed_file(tmp_path):
    from gslm.sft import ConfigError, load_sft_config
    p = tmp_path / "c.yaml"; p.write_text("model: gslm-tiny\ntrain:\n  max_steps: 2\n  deepspeed: ds.json\n")
    with pytest.raises(ConfigError, match=r"line 4.*train.deepspeed.*ds.json"): load_sft_config(p)
    (tmp_path / "ds.json").write_text(json.dumps(deepspeed_config(2)))
    cfg = load_sft_config(p)                                         # found next to the config file
    assert cfg.train_config().deepspeed == str((tmp_path / "ds.json").resolve())


def test_a_failing_rank_is_a_clear_error():
    script = write_script("""
        import os
        if os.environ["RANK"] == "1": raise ZeroDivisionError("rank 1 divided by zero")
    """)
    with pytest.raises(DistributedError, match="rank 1 of 2 failed with ZeroDivisionError: rank 1 divided by zero") as e: launch(script)
    assert e.value.rank == 1 and "ZeroDivisionError" in e.value.remote_traceback


def test_a_hanging_rank_times_out():
    script = write_script("""
        import time, torch.distributed as dist
        dist.init_process_group("gloo")
        if dist.get_rank() == 0: time.sleep(300)
        dist.barrier()
    """)
    t0 = time.perf_counter()
    with pytest.raises(DistributedError, match="timed out after 8 s"): launch(script, timeout=8)
    assert time.perf_counter() - t0 < 30


def test_zero3_on_two_processes_equals_one_process():
    res = launch("gslm.distributed:zero_train", stage=3, steps=3, timeout=600).values
    ref = reference_training(3)
    for r in res: torch.testing.assert_close(r["losses"], ref["losses"], atol=2e-5, rtol=0)
    full = 4 * res[0]["params"]
    assert res[0]["optimizer_class"] == "DeepSpeedZeroOptimizer_Stage3"
    assert abs(res[0]["weights"] - full / 2) <= 0.02 * full and abs(res[0]["optimizer"] - 3 * full / 2) <= 0.02 * full


def _examples(n=32, seed=0, vocab=512):
    rng = random.Random(seed); out = []
    for _ in range(n):
        p, c = rng.randint(2, 12), rng.randint(1, 10)
        ids = [rng.randrange(3, vocab) for _ in range(p + c)]
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def test_fit_under_zero3_resumes_from_sharded_checkpoints(tmp_path):
    "fit with DeepSpeed ZeRO-3 on 2 processes: 2 steps + checkpoint, then a new launch resumes to 4 = one process with double micro-batches."
    def cfg(steps, **kw): return dict(max_steps=steps, batch_size=2, grad_accum=2, lr=1e-3, shuffle=True, progress_bar=False, **kw)
    out = str(tmp_path / "run")
    ds = deepspeed_config(3)
    a = launch("tests.test_distributed:_fit_worker", cfg(2, output_dir=out, save_every=2, deepspeed=ds), timeout=600,
               env={"PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}).values
    assert os.path.isdir(os.path.join(out, "checkpoint-2", "deepspeed"))
    b = launch("tests.test_distributed:_fit_worker", cfg(4, output_dir=out, save_every=2, resume_from="latest", deepspeed=ds), timeout=600,
               env={"PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}).values
    from gslm.models import tiny_model
    m = tiny_model("llama", seed=0)
    h = fit(m, _examples(), config=TrainConfig(**{**cfg(4), "batch_size": 4}))
    torch.testing.assert_close(b[0]["loss"], h.loss, atol=1e-5, rtol=0)          # history restored + 2 resumed steps
    for k, v in m.state_dict().items(): torch.testing.assert_close(b[1]["state"][k], v, atol=1e-5, rtol=1e-4)
    for run in (a, b):                                                            # every step: the ranks' examples are disjoint
        for x, y in zip(run[0]["seen"], run[1]["seen"]): assert not set(x) & set(y)


def _fit_worker(config: dict):
    from gslm.models import tiny_model
    m, seen = tiny_model("llama", seed=0), []
    h = fit(m, _examples(), config=TrainConfig(**config), callbacks=[lambda step, row: seen.append(row["examples"])])
    return {"loss": h.loss, "seen": seen, "state": m.state_dict()}


def test_workers_use_this_environments_ninja_and_ops_cache(monkeypatch, tmp_path):
    """A build of DeepSpeed's ops records the ninja and paths it used: ranks get this Python's bin/ first on PATH, and the
    cache has one folder per environment, so neither the system's ninja nor a second venv sharing GSLM_CACHE rebuilds it."""
    monkeypatch.setenv("GSLM_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin" + os.pathsep + "/bin")
    e = worker_env()
    assert e["PATH"].split(os.pathsep) == [os.path.dirname(sys.executable), "/usr/bin", "/bin"]
    monkeypatch.setenv("PATH", e["PATH"])
    assert worker_env()["PATH"] == e["PATH"]                                                # not prepended twice
    assert worker_env(env={"PATH": "/opt/x"})["PATH"] == "/opt/x"                         # an explicit env wins
    d = extensions_dir()
    assert d.is_dir() and d.parent == tmp_path / "torch_extensions" and d.name.startswith(Path(sys.prefix).name + "-")
    assert e["TORCH_EXTENSIONS_DIR"] == str(d)
