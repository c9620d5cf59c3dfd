"""The fused loss whose forward already writes the logits' gradient: ``grpo_loss(..., grad_in_forward=True)``.

Why: the usual schedule reads the logits in the forward, then reads them again and writes the gradient in the
backward (3 passes over ``[N, V]``). The loss's gradient w.r.t. the logits is ``g_t (1[v=y] - p_v) / tau`` with
``g_t`` known as soon as the row's log-sum-exp is (token-level ratio), so a kernel that keeps the row on chip can
write the gradient right away: 2 passes (the Hopper cluster kernel, csrc/include/grpo_kernels/grpo_loss_sm90.cuh).

The price is that the forward must know the scale autograd will bring (``grad_output``, e.g. 1 / accumulation
steps). It takes it as ``loss_scale`` and writes ``loss_scale * d loss / d logits``; the backward then only checks:

    grad_output == loss_scale  ->  the gradient is returned as it is (the CUDA check runs on the device: no sync)
    grad_output != loss_scale  ->  gradient *= grad_output / loss_scale (one more read + write pass: correct, slower)

Backends implement ``grpo_loss_forward_with_grad(logits, batch, config, with_entropy, loss_scale, grad_out)`` and
``scale_gradient_(grad, grad_loss, loss_scale)``; a backend without them gets the generic forward + backward below
(3 passes, same numbers), so the plumbing is the same on every backend and is tested on the CPU.

Restriction: the entropy is returned as a metric, without gradient (its coefficient in the loss is unknown when the
forward writes the gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _alloc
from .backends import get_backend
from .loss_math import LossConfig, LossForward, TokenBatch


def _batch_config(args: tuple) -> tuple[TokenBatch, LossConfig]:
    """The flat op arguments (same order as ``grpo_kernels::grpo_loss``, from token_ids on) -> batch, config."""
    batch = TokenBatch(*args[:9])
    names = ("loss_type", "kl_estimator", "importance_sampling_level", "beta", "epsilon_low", "epsilon_high", "delta",
             "dual_clip", "temperature", "sapo_temperature_pos", "sapo_temperature_neg", "bias_corrected_kl")  # fmt: skip
    return batch, LossConfig(**dict(zip(names, args[9:21])))


def _forward_with_grad(backend: str, logits: Tensor, args: tuple, with_entropy: bool, loss_scale: float, grad_out: Tensor):
    batch, config = _batch_config(args)
    impl = get_backend(backend)
    if hasattr(impl, "grpo_loss_forward_with_grad"):
        return impl.grpo_loss_forward_with_grad(logits, batch, config, with_entropy, loss_scale, grad_out)
    fwd: LossForward = impl.grpo_loss_forward(logits, batch, config, with_entropy)
    g = fwd.grad_logprobs * loss_scale
    impl.token_logprobs_backward(logits, batch.token_ids, fwd.lse, fwd.entropy, g, None, config.temperature, grad_out)
    return fwd


# ----------------------------------------------------------------------------------------------------------------
# custom ops: opaque to torch.compile, like grpo_kernels::grpo_loss (same arguments, plus loss_scale)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("grpo_kernels::grpo_loss_with_grad", mutates_args=())
def grpo_loss_with_grad(
    logits: Tensor, token_ids: Tensor, coef: Tensor, advantages: Tensor, old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None, is_weights: Tensor | None, cu_seqlens: Tensor, seq_ids: Tensor, seq_weights: Tensor,
    loss_type: str, kl_estimator: str, importance_sampling_level: str, beta: float, epsilon_low: float,
    epsilon_high: float, delta: float | None, dual_clip: float | None, temperature: float, sapo_temperature_pos: float,
    sapo_temperature_neg: float, bias_corrected_kl: bool, with_entropy: bool, loss_scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``grpo_kernels::grpo_loss``'s outputs + ``loss_scale * d loss / d logits`` in a new buffer."""
    grad = _alloc.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    args = (token_ids, coef, advantages, old_logprobs, ref_logprobs, is_weights, cu_seqlens, seq_ids, seq_weights,
            loss_type, kl_estimator, importance_sampling_level, beta, epsilon_low, epsilon_high, delta, dual_clip,
            temperature, sapo_temperature_pos, sapo_temperature_neg, bias_corrected_kl)  # fmt: skip
    return (*_forward_with_grad(backend, logits, args, with_entropy, loss_scale, grad), grad)


