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
