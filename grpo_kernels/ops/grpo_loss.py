"""The fused GRPO loss from logits: one op whose forward already holds what the gradient needs.

    grpo_loss (logits; batch: TokenBatch, config: LossConfig, with_entropy, inplace_backward, backend)
        -> loss, lp, lse, entropy, g, per-token loss, kl, clip flags

The forward is the backend's fused pass (log-probs + the per-token epilogue of :mod:`grpo_kernels.loss_math`); the
backward is the shared pass over the logits (:mod:`grpo_kernels.ops.logprobs`) driven by ``g_t = d loss / d lp_t``
times the incoming gradient, and ``d loss / d H_t`` when the entropy is differentiated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import get_backend
from ..config import LossConfig
from ..loss_math import TokenBatch
from ._define import struct_op
from .logprobs import accumulation_dtype, logits_grad

LOSS_OUTPUTS = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"


def fake_loss_outputs(logits: Tensor, token_ids: Tensor, with_entropy: bool) -> tuple[Tensor, ...]:
    """Empty outputs shaped like a :class:`grpo_kernels.loss_math.LossForward` (for the ops' fake kernels)."""
    n, acc = token_ids.shape[0], accumulation_dtype(logits)
    new = lambda k, dtype=acc: logits.new_empty(k, dtype=dtype)  # noqa: E731
    return new(()), new(n), new(n), new(n if with_entropy else 0), new(n), new(n), new(n), new(n, torch.uint8)


@struct_op(
    "grpo_kernels::grpo_loss",
    positional={"logits": Tensor},
    structs={"batch": TokenBatch, "config": LossConfig},
    options={"with_entropy": bool, "inplace_backward": bool, "backend": str},
    returns=LOSS_OUTPUTS,
)
def grpo_loss(logits, batch, config, with_entropy, inplace_backward, backend) -> tuple[Tensor, ...]:
    return tuple(get_backend(backend).grpo_loss_forward(logits, batch, config, with_entropy))


@grpo_loss.register_fake
def _(logits, batch, with_entropy, inplace_backward, backend):
    return fake_loss_outputs(logits, batch.token_ids, with_entropy)


def _setup(ctx, args, output):
    _, _, lse, entropy, grad_logprobs = output[:5]
    ctx.save_for_backward(args["logits"], args["token_ids"], lse, entropy, grad_logprobs, args["temperature"])
    ctx.backend, ctx.inplace = args["backend"], args["inplace_backward"]
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_lp, grad_lse, grad_entropy, *unused):
    logits, token_ids, lse, entropy, grad_logprobs, temperature = ctx.saved_tensors
    g = grad_logprobs * grad_loss if grad_loss is not None else torch.zeros_like(grad_logprobs)
    return logits_grad(
        logits,
        token_ids,
        lse,
        entropy,
        g,
        grad_entropy,
        temperature=temperature,
        backend=ctx.backend,
        inplace=ctx.inplace,
    )


grpo_loss.register_autograd(_backward, setup_context=_setup)
