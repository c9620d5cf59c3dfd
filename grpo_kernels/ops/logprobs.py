"""Per-token log-probs and entropy: the forward op, the one backward pass over the logits, and autograd.

    token_logprobs           (logits, token_ids; temperature, with_entropy)   -> lp, lse, entropy
    token_logprobs_backward  (logits, token_ids, lse, entropy, g, g_H; ...)   -> d/d logits  (new buffer)
    token_logprobs_backward_ (the same, the gradient written over the logits) -> ()

The backward pass is shared by every op that reads the logits (the fused loss too): it needs only the per-row
``lse`` (and entropy) and the per-token scalars ``g_t = d loss / d lp_t`` and ``d loss / d H_t``
(docs/math.md section 8): one read of the logits and one write of the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _alloc
from ..backends import get_backend
from ._define import struct_op


def accumulation_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# the backward pass over the logits (shared by every forward op)
# ----------------------------------------------------------------------------------------------------------------
_BACKWARD_ARGS = {
    "logits": Tensor,  # [B, T, V]
    "token_ids": Tensor,  # [N] int64, -1 = not taking part
    "lse": Tensor,  # [N]
    "entropy": Tensor,  # [N] or [0]
    "grad_lp": Tensor,  # [N]
    "grad_entropy": Tensor | None,  # [N]
}
_BACKWARD_OPTIONS = {"temperature": float, "backend": str}


@struct_op(
    "grpo_kernels::token_logprobs_backward", positional=_BACKWARD_ARGS, options=_BACKWARD_OPTIONS, returns="Tensor"
)
def token_logprobs_backward(logits, token_ids, lse, entropy, grad_lp, grad_entropy, temperature, backend) -> Tensor:
    out = _alloc.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    get_backend(backend).token_logprobs_backward(
        logits, token_ids, lse, entropy, grad_lp, grad_entropy, temperature, out
    )
    return out


@token_logprobs_backward.register_fake
def _(logits, token_ids, lse, entropy, grad_lp, grad_entropy, temperature, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@struct_op(
    "grpo_kernels::token_logprobs_backward_",
    positional=_BACKWARD_ARGS,
    options=_BACKWARD_OPTIONS,
    returns="()",
    mutates_args=("logits",),
)
def token_logprobs_backward_(logits, token_ids, lse, entropy, grad_lp, grad_entropy, temperature, backend) -> None:
    get_backend(backend).token_logprobs_backward(
        logits, token_ids, lse, entropy, grad_lp, grad_entropy, temperature, logits
    )


def logits_grad(
    logits: Tensor,
    token_ids: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_lp: Tensor,
    grad_entropy: Tensor | None,
    *,
    temperature,
    backend: str,
    inplace: bool,
) -> Tensor:
    """``d loss / d logits`` from the per-token gradients (over the logits' own buffer when ``inplace``)."""
    if entropy.numel() == 0:
        grad_entropy = None
    elif grad_entropy is not None:
        grad_entropy = grad_entropy.contiguous()
    args = (logits, token_ids, lse, entropy, grad_lp.contiguous(), grad_entropy)
    if inplace:
        token_logprobs_backward_(*args, temperature=temperature, backend=backend)
        return logits
    return token_logprobs_backward(*args, temperature=temperature, backend=backend)


# ----------------------------------------------------------------------------------------------------------------
# token log-probs (+ entropy)
# ----------------------------------------------------------------------------------------------------------------
@struct_op(
    "grpo_kernels::token_logprobs",
    positional={"logits": Tensor, "token_ids": Tensor},
    options={"temperature": float, "with_entropy": bool, "backend": str},
    returns="(Tensor, Tensor, Tensor)",
)
def token_logprobs(logits, token_ids, temperature, with_entropy, backend) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(get_backend(backend).token_logprobs_forward(logits, token_ids, temperature, with_entropy))


@token_logprobs.register_fake
def _(logits, token_ids, temperature, with_entropy, backend):
    n, acc = token_ids.shape[0], accumulation_dtype(logits)
    return (
        logits.new_empty(n, dtype=acc),
        logits.new_empty(n, dtype=acc),
        logits.new_empty(n if with_entropy else 0, dtype=acc),
    )


def _setup(ctx, args, output):
    _, lse, entropy = output
    ctx.save_for_backward(args["logits"], args["token_ids"], lse, entropy, args["temperature"])
    ctx.backend = args["backend"]
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_lp, grad_lse, grad_entropy):
    logits, token_ids, lse, entropy, temperature = ctx.saved_tensors
    if grad_lp is None:
        grad_lp = torch.zeros_like(lse)
    grad = logits_grad(
        logits,
        token_ids,
        lse,
        entropy,
        grad_lp,
        grad_entropy,
        temperature=temperature,
        backend=ctx.backend,
        inplace=False,
    )
    return grad, None


token_logprobs.register_autograd(_backward, setup_context=_setup)
