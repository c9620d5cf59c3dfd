"""Shared pieces of the grouped-advantage op: the group layout every backend receives, and the result type."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .config import AdvantageConfig  # noqa: F401 - re-exported: the backends read it from here


class GroupLayout(NamedTuple):
    """Which rows form which group, in a form kernels can use without atomics.

    Rows ``order[cu_groups[g]:cu_groups[g+1]]`` form group ``g``. For a fixed group size ``G`` (TRL's layout)
    ``order`` is the identity and ``cu_groups`` is ``arange(0, B+1, G)``; ``group_size`` says so.
    """

    order: torch.Tensor  # [B] int64
    cu_groups: torch.Tensor  # [num_groups + 1] int64
    group_index: torch.Tensor  # [B] int64: the group of each row (in the caller's row order)
    group_size: int | None  # G when groups are consecutive runs of equal size, else None

    @property
    def num_groups(self) -> int:
        return self.cu_groups.shape[0] - 1


class GroupAdvantages(NamedTuple):
    """Output of :func:`grpo_kernels.group_advantages` with ``return_stats=True``.

    ``group_mean``/``group_std`` are indexed by group (group ``i`` is rows ``i*G .. i*G+G-1`` for a fixed group
    size, or the ``i``-th smallest distinct value of ``group_ids``): the NaN-aware mean and Bessel-corrected std of
    the row totals (the weighted sum of the rewards; with normalize_then_sum, of their per-group z-scores), whatever
    the estimator: not the leave-one-out or length-weighted baseline an estimator subtracts. ``group_std`` is NaN
    for a group with fewer than 2 valid rewards. ``frac_zero_std`` is the fraction of groups whose std is (close to)
    0, TRL's ``frac_reward_zero_std``.
    """

    advantages: torch.Tensor  # [B] float32
    group_mean: torch.Tensor  # [num_groups] float32
    group_std: torch.Tensor  # [num_groups] float32
    frac_zero_std: torch.Tensor  # [] float32


def make_layout(batch: int, group_size: int | None, group_ids: torch.Tensor | None, device) -> GroupLayout:
    if group_ids is None:
        index = torch.arange(batch, device=device)
        cu = torch.arange(0, batch + 1, group_size, device=device)
        return GroupLayout(index, cu, index // group_size, group_size)
    _, group_index = torch.unique(group_ids, sorted=True, return_inverse=True)
    order = torch.argsort(group_index, stable=True)
    counts = torch.bincount(group_index)
    cu = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return GroupLayout(order, cu, group_index, None)
