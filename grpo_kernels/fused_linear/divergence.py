"""The distillation loss from hidden states and LM heads: neither the student's nor the teacher's ``[N, V]`` logits
ever exist.

    z     = h_s @ W_s.T (+ b_s)          student logits, one tile of tokens at a time
    z_ref = h_t @ W_t.T (+ b_t)          teacher logits, the same tokens (the teacher's hidden size may differ)
    loss  = distill_loss(z, z_ref, ...)  (grpo_kernels.divergence: jsd / reverse_kl / forward_kl)

The tokens that take part are gathered (masked positions are never projected), then processed in tiles of
``chunk_tokens`` rows with the whole vocabulary per tile. Per tile::

    Z, Z_ref   <- both projections                              [c, V] each, float32 accumulation in the GEMMs
    D, lse, .. <- backend.divergence_forward(Z, Z_ref)          (one read of both tiles; jsd: two)
    Z          <- c_t dD/dZ written over Z                      backend.divergence_backward, in place
    dH_s = Z @ W_s,  dW_s += Z.T @ H_s,  db_s += sum_rows Z     finished for these rows: the tile holds all of V

so the student's gradients are complete when the forward returns (6 N H_s V + 2 N H_t V FLOPs, no recompute) and
the autograd backward only scales them by the incoming gradient. The teacher is a constant: no gradient reaches its
hidden states or head (GKD runs the teacher under ``no_grad``). Peak extra memory: two logits tiles + the float32
``dW_s`` accumulator + O(N H).

Read-only helpers taken from :mod:`grpo_kernels.fused_linear` (not edited here): ``compute_dtype``, ``_make_head``
(the tile buffer and the projection of ``_Head``), ``_addmm_acc`` (float32 ``dW`` accumulation from bf16 tiles),
``_acc`` and ``_TILE_BYTES``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._inputs import LOGITS_DTYPES
from .._inputs import check_same_shape as _check_same_shape
from .._inputs import check_tensor as _check_tensor
from .._inputs import poison as _poison
from ..backends import get_backend
from ..divergence import (
    DistillOutput,
    check_distill_args,
    check_positions,
    divergence_backend,
    kernel_kind,
    position_ids_and_weights,
    reduce_positions,
)
from ..ops._define import struct_op
from .tiles import _TILE_BYTES, compute_dtype
from .tiles import acc_dtype as _acc
from .tiles import addmm_acc as _addmm_acc
from .tiles import make_head as _make_head


def default_chunk_tokens(vocab: int, student_dtype: torch.dtype, teacher_dtype: torch.dtype) -> int:
    """Rows per tile so that the two logits tiles together are about ``_TILE_BYTES`` (512 MiB)."""
    rows = max(1, _TILE_BYTES // (max(vocab, 1) * (student_dtype.itemsize + teacher_dtype.itemsize)))
    return rows - rows % 128 if rows >= 128 else rows


# ----------------------------------------------------------------------------------------------------------------
# the fused op: loss, per-position outputs and the finished student gradients
# ----------------------------------------------------------------------------------------------------------------
@struct_op(
    "grpo_kernels::fused_linear_divergence",
    positional={
        "hidden": Tensor,
        "weight": Tensor,
        "bias": Tensor | None,  # student [N, H], [V, H], [V]
        "teacher_hidden": Tensor,
        "teacher_weight": Tensor,
        "teacher_bias": Tensor | None,  # [N, H_t], [V, H_t], [V]
    },
    options={
        "token_ids": Tensor,  # [N] int64, -1 = not taking part
        "coef": Tensor,  # [N] loss = sum_t coef_t D_t
        "kind": str,
        "beta": float,
        "temperature": float,
        "with_logprobs": bool,
        "dtype": torch.dtype,  # compute dtype of the student's projection
        "teacher_dtype": torch.dtype,
        "chunk_tokens": int,
        "grad_hidden": bool,
        "grad_weight": bool,
        "grad_bias": bool,  # which gradients to compute
        "backend": str,
    },
    returns="(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _fused_linear_divergence(
    hidden,
    weight,
    bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    token_ids,
    coef,
    kind,
    beta,
    temperature,
    with_logprobs,
    dtype,
    teacher_dtype,
    chunk_tokens,
    grad_hidden,
    grad_weight,
    grad_bias,
    backend,
) -> tuple[Tensor, ...]:
    """-> loss [], divergence [N], lp [N] / [0], d loss/d hidden [N, H] / [0], d loss/d weight [V, H] / [0],
    d loss/d bias [V] / [0]."""
    be = get_backend(backend)
    device, acc = hidden.device, _acc(torch.promote_types(dtype, teacher_dtype))
    total, vocab = hidden.shape[0], weight.shape[0]
    grad_bias = grad_bias and bias is not None
    wants_grad = grad_hidden or grad_weight or grad_bias
    with torch.autocast(device.type, enabled=False):  # every dtype below is chosen, not autocast's
        keep = torch.nonzero(token_ids >= 0).squeeze(1)  # [n]: masked positions are never projected (a host sync)
        n = keep.shape[0]
        h_s, h_t = hidden.index_select(0, keep).to(dtype), teacher_hidden.index_select(0, keep).to(teacher_dtype)
        ids, c = token_ids.index_select(0, keep), coef.index_select(0, keep).to(acc)
        chunk = max(1, min(chunk_tokens, n))
        head = _make_head(weight, bias, dtype, None, 1.0, chunk)
        teacher = _make_head(teacher_weight, teacher_bias, teacher_dtype, None, 1.0, chunk)
        div, lp = (
            torch.zeros(n, dtype=acc, device=device),
            torch.zeros(n if with_logprobs else 0, dtype=acc, device=device),
        )
        loss = torch.zeros((), dtype=acc, device=device)
        d_h = torch.empty(n, hidden.shape[1], dtype=dtype, device=device) if grad_hidden else None
        d_w = torch.zeros(weight.shape, dtype=_acc(dtype), device=device) if grad_weight else None  # accumulator
        d_b = torch.zeros(vocab, dtype=_acc(dtype), device=device) if grad_bias else None
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            z = head.logits(h_s[start:end]).unsqueeze(0)  # [1, c, V] in head.tile
            z_ref = teacher.logits(h_t[start:end]).unsqueeze(0)
            d, lp_t, lse, lse_ref, kl_s, kl_t = be.divergence_forward(
                z, z_ref, ids[start:end], kind, beta, temperature, with_logprobs
            )
            div[start:end] = d
            if with_logprobs:
                lp[start:end] = lp_t
            loss += (c[start:end] * d).sum()
            if wants_grad:  # overwrite the tile with d loss / d z, then fold it into dH, dW and db
                be.divergence_backward(
                    z,
                    z_ref,
                    ids[start:end],
                    lse,
                    lse_ref,
                    kl_s,
                    kl_t,
                    c[start:end],
                    None,
                    kind,
                    beta,
                    temperature,
                    z,
                    None,
                )
                grad = z[0]
                if d_h is not None:
                    torch.mm(grad, head.weight, out=d_h[start:end])
                if d_w is not None:
                    _addmm_acc(d_w, grad.T, h_s[start:end])
                if d_b is not None:
                    d_b.add_(grad.sum(0, dtype=d_b.dtype))

        def spread(x: Tensor) -> Tensor:
            return x.new_zeros((total, *x.shape[1:])).index_copy_(0, keep, x)

        none = torch.empty(0, dtype=weight.dtype, device=device)
        return (
            loss,
            spread(div),
            spread(lp) if with_logprobs else lp,
            spread(d_h).to(hidden.dtype) if d_h is not None else none.to(hidden.dtype),
            d_w.to(weight.dtype) if d_w is not None else none,
            d_b.to(bias.dtype) if d_b is not None else none,
        )


@_fused_linear_divergence.register_fake
def _(
    hidden,
    weight,
    bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    token_ids,
    coef,
    kind,
    beta,
    temperature,
    with_logprobs,
    dtype,
    teacher_dtype,
    chunk_tokens,
    grad_hidden,
    grad_weight,
    grad_bias,
    backend,
):
    n, acc = token_ids.shape[0], _acc(torch.promote_types(dtype, teacher_dtype))
    has_bias = grad_bias and bias is not None
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty(n, dtype=acc),
        hidden.new_empty(n if with_logprobs else 0, dtype=acc),
        hidden.new_empty(hidden.shape if grad_hidden else 0),
        weight.new_empty(weight.shape if grad_weight else 0),
        weight.new_empty(bias.shape if has_bias else 0, dtype=bias.dtype if has_bias else weight.dtype),
    )


def _setup(ctx, args, output):
    ctx.save_for_backward(*output[3:])
    ctx.computed = (args["grad_hidden"], args["grad_weight"], args["grad_bias"])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_div, grad_lp, *unused):
    if grad_div is not None or grad_lp is not None:
        raise RuntimeError(
            "fused_linear_distill_loss computes its gradients during the forward: only .loss carries a gradient "
            "(use .divergence.detach() / .logprobs.detach() for logging, or distill_loss on logits for other losses)"
        )
    # scaled in place, as fused_linear_grpo_loss does: nothing else needs the stored gradients
    grads = [
        g.mul_(grad_loss) if done and grad_loss is not None else None
        for g, done in zip(ctx.saved_tensors, ctx.computed)
    ]
    return (*grads, None, None, None)  # hidden, weight, bias; the teacher's get none


_fused_linear_divergence.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
def _check_head(prefix: str, hidden, weight, bias, device) -> None:
    for name, x in ((f"{prefix}hidden", hidden), (f"{prefix}weight", weight), (f"{prefix}bias", bias)):
        if x is None and name.endswith("bias"):
            continue
        if device is None:
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        else:
            _check_tensor(name, x, device, "student_hidden")
        if x.dtype not in LOGITS_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{prefix}hidden must be [B, T, H] or packed [N, H], got shape {list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(
            f"{prefix}weight must be an LM head [V, H] with H = {prefix}hidden.shape[-1] = {hidden.shape[-1]} and "
            f"V >= 1, got shape {list(weight.shape)}"
        )
    if bias is not None:
        _check_same_shape(f"{prefix}bias", bias, weight.shape[:1], f"{prefix}weight's vocabulary dim")


def fused_linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    token_ids: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    divergence: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    num_items_in_batch: float | Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_tokens: int | None = None,
) -> DistillOutput:
    """:func:`grpo_kernels.distill_loss` of ``z = student_hidden @ student_weight.T (+ student_bias)`` against
    ``z_ref = teacher_hidden @ teacher_weight.T (+ teacher_bias)``, without either ``[N, V]`` logits tensor: both
    heads and the divergence run fused, tile by tile, and the student's gradients (hidden, weight, bias) are finished
    during the forward.

    Args:
        student_hidden: ``[B, T, H]`` (``student_hidden[:, t]`` predicts position ``t``: the caller shifts) or packed
            ``[N, H]``, float16/bfloat16/float32 (float64 on the torch backend).
        student_weight: the student's LM head ``[V, H]``; student_bias: optional ``[V]``.
        teacher_hidden: ``[B, T, H_t]`` / ``[N, H_t]`` (the teacher's hidden size may differ); teacher_weight:
            ``[V, H_t]`` (the same vocabulary); teacher_bias: optional ``[V]``. No gradient reaches them.
        token_ids, divergence, beta, temperature, mask, num_items_in_batch, ignore_index, backend: as
            :func:`grpo_kernels.distill_loss`.
        chunk_tokens: tokens per tile; default :func:`default_chunk_tokens` (both logits tiles ~ 512 MiB).

    Compute dtypes: autocast's when it is on, else each head's ``promote_types(hidden.dtype, weight.dtype)``; the
    matmuls accumulate in float32 and ``dW`` is accumulated across tiles in float32, returned in the weight's dtype.

    Returns:
        :class:`grpo_kernels.DistillOutput`. ``loss`` is differentiable w.r.t. the student's hidden states, weight
        and bias (its backward only scales the stored gradients); ``divergence`` and ``logprobs`` carry no gradient.
    """
    _check_head("student_", student_hidden, student_weight, student_bias, None)
    device = student_hidden.device
    _check_head("teacher_", teacher_hidden, teacher_weight, teacher_bias, device)
    shape = student_hidden.shape[:-1]
    _check_same_shape(
        "teacher_hidden", teacher_hidden, (*shape, teacher_hidden.shape[-1]), "student_hidden's positions"
    )
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight must have the student's vocabulary V = {student_weight.shape[0]}, got "
            f"{teacher_weight.shape[0]} (distillation over the vocabulary needs one vocabulary)"
        )
    check_positions(token_ids, mask, shape, device, "student_hidden")
    check_distill_args(divergence, beta, temperature, num_items_in_batch)
    if chunk_tokens is not None and (
        isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1
    ):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    dtype = compute_dtype(student_hidden, student_weight)
    teacher_dtype = compute_dtype(teacher_hidden, teacher_weight)
    acc = _acc(torch.promote_types(dtype, teacher_dtype))
    name = divergence_backend(backend, device, acc == torch.float64)
    vocab = student_weight.shape[0]
    chunk = chunk_tokens or default_chunk_tokens(vocab, dtype, teacher_dtype)
    ids, weights = position_ids_and_weights(token_ids, mask, ignore_index, shape, vocab, device, acc)
    coef = reduce_positions(weights, weights, num_items_in_batch)  # loss = sum_t coef_t D_t
    grad = torch.is_grad_enabled()
    needs = [grad and x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)]
    loss, div, lp, *_ = _fused_linear_divergence(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_weight,
        student_bias,
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach(),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        token_ids=ids,
        coef=coef,
        kind=kernel_kind(divergence, beta),
        beta=beta,
        temperature=temperature,
        with_logprobs=token_ids is not None,
        dtype=dtype,
        teacher_dtype=teacher_dtype,
        chunk_tokens=chunk,
        grad_hidden=needs[0],
        grad_weight=needs[1],
        grad_bias=needs[2],
        backend=name,
    )
    logprobs = None
    if token_ids is not None:
        logprobs = _poison(lp, token_ids, ids, mask, ignore_index).view(shape)
    return DistillOutput(loss, div.view(shape), logprobs)


__all__ = ["default_chunk_tokens", "fused_linear_distill_loss"]
