"""grpo-kernels: fused kernels for the GRPO loss (log-probs, group advantages, clipped ratio + KL) in one pass.

Public API (see :mod:`grpo_kernels.api` for the math and every argument)::

    token_logprobs(logits, token_ids, *, temperature=1.0, return_entropy=False, mask=None, backend="auto")
    group_advantages(rewards, *, group_size=None, group_ids=None, scale="group", eps=1e-4, ...)
    grpo_loss(logits, token_ids, advantages, *, mask=None, old_logprobs=None, ref_logprobs=None, beta=0.0, ...)
    GRPOLoss(**config)(logits, token_ids, advantages, ...)
    distill_loss(student_logits, teacher_logits, token_ids=None, *, divergence="jsd", beta=0.5, ...)
"""

from .advantages import GroupAdvantages
from .api import GRPOLoss, GRPOLossOutput, group_advantages, grpo_loss, token_logprobs
from .backends import available_backends
from .divergence import DistillOutput, distill_loss

__version__ = "0.1.0"

__all__ = [
    "DistillOutput",
    "GRPOLoss",
    "GRPOLossOutput",
    "GroupAdvantages",
    "available_backends",
    "distill_loss",
    "group_advantages",
    "grpo_loss",
    "token_logprobs",
]
