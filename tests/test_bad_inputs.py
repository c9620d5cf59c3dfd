"""The bad-input catalogue (docs/reliability.md): every malformed or non-finite input gets a clear exception naming
the argument, or a defined result that is tested here. Extends tests/test_validation.py (not repeated here)."""

import math

import pytest
import torch

from conftest import DEVICE
from grpo_kernels import grpo_loss
from grpo_kernels import reference as ref
from helpers import make_batch

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
