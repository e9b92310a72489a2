"Oracle checks for gslm.train: accumulation = big batch, SIGKILL + resume = uninterrupted run, same losses as transformers.Trainer."
import os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

from gslm.models import tiny_model
from gslm.train import TrainConfig, PadCollator, PackedCollator, fit, list_checkpoints, evaluate, History
from gslm.data import pack

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = textwrap.dedent('''
    import random
    def make_examples(n=32, seed=0, vocab=512):
        "Random prompt/completion examples of varied length; prompt labels are -100 (completion-only loss)."
        rng = random.Random(seed); out = []
        for _ in range(n):
            p, c = rng.randint(2, 12), rng.randint(1, 10)
            ids = [rng.randrange(3, vocab) for _ in range(p + c)]
            out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
        return out
''')
exec(DATA)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_accumulation_equals_big_batch():
    data = make_examples(32)
    common = dict(max_steps=3, lr=1e-3, shuffle=False, max_grad_norm=1.0, weight_decay=0.01, progress_bar=False)
    big, small = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    h_big = fit(big, data, config=TrainConfig(batch_size=8, grad_accum=1, **common))
    h_small = fit(small, data, config=TrainConfig(batch_size=2, grad_accum=4, **common))
    for k, v in params(big).items():
        torch.testing.assert_close(params(small)[k], v, atol=1e-5, rtol=0, msg=f"{k} differs")
    torch.testing.assert_close(h_small.loss, h_big.loss, atol=1e-5, rtol=0)
    assert h_big.tokens == h_small.tokens
    # the check can fail: a per-micro-batch mean (the classic bug) gives different weights
    bad = tiny_model("llama", seed=0)
    fit(bad, data[:8] * 4, config=TrainConfig(batch_size=8, **common))
    assert max((params(bad)[k] - v).abs().max().item() for k, v in params(big).items()) > 1e-3


def test_packed_rows_train():
    data = make_examples(24)
    packed = pack({"input_ids": [e["input_ids"] for e in data], "labels": [e["labels"] for e in data]}, 32)
    m = tiny_model("llama", seed=0)
    h = fit(m, packed, collator=PackedCollator(), eval_data=data,
            config=TrainConfig(max_steps=4, batch_size=2, lr=1e-2, progress_bar=False, eval_every=2))
    assert len(h) == 4 and h.eval_step == [2, 4] and all(t > 0 for t in h.tokens_per_s)
    # real tokens: the packed rows hold exactly the examples' tokens, no padding counted
    assert sum(h.tokens) <= sum(len(e["input_ids"]) for e in data)


def test_bad_input_and_logging(tmp_path):
    with pytest.raises(ValueError, match="choose one of"): TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="output_dir"): TrainConfig(save_every=5)
    with pytest.raises(ValueError, match="lower batch_size"):
        fit(tiny_model("llama"), make_examples(3), config=TrainConfig(batch_size=4, progress_bar=False))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fit(tiny_model("llama"), make_examples(8), config=TrainConfig(batch_size=4, resume_from=str(tmp_path / "nope"), progress_bar=False))
    m = tiny_model("llama")
    h = fit(m, make_examples(16), eval_data=make_examples(4, seed=1),
            config=TrainConfig(max_steps=4, batch_size=4, output_dir=str(tmp_path / "r"), eval_every=2, gradient_checkpointing=True,
                               progress_bar=False))
    assert m.is_activation_checkpointing
    lines = (tmp_path / "r" / "log.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss,eval_loss") and len(lines) == 5
    assert lines[2].split(",")[2] != "" and lines[1].split(",")[2] == ""     # eval loss on steps 2 and 4 only
    df = h.to_frame(); assert list(df.index) == [1, 2, 3, 4] and df["eval_loss"].notna().sum() == 2


SCRIPT = DATA + textwrap.dedent('''
    import sys, time, torch
    torch.set_num_threads(1)
    from gslm.models import tiny_model
    from gslm.train import TrainConfig, fit
    out = sys.argv[1]
    cfg = TrainConfig(max_steps=10, batch_size=4, grad_accum=2, lr=3e-3, schedule="cosine", warmup_steps=2,
                      seed=1, output_dir=out, save_every=2, keep_last=2, progress_bar=False)
    fit(tiny_model("llama", seed=0), make_examples(20), config=cfg, callbacks=[lambda step, row: time.sleep(0.5)])
''')


def test_sigkill_and_resume_is_exact(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "train_script.py"; script.write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GSLM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env)
    t0 = time.time()
    try:
        while not (out / "checkpoint-4").exists():
            assert proc.poll() is None, "the training subprocess ended before writing checkpoint-4"
            assert time.time() - t0 < 120, "no checkpoint-4 after 120 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = list_checkpoints(out)
    assert done and int(done[-1].name.split("-")[1]) < 10, f"the run was not interrupted mid-way: {done}"
    saved_step = int(done[-1].name.split("-")[1])
    saved_weights = torch.load(done[-1] / "model.pt", weights_only=True)
    cfg = dict(max_steps=10, batch_size=4, grad_accum=2, lr=3e-3, schedule="cosine", warmup_steps=2, seed=1, progress_bar=False)
    resumed = tiny_model("llama", seed=0)
    h_res = fit(resumed, make_examples(20), config=TrainConfig(output_dir=str(out), resume_from="latest", save_every=2, **cfg))
    ref = tiny_model("llama", seed=0)
    h_ref = fit(ref, make_examples(20), config=TrainConfig(**cfg))
    for k, v in params(ref).items():
        assert torch.equal(params(resumed)[k], v), f"{k} differs after resume"
    assert h_res.loss == h_ref.loss and h_res.lr == h_ref.lr
    assert (out / "log.csv").read_text().count("\n") == 11       # header + one row per step, no duplicates
    # the check can fail: restoring only the weights (fresh AdamW moments and schedule) ends elsewhere
    partial = tiny_model("llama", seed=0)
    partial.load_state_dict(saved_weights)
    left = 10 - saved_step
    fit(partial, make_examples(20), config=TrainConfig(**{**cfg, "max_steps": left}))
    assert not torch.equal(params(partial)["lm_head.weight"], params(ref)["lm_head.weight"])


