"""Group-relative advantages (spec section 2) in Triton: one program per group, plus one program for batch stats.

Groups arrive as a :class:`grpo_kernels.advantages.GroupLayout`: rows ``order[cu_groups[g]:cu_groups[g+1]]`` form
group ``g`` (for a fixed group size, ``order`` is the identity). Program ``g`` walks its rows in blocks:

    sum_then_normalize:  t_b = nansum_k w_k r_bk (NaN if every r_bk is NaN)
    normalize_then_sum:  t_b = nansum_k w_k (r_bk - mean_gk) / (std_gk + eps), the column stats from the group
    mean_g, std_g = NaN-aware mean and Bessel-corrected std of t over the group (std NaN below 2 valid rows)
    A_b = (t_b - mean_g) / (std_g + eps)   |   t_b - mean_g   (scale "group" | "none")

and writes the advantages directly. Scale "batch" and ``normalize_then_sum`` also need statistics of ``t`` over the
whole batch: the group program leaves ``t_b - mean_g`` (or ``t_b``) behind and one more program computes the batch
mean/std and finishes ``A``. Every sum runs in a fixed order (block by block, tree within a block): the result is
bitwise reproducible, no atomics. NaN advantages become 0 (``nan_to_num``), as in the reference.

Each pass recomputes ``t_b`` from the rewards (a few floats per row) instead of storing and re-reading it, so no
program reads memory that another thread of it wrote.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _alloc
from ...advantages import AdvantageConfig, GroupLayout
from .common import FLOAT32_MAX, device_guard

SUM_THEN_NORMALIZE = tl.constexpr(0)
NORMALIZE_THEN_SUM = tl.constexpr(1)
_MULTI_REWARD = {"sum_then_normalize": 0, "normalize_then_sum": 1}

SCALE_GROUP = tl.constexpr(0)
SCALE_BATCH = tl.constexpr(1)
SCALE_NONE = tl.constexpr(2)
_SCALE = {"group": 0, "batch": 1, "none": 2}

_MAX_BLOCK_ROWS = 1024


@triton.jit
def _nan_to_num(x):
    """``torch.nan_to_num(x, nan=0.0)``: NaN -> 0, +-inf -> +-largest float32."""
    x = tl.where(x != x, 0.0, x)
    return tl.where(x > FLOAT32_MAX, FLOAT32_MAX, tl.where(x < -FLOAT32_MAX, -FLOAT32_MAX, x))


@triton.jit
def _load_rewards(rewards_ptr, order_ptr, idx, in_group, cols, num_rewards):
    """Rows ``order[idx]`` of ``rewards [B, R]`` as a ``[BLOCK_B, BLOCK_R]`` tile (NaN outside), and their ids."""
    rows = tl.load(order_ptr + idx, mask=in_group, other=0)
    ok = in_group[:, None] & (cols < num_rewards)[None, :]
    r = tl.load(rewards_ptr + rows[:, None] * num_rewards + cols[None, :], mask=ok, other=float("nan"))
    return r, rows


@triton.jit
def _row_totals(r, weights, col_mean, col_std, eps, in_group, MULTI_REWARD: tl.constexpr):
    """``t_b`` of spec section 2 for a tile of rewards: ``[BLOCK_B]``, NaN for unscorable or absent rows."""
    if MULTI_REWARD == NORMALIZE_THEN_SUM:
        terms = (r - col_mean[None, :]) / (col_std[None, :] + eps) * weights[None, :]
    else:
        terms = r * weights[None, :]
    total = tl.sum(tl.where(terms != terms, 0.0, terms), axis=1)
    scorable = tl.sum((r == r).to(tl.int32), axis=1) > 0
    return tl.where(scorable & in_group, total, float("nan"))


@triton.jit
def _mean_std(count, total, sum_sq):
    """Mean and Bessel-corrected std from a count, a sum and a sum of squared deviations (std NaN below 2)."""
    return total / count, tl.where(count > 1.0, tl.sqrt(sum_sq / (count - 1.0)), float("nan"))


@triton.jit
def _group_advantages_kernel(
    rewards_ptr,  # [B, R] float32, contiguous
    weights_ptr,  # [R] float32
    order_ptr,  # [B] int64: rows sorted by group
    cu_groups_ptr,  # [G + 1] int64: group g is order[cu[g]:cu[g+1]]
    adv_ptr,  # [B] float32 out: advantages (scale batch: t - mean_g, finished by the batch kernel)
    total_ptr,  # [B] float32 out: t, for the batch kernel (WRITE_TOTALS)
    mean_ptr,  # [G] float32 out
    std_ptr,  # [G] float32 out
    num_rewards,
    eps,  # runtime scalar
    MULTI_REWARD: tl.constexpr,
    SCALE: tl.constexpr,
    WRITE_TOTALS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    group = tl.program_id(0)
    start = tl.load(cu_groups_ptr + group)
    end = tl.load(cu_groups_ptr + group + 1)
    offs = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_R)
    weights = tl.load(weights_ptr + cols, mask=cols < num_rewards, other=0.0)

    # normalize_then_sum: per-column mean/std over the group first (two passes)
    col_mean = tl.zeros([BLOCK_R], dtype=tl.float32)
    col_std = tl.zeros([BLOCK_R], dtype=tl.float32)
    if MULTI_REWARD == NORMALIZE_THEN_SUM:
        col_count = tl.zeros([BLOCK_R], dtype=tl.float32)
        col_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        for i in range(start, end, BLOCK_B):
            r, _ = _load_rewards(rewards_ptr, order_ptr, i + offs, i + offs < end, cols, num_rewards)
            col_count += tl.sum((r == r).to(tl.float32), axis=0)
            col_sum += tl.sum(tl.where(r == r, r, 0.0), axis=0)
        col_mean = col_sum / col_count
        col_sq = tl.zeros([BLOCK_R], dtype=tl.float32)
        for i in range(start, end, BLOCK_B):
            r, _ = _load_rewards(rewards_ptr, order_ptr, i + offs, i + offs < end, cols, num_rewards)
            dev = tl.where(r == r, r - col_mean[None, :], 0.0)
            col_sq += tl.sum(dev * dev, axis=0)
        col_mean, col_std = _mean_std(col_count, col_sum, col_sq)

    # group mean/std of the row totals (two passes)
    count = 0.0
    total = 0.0
    for i in range(start, end, BLOCK_B):
        in_group = i + offs < end
        r, _ = _load_rewards(rewards_ptr, order_ptr, i + offs, in_group, cols, num_rewards)
        t = _row_totals(r, weights, col_mean, col_std, eps, in_group, MULTI_REWARD)
        count += tl.sum((t == t).to(tl.float32), axis=0)
        total += tl.sum(tl.where(t == t, t, 0.0), axis=0)
    mean = total / count
    sum_sq = 0.0
    for i in range(start, end, BLOCK_B):
        in_group = i + offs < end
        r, _ = _load_rewards(rewards_ptr, order_ptr, i + offs, in_group, cols, num_rewards)
        dev = _row_totals(r, weights, col_mean, col_std, eps, in_group, MULTI_REWARD) - mean
        sum_sq += tl.sum(tl.where(dev == dev, dev * dev, 0.0), axis=0)
    mean, std = _mean_std(count, total, sum_sq)
    tl.store(mean_ptr + group, mean)
    tl.store(std_ptr + group, std)

    # outputs per row
    for i in range(start, end, BLOCK_B):
        in_group = i + offs < end
        r, rows = _load_rewards(rewards_ptr, order_ptr, i + offs, in_group, cols, num_rewards)
        t = _row_totals(r, weights, col_mean, col_std, eps, in_group, MULTI_REWARD)
        if WRITE_TOTALS:
            tl.store(total_ptr + rows, t, mask=in_group)
        if MULTI_REWARD == SUM_THEN_NORMALIZE:  # (normalize_then_sum: A comes from the batch stats of t alone)
            if SCALE == SCALE_GROUP:
                tl.store(adv_ptr + rows, _nan_to_num((t - mean) / (std + eps)), mask=in_group)
            elif SCALE == SCALE_NONE:
                tl.store(adv_ptr + rows, _nan_to_num(t - mean), mask=in_group)
            else:  # SCALE_BATCH: divided by the batch std in _batch_scale_kernel
                tl.store(adv_ptr + rows, t - mean, mask=in_group)


@triton.jit
def _batch_scale_kernel(
    total_ptr,  # [B] float32: t (its batch stats give the scale)
    adv_ptr,  # [B] float32 in/out: the value to scale (scale batch), out only (normalize_then_sum)
    batch,
    eps,
    CENTRE_ON_BATCH_MEAN: tl.constexpr,  # normalize_then_sum: A = (t - mean_batch) / (std_batch + eps)
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    count = 0.0
    total = 0.0
    for i in range(0, batch, BLOCK):
        t = tl.load(total_ptr + i + offs, mask=i + offs < batch, other=float("nan"))
        count += tl.sum((t == t).to(tl.float32), axis=0)
        total += tl.sum(tl.where(t == t, t, 0.0), axis=0)
    mean = total / count
    sum_sq = 0.0
    for i in range(0, batch, BLOCK):
        dev = tl.load(total_ptr + i + offs, mask=i + offs < batch, other=float("nan")) - mean
        sum_sq += tl.sum(tl.where(dev == dev, dev * dev, 0.0), axis=0)
    mean, std = _mean_std(count, total, sum_sq)
    for i in range(0, batch, BLOCK):
        in_batch = i + offs < batch
        if CENTRE_ON_BATCH_MEAN:
            x = tl.load(total_ptr + i + offs, mask=in_batch) - mean
        else:
            x = tl.load(adv_ptr + i + offs, mask=in_batch)
        tl.store(adv_ptr + i + offs, _nan_to_num(x / (std + eps)), mask=in_batch)


def group_advantages(rewards: torch.Tensor, weights: torch.Tensor, layout: GroupLayout, config: AdvantageConfig):
    """``rewards [B, R]`` float32, ``weights [R]`` -> ``(advantages [B], group_mean [G], group_std [G])``."""
    batch, num_rewards = rewards.shape
    num_groups = layout.num_groups
    device = rewards.device
    adv = _alloc.empty(batch, dtype=torch.float32, device=device)
    mean = _alloc.empty(num_groups, dtype=torch.float32, device=device)
    std = _alloc.empty(num_groups, dtype=torch.float32, device=device)
    if batch == 0:
        return adv, mean, std
    normalize_then_sum = config.multi_reward == "normalize_then_sum"
    # A group is usually a few to a few hundred rows: one block covers it (the mean size when sizes vary).
    rows_per_group = layout.group_size or triton.cdiv(batch, max(num_groups, 1))
    block_rows = min(triton.next_power_of_2(rows_per_group), _MAX_BLOCK_ROWS)
    # batch statistics of t are needed for scale "batch" and for normalize_then_sum
    needs_batch = normalize_then_sum or config.scale == "batch"
    totals = torch.empty(batch if needs_batch else 0, dtype=torch.float32, device=device)
    with device_guard(rewards):
        _group_advantages_kernel[(num_groups,)](
            rewards, weights.to(torch.float32), layout.order, layout.cu_groups, adv, totals if needs_batch else adv,
            mean, std, num_rewards, config.eps,
            MULTI_REWARD=_MULTI_REWARD[config.multi_reward], SCALE=_SCALE[config.scale], WRITE_TOTALS=needs_batch,
            BLOCK_B=block_rows, BLOCK_R=triton.next_power_of_2(num_rewards),
        )  # fmt: skip
        if needs_batch:
            _batch_scale_kernel[(1,)](
                totals, adv, batch, config.eps,
                CENTRE_ON_BATCH_MEAN=normalize_then_sum, BLOCK=min(triton.next_power_of_2(batch), _MAX_BLOCK_ROWS),
            )  # fmt: skip
    return adv, mean, std
