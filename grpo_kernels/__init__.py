"""grpo-kernels: fused kernels for the GRPO loss (log-probs, group advantages, clipped ratio + KL) in one pass.

Public API (see :mod:`grpo_kernels.api` for the math and every argument)::

    token_logprobs(logits, token_ids, *, temperature=1.0, return_entropy=False, mask=None, backend="auto")
    group_advantages(rewards, *, group_size=None, group_ids=None, scale=None, eps=1e-4, estimator="grpo", ...)
    grpo_loss(logits, token_ids, advantages, *, mask=None, old_logprobs=None, ref_logprobs=None, beta=0.0, ...)
    GRPOLoss(**config)(logits, token_ids, advantages, ...)
    fused_linear_grpo_loss(hidden, weight, token_ids, advantages, ...)     # the same from hidden states + LM head
    distill_loss(student_logits, teacher_logits, token_ids=None, *, divergence="jsd", beta=0.5, ...)

Every hyper-parameter of the loss is a field of :class:`LossConfig` (``grpo_kernels.config``).
"""

__version__ = "0.2.0.dev0"  # the one place the version is written (pyproject.toml reads it)

from .advantages import GroupAdvantages
from .api import GRPOLoss, GRPOLossOutput, group_advantages, grpo_loss, token_logprobs
from .backends import available_backends
from .config import AdvantageConfig, LossConfig
from .divergence import DistillOutput, distill_loss
from .fused_linear import FusedLinearGRPOLoss, fused_linear_grpo_loss, fused_linear_token_logprobs

__all__ = [
    "AdvantageConfig",
    "DistillOutput",
    "FusedLinearGRPOLoss",
    "GRPOLoss",
    "GRPOLossOutput",
    "GroupAdvantages",
    "LossConfig",
    "available_backends",
    "distill_loss",
    "fused_linear_grpo_loss",
    "fused_linear_token_logprobs",
    "group_advantages",
    "grpo_loss",
    "token_logprobs",
]
