"""Exact divergences over the whole vocabulary, fused: on-policy distillation and the exact KL to a reference.

Per position, with ``u = z / tau`` (student / policy) and ``u_r = z_ref / tau`` (teacher / reference),
``p = softmax(u)``, ``q = softmax(u_r)`` (docs/math.md section 11: derivations and byte counts)::

    reverse_kl  D = KL(p||q) = sum_v p_v (log p_v - log q_v)      dD/dz_v = p_v (log p_v - log q_v - D) / tau
    forward_kl  D = KL(q||p)                                       dD/dz_v = (p_v - q_v) / tau
    jsd         m = beta q + (1 - beta) p                          dD/dz_v = (1 - beta) p_v (log p_v - log m_v - K)/tau
                D = beta KL(q||m) + (1 - beta) KL(p||m)            K = KL(p||m)
                (TRL's generalized_jsd_loss; beta = 0 exactly is forward_kl, beta = 1 exactly is reverse_kl)

The design, and why: the forward reads both rows once (the two KLs: one online pass with running maxima and
rescaled sums) or twice (jsd: log m needs both final log-sum-exps, so a second pass) and keeps four scalars per row
(``lse``, ``lse_ref`` and the KL that appears in each gradient). The backward recomputes ``p``, ``q`` (and ``m``)
from those and the logits in one read of both rows and one write of the gradient. Producing the gradient in the
forward instead would save that re-read but hold an ``[N, V]`` gradient from the forward to the backward and need
the upstream gradient in advance; recomputing keeps the memory at the inputs' and is one pass.

Traffic for ``N`` rows of ``V`` entries, student ``s`` and teacher ``t`` bytes per entry: forward ``N V (s + t)``
(jsd ``2 N V (s + t)``), backward ``N V (s + t)`` read + ``N V s`` written (+ ``N V t`` with the teacher's gradient).

This file reads top to bottom: the kernel kinds, the custom ops (forward; backward into a new buffer or over the
student's logits) with their fake implementations and autograd, then the public :func:`distill_loss`. The kernels
are the backends' ``divergence_forward`` / ``divergence_backward`` (``backends/torch/divergence.py``,
``backends/triton/divergence.py``); the CUDA backend has none and says so. The fused-linear form is in
:mod:`grpo_kernels.fused_linear.divergence`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _alloc
from ._inputs import LOGITS_DTYPES, as_3d, check_number, check_same_shape, check_tensor, compiling, kernel_token_ids
from ._inputs import poison as _poison
from .backends import get_backend, resolve_backend, unavailable_reason
from .config import check_option
from .ops._define import struct_op

_as_3d, _check_number, _check_same_shape, _check_tensor, _compiling, _kernel_token_ids = (
    as_3d,
    check_number,
    check_same_shape,
    check_tensor,
    compiling,
    kernel_token_ids,
)


def _check_choice(name: str, value, choices) -> None:
    check_option(name, value, str, choices=choices)


DIVERGENCES = ("jsd", "reverse_kl", "forward_kl")
# What the kernels compute. TRL's special cases of the jsd (beta = 0: KL(q||p), beta = 1: KL(p||q)) are mapped
# here, so a kernel's jsd always has 0 < beta < 1 and a finite mixture wherever p or q is positive.
KINDS = ("reverse_kl", "forward_kl", "jsd")


def kernel_kind(divergence: str, beta: float) -> str:
    """The kernel that computes ``divergence`` at ``beta`` (one of :data:`KINDS`)."""
    if divergence == "jsd":
        return "forward_kl" if beta == 0.0 else "reverse_kl" if beta == 1.0 else "jsd"
    return divergence


def _acc(student: Tensor, teacher: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# forward: per-row divergence, log-probs, log-sum-exps and the KLs of the gradients
# ----------------------------------------------------------------------------------------------------------------
# The kernel's divergence and its scalars (floats travel as 0-dim tensors: no recompiles when beta changes)
_KIND = {"kind": str, "beta": float, "temperature": float}
_ROWS = {  # the per-row state the forward keeps for the backward
    "token_ids": Tensor,  # [N] int64, -1 = not taking part
    "lse": Tensor,  # [N] float64
    "lse_ref": Tensor,  # [N] float64
    "kl_student": Tensor,  # [N]
    "kl_teacher": Tensor,  # [N]
    "grad_div": Tensor,  # [N] dL/dD
    "grad_lp": Tensor | None,  # [N] dL/dlp
}


@struct_op(
    "grpo_kernels::vocab_divergence",
    positional={"student": Tensor, "teacher": Tensor, "token_ids": Tensor},  # [B, T, V], [B, T, V], [N]
    options={**_KIND, "with_logprobs": bool, "inplace_backward": bool, "backend": str},
    returns="(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def vocab_divergence(
    student, teacher, token_ids, kind, beta, temperature, with_logprobs, inplace_backward, backend
) -> tuple[Tensor, ...]:
    """-> divergence [N], lp [N] / [0], lse [N], lse_ref [N], kl_student [N], kl_teacher [N] (float32; float64 when
    either input is; ``lse`` and ``lse_ref`` always float64: a float32 log-sum-exp of ~40 is half an ulp, 2e-6, off,
    which the gradients amplify where they nearly cancel). ``kl_student`` is the KL in the student's gradient
    (reverse_kl: D; jsd: KL(p||m); else 0), ``kl_teacher`` the one in the teacher's (forward_kl: D; jsd: KL(q||m);
    else 0). ``inplace_backward``: the backward writes the student's gradient over the student's logits."""
    be = get_backend(backend)
    return tuple(be.divergence_forward(student, teacher, token_ids, kind, beta, temperature, with_logprobs))


@vocab_divergence.register_fake
def _(student, teacher, token_ids, kind, beta, temperature, with_logprobs, inplace_backward, backend):
    n, acc = token_ids.shape[0], _acc(student, teacher)
    lse, lse_ref = (student.new_empty(n, dtype=torch.float64) for _ in range(2))
    div, kl_student, kl_teacher = (student.new_empty(n, dtype=acc) for _ in range(3))
    return div, student.new_empty(n if with_logprobs else 0, dtype=acc), lse, lse_ref, kl_student, kl_teacher


# ----------------------------------------------------------------------------------------------------------------
# backward: one read of both rows, one write of each requested gradient
# ----------------------------------------------------------------------------------------------------------------
@struct_op(
    "grpo_kernels::vocab_divergence_backward",
    positional={"student": Tensor, "teacher": Tensor, **_ROWS},
    options={**_KIND, "student_grad": bool, "teacher_grad": bool, "backend": str},
    returns="(Tensor, Tensor)",
)
def vocab_divergence_backward(
    student,
    teacher,
    token_ids,
    lse,
    lse_ref,
    kl_student,
    kl_teacher,
    grad_div,
    grad_lp,
    kind,
    beta,
    temperature,
    student_grad,
    teacher_grad,
    backend,
) -> tuple[Tensor, Tensor]:
    """-> dL/dstudent [B, T, V] (student's dtype) or [0], dL/dteacher [B, T, V] (teacher's dtype) or [0]."""
    out_s = _alloc.empty(student.shape, dtype=student.dtype, device=student.device) if student_grad else None
    out_t = _alloc.empty(teacher.shape, dtype=teacher.dtype, device=teacher.device) if teacher_grad else None
    get_backend(backend).divergence_backward(
        student,
        teacher,
        token_ids,
        lse,
        lse_ref,
        kl_student,
        kl_teacher,
        grad_div,
        grad_lp,
        kind,
        beta,
        temperature,
        out_s,
        out_t,
    )
    none = student.new_empty(0)
    return out_s if out_s is not None else none, out_t if out_t is not None else none


@vocab_divergence_backward.register_fake
def _(
    student,
    teacher,
    token_ids,
    lse,
    lse_ref,
    kl_student,
    kl_teacher,
    grad_div,
    grad_lp,
    kind,
    beta,
    temperature,
    student_grad,
    teacher_grad,
    backend,
):
    return (
        torch.empty_like(student) if student_grad else student.new_empty(0),
        torch.empty_like(teacher) if teacher_grad else student.new_empty(0),
    )


@struct_op(
    "grpo_kernels::vocab_divergence_backward_",
    positional={"student": Tensor, "teacher": Tensor, **_ROWS},
    options={**_KIND, "teacher_grad": bool, "backend": str},
    returns="Tensor",
    mutates_args=("student",),
)
def vocab_divergence_backward_(
    student,
    teacher,
    token_ids,
    lse,
    lse_ref,
    kl_student,
    kl_teacher,
    grad_div,
    grad_lp,
    kind,
    beta,
    temperature,
    teacher_grad,
    backend,
) -> Tensor:
    """The student's gradient written over the student's logits (each block is read before it is written; the
    teacher's gradient, when asked for, is computed from the same read) -> dL/dteacher [B, T, V] or [0]."""
    out_t = _alloc.empty(teacher.shape, dtype=teacher.dtype, device=teacher.device) if teacher_grad else None
    get_backend(backend).divergence_backward(
        student,
        teacher,
        token_ids,
        lse,
        lse_ref,
        kl_student,
        kl_teacher,
        grad_div,
        grad_lp,
        kind,
        beta,
        temperature,
        student,
        out_t,
    )
    return out_t if out_t is not None else student.new_empty(0)


@vocab_divergence_backward_.register_fake
def _(
    student,
    teacher,
    token_ids,
    lse,
    lse_ref,
    kl_student,
    kl_teacher,
    grad_div,
    grad_lp,
    kind,
    beta,
    temperature,
    teacher_grad,
    backend,
):
    return torch.empty_like(teacher) if teacher_grad else student.new_empty(0)


def _setup(ctx, args, output):
    _, _, lse, lse_ref, kl_student, kl_teacher = output
    ctx.save_for_backward(
        args["student"],
        args["teacher"],
        args["token_ids"],
        lse,
        lse_ref,
        kl_student,
        kl_teacher,
        args["beta"],
        args["temperature"],
    )
    ctx.kind, ctx.backend, ctx.inplace = args["kind"], args["backend"], args["inplace_backward"]
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_div, grad_lp, *unused):
    student, teacher, token_ids, lse, lse_ref, kl_student, kl_teacher, beta, temperature = ctx.saved_tensors
    wants_student, wants_teacher = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_div is None:
        grad_div = torch.zeros_like(lse)
    rows = dict(
        token_ids=token_ids,
        lse=lse,
        lse_ref=lse_ref,
        kl_student=kl_student,
        kl_teacher=kl_teacher,
        grad_div=grad_div.contiguous(),
        grad_lp=None if grad_lp is None else grad_lp.contiguous(),
    )
    kind = dict(kind=ctx.kind, beta=beta, temperature=temperature, backend=ctx.backend)
    if ctx.inplace and wants_student:
        grad_t = vocab_divergence_backward_(student, teacher, *rows.values(), teacher_grad=wants_teacher, **kind)
        grad_s = student
    else:
        grad_s, grad_t = vocab_divergence_backward(
            student, teacher, *rows.values(), student_grad=wants_student, teacher_grad=wants_teacher, **kind
        )
    return grad_s if wants_student else None, grad_t if wants_teacher else None, None


