"""The bad-input catalogue (docs/reliability.md): every malformed or non-finite input gets a clear exception naming
the argument, or a defined result that is tested here. Extends tests/test_validation.py (not repeated here)."""

import math

import pytest
import torch

from conftest import DEVICE
from grpo_kernels import group_advantages, grpo_loss
from grpo_kernels import reference as ref
from grpo_kernels.loss_math import segment_sum
from helpers import make_batch, rel_err

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]


# ----------------------------------------------------------------------------------------------------------------
# non-finite values at positions that take part: they propagate to the loss, never turned into a plausible number
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_nan_logit_reaches_the_on_policy_loss(backend, loss_type, level):
    """Regression: without old_logprobs the ratio was a constant 1, so a NaN log-prob left the loss finite."""
    d = make_batch(2, 4, 9, seed=1, masked_tail=False, empty_row=False)
    z = d["logits"].clone()
    z[0, 1, 3] = math.nan
    kw = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=4)
    out = grpo_loss(z, d["ids"], d["adv"], backend=backend, **kw)
    expect = ref.grpo_loss(z.double(), d["ids"], d["adv"].double(), **kw)
    assert math.isnan(expect.loss.item()) and math.isnan(out.loss.item())


def test_segment_sum_keeps_non_finite_values_in_their_segment():
    """Regression: the prefix sum carried inf/NaN into every later segment (inf - inf = NaN)."""
    inf, nan = math.inf, math.nan
    values = torch.tensor([1.0, 2.0, inf, 3.0, nan, 4.0, -inf, inf, 5.0, -inf, 6.0], device=DEVICE)
    cu = torch.tensor([0, 2, 4, 6, 8, 9, 11, 11], device=DEVICE)
    expect = torch.tensor([3.0, inf, nan, nan, 5.0, -inf, 0.0])
    torch.testing.assert_close(segment_sum(values, cu).cpu(), expect, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_non_finite_old_logprob_stays_in_its_sequence(backend, bad):
    """Sequence-level ratio: a NaN/-inf old log-prob in sequence 0 makes that sequence's loss NaN/inf as the
    reference does, and leaves the other sequences (loss values and gradient rows) exactly as the reference has them."""
    d = make_batch(3, 4, 11, seed=2, masked_tail=False, empty_row=False)
    old = d["old"].clone()
    old[0, 2] = bad
    kw = dict(mask=d["mask"], old_logprobs=old, loss_type="grpo", importance_sampling_level="sequence")
    z = d["logits"].clone().requires_grad_(True)
    out = grpo_loss(z, d["ids"], d["adv"], backend=backend, **kw)
    z64 = d["logits"].double().requires_grad_(True)
    expect = ref.grpo_loss(z64, d["ids"], d["adv"].double(), **kw)
    assert not math.isfinite(out.loss.item())
    assert math.isnan(out.loss.item()) == math.isnan(expect.loss.item())
    assert rel_err(out.per_token_loss[1:], expect.per_token_loss[1:]) < 1e-5
    (grad,) = torch.autograd.grad(out.loss, z)
    (grad64,) = torch.autograd.grad(expect.loss, z64)
    assert rel_err(grad[1:], grad64[1:]) < 1e-5


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_infinite_reward_is_an_error(backend, bad):
    """Regression: an infinite reward zeroed the advantages of its group (and, through the prefix sums, of every
    later group) without a word. It has no z-score: eager mode raises, torch.compile makes every advantage NaN."""
    rewards = torch.tensor([1.0, 2.0, bad, 3.0, 1.0, 2.0, 3.0, 4.5], device=DEVICE)
    with pytest.raises(ValueError, match=r"rewards must be finite, or NaN for 'no score'; got -?inf at row 2"):
        group_advantages(rewards, group_size=4, backend=backend)
    with pytest.raises(ValueError, match="rewards must be finite"):
        group_advantages(rewards.reshape(4, 2), group_size=2, backend=backend)
    group_advantages(rewards.nan_to_num(posinf=0.0, neginf=0.0), group_size=4, backend=backend)  # warm: imports
    compiled = torch.compile(lambda r: group_advantages(r, group_size=4, backend=backend), fullgraph=True, backend="aot_eager")
    assert torch.isnan(compiled(rewards)).all()


def test_non_finite_reward_weight_is_an_error(backend):
    rewards = torch.randn(4, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"reward_weights must be finite, got \[1.0, nan\]"):
        group_advantages(rewards, group_size=2, reward_weights=[1.0, math.nan], backend=backend)
