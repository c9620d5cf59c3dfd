"""The torch backend's grouped advantages: NaN-aware group statistics as row or segment reductions, no atomics.

Every estimator of docs/math.md section 10 is a few vectorised steps on the row totals ``t [B]``: the group
statistics (count, mean, std; opo's length-weighted sums; grpo_passk's max, its multiplicity and the runner-up),
then one elementwise formula, then (gpg, reinforce_plus_plus_baseline) one batch reduction.
"""

from __future__ import annotations

import torch

from ...advantages import AdvantageConfig, GroupLayout
from ...loss_math import segment_sum
from ...reference import WHITEN_EPS


def group_advantages(rewards, weights, layout: GroupLayout, config: AdvantageConfig, lengths=None):
    """``rewards [B, R]`` float, ``weights [R]``, ``lengths [B]`` (rewards' dtype) or None ->
    ``(advantages [B], group_mean [G], group_std [G])``."""
    unscorable = torch.isnan(rewards).all(dim=1)
    nan = torch.full((), float("nan"), dtype=rewards.dtype, device=rewards.device)
    if config.multi_reward == "sum_then_normalize":
        total = torch.where(torch.isnan(rewards), 0.0, rewards * weights).sum(dim=1)
        total = torch.where(unscorable, nan, total)
        if config.estimator != "grpo":
            return _estimator_advantages(total, layout, config, lengths)
        mean, std = _grouped_nan_stats(total, layout)
        centred = total - mean[layout.group_index]
        if config.scale == "group":
            adv = centred / (std[layout.group_index] + config.eps)
        elif config.scale == "batch":
            adv = centred / (_batch_nan_stats(total)[1] + config.eps)
        else:
            adv = centred
    else:  # normalize_then_sum
        columns = []
        for k in range(rewards.shape[1]):
            mean_k, std_k = _grouped_nan_stats(rewards[:, k], layout)
            columns.append((rewards[:, k] - mean_k[layout.group_index]) / (std_k[layout.group_index] + config.eps))
        normalised = torch.stack(columns, dim=1)
        total = torch.where(torch.isnan(normalised), 0.0, normalised * weights).sum(dim=1)
        total = torch.where(unscorable, nan, total)
        mean, std = _grouped_nan_stats(total, layout)
        batch_mean, batch_std = _batch_nan_stats(total)
        adv = (total - batch_mean) / (batch_std + config.eps)
    return torch.nan_to_num(adv, nan=0.0), mean, std


def _nan_stats_from_sums(count, total, sum_sq_dev):
    mean = total / count
    var = sum_sq_dev / (count - 1)
    return mean, torch.where(count > 1, torch.sqrt(var), torch.full_like(var, float("nan")))


def _row_nan_stats(rows: torch.Tensor):
    """NaN-aware count, mean and Bessel-corrected std of each row of ``[G, size]`` (NaN std below 2 valid entries).

    Summed in float64 (``[B]`` values: cheap), so that a row of equal rewards has a mean equal to each of them and a
    std of exactly 0, as with ``segment_sum``'s float64 prefix sums.
    """
    valid = ~torch.isnan(rows)
    x = torch.where(valid, rows.to(torch.float64), 0.0)
    count = valid.sum(dim=1).to(torch.float64)
    mean = x.sum(dim=1) / count
    deviation = torch.where(valid, x - mean.unsqueeze(1), 0.0)
    mean, std = _nan_stats_from_sums(count, mean * count, (deviation * deviation).sum(dim=1))
    return count, mean.to(rows.dtype), std.to(rows.dtype)


def _segment_nan_stats(sorted_values: torch.Tensor, cu: torch.Tensor, segment_of_row: torch.Tensor):
    """The same for contiguous segments of any lengths (``segment_sum``: deterministic, no atomics); count, mean,
    std."""
    valid = ~torch.isnan(sorted_values)
    count = segment_sum(valid.to(sorted_values.dtype), cu)
    mean = segment_sum(torch.where(valid, sorted_values, 0.0), cu) / count
    deviation = torch.where(valid, sorted_values - mean[segment_of_row], 0.0)
    mean, std = _nan_stats_from_sums(count, mean * count, segment_sum(deviation * deviation, cu))
    return count, mean, std


def _grouped_nan_stats(values: torch.Tensor, layout: GroupLayout, with_count: bool = False):
    """``(mean [G], std [G])`` of ``values [B]`` per group, NaN-aware; ``with_count``: ``(count, mean, std)``."""
    if layout.group_size is not None:  # TRL's layout: consecutive groups of G rows, a plain [B/G, G] reduction
        stats = _row_nan_stats(values.view(-1, layout.group_size))
    else:
        stats = _segment_nan_stats(values[layout.order], layout.cu_groups, layout.group_index[layout.order])
    return stats if with_count else stats[1:]


