"""The fused loss whose forward already writes the logits' gradient: ``grpo_loss(..., grad_in_forward=True)``.

Why: the usual schedule reads the logits in the forward, then reads them again and writes the gradient in the
backward (3 passes over ``[N, V]``). The loss's gradient w.r.t. the logits is ``g_t (1[v=y] - p_v) / tau`` with
``g_t`` known as soon as the row's log-sum-exp is (token-level ratio), so a kernel that keeps the row on chip can
write the gradient right away: 2 passes (the Hopper cluster kernel, csrc/include/grpo_kernels/grpo_loss_sm90.cuh).

The price is that the forward must know the scale autograd will bring (``grad_output``, e.g. 1 / accumulation
steps). It takes it as ``loss_scale`` and writes ``loss_scale * d loss / d logits``; the backward then only checks:

    grad_output == loss_scale  ->  the gradient is returned as it is (the CUDA check runs on the device: no sync)
    grad_output != loss_scale  ->  gradient *= grad_output / loss_scale (one more read + write pass: correct, slower)

Backends provide ``grpo_loss_forward_with_grad`` and ``scale_gradient_`` (:class:`grpo_kernels.backends.Backend`
has defaults that are correct everywhere: forward + backward, 3 passes), so the plumbing is the same on every
backend and is tested on the CPU.

Restriction: the entropy is returned as a metric, without gradient (its coefficient in the loss is unknown when the
forward writes the gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _alloc
from ..backends import get_backend
from ..config import LossConfig
from ..loss_math import TokenBatch
from ._define import struct_op
from .grpo_loss import LOSS_OUTPUTS, fake_loss_outputs

_STRUCTS = {"batch": TokenBatch, "config": LossConfig}
_OPTIONS = {"with_entropy": bool, "loss_scale": float, "backend": str}


# ----------------------------------------------------------------------------------------------------------------
# custom ops: opaque to torch.compile, like grpo_kernels::grpo_loss (same arguments, plus loss_scale)
# ----------------------------------------------------------------------------------------------------------------
@struct_op(
    "grpo_kernels::grpo_loss_with_grad",
    positional={"logits": Tensor},
    structs=_STRUCTS,
    options=_OPTIONS,
    returns=LOSS_OUTPUTS[:-1] + ", Tensor)",
)
def grpo_loss_with_grad(logits, batch, config, with_entropy, loss_scale, backend) -> tuple[Tensor, ...]:
    """``grpo_kernels::grpo_loss``'s outputs + ``loss_scale * d loss / d logits`` in a new buffer."""
    grad = _alloc.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    fwd = get_backend(backend).grpo_loss_forward_with_grad(logits, batch, config, with_entropy, loss_scale, grad)
    return (*fwd, grad)


@grpo_loss_with_grad.register_fake
def _(logits, batch, with_entropy, loss_scale, backend):
    return (*fake_loss_outputs(logits, batch.token_ids, with_entropy), torch.empty_like(logits))


@struct_op(
    "grpo_kernels::grpo_loss_with_grad_",
    positional={"logits": Tensor},
    structs=_STRUCTS,
    options=_OPTIONS,
    returns=LOSS_OUTPUTS,
    mutates_args=("logits",),
)
def grpo_loss_with_grad_(logits, batch, config, with_entropy, loss_scale, backend) -> tuple[Tensor, ...]:
    """The same, with the gradient written over the logits."""
    return tuple(
        get_backend(backend).grpo_loss_forward_with_grad(logits, batch, config, with_entropy, loss_scale, logits)
    )


@grpo_loss_with_grad_.register_fake
def _(logits, batch, with_entropy, loss_scale, backend):
    return fake_loss_outputs(logits, batch.token_ids, with_entropy)


@struct_op(
    "grpo_kernels::scale_gradient_",
    positional={"grad": Tensor, "grad_loss": Tensor},
    options={"loss_scale": float, "backend": str},
    returns="()",
    mutates_args=("grad",),
)
def scale_gradient_(grad, grad_loss, loss_scale, backend) -> None:
    """``grad *= grad_loss / loss_scale`` where ``grad_loss != loss_scale``; nothing otherwise."""
    get_backend(backend).scale_gradient_(grad, grad_loss, loss_scale)


# ----------------------------------------------------------------------------------------------------------------
# autograd (a Function: custom ops that mutate their inputs take no registered autograd)
# ----------------------------------------------------------------------------------------------------------------
class _GradInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, batch: TokenBatch, config: LossConfig, options: dict):
        loss_scale, backend = options["loss_scale"], options["backend"]
        if options["inplace"]:
            outputs = grpo_loss_with_grad_(
                logits,
                batch=batch,
                config=config,
                with_entropy=options["with_entropy"],
                loss_scale=loss_scale,
                backend=backend,
            )
            grad = logits
        else:
            *outputs, grad = grpo_loss_with_grad(
                logits,
                batch=batch,
                config=config,
                with_entropy=options["with_entropy"],
                loss_scale=loss_scale,
                backend=backend,
            )
        ctx.save_for_backward(grad)
        ctx.loss_scale, ctx.backend = loss_scale, backend
        ctx.set_materialize_grads(False)
        loss, lp, lse, entropy, g, per_token_loss, kl, flags = outputs
        ctx.mark_non_differentiable(lp, lse, entropy, g, per_token_loss, kl, flags)
        return loss, lp, lse, entropy, g, per_token_loss, kl, flags

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad,) = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None
        scale_gradient_(grad, grad_loss, loss_scale=ctx.loss_scale, backend=ctx.backend)
        return grad, None, None, None


def grpo_loss(
    logits: Tensor,
    *,
    batch: TokenBatch,
    config: LossConfig,
    with_entropy: bool,
    inplace: bool,
    loss_scale: float,
    backend: str,
) -> tuple[Tensor, ...]:
    """``grpo_kernels::grpo_loss``'s 8 outputs, with the logits' gradient computed in the forward (over the logits
    when ``inplace``)."""
    options = dict(with_entropy=with_entropy, inplace=inplace, loss_scale=loss_scale, backend=backend)
    return _GradInForward.apply(logits, batch, config, options)