def test_same_losses_as_transformers_trainer(tmp_path):
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments
    data = make_examples(32)
    hp = dict(lr=2e-3, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-8, schedule="linear", warmup_steps=2, max_grad_norm=1.0)
    ours = tiny_model("llama", seed=0)
    h = fit(ours, data, config=TrainConfig(max_steps=8, batch_size=4, grad_accum=2, shuffle=False, progress_bar=False, **hp))

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs): return SequentialSampler(self.train_dataset)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=8,
                             learning_rate=hp["lr"], weight_decay=hp["weight_decay"], adam_beta1=0.9, adam_beta2=0.95,
                             adam_epsilon=hp["eps"], lr_scheduler_type="linear", warmup_steps=2, max_grad_norm=1.0,
                             optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True, dataloader_num_workers=0)
    theirs = tiny_model("llama", seed=0)
    tr = InOrder(model=theirs, args=args, train_dataset=data, data_collator=PadCollator(pad_id=0, with_num_tokens=False))
    tr.train()
    hf_loss = [r["loss"] for r in tr.state.log_history if "loss" in r]
    assert len(hf_loss) == 8
    torch.testing.assert_close(torch.tensor(h.loss, dtype=torch.float64), torch.tensor([float(x) for x in hf_loss], dtype=torch.float64), atol=2e-4, rtol=0)
    for k, v in params(theirs).items():
        torch.testing.assert_close(params(ours)[k], v, atol=1e-5, rtol=1e-4, msg=f"{k} differs from Trainer's")


DDP_SCRIPT = DATA + textwrap.dedent('''
    import sys, torch
    torch.set_num_threads(1)
    from gslm.models import tiny_model
    from gslm.train import TrainConfig, fit, get_accelerator
    m = tiny_model("llama", seed=0)
    h = fit(m, make_examples(32), config=TrainConfig(max_steps=3, batch_size=2, grad_accum=2, lr=1e-3, shuffle=False, progress_bar=False))
    acc = get_accelerator()
    assert acc.num_processes == 2, f"expected 2 processes, got {acc.num_processes}"
    if acc.is_main_process: torch.save({"weights": m.state_dict(), "loss": h.loss, "tokens": h.tokens}, sys.argv[1])
''')


def test_two_processes_equal_one(tmp_path):
    "torchrun with 2 CPU processes (gloo DDP), micro-batches of 2 = one process with micro-batches of 4."
    script = tmp_path / "ddp.py"; script.write_text(DDP_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GSLM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    m = tiny_model("llama", seed=0)
    h = fit(m, make_examples(32), config=TrainConfig(max_steps=3, batch_size=4, grad_accum=2, lr=1e-3, shuffle=False, progress_bar=False))
    assert got["tokens"] == h.tokens
    torch.testing.assert_close(got["loss"], h.loss, atol=1e-5, rtol=0)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(got["weights"][k], v, atol=1e-5, rtol=0, msg=f"{k} differs between 2 processes and 1")


def test_peft_checkpoints_hold_only_what_trains_and_resume_exactly(tmp_path):
    from gslm.peft import apply_method
    def run(max_steps, out, resume=None):
        torch.manual_seed(0)
        m = apply_method(tiny_model("llama", seed=0), "lora", r=2, alpha=4)
        cfg = TrainConfig(max_steps=max_steps, batch_size=2, lr=1e-2, output_dir=str(out), save_every=2, resume_from=resume,
                          progress_bar=False, seed=0)
        fit(m, make_examples(), config=cfg)
        return m
    straight = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed = run(4, tmp_path / "b", resume="latest")
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()): assert torch.equal(p, q), n
    saved = torch.load(tmp_path / "b" / "checkpoint-2" / "model.pt", weights_only=True)
    assert saved and all(".lora_" in k for k in saved)                      # a few kilobytes, not the frozen base
    other = apply_method(tiny_model("llama", seed=0), "lora", r=3, alpha=4)   # prepared differently: a clear error
    with pytest.raises((KeyError, RuntimeError), match="does not fit|size mismatch"):
        fit(other, make_examples(), config=TrainConfig(max_steps=4, batch_size=2, output_dir=str(tmp_path / "b"), resume_from="latest",
                                            progress_bar=False))


def test_prompt_tuning_trains_with_fit():
    from gslm.peft import apply_method
    m = apply_method(tiny_model("llama", seed=0), "prompt", num_virtual_tokens=4)
    data = make_examples(16)
    before = evaluate(m, data, batch_size=4)                       # the virtual positions are dropped before the loss
    fit(m, data, config=TrainConfig(max_steps=12, batch_size=4, lr=5e-2, progress_bar=False))
    assert evaluate(m, data, batch_size=4) < before
