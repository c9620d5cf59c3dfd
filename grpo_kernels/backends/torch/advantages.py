"""The torch backend's grouped advantages: NaN-aware group statistics as row or segment reductions, no atomics."""

from __future__ import annotations

import torch

from ...advantages import AdvantageConfig, GroupLayout
from ...loss_math import segment_sum


def group_advantages(rewards, weights, layout: GroupLayout, config: AdvantageConfig):
    """``rewards [B, R]`` float, ``weights [R]`` -> ``(advantages [B], group_mean [G], group_std [G])``."""
    unscorable = torch.isnan(rewards).all(dim=1)
    nan = torch.full((), float("nan"), dtype=rewards.dtype, device=rewards.device)
    if config.multi_reward == "sum_then_normalize":
        total = torch.where(torch.isnan(rewards), 0.0, rewards * weights).sum(dim=1)
        total = torch.where(unscorable, nan, total)
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
    """NaN-aware mean and Bessel-corrected std of each row of ``[G, size]`` (NaN std below 2 valid entries).

    Summed in float64 (``[B]`` values: cheap), so that a row of equal rewards has a mean equal to each of them and a
    std of exactly 0, as with ``segment_sum``'s float64 prefix sums.
    """
    valid = ~torch.isnan(rows)
    x = torch.where(valid, rows.to(torch.float64), 0.0)
    count = valid.sum(dim=1).to(torch.float64)
    mean = x.sum(dim=1) / count
    deviation = torch.where(valid, x - mean.unsqueeze(1), 0.0)
    mean, std = _nan_stats_from_sums(count, mean * count, (deviation * deviation).sum(dim=1))
    return mean.to(rows.dtype), std.to(rows.dtype)


def _segment_nan_stats(sorted_values: torch.Tensor, cu: torch.Tensor, segment_of_row: torch.Tensor):
    """The same for contiguous segments of any lengths (``segment_sum``: deterministic, no atomics)."""
    valid = ~torch.isnan(sorted_values)
    count = segment_sum(valid.to(sorted_values.dtype), cu)
    mean = segment_sum(torch.where(valid, sorted_values, 0.0), cu) / count
    deviation = torch.where(valid, sorted_values - mean[segment_of_row], 0.0)
    return _nan_stats_from_sums(count, mean * count, segment_sum(deviation * deviation, cu))


def _grouped_nan_stats(values: torch.Tensor, layout: GroupLayout):
    if layout.group_size is not None:  # TRL's layout: consecutive groups of G rows, a plain [B/G, G] reduction
        return _row_nan_stats(values.view(-1, layout.group_size))
    return _segment_nan_stats(values[layout.order], layout.cu_groups, layout.group_index[layout.order])


def _batch_nan_stats(values: torch.Tensor):
    mean, std = _row_nan_stats(values.view(1, -1))
    return mean[0], std[0]
