"""Group-relative advantages (docs/math.md section 2, docs/math.md section 10) in Triton: one program per group, plus
one program for batch statistics.

Groups arrive as a :class:`grpo_kernels.advantages.GroupLayout`: rows ``order[cu_groups[g]:cu_groups[g+1]]`` form
group ``g`` (for a fixed group size, ``order`` is the identity). Program ``g`` walks its rows in blocks:

    sum_then_normalize:  t_b = nansum_k w_k r_bk (NaN if every r_bk is NaN)
    normalize_then_sum:  t_b = nansum_k w_k (r_bk - mean_gk) / (std_gk + eps), the column stats from the group
    mean_g, std_g = NaN-aware mean and Bessel-corrected std of t over the group (std NaN below 2 valid rows)
    A_b = (t_b - mean_g) / (std_g + eps)   |   t_b - mean_g   (scale "group" | "none")

Statistics take one pass: each block's mean and squared deviations are computed in two passes over the block in
registers and merged into the running ones with Chan et al.'s update, so a group that fits one block (the usual case)
gets exactly the two-pass result. A second pass writes the advantages. Scale "batch" and ``normalize_then_sum`` also
need statistics of ``t`` over the whole batch: the group program writes ``t_b`` (and ``t_b - mean_g``) and one more
program computes the batch mean/std the same way and finishes ``A``. Every sum runs in a fixed order: the result is
bitwise reproducible, no atomics. NaN advantages become 0 (``nan_to_num``), as in the reference.

Each pass recomputes ``t_b`` from the rewards (a few floats per row) instead of storing and re-reading it, so no
program reads memory that another thread of it wrote.

The other estimators reuse the same two passes (n = valid rows of the group; rows without a baseline get 0):

    rloo        A_b = n/(n-1) (t_b - mean_g)
    grpo_passk  the statistics pass also keeps (max, how many rows hold it, the largest value below it), merged block
                by block exactly (max is order-free); A_b = (max - runner-up) [/ (std_g + eps)] for a unique max
    opo         the statistics pass also sums len_b and len_b t_b; A_b = t_b - sum(len t) / sum(len)
    gpg         the group program writes t_b - mean_g; the batch program counts the nonzero t and scales by B / count
    reinforce_plus_plus_baseline  the group program writes t_b - mean_g; the batch program whitens it with the
                length-weighted mean and variance (Chan's update with weights), / sqrt(var + 1e-8)
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

GRPO = tl.constexpr(0)
RLOO = tl.constexpr(1)
GRPO_PASSK = tl.constexpr(2)
REINFORCE_PLUS_PLUS_BASELINE = tl.constexpr(3)
OPO = tl.constexpr(4)
GPG = tl.constexpr(5)
_ESTIMATOR = {"grpo": 0, "rloo": 1, "grpo_passk": 2, "reinforce_plus_plus_baseline": 3, "opo": 4, "gpg": 5}
WHITEN_EPS = tl.constexpr(1e-8)  # reference.WHITEN_EPS

_MAX_BLOCK_ROWS = 1024


@triton.jit
def _nan_to_num(x):
    """``torch.nan_to_num(x, nan=0.0)``: NaN -> 0, +-inf -> +-largest float32."""
    x = tl.where(x != x, 0.0, x)
    return tl.where(x > FLOAT32_MAX, FLOAT32_MAX, tl.where(x < -FLOAT32_MAX, -FLOAT32_MAX, x))


@triton.jit
def _row_totals(
    rewards_ptr, order_ptr, idx, end, cols, num_rewards, weights, col_mean, col_std, eps, MULTI_REWARD: tl.constexpr
):
    """Group rows ``order[idx]`` (``idx < end``): ``(t [BLOCK_B], row ids [BLOCK_B], rewards [BLOCK_B, BLOCK_R])``,
    with ``t`` NaN for unscorable or absent rows and the rewards NaN outside the tensor."""
    in_group = idx < end
    rows = tl.load(order_ptr + idx, mask=in_group, other=0)
    ok = in_group[:, None] & (cols < num_rewards)[None, :]
    r = tl.load(rewards_ptr + rows[:, None] * num_rewards + cols[None, :], mask=ok, other=float("nan"))
    if MULTI_REWARD == NORMALIZE_THEN_SUM:
        terms = (r - col_mean[None, :]) / (col_std[None, :] + eps) * weights[None, :]
    else:
        terms = r * weights[None, :]
    total = tl.sum(tl.where(terms != terms, 0.0, terms), axis=1)
    scorable = tl.sum((r == r).to(tl.int32), axis=1) > 0
    return tl.where(scorable & in_group, total, float("nan")), rows, r


@triton.jit
def _merge_stats(count, mean, m2, x):
    """Fold the non-NaN entries of ``x`` (along axis 0) into the running ``(count, mean, M2)``."""
    valid = x == x
    n = tl.sum(valid.to(tl.float32), axis=0)
    block_mean = tl.sum(tl.where(valid, x, 0.0), axis=0) / tl.maximum(n, 1.0)
    dev = tl.where(valid, x - block_mean, 0.0)
    total = count + n
    delta = block_mean - mean
    mean = tl.where(count == 0.0, block_mean, mean + delta * (n / tl.maximum(total, 1.0)))
    m2 = m2 + tl.sum(dev * dev, axis=0) + delta * delta * (count * n / tl.maximum(total, 1.0))
    return total, mean, m2


@triton.jit
def _merge_weighted_stats(weight, mean, m2, x, w):
    """Fold the non-NaN entries of ``x`` with weights ``w`` into the running ``(total weight, mean, M2)``."""
    valid = x == x
    w = tl.where(valid, w, 0.0)
    x = tl.where(valid, x, 0.0)
    n = tl.sum(w, axis=0)
    block_mean = tl.where(n > 0.0, tl.sum(w * x, axis=0) / n, 0.0)
    dev = x - block_mean
    total = weight + n
    delta = block_mean - mean
    share = tl.where(total > 0.0, n / total, 0.0)
    mean = tl.where(weight == 0.0, block_mean, mean + delta * share)
    m2 = m2 + tl.sum(w * dev * dev, axis=0) + delta * delta * weight * share
    return total, mean, m2


@triton.jit
def _merge_top2(top, top_count, second, x, valid):
    """Fold the valid entries of ``x`` into the running (max, rows holding it, largest value below it); -inf: none."""
    x = tl.where(valid, x, float("-inf"))
    block_top = tl.max(x, axis=0)
    block_count = tl.sum((valid & (x == block_top)).to(tl.float32), axis=0)
    block_second = tl.max(tl.where(x == block_top, float("-inf"), x), axis=0)
    new_top = tl.maximum(top, block_top)
    count = tl.where(top == new_top, top_count, 0.0) + tl.where(block_top == new_top, block_count, 0.0)
    second = tl.maximum(tl.where(top == new_top, second, top), tl.where(block_top == new_top, block_second, block_top))
    return new_top, count, second


@triton.jit
def _finish_stats(count, mean, m2):
    """``(mean, Bessel-corrected std)``: mean NaN without valid entries, std NaN below two."""
    std = tl.sqrt(m2 / tl.maximum(count - 1.0, 1.0))
    return tl.where(count > 0.0, mean, float("nan")), tl.where(count > 1.0, std, float("nan"))


@triton.jit
def _group_advantages_kernel(
    rewards_ptr,  # [B, R] float32, contiguous
    weights_ptr,  # [R] float32
    order_ptr,  # [B] int64: rows sorted by group
    cu_groups_ptr,  # [G + 1] int64: group g is order[cu[g]:cu[g+1]]
    lengths_ptr,  # [B] float32: completion lengths (opo; else unused)
    adv_ptr,  # [B] float32 out: advantages (scale batch, gpg, rf++ baseline: t - mean_g, finished by a batch kernel)
    total_ptr,  # [B] float32 out: t, for the batch kernel (WRITE_TOTALS)
    mean_ptr,  # [G] float32 out
    std_ptr,  # [G] float32 out
    num_rewards,
    eps,  # runtime scalar
    MULTI_REWARD: tl.constexpr,
    SCALE: tl.constexpr,
    ESTIMATOR: tl.constexpr,
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

    # normalize_then_sum: mean/std of each reward column over the group
    col_mean = tl.zeros([BLOCK_R], dtype=tl.float32)
    col_std = tl.zeros([BLOCK_R], dtype=tl.float32)
    if MULTI_REWARD == NORMALIZE_THEN_SUM:
        col_count = tl.zeros([BLOCK_R], dtype=tl.float32)
        col_m2 = tl.zeros([BLOCK_R], dtype=tl.float32)
        for i in range(start, end, BLOCK_B):
            _, _, r = _row_totals(
                rewards_ptr,
                order_ptr,
                i + offs,
                end,
                cols,
                num_rewards,
                weights,
                col_mean,
                col_std,
                eps,
                SUM_THEN_NORMALIZE,
            )
            col_count, col_mean, col_m2 = _merge_stats(col_count, col_mean, col_m2, r)
        col_mean, col_std = _finish_stats(col_count, col_mean, col_m2)

    # mean/std of the row totals over the group (opo: also the length sums; grpo_passk: also the top two)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    sum_len = 0.0
    sum_len_t = 0.0
    top = float("-inf")
    top_count = 0.0
    second = float("-inf")
    for i in range(start, end, BLOCK_B):
        t, rows, _ = _row_totals(
            rewards_ptr, order_ptr, i + offs, end, cols, num_rewards, weights, col_mean, col_std, eps, MULTI_REWARD
        )
        count, mean, m2 = _merge_stats(count, mean, m2, t)
        if ESTIMATOR == OPO:
            length = tl.load(lengths_ptr + rows, mask=i + offs < end, other=0.0)
            sum_len += tl.sum(tl.where(t == t, length, 0.0), axis=0)
            sum_len_t += tl.sum(tl.where(t == t, length * t, 0.0), axis=0)
        if ESTIMATOR == GRPO_PASSK:
            top, top_count, second = _merge_top2(top, top_count, second, t, t == t)
    mean, std = _finish_stats(count, mean, m2)
    tl.store(mean_ptr + group, mean)
    tl.store(std_ptr + group, std)
    # Per-group scalars are NaN where the group has no baseline (fewer than 2 valid rows), so that every row of it
    # gets NaN -> 0 at the store.
    if ESTIMATOR == RLOO:
        factor = tl.where(count > 1.0, count / tl.maximum(count - 1.0, 1.0), float("nan"))
    if ESTIMATOR == GRPO_PASSK:  # only a unique max gets a nonzero gap; a tie at the top gives 0
        gap = tl.where(top_count == 1.0, top - second, 0.0)
        if SCALE == SCALE_GROUP:
            gap = gap / (std + eps)
        gap = tl.where(count > 1.0, gap, 0.0)
    if ESTIMATOR == OPO:
        baseline = tl.where((count > 1.0) & (sum_len > 0.0), sum_len_t / sum_len, float("nan"))
    if ESTIMATOR == GPG or ESTIMATOR == REINFORCE_PLUS_PLUS_BASELINE:  # noqa: SIM109 - constexprs in a Triton kernel
        mean = tl.where(count > 1.0, mean, float("nan"))

    # outputs per row
    for i in range(start, end, BLOCK_B):
        t, rows, _ = _row_totals(
            rewards_ptr, order_ptr, i + offs, end, cols, num_rewards, weights, col_mean, col_std, eps, MULTI_REWARD
        )
        in_group = i + offs < end
        if WRITE_TOTALS:
            tl.store(total_ptr + rows, t, mask=in_group)
        if ESTIMATOR == RLOO:
            tl.store(adv_ptr + rows, _nan_to_num((t - mean) * factor), mask=in_group)
        elif ESTIMATOR == GRPO_PASSK:  # (NaN t never equals top)
            tl.store(adv_ptr + rows, tl.where(t == top, gap, 0.0), mask=in_group)
        elif ESTIMATOR == OPO:
            tl.store(adv_ptr + rows, _nan_to_num(t - baseline), mask=in_group)
        elif ESTIMATOR != GRPO:  # gpg, reinforce_plus_plus_baseline: NaN marks "no baseline" for the batch kernel
            tl.store(adv_ptr + rows, t - mean, mask=in_group)
        elif MULTI_REWARD == SUM_THEN_NORMALIZE:  # (normalize_then_sum: A comes from the batch stats of t alone)
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
    mean = 0.0
    m2 = 0.0
    for i in range(0, batch, BLOCK):
        t = tl.load(total_ptr + i + offs, mask=i + offs < batch, other=float("nan"))
        count, mean, m2 = _merge_stats(count, mean, m2, t)
    mean, std = _finish_stats(count, mean, m2)
    for i in range(0, batch, BLOCK):
        in_batch = i + offs < batch
        if CENTRE_ON_BATCH_MEAN:
            x = tl.load(total_ptr + i + offs, mask=in_batch) - mean
        else:
            x = tl.load(adv_ptr + i + offs, mask=in_batch)
        tl.store(adv_ptr + i + offs, _nan_to_num(x / (std + eps)), mask=in_batch)


@triton.jit
def _gpg_scale_kernel(
    total_ptr,  # [B] float32: t
    adv_ptr,  # [B] float32 in/out: t - mean_g (NaN: no baseline) -> B / max(1, #nonzero t) (t - mean_g)
    batch,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    nonzero = 0
    for i in range(0, batch, BLOCK):
        t = tl.load(total_ptr + i + offs, mask=i + offs < batch, other=0.0)
        nonzero += tl.sum(((t == t) & (t != 0.0)).to(tl.int32), axis=0)
    alpha = (batch * 1.0) / tl.maximum(nonzero, 1).to(tl.float32)
    for i in range(0, batch, BLOCK):
        in_batch = i + offs < batch
        tl.store(adv_ptr + i + offs, _nan_to_num(tl.load(adv_ptr + i + offs, mask=in_batch) * alpha), mask=in_batch)


@triton.jit
def _whiten_kernel(
    adv_ptr,  # [B] float32 in/out: t - mean_g (NaN: no baseline) -> whitened over the batch's tokens
    lengths_ptr,  # [B] float32: the weight of each row (its completion length)
    batch,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    weight = 0.0
    mean = 0.0
    m2 = 0.0
    for i in range(0, batch, BLOCK):
        in_batch = i + offs < batch
        x = tl.load(adv_ptr + i + offs, mask=in_batch, other=float("nan"))
        w = tl.load(lengths_ptr + i + offs, mask=in_batch, other=0.0)
        weight, mean, m2 = _merge_weighted_stats(weight, mean, m2, x, w)
    inv_std = 1.0 / tl.sqrt(m2 / tl.maximum(weight - 1.0, 1e-30) + WHITEN_EPS)
    for i in range(0, batch, BLOCK):
        in_batch = i + offs < batch
        x = tl.load(adv_ptr + i + offs, mask=in_batch)
        tl.store(adv_ptr + i + offs, tl.where(weight > 1.0, _nan_to_num((x - mean) * inv_std), 0.0), mask=in_batch)


def group_advantages(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    layout: GroupLayout,
    config: AdvantageConfig,
    lengths: torch.Tensor | None = None,
):
    """``rewards [B, R]`` float32, ``weights [R]``, ``lengths [B]`` float32 or None ->
    ``(advantages [B], group_mean [G], group_std [G])``."""
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
    # batch statistics of t are needed for scale "batch", normalize_then_sum and gpg (its nonzero count)
    needs_batch = normalize_then_sum or config.scale == "batch" or config.estimator == "gpg"
    totals = _alloc.empty(batch if needs_batch else 0, dtype=torch.float32, device=device)
    lengths = adv if lengths is None else lengths.to(torch.float32).contiguous()  # (a placeholder when unused)
    batch_block = min(triton.next_power_of_2(batch), _MAX_BLOCK_ROWS)
    with device_guard(rewards):
        _group_advantages_kernel[(num_groups,)](
            rewards,
            weights.to(torch.float32),
            layout.order,
            layout.cu_groups,
            lengths,
            adv,
            totals if needs_batch else adv,
            mean,
            std,
            num_rewards,
            config.eps,
            MULTI_REWARD=_MULTI_REWARD[config.multi_reward],
            SCALE=_SCALE[config.scale],
            ESTIMATOR=_ESTIMATOR[config.estimator],
            WRITE_TOTALS=needs_batch,
            BLOCK_B=block_rows,
            BLOCK_R=triton.next_power_of_2(num_rewards),
        )
        if config.estimator == "gpg":
            _gpg_scale_kernel[(1,)](totals, adv, batch, BLOCK=batch_block)
        elif config.estimator == "reinforce_plus_plus_baseline":
            _whiten_kernel[(1,)](adv, lengths, batch, BLOCK=batch_block)
        elif needs_batch:
            _batch_scale_kernel[(1,)](
                totals,
                adv,
                batch,
                config.eps,
                CENTRE_ON_BATCH_MEAN=normalize_then_sum,
                BLOCK=batch_block,
            )
    return adv, mean, std