def _batch_nan_stats(values: torch.Tensor):
    _, mean, std = _row_nan_stats(values.view(1, -1))
    return mean[0], std[0]


def _estimator_advantages(total, layout: GroupLayout, config: AdvantageConfig, lengths):
    """rloo, grpo_passk, reinforce_plus_plus_baseline, opo, gpg from the row totals ``total [B]`` (NaN: unscorable)."""
    gi = layout.group_index
    count, mean, std = _grouped_nan_stats(total, layout, with_count=True)
    valid = ~torch.isnan(total)
    has_baseline = valid & (count[gi] >= 2)
    centred = total - mean[gi]
    zero = torch.zeros((), dtype=total.dtype, device=total.device)
    estimator = config.estimator
    if estimator == "rloo":  # n/(n-1) (t - mean): t minus the mean of the other n - 1
        factor = (count / (count - 1).clamp(min=1)).to(total.dtype)
        adv = torch.where(has_baseline, centred * factor[gi], zero)
    elif estimator == "grpo_passk":
        top, top_count, second = _grouped_top2(torch.where(valid, total, float("-inf")), layout)
        gap = top - torch.where(top_count >= 2, top, second)
        if config.scale == "group":
            gap = gap / (std + config.eps)
        winner = has_baseline & (total == top[gi]) & (top_count[gi] == 1)
        adv = torch.where(winner, gap[gi], zero)
    elif estimator == "opo":
        w = torch.where(valid, lengths, 0.0)
        sum_w = _grouped_sum(w, layout)
        baseline = (_grouped_sum(w * torch.where(valid, total, 0.0), layout) / sum_w).to(total.dtype)
        adv = torch.where(has_baseline & (sum_w[gi] > 0), total - baseline[gi], zero)
    elif estimator == "gpg":
        alpha = total.shape[0] / (valid & (total != 0)).sum().clamp(min=1).to(torch.float64)  # B / nonzero rewards
        adv = torch.where(has_baseline, centred * alpha.to(total.dtype), zero)
    else:  # reinforce_plus_plus_baseline: the group-mean baseline, whitened over the batch's tokens
        adv = _whiten(torch.where(has_baseline, centred, float("nan")), lengths)
    return adv, mean, std


def _grouped_sum(values: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Per-group sums of ``values [B]`` (no NaN), in float64."""
    if layout.group_size is not None:
        return values.to(torch.float64).view(-1, layout.group_size).sum(dim=1)
    return segment_sum(values[layout.order], layout.cu_groups)


def _grouped_top2(values: torch.Tensor, layout: GroupLayout):
    """Per group: the max of ``values [B]`` (-inf for excluded rows), how many rows hold it, and the largest value
    below it (-inf if none). Max is exact and order-free, so this is deterministic on every device."""
    gi = layout.group_index
    if layout.group_size is not None:
        rows = values.view(-1, layout.group_size)
        top = rows.amax(dim=1)
        at_top = rows == top.unsqueeze(1)
        second = torch.where(at_top, float("-inf"), rows).amax(dim=1)
        return top, at_top.sum(dim=1), second
    lengths = layout.cu_groups[1:] - layout.cu_groups[:-1]
    top = torch.segment_reduce(values[layout.order], "max", lengths=lengths)
    at_top = values == top[gi]
    second = torch.segment_reduce(torch.where(at_top, float("-inf"), values)[layout.order], "max", lengths=lengths)
    return top, _grouped_sum(at_top.to(values.dtype), layout).round().to(torch.int64), second


def _whiten(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(x - mu) / sqrt(var + 1e-8)`` with the weighted mean and Bessel-corrected variance (divide by W - 1) of
    the non-NaN entries, weight ``weights`` each; 0 where ``x`` is NaN, everywhere when W <= 1. Sums in float64."""
    valid = ~torch.isnan(values)
    x = torch.where(valid, values.to(torch.float64), 0.0)
    w = torch.where(valid, weights.to(torch.float64), 0.0)
    total_weight = w.sum()
    mu = (w * x).sum() / total_weight
    var = (w * (x - mu) ** 2).sum() / (total_weight - 1)
    out = ((x - mu) / torch.sqrt(var + WHITEN_EPS)).to(values.dtype)
    return torch.where(valid & (total_weight > 1), out, 0.0)