@torch.library.custom_op("grpo_kernels::grpo_loss_with_grad_", mutates_args=("logits",))
def grpo_loss_with_grad_(
    logits: Tensor, token_ids: Tensor, coef: Tensor, advantages: Tensor, old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None, is_weights: Tensor | None, cu_seqlens: Tensor, seq_ids: Tensor, seq_weights: Tensor,
    loss_type: str, kl_estimator: str, importance_sampling_level: str, beta: float, epsilon_low: float,
    epsilon_high: float, delta: float | None, dual_clip: float | None, temperature: float, sapo_temperature_pos: float,
    sapo_temperature_neg: float, bias_corrected_kl: bool, with_entropy: bool, loss_scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The same, with the gradient written over the logits."""
    args = (token_ids, coef, advantages, old_logprobs, ref_logprobs, is_weights, cu_seqlens, seq_ids, seq_weights,
            loss_type, kl_estimator, importance_sampling_level, beta, epsilon_low, epsilon_high, delta, dual_clip,
            temperature, sapo_temperature_pos, sapo_temperature_neg, bias_corrected_kl)  # fmt: skip
    return tuple(_forward_with_grad(backend, logits, args, with_entropy, loss_scale, logits))


def _fake_outputs(logits: Tensor, token_ids: Tensor, with_entropy: bool) -> tuple[Tensor, ...]:
    n = token_ids.shape[0]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    new = lambda k, dtype=acc: logits.new_empty(k, dtype=dtype)  # noqa: E731
    return new(()), new(n), new(n), new(n if with_entropy else 0), new(n), new(n), new(n), new(n, torch.uint8)


@grpo_loss_with_grad.register_fake
def _(logits, token_ids, *args):
    return (*_fake_outputs(logits, token_ids, args[-3]), torch.empty_like(logits))


@grpo_loss_with_grad_.register_fake
def _(logits, token_ids, *args):
    return _fake_outputs(logits, token_ids, args[-3])


@torch.library.custom_op("grpo_kernels::scale_gradient_", mutates_args=("grad",))
def scale_gradient_(grad: Tensor, grad_loss: Tensor, loss_scale: float, backend: str) -> None:
    """``grad *= grad_loss / loss_scale`` where ``grad_loss != loss_scale``; nothing otherwise."""
    impl = get_backend(backend)
    if hasattr(impl, "scale_gradient_"):
        impl.scale_gradient_(grad, grad_loss, loss_scale)
    elif bool(grad_loss != loss_scale):  # generic: one host sync
        grad.mul_(grad_loss.detach().to(torch.float64 if grad.dtype == torch.float64 else torch.float32) / loss_scale)


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------
class _GradInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, inplace: bool, loss_scale: float, backend: str, *args):
        if inplace:
            outputs = grpo_loss_with_grad_(logits, *args, loss_scale, backend)
            grad = logits
        else:
            *outputs, grad = grpo_loss_with_grad(logits, *args, loss_scale, backend)
        ctx.save_for_backward(grad)
        ctx.loss_scale, ctx.backend, ctx.num_args = loss_scale, backend, len(args)
        ctx.set_materialize_grads(False)
        loss, lp, lse, entropy, g, per_token_loss, kl, flags = outputs
        ctx.mark_non_differentiable(lp, lse, entropy, g, per_token_loss, kl, flags)
        return loss, lp, lse, entropy, g, per_token_loss, kl, flags

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad,) = ctx.saved_tensors
        if grad_loss is not None:
            scale_gradient_(grad, grad_loss, ctx.loss_scale, ctx.backend)
        else:
            grad = None
        return (grad, None, None, None) + (None,) * ctx.num_args


def grpo_loss(logits: Tensor, *args, inplace: bool, loss_scale: float, backend: str) -> tuple[Tensor, ...]:
    """``grpo_kernels::grpo_loss``'s 8 outputs (``args`` = its arguments from ``token_ids`` to ``with_entropy``), with
    the logits' gradient computed in the forward (over the logits when ``inplace``)."""
    return _GradInForward.apply(logits, inplace, loss_scale, backend, *args)
