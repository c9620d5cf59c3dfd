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


# ----------------------------------------------------------------------------------------------------------------
# kl_estimator="exact": the policy's and the reference's logits, the exact KL(p||q) over the vocabulary
# ----------------------------------------------------------------------------------------------------------------
# Forward: the backend's divergence kernel reads both rows once (KL(p||q), lp, both log-sum-exps), then the [N]
# closed form of loss_math with the exact KL as the KL term. Backward: one read of both rows, one write of
#     dloss/dz_v = beta c_t dKL_t/dz_v + g_t d lp_t/dz_v,   dKL/dz_v = p_v (log p_v - log q_v - KL) / tau
# (grpo_kernels.divergence's backward with grad_div = beta c_t, grad_lp = g_t; docs/math.md section 11).
# Bytes for N rows of V entries, s and r bytes per policy / reference entry: forward N V (s + r) read (+ N V s for
# the entropy when asked for); backward N V (s + r) read + N V s written. No gradient reaches ref_logits.
@struct_op(
    "grpo_kernels::grpo_loss_exact_kl",
    positional={"logits": Tensor, "ref_logits": Tensor},  # [B, T, V] each, any of bf16 / fp16 / fp32 (fp64)
    structs={"batch": TokenBatch, "config": LossConfig},
    options={"with_entropy": bool, "inplace_backward": bool, "backend": str},
    returns=LOSS_OUTPUTS[:-1] + ", Tensor)",
)
def grpo_loss_exact_kl(logits, ref_logits, batch, config, with_entropy, inplace_backward, backend):
    """``grpo_kernels::grpo_loss``'s outputs (``lse`` float64, ``kl`` the exact KL) + ``lse_ref`` [N] float64."""
    fwd, lse_ref = get_backend(backend).grpo_loss_exact_kl_forward(logits, ref_logits, batch, config, with_entropy)
    return (*fwd, lse_ref)


@grpo_loss_exact_kl.register_fake
def _(logits, ref_logits, batch, with_entropy, inplace_backward, backend):
    loss, lp, _, entropy, g, per_token_loss, kl, flags = fake_loss_outputs(logits, batch.token_ids, with_entropy)
    lse, lse_ref = (logits.new_empty(batch.token_ids.shape[0], dtype=torch.float64) for _ in range(2))
    return loss, lp, lse, entropy, g, per_token_loss, kl, flags, lse_ref


def _exact_setup(ctx, args, output):
    _, _, lse, entropy, grad_logprobs, _, kl, _, lse_ref = output
    ctx.save_for_backward(
        args["logits"],
        args["ref_logits"],
        args["token_ids"],
        args["coef"],
        lse,
        lse_ref,
        kl,
        entropy,
        grad_logprobs,
        args["beta"],
        args["temperature"],
    )
    ctx.backend, ctx.inplace = args["backend"], args["inplace_backward"]
    ctx.set_materialize_grads(False)


def _exact_backward(ctx, grad_loss, grad_lp, grad_lse, grad_entropy, *unused):
    from ..divergence import vocab_divergence_backward, vocab_divergence_backward_

    logits, ref_logits, token_ids, coef, lse, lse_ref, kl, entropy, grad_logprobs, beta, temperature = ctx.saved_tensors
    scale = grad_loss if grad_loss is not None else torch.zeros((), dtype=grad_logprobs.dtype, device=logits.device)
    grad_div = (coef.to(grad_logprobs.dtype) * beta.to(grad_logprobs.dtype).to(logits.device) * scale).contiguous()
    g = (grad_logprobs * scale).contiguous()
    with_entropy = grad_entropy is not None and entropy.numel() > 0
    rows = (token_ids, lse, lse_ref, kl, torch.zeros_like(kl), grad_div, None if with_entropy else g)
    kind = dict(kind="reverse_kl", beta=0.0, temperature=temperature, backend=ctx.backend)
    if not with_entropy:
        if ctx.inplace:
            vocab_divergence_backward_(logits, ref_logits, *rows, teacher_grad=False, **kind)
            return logits, None
        grad, _ = vocab_divergence_backward(logits, ref_logits, *rows, student_grad=True, teacher_grad=False, **kind)
        return grad, None
    # The entropy is differentiated too: the divergence kernel has no entropy term, so its part goes into a buffer
    # of its own (read before an in-place write), and the log-prob pass adds g_t and the entropy's term.
    kl_part, _ = vocab_divergence_backward(logits, ref_logits, *rows, student_grad=True, teacher_grad=False, **kind)
    grad = logits_grad(
        logits,
        token_ids,
        lse.to(grad_logprobs.dtype),
        entropy,
        g,
        grad_entropy,
        temperature=temperature,
        backend=ctx.backend,
        inplace=ctx.inplace,
    )
    return grad.add_(kl_part), None


grpo_loss_exact_kl.register_autograd(_exact_backward, setup_context=_exact_setup)
