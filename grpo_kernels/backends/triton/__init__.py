"""The Triton backend: fused log-probs / entropy, the fused GRPO loss forward and grouped advantages.

One file per op, each read top to bottom (kernel, then launcher):

    logprobs.py    token log-probs + entropy (one pass per row) and their gradient (one read + one write pass)
    grpo_loss.py   the fused loss forward: the log-prob row pass + the per-token loss and g_t in the same program
    advantages.py  group-relative advantages, one program per group (+ one for batch statistics)
    divergence.py  exact divergences between two logits rows (online one-pass KLs, two-pass jsd) and their gradient
    common.py      launch grids, vocabulary tiling, 64-bit row offsets, NaN-propagating min/max

Runs on CUDA devices, and on the CPU through the Triton interpreter (``TRITON_INTERPRET=1`` set before this package
is imported; exact but slow, for tests). The design and the byte counts are in ``docs/triton.md``.
"""

from __future__ import annotations

import torch
from triton.runtime.jit import JITFunction

from ..base import Backend, exact_kl_loss_forward
from .advantages import group_advantages
from .divergence import divergence_backward, divergence_forward
from .grpo_loss import grpo_loss_forward
from .logprobs import _token_logprobs_fwd_kernel, token_logprobs_backward, token_logprobs_forward

# Under TRITON_INTERPRET=1, @triton.jit returns an interpreter object instead of a JITFunction.
_INTERPRETED = not isinstance(_token_logprobs_fwd_kernel, JITFunction)


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if _INTERPRETED:
                return None
            return (
                "Triton kernels need a CUDA device; on the CPU they run only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before grpo_kernels.backends.triton is first imported)"
            )
        return f"Triton kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1), not on {device.type}"

    token_logprobs_forward = staticmethod(token_logprobs_forward)

    token_logprobs_backward = staticmethod(token_logprobs_backward)

    grpo_loss_forward = staticmethod(grpo_loss_forward)

    group_advantages = staticmethod(group_advantages)

    divergence_forward = staticmethod(divergence_forward)

    divergence_backward = staticmethod(divergence_backward)

    grpo_loss_exact_kl_forward = exact_kl_loss_forward


BACKEND = TritonBackend()