vocab_divergence.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
class DistillOutput(NamedTuple):
    """What :func:`distill_loss` returns."""

    loss: Tensor  # [] float32 (float64 for float64 inputs)
    divergence: Tensor  # [B, T] (packed: [N]) per-position divergence, differentiable; 0 where not taking part
    logprobs: Tensor | None  # [B, T] student log-probs of token_ids, differentiable; None without token_ids


# Under torch.compile the answer is a trace-time constant (it imports backend modules on first use).
@torch.compiler.assume_constant_result
def divergence_backend(name: str, device: torch.device, float64: bool) -> str:
    """The backend that computes divergences: as :func:`grpo_kernels.backends.resolve_backend`, except that
    ``"auto"`` never picks ``"cuda"`` (which has no divergence kernels): triton, then torch, on a GPU."""
    if name != "auto" or float64 or device.type != "cuda":
        return resolve_backend(name, device, float64=float64)
    for candidate in ("triton", "torch"):
        if unavailable_reason(candidate, device) is None:
            return candidate
    raise RuntimeError(f"no backend can compute divergences on {device}")


def check_logits(name: str, x, device: torch.device | None = None, source: str = "student_logits") -> None:
    """``[B, T, V]`` or ``[N, V]`` floating logits with unit stride along V; errors name the argument."""
    if device is not None:
        _check_tensor(name, x, device, source)
    elif not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be [B, T, V] or packed [N, V], got shape {list(x.shape)}")
    if x.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} must have a vocabulary of at least 1 entry, got shape {list(x.shape)}")
    if x.stride(-1) != 1 and x.numel() > 0:
        raise ValueError(
            f"{name} must be contiguous in the vocabulary dimension (stride 1), got strides {list(x.stride())}"
        )


