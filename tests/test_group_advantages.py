"""group_advantages on every backend against reference.py."""

import math

import pytest
import torch
from conftest import DEVICE

from grpo_kernels import group_advantages
from grpo_kernels import reference as ref

MODES = [
    ("group", "sum_then_normalize"),
    ("batch", "sum_then_normalize"),
    ("none", "sum_then_normalize"),
    ("group", "normalize_then_sum"),
]


def _rewards(batch, columns, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 4, (batch, columns), generator=g).float() + 0.25 * torch.randn(batch, columns, generator=g)
    r[1, 0] = math.nan
    r[5] = math.nan  # unscorable row
    r[8:12, -1] = 2.0  # a constant column in one group
    return r


@pytest.mark.parametrize("scale,mode", MODES)
@pytest.mark.parametrize("group_size", [4, 1, 16])
def test_fixed_groups_match_reference(backend, scale, mode, group_size, poisoned):
    r = _rewards(16, 3, seed=group_size)
    w = torch.tensor([1.0, 0.5, 2.0])
    out = group_advantages(
        r.to(DEVICE),
        group_size=group_size,
        scale=scale,
        multi_reward=mode,
        reward_weights=w,
        backend=backend,
        return_stats=True,
    )
    expect = ref.group_advantages(r.double(), group_size=group_size, scale=scale, multi_reward=mode, reward_weights=w)
    assert out.advantages.dtype == torch.float32
    torch.testing.assert_close(out.advantages.cpu().double(), expect.advantages, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.group_mean.cpu().double(), expect.group_mean, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(out.group_std.cpu().double(), expect.group_std, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert out.frac_zero_std.item() == pytest.approx(expect.frac_zero_std.item())


@pytest.mark.parametrize("scale,mode", MODES)
def test_group_ids_match_reference(backend, scale, mode):
    r = _rewards(13, 2, seed=3)
    ids = torch.tensor([7, 2, 7, 0, 2, 2, 9, 0, 7, 9, 9, 4, 0])
    out = group_advantages(
        r.to(DEVICE), group_ids=ids.to(DEVICE), scale=scale, multi_reward=mode, backend=backend, return_stats=True
    )
    expect = ref.group_advantages(r.double(), group_ids=ids, scale=scale, multi_reward=mode)
    torch.testing.assert_close(out.advantages.cpu().double(), expect.advantages, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.group_std.cpu().double(), expect.group_std, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_matches_trl_formula(backend):
    """TRL 1.16's sum_then_normalize, group scale, on a reward matrix: written out here from its source."""
    r = _rewards(12, 2, seed=9)
    w = torch.tensor([1.0, 0.3])
    total = (r * w).nansum(dim=1)
    total[torch.isnan(r).all(dim=1)] = math.nan
    grouped = total.view(-1, 4)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    count = (~torch.isnan(grouped)).sum(1, keepdim=True)
    std = torch.sqrt(torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * count / (count - 1))
    trl = torch.nan_to_num(((grouped - mean) / (std + 1e-4)).view(-1), nan=0.0)
    out = group_advantages(r.to(DEVICE), group_size=4, reward_weights=w, backend=backend)
    torch.testing.assert_close(out.cpu(), trl, rtol=1e-5, atol=1e-5)


def test_deterministic(backend):
    r = torch.randn(4096, device=DEVICE)
    ids = torch.randint(0, 300, (4096,), device=DEVICE)
    a = group_advantages(r, group_ids=ids, backend=backend)
    b = group_advantages(r, group_ids=ids, backend=backend)
    assert torch.equal(a, b)
