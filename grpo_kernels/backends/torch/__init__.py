"""The torch backend: chunked log-probs / entropy with a hand-written gradient, on any device.

One file per op, as in the Triton backend:

    logprobs.py    token log-probs + entropy in row blocks (one read of the logits) and their gradient (one read +
                   one write), never a full [N, V] float32 softmax
    advantages.py  group-relative advantages: NaN-aware group statistics, float64 sums, no atomics
    divergence.py  exact divergences between two logits rows (distillation, exact KL) and their gradients

The fused loss is the log-prob pass followed by the closed-form per-token math of :mod:`grpo_kernels.loss_math`.
This is the fallback everyone gets (CPU, or a GPU without Triton) and the only backend that computes float64.
"""

from __future__ import annotations

import torch

from ...loss_math import LossConfig, LossForward, TokenBatch, loss_forward_from_logprobs
from ..base import Backend, exact_kl_loss_forward
from .advantages import group_advantages
from .divergence import divergence_backward, divergence_forward
from .logprobs import token_logprobs_backward, token_logprobs_forward


class TorchBackend(Backend):
    name = "torch"

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    token_logprobs_forward = staticmethod(token_logprobs_forward)

    token_logprobs_backward = staticmethod(token_logprobs_backward)

    def grpo_loss_forward(self, logits, batch: TokenBatch, config: LossConfig, with_entropy: bool) -> LossForward:
        lp, lse, entropy = token_logprobs_forward(logits, batch.token_ids, config.temperature, with_entropy)
        return loss_forward_from_logprobs(lp, lse, entropy, batch, config)

    group_advantages = staticmethod(group_advantages)

    divergence_forward = staticmethod(divergence_forward)

    divergence_backward = staticmethod(divergence_backward)

    grpo_loss_exact_kl_forward = exact_kl_loss_forward


BACKEND = TorchBackend()