def check_distill_args(divergence, beta, temperature, num_items_in_batch) -> None:
    """The scalar arguments of the distillation losses (shared with the fused-linear form)."""
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_number("beta", beta, low=0)
    if beta > 1:
        raise ValueError(f"beta must be in [0, 1] (the teacher's weight in the mixture), got {beta}")
    _check_number("temperature", temperature, low=0, low_inclusive=False)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    "num_items_in_batch must be a number or a 1-element tensor, got shape "
                    f"{list(num_items_in_batch.shape)}"
                )
        else:
            _check_number("num_items_in_batch", num_items_in_batch, low=0, low_inclusive=False)


def position_ids_and_weights(
    token_ids: Tensor | None, mask: Tensor | None, ignore_index: int, shape, vocab: int, device, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(ids [N] int64 with -1 where a position does not take part, weights m_t [N] in acc)``.

    With ``token_ids``, out-of-range ids raise where the position takes part (as :func:`grpo_kernels.grpo_loss`);
    without, every position whose mask is non-zero takes part (id 0: a row marker, no log-prob is read).
    """
    if token_ids is not None:
        ids = _kernel_token_ids(token_ids, mask, ignore_index, vocab)
    elif mask is not None:
        ids = torch.where(mask.reshape(-1) != 0, 0, -1)
    else:
        ids = torch.zeros(shape.numel(), dtype=torch.long, device=device)
    valid = ids >= 0
    weights = mask.reshape(-1).to(acc) if mask is not None else torch.ones((), dtype=acc, device=device)
    return ids, torch.where(valid, weights, torch.zeros((), dtype=acc, device=device))


def reduce_positions(total: Tensor, weights: Tensor, num_items_in_batch) -> Tensor:
    """``total / max(1, sum_t m_t)``, or ``total / num_items_in_batch`` (TRL's two reductions)."""
    if num_items_in_batch is None:
        return total / weights.sum().clamp(min=1.0)
    return total / torch.as_tensor(num_items_in_batch, dtype=total.dtype, device=total.device).reshape(())


def check_positions(token_ids, mask, shape, device, source: str) -> None:
    if token_ids is not None:
        _check_tensor("token_ids", token_ids, device, source)
        if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
        _check_same_shape("token_ids", token_ids, shape, f"{source} without the last dim")
    if mask is not None:
        _check_tensor("mask", mask, device, source)
        _check_same_shape("mask", mask, shape, f"{source} without the last dim")


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    token_ids: Tensor | None = None,
    *,
    divergence: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    num_items_in_batch: float | Tensor | None = None,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> DistillOutput:
    """Knowledge-distillation loss: an exact divergence between the student's and the teacher's next-token
    distributions over the whole vocabulary, at every position, fused (no ``[N, V]`` softmax is materialised).

    With ``p = softmax(student / tau)``, ``q = softmax(teacher / tau)`` per position::

        reverse_kl:  D = KL(p||q) = sum_v p_v (log p_v - log q_v)
        forward_kl:  D = KL(q||p)
        jsd:         D = beta KL(q||m) + (1 - beta) KL(p||m),  m = beta q + (1 - beta) p

    ``jsd`` is TRL's ``generalized_jsd_loss`` (GKD, beta weights the teacher), with TRL's special cases: beta = 0
    is KL(q||p) and beta = 1 is KL(p||q). ``loss = sum_t m_t D_t / max(1, sum_t m_t)`` over the positions that take
    part (``m_t`` the mask value), equal to TRL's ``reduction="batchmean"`` with ``labels`` = ``token_ids`` (-100
    where masked); with ``num_items_in_batch``, ``sum_t m_t D_t / num_items_in_batch`` (TRL's form for gradient
    accumulation). Without any mask TRL divides by the batch size B instead: pass ``token_ids`` / ``mask`` to match
    it, or scale.

    Args:
        student_logits: ``[B, T, V]`` or packed ``[N, V]``, float16/bfloat16/float32 (float64 on the torch
            backend), stride 1 along V (other strides are free: ``logits[:, :-1]`` is not copied).
        teacher_logits: the same shape, any of those dtypes (e.g. a float32 teacher for a bf16 student). Its
            gradient is computed only if it requires grad (a frozen teacher usually does not).
        token_ids: optional ``[B, T]`` / ``[N]`` ids in ``[0, V)`` or ``ignore_index``: positions equal to
            ``ignore_index`` do not take part (TRL's labels), and the student's log-probs of the ids are returned
            from the same pass.
        divergence: ``"jsd"`` (default, as TRL's GKD), ``"reverse_kl"`` or ``"forward_kl"``.
        beta: the teacher's weight in the jsd mixture, in [0, 1] (used by ``"jsd"`` only).
        temperature: > 0, divides both logits (TRL's ``temperature``; the loss is not rescaled by tau^2).
        mask: optional ``[B, T]`` / ``[N]``; 0 = not taking part, other values weight the position.
        num_items_in_batch: normaliser instead of the weight sum (number > 0 or 1-element tensor).
        ignore_index: the id that marks a position as not taking part (default -100).
        inplace_backward: write the student's gradient over ``student_logits`` in the backward (no second
            ``[N, V]`` buffer: the peak extra memory is a few row blocks). The logits' values are gone after the
            backward; autograd raises if anything else saved them for its own backward. Not allowed on a leaf
            tensor that requires grad (its ``.grad`` would alias its data).
        backend: ``"auto"`` (triton on a GPU, torch on the CPU and for float64), ``"torch"`` or ``"triton"``;
            ``"cuda"`` has no divergence kernels and raises.

    Edge cases: a vocabulary entry with a -inf logit has probability 0 and contributes 0. A KL is +inf when the
    distribution it is taken against has a -inf logit where the other has a finite one (reverse_kl: the teacher;
    forward_kl: the student); the loss is then +inf. The gradient of such a row is NaN where the infinite term
    moves with the logits (the student's for reverse_kl, the teacher's for forward_kl) and finite otherwise. The
    jsd is always finite. A row whose logits hold a NaN or +inf, or are all -inf, gives NaN. TRL returns NaN
    instead of 0 for the terms of a -inf teacher logit (``F.kl_div`` computes 0 * -inf).

    Returns:
        :class:`DistillOutput`: ``loss`` (0-dim), ``divergence`` and ``logprobs`` shaped like the positions
        (float32; float64 when an input is float64), all differentiable w.r.t. the student's logits (and the
        teacher's, when they require grad).
    """
    check_logits("student_logits", student_logits)
    base = student_logits._base if student_logits._base is not None else student_logits
    if (
        inplace_backward
        and student_logits.requires_grad
        and (student_logits.is_leaf or base.is_leaf and base.requires_grad)
    ):
        raise ValueError(
            "inplace_backward=True would write the gradient over a leaf tensor that requires grad (or a view of one), "
            "whose .grad would then alias its data; use it on logits produced by the model (a non-leaf), or pass "
            "inplace_backward=False"
        )
    device = student_logits.device
    check_logits("teacher_logits", teacher_logits, device)
    _check_same_shape("teacher_logits", teacher_logits, student_logits.shape, "student_logits")
    shape = student_logits.shape[:-1]
    check_positions(token_ids, mask, shape, device, "student_logits")
    check_distill_args(divergence, beta, temperature, num_items_in_batch)
    acc = _acc(student_logits, teacher_logits)
    name = divergence_backend(backend, device, acc == torch.float64)
    vocab = student_logits.shape[-1]
    ids, weights = position_ids_and_weights(token_ids, mask, ignore_index, shape, vocab, device, acc)

    div, lp, *_ = vocab_divergence(
        _as_3d(student_logits),
        _as_3d(teacher_logits),
        ids,
        kind=kernel_kind(divergence, beta),
        beta=beta,
        temperature=temperature,
        with_logprobs=token_ids is not None,
        inplace_backward=bool(inplace_backward and student_logits.requires_grad),
        backend=name,
    )
    loss = reduce_positions((div * weights).sum(), weights, num_items_in_batch)
    logprobs = None
    if token_ids is not None:
        lp = _poison(lp, token_ids, ids, mask, ignore_index)
        if _compiling():  # an out-of-range id (dropped from the kernel) must not leave a plausible loss behind
            loss = loss + lp.sum() * 0
        logprobs = lp.view(shape)
    return DistillOutput(loss, div.view(shape), logprobs)


__all__ = ["DIVERGENCES", "DistillOutput", "distill_loss", "kernel_kind"]
