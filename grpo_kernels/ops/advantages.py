"""Group-relative advantages: one op, no gradient.

    group_advantages (rewards [B, R], weights [R], lengths [B]?; layout: GroupLayout, config: AdvantageConfig)
        -> advantages [B], group mean [G], group std [G]

``lengths`` (tokens per completion) is read by the estimators that need it (opo, reinforce_plus_plus_baseline).
"""

from __future__ import annotations

from torch import Tensor

from ..advantages import GroupLayout
from ..backends import get_backend
from ..config import AdvantageConfig
from ._define import struct_op


@struct_op(
    "grpo_kernels::group_advantages",
    positional={"rewards": Tensor, "weights": Tensor, "lengths": Tensor | None},
    structs={"layout": GroupLayout, "config": AdvantageConfig},
    options={"backend": str},
    returns="(Tensor, Tensor, Tensor)",
)
def group_advantages(rewards, weights, lengths, layout, config, backend) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(get_backend(backend).group_advantages(rewards, weights, layout, config, lengths))


@group_advantages.register_fake
def _(rewards, weights, lengths, layout, backend):
    g = layout.cu_groups.shape[0] - 1
    return rewards.new_empty(rewards.shape[0]), rewards.new_empty(g), rewards.new_empty(g)
