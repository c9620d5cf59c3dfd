"""Exact divergences between two logits rows (distillation, exact KL to a reference) and their gradient: two kernels.

Per row, ``u = z / tau`` (student), ``u_r = z_ref / tau`` (teacher), ``p = softmax(u)``, ``q = softmax(u_r)``
(derivations in docs/divergences.md)::

    reverse_kl  D = KL(p||q)                     dD/du = p (log p - log q - D)        dD/du_r = q - p
    forward_kl  D = KL(q||p)                     dD/du = p - q                        dD/du_r = q (log q - log p - D)
    jsd         D = b KL(q||m) + (1-b) KL(p||m)  dD/du = (1-b) p (log p - log m - K) dD/du_r = b q (log q - log m - K_r)
                m = b q + (1-b) p,  K = KL(p||m),  K_r = KL(q||m)

Forward: one program per row (rows on grid axis x). The two KLs are one pass over both rows, online: running maxima
``M``, ``M_r``, rescaled sums ``S = sum exp(u - M)``, ``S_r``, and the cross term
``W = sum exp(u - M) ((u - M) - (u_r - M_r))`` (reverse; forward swaps the roles), rescaled when a maximum moves:
``W <- exp(M - M') (W + ((M - M') - (M_r - M_r')) S)``. Then ``KL(p||q) = W / S - log S + log S_r``. The jsd needs
``log m_v``, which depends on both final log-sum-exps: a first pass finds them, a second sums the two KLs.
Traffic: ``N V (s + t)`` bytes read (jsd: twice), ``s`` and ``t`` the bytes per entry of the two logits.

Backward: one program per (row, vocabulary block): one read of both rows and one write of each requested gradient,
from the forward's per-row ``lse``, ``lse_r`` and the KLs of the gradients. ``out_student`` may be the student's
logits (in place: a program reads its block before writing the same addresses). Traffic: ``N V (s + t)`` read +
``N V s`` written (+ ``N V t`` for the teacher's gradient).

Conventions: a -inf logit has probability 0 and contributes 0; KL(a||b) is +inf when ``b`` has -inf where ``a`` is
finite (its gradient row is NaN where that term moves with the logits); a row with a non-finite log-sum-exp is NaN.
Rows with ``token_id < 0`` are never read: 0s, and a zero gradient row. Not yet run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _alloc
from .common import FLOAT32_MAX, device_guard, maximum, row_block_grid, row_grid, row_offset, vocab_tiling

REVERSE_KL = tl.constexpr(0)
FORWARD_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
_KIND = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}
INF = tl.constexpr(float("inf"))


@triton.jit
def _finite(x):
    return tl.abs(x) < INF


@triton.jit
def _split(lse):
    """A float64 log-sum-exp as float32 ``hi + lo``: ``(u - hi) - lo`` is then log p to float32 precision.

    A float32 log-sum-exp of ~40 is off by up to 2e-6 (half an ulp); the jsd's and the reverse KL's gradients
    ``p (log p - log r - K)`` nearly cancel on rows where the student is confident and the teacher disagrees, and
    such an offset of log p became a relative error of 1e-1 there (measured: docs/divergences.md).
    """
    hi = lse.to(tl.float32)
    return hi, (lse - hi.to(tl.float64)).to(tl.float32)


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _divergence_fwd_kernel(
    student_ptr,  # [B, T, V] bf16/fp16/fp32, unit stride along V
    teacher_ptr,  # [B, T, V] bf16/fp16/fp32, unit stride along V
    token_ids_ptr,  # [N] int64, -1 = not taking part
    div_ptr,  # [N] float32 out: the divergence
    lp_ptr,  # [N] float32 out (only WITH_LOGPROBS)
    lse64_ptr,  # [N] float64 out (see _split below)
    lse_ref64_ptr,  # [N] float64 out
    kl_student_ptr,  # [N] float32 out: the KL in the student's gradient
    kl_teacher_ptr,  # [N] float32 out: the KL in the teacher's gradient
    seq_len,  # shapes
    vocab,
    s_stride_b,  # strides, in elements
    s_stride_t,
    t_stride_b,
    t_stride_t,
    inv_temperature,  # runtime scalars: a new temperature or beta does not recompile
    beta,
    KIND: tl.constexpr,
    WITH_LOGPROBS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(token_ids_ptr + row)
    if target < 0:
        tl.store(div_ptr + row, 0.0)
        tl.store(lse64_ptr + row, 0.0)
        tl.store(lse_ref64_ptr + row, 0.0)
        tl.store(kl_student_ptr + row, 0.0)
        tl.store(kl_teacher_ptr + row, 0.0)
        if WITH_LOGPROBS:
            tl.store(lp_ptr + row, 0.0)
        return
    s_row = student_ptr + row_offset(row, seq_len, s_stride_b, s_stride_t)
    t_row = teacher_ptr + row_offset(row, seq_len, t_stride_b, t_stride_t)
    if WITH_LOGPROBS:  # loaded first: one float live across the loops instead of the 64-bit id (ptxas spilled it)
        u_target = tl.load(s_row + target).to(tl.float32) * inv_temperature
    cols = tl.arange(0, BLOCK_V)
    # Maxima start at the lowest finite float, not -inf: a block that is all -inf then rescales by exp(0) = 1.
    m = -FLOAT32_MAX
    m_r = -FLOAT32_MAX
    s = 0.0  # sum exp(u - m)
    s_r = 0.0  # sum exp(u_r - m_r)
    w = 0.0  # the cross term (two KLs)
    infinite = 0  # a -inf in the distribution the KL is taken against, where the other one is finite
    for start in range(0, vocab, BLOCK_V):
        in_vocab = start + cols < vocab
        u = tl.load(s_row + start + cols, mask=in_vocab, other=-float("inf")).to(tl.float32) * inv_temperature
        u_r = tl.load(t_row + start + cols, mask=in_vocab, other=-float("inf")).to(tl.float32) * inv_temperature
        m_new = maximum(m, tl.max(u, axis=0))
        m_r_new = maximum(m_r, tl.max(u_r, axis=0))
        rescale = tl.exp(m - m_new)
        rescale_r = tl.exp(m_r - m_r_new)
        e = tl.exp(u - m_new)
        e_r = tl.exp(u_r - m_r_new)
        if KIND != JSD:
            d = (u - m_new) - (u_r - m_r_new)
            shift = (m - m_new) - (m_r - m_r_new)  # how much every earlier d moves with the new maxima
            # entries where either logit is -inf are left out of w: 0 where the weighting logit is -inf (weight 0),
            # and the +inf where the other one is -inf is the `infinite` flag instead
            skip = (u == -INF) | (u_r == -INF)
            if KIND == REVERSE_KL:
                w = rescale * (w + shift * s) + tl.sum(tl.where(skip, 0.0, e * d), axis=0)
                infinite = tl.maximum(infinite, tl.max(((u > -INF) & (u_r == -INF)).to(tl.int32), axis=0))
            else:
                w = rescale_r * (w - shift * s_r) - tl.sum(tl.where(skip, 0.0, e_r * d), axis=0)
                infinite = tl.maximum(infinite, tl.max(((u_r > -INF) & (u == -INF)).to(tl.int32), axis=0))
        s = s * rescale + tl.sum(e, axis=0)
        s_r = s_r * rescale_r + tl.sum(e_r, axis=0)
        m = m_new
        m_r = m_r_new
    log_s = tl.log(s)
    log_s_r = tl.log(s_r)
    kl_student = 0.0
    kl_teacher = 0.0
    if KIND == REVERSE_KL:
        kl_student = tl.where(infinite > 0, INF, w / s - log_s + log_s_r)
        div = kl_student
    elif KIND == FORWARD_KL:
        kl_teacher = tl.where(infinite > 0, INF, w / s_r - log_s_r + log_s)
        div = kl_teacher
    else:  # second pass: log m needs both final log-sum-exps
        one_m_beta = 1.0 - beta
        for start in range(0, vocab, BLOCK_V):
            in_vocab = start + cols < vocab
            u = tl.load(s_row + start + cols, mask=in_vocab, other=-float("inf")).to(tl.float32) * inv_temperature
            u_r = tl.load(t_row + start + cols, mask=in_vocab, other=-float("inf")).to(tl.float32) * inv_temperature
            log_p = (u - m) - log_s  # u - m is exact near the maximum, where p is large
            log_q = (u_r - m_r) - log_s_r
            p = tl.exp(log_p)
            q = tl.exp(log_q)
            mix = beta * q + one_m_beta * p
            log_m = tl.log(mix)
            # p = 0 (a -inf logit, or underflow) contributes 0; so does an m that underflowed (then p ~ 0 too)
            dead = mix == 0.0
            kl_student += tl.sum(tl.where((p == 0.0) | dead, 0.0, p * (log_p - log_m)), axis=0)
            kl_teacher += tl.sum(tl.where((q == 0.0) | dead, 0.0, q * (log_q - log_m)), axis=0)
        div = beta * kl_teacher + one_m_beta * kl_student
    div = tl.where(_finite(m + log_s) & _finite(m_r + log_s_r), div, float("nan"))
    tl.store(div_ptr + row, div)
    tl.store(lse64_ptr + row, m.to(tl.float64) + log_s.to(tl.float64))
    tl.store(lse_ref64_ptr + row, m_r.to(tl.float64) + log_s_r.to(tl.float64))
    tl.store(kl_student_ptr + row, kl_student)
    tl.store(kl_teacher_ptr + row, kl_teacher)
    if WITH_LOGPROBS:
        tl.store(lp_ptr + row, (u_target - m) - log_s)


def _tiling(vocab: int, forward_jsd: bool = False) -> tuple[int, int]:
    """Steps of 4096 entries (16 per thread at 8 warps) whatever the dtype: two rows and a few float32
    temporaries per entry must stay in registers. The jsd's two-loop forward takes 2048 (8 per thread, still
    16-byte bf16 loads): at 4096 ptxas (triton 3.9) holds it to 80 registers and spills, at 2048 it needs 54
    (``python -m benchmarks.static_report_triton``)."""
    return vocab_tiling(vocab, 8 if forward_jsd else 4)


def divergence_forward(student, teacher, token_ids, kind, beta, temperature, with_logprobs):
    """``student``, ``teacher`` ``[B, T, V]`` -> ``(div, lp, lse, lse_ref, kl_student, kl_teacher)``, ``[N]`` each,
    float32 except the two log-sum-exps, float64 (``lp`` ``[0]`` unless ``with_logprobs``)."""
    _, seq_len, vocab = student.shape
    n = token_ids.shape[0]
    div, kl_student, kl_teacher = (_alloc.empty(n, dtype=torch.float32, device=student.device) for _ in range(3))
    lse, lse_ref = (_alloc.empty(n, dtype=torch.float64, device=student.device) for _ in range(2))
    lp = _alloc.empty(n if with_logprobs else 0, dtype=torch.float32, device=student.device)
    if n == 0:
        return div, lp, lse, lse_ref, kl_student, kl_teacher
    block, num_warps = _tiling(vocab, forward_jsd=kind == "jsd")
    with device_guard(student):
        _divergence_fwd_kernel[row_grid(n)](
            student,
            teacher,
            token_ids,
            div,
            lp if with_logprobs else div,
            lse,
            lse_ref,
            kl_student,
            kl_teacher,
            seq_len,
            vocab,
            student.stride(0),
            student.stride(1),
            teacher.stride(0),
            teacher.stride(1),
            1.0 / temperature,
            float(beta),
            KIND=_KIND[kind],
            WITH_LOGPROBS=with_logprobs,
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return div, lp, lse, lse_ref, kl_student, kl_teacher


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _divergence_bwd_kernel(
    student_ptr,  # [B, T, V] bf16/fp16/fp32
    teacher_ptr,  # [B, T, V] bf16/fp16/fp32
    out_student_ptr,  # [B, T, V] student's dtype (may be student_ptr: in place); only STUDENT_GRAD
    out_teacher_ptr,  # [B, T, V] teacher's dtype; only TEACHER_GRAD
    token_ids_ptr,  # [N] int64, -1 = not taking part
    lse64_ptr,  # [N] float64, from the forward
    lse_ref64_ptr,  # [N] float64
    kl_student_ptr,  # [N] float32
    kl_teacher_ptr,  # [N] float32
    grad_div_ptr,  # [N] float32: dL/dD
    grad_lp_ptr,  # [N] float32: dL/dlp (only HAS_GRAD_LP)
    seq_len,  # shapes
    vocab,
    s_stride_b,  # strides, in elements
    s_stride_t,
    t_stride_b,
    t_stride_t,
    os_stride_b,
    os_stride_t,
    ot_stride_b,
    ot_stride_t,
    inv_temperature,
    beta,
    KIND: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    HAS_GRAD_LP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = cols < vocab
    target = tl.load(token_ids_ptr + row)
    os_row = out_student_ptr + row_offset(row, seq_len, os_stride_b, os_stride_t)
    ot_row = out_teacher_ptr + row_offset(row, seq_len, ot_stride_b, ot_stride_t)
    if target < 0:
        if STUDENT_GRAD:
            tl.store(os_row + cols, tl.zeros([BLOCK_V], dtype=out_student_ptr.dtype.element_ty), mask=in_vocab)
        if TEACHER_GRAD:
            tl.store(ot_row + cols, tl.zeros([BLOCK_V], dtype=out_teacher_ptr.dtype.element_ty), mask=in_vocab)
        return
    s_row = student_ptr + row_offset(row, seq_len, s_stride_b, s_stride_t)
    t_row = teacher_ptr + row_offset(row, seq_len, t_stride_b, t_stride_t)
    u = tl.load(s_row + cols, mask=in_vocab, other=0.0).to(tl.float32) * inv_temperature
    u_r = tl.load(t_row + cols, mask=in_vocab, other=0.0).to(tl.float32) * inv_temperature
    lse_hi, lse_lo = _split(tl.load(lse64_ptr + row))
    lse_r_hi, lse_r_lo = _split(tl.load(lse_ref64_ptr + row))
    k_s = tl.load(kl_student_ptr + row)
    k_t = tl.load(kl_teacher_ptr + row)
    c = tl.load(grad_div_ptr + row) * inv_temperature  # 1/tau folded into the row scalars
    log_p = (u - lse_hi) - lse_lo
    log_q = (u_r - lse_r_hi) - lse_r_lo
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    if KIND == JSD:
        mix = beta * q + (1.0 - beta) * p
        log_m = tl.log(mix)
        dead = mix == 0.0
    if STUDENT_GRAD:
        if KIND == REVERSE_KL:
            g = tl.where(u == -INF, 0.0, p * (log_p - log_q - k_s))
            g = tl.where(k_s == INF, float("nan"), g)  # the infinite term p log(1/q) moves with u
        elif KIND == FORWARD_KL:
            g = p - q
        else:
            g = (1.0 - beta) * tl.where((p == 0.0) | dead, 0.0, p * (log_p - log_m - k_s))
        grad = tl.where(c == 0.0, 0.0, c * g)  # grad_div = 0: no divergence term, whatever the row holds
        if HAS_GRAD_LP:
            g_lp = tl.load(grad_lp_ptr + row) * inv_temperature
            grad += tl.where(cols == target, g_lp, 0.0) - g_lp * p
        tl.store(os_row + cols, grad.to(out_student_ptr.dtype.element_ty), mask=in_vocab)
    if TEACHER_GRAD:
        if KIND == REVERSE_KL:
            g_r = q - p
        elif KIND == FORWARD_KL:
            g_r = tl.where(u_r == -INF, 0.0, q * (log_q - log_p - k_t))
            g_r = tl.where(k_t == INF, float("nan"), g_r)
        else:
            g_r = beta * tl.where((q == 0.0) | dead, 0.0, q * (log_q - log_m - k_t))
        grad_r = tl.where(c == 0.0, 0.0, c * g_r)
        tl.store(ot_row + cols, grad_r.to(out_teacher_ptr.dtype.element_ty), mask=in_vocab)


def divergence_backward(
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
    out_student,
    out_teacher,
) -> None:
    """Write ``d/dz`` of ``sum_t (grad_div_t D_t + grad_lp_t lp_t)`` into ``out_student`` and ``d/dz_ref`` of
    ``sum_t grad_div_t D_t`` into ``out_teacher`` (either may be None)."""
    _, seq_len, vocab = student.shape
    n = token_ids.shape[0]
    if n == 0 or (out_student is None and out_teacher is None):
        return
    block, num_warps = _tiling(vocab)
    os_, ot = out_student if out_student is not None else student, out_teacher if out_teacher is not None else teacher
    grad_div = grad_div.float().contiguous()
    grad_lp = grad_lp.float().contiguous() if grad_lp is not None else None
    with device_guard(student):
        _divergence_bwd_kernel[row_block_grid(n, vocab, block)](
            student,
            teacher,
            os_,
            ot,
            token_ids,
            lse,
            lse_ref,
            kl_student,
            kl_teacher,
            grad_div,
            grad_lp if grad_lp is not None else grad_div,
            seq_len,
            vocab,
            student.stride(0),
            student.stride(1),
            teacher.stride(0),
            teacher.stride(1),
            os_.stride(0),
            os_.stride(1),
            ot.stride(0),
            ot.stride(1),
            1.0 / temperature,
            float(beta),
            KIND=_KIND[kind],
            STUDENT_GRAD=out_student is not None,
            TEACHER_GRAD=out_teacher is not None,
            HAS_GRAD_LP=grad_lp is not None,
            BLOCK_V=block,
            num_warps=num_warps,
        )
