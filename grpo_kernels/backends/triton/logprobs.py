"""Per-token log-probabilities and entropy from logits, and their gradient: two Triton kernels.

docs/math.md section 1, with ``u = z / tau``::

    lse = log sum_v exp(u_v)      lp = u_y - lse      H = lse - sum_v p_v u_v      p_v = exp(u_v - lse)
    d/dz_v = (g 1[v = y] - p_v (g + g_H (log p_v + H))) / tau        (g = dL/dlp, g_H = dL/dH)

Forward: one program per row (rows on grid axis x, so T >= 65536 works), one pass over the row with an online
log-sum-exp in float32: a running max ``m``, the rescaled sum ``s = sum exp(u - m)`` and, for the entropy,
``w = sum exp(u - m) (u - m)``, so that ``lse = m + log s`` and ``H = log s - w / s`` without cancellation against a
large ``m``. The target logit is one extra scalar load. Traffic: N * V * elt bytes read.

Backward: one program per (row, vocabulary block), a read and a write of each element; ``out`` may be the logits
buffer itself (in place: each program reads its block before writing the same addresses, no other program touches
them). Traffic: N * V * elt bytes read + N * V * elt bytes written.

Rows with ``token_id < 0`` are never read: the forward writes 0s, the backward writes a zero gradient row. A row
whose ``token_id == V`` has its target in another vocabulary shard (:mod:`grpo_kernels.vocab_parallel`): it is read
as usual, ``lp = -lse`` and its gradient has no ``1[v = y]`` term (``cols == target`` is never true).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _alloc
from .common import FLOAT32_MAX, device_guard, maximum, row_block_grid, row_grid, row_offset, vocab_tiling

# log p (or u - max) is clamped here wherever it multiplies p: p = exp(log p) underflows to 0 far above the floor, so
# no contributing term changes, and a masked-out vocabulary entry (z = -inf, p = 0) gives 0 * floor = 0, not NaN.
# (A NaN logit still propagates: it makes the row's sum, hence lse, NaN.)
LOGP_FLOOR = tl.constexpr(-1.0e4)


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def row_logprobs(
    row_ptr,  # first element of one row of the logits, [V]
    target,  # int64 id in [0, V], V = the target is in another vocabulary shard
    vocab,
    inv_temperature,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``(lp, lse, H)`` of one row, float32, in one pass. ``H`` is 0 unless ``WITH_ENTROPY``."""
    cols = tl.arange(0, BLOCK_V)
    # Start from the lowest finite float, not -inf: a block that is entirely -inf (masked vocabulary) then gives
    # exp(m - m_new) = exp(0) = 1 instead of exp(-inf + inf) = NaN.
    m = -FLOAT32_MAX
    s = 0.0  # sum exp(u - m)
    w = 0.0  # sum exp(u - m) (u - m)
    for start in range(0, vocab, BLOCK_V):
        in_vocab = start + cols < vocab
        u = tl.load(row_ptr + start + cols, mask=in_vocab, other=-float("inf")).to(tl.float32) * inv_temperature
        m_new = maximum(m, tl.max(u, axis=0))
        rescale = tl.exp(m - m_new)
        d = u - m_new
        e = tl.exp(d)
        if WITH_ENTROPY:
            # (u - m) = (u - m_new) + (m_new - m): shift the old sum, then rescale it. The floor turns the
            # 0 * -inf of z = -inf (or of a lane past the end of the row) into 0 * floor = 0.
            w = rescale * (w + (m - m_new) * s) + tl.sum(e * tl.maximum(d, LOGP_FLOOR), axis=0)
        s = s * rescale + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    # target == vocab: the target is in another vocabulary shard (vocab_parallel.py): u_y taken as 0, lp = -lse
    lp = tl.load(row_ptr + target, mask=target < vocab, other=0.0).to(tl.float32) * inv_temperature - lse
    entropy = 0.0
    if WITH_ENTROPY:
        entropy = log_s - w / s
    return lp, lse, entropy


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,  # [B, T, V] bf16/fp16/fp32, unit stride along V
    token_ids_ptr,  # [N] int64, -1 = not taking part
    lp_ptr,  # [N] float32 out
    lse_ptr,  # [N] float32 out
    entropy_ptr,  # [N] float32 out (untouched unless WITH_ENTROPY)
    seq_len,  # shapes
    vocab,
    stride_b,  # logits strides, in elements
    stride_t,
    inv_temperature,  # runtime scalar: a new temperature does not recompile
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(token_ids_ptr + row)
    if target < 0:
        tl.store(lp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        return
    row_ptr = logits_ptr + row_offset(row, seq_len, stride_b, stride_t)
    lp, lse, entropy = row_logprobs(row_ptr, target, vocab, inv_temperature, WITH_ENTROPY, BLOCK_V)
    tl.store(lp_ptr + row, lp)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


def token_logprobs_forward(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, with_entropy: bool):
    """``logits [B, T, V]``, ``token_ids [N]`` -> ``(lp [N], lse [N], entropy [N] or [0])``, float32."""
    _, seq_len, vocab = logits.shape
    n = token_ids.shape[0]
    lp = _alloc.empty(n, dtype=torch.float32, device=logits.device)
    lse = _alloc.empty(n, dtype=torch.float32, device=logits.device)
    entropy = _alloc.empty(n if with_entropy else 0, dtype=torch.float32, device=logits.device)
    if n == 0:
        return lp, lse, entropy
    block, num_warps = vocab_tiling(vocab, logits.element_size())
    with device_guard(logits):
        _token_logprobs_fwd_kernel[row_grid(n)](
            logits,
            token_ids,
            lp,
            lse,
            entropy if with_entropy else lp,
            seq_len,
            vocab,
            logits.stride(0),
            logits.stride(1),
            1.0 / temperature,
            WITH_ENTROPY=with_entropy,
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return lp, lse, entropy


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,  # [B, T, V] bf16/fp16/fp32, unit stride along V
    out_ptr,  # [B, T, V] logits' dtype: the gradient (may be logits_ptr: in place)
    token_ids_ptr,  # [N] int64, -1 = not taking part
    lse_ptr,  # [N] float32, from the forward
    entropy_ptr,  # [N] float32, from the forward (read only with HAS_ENTROPY_GRAD)
    grad_lp_ptr,  # [N] float32: dL/dlp
    grad_entropy_ptr,  # [N] float32: dL/dH (read only with HAS_ENTROPY_GRAD)
    seq_len,  # shapes
    vocab,
    stride_b,  # logits strides, in elements
    stride_t,
    out_stride_b,  # out strides
    out_stride_t,
    inv_temperature,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = cols < vocab
    out_row = out_ptr + row_offset(row, seq_len, out_stride_b, out_stride_t)
    target = tl.load(token_ids_ptr + row)
    if target < 0:
        tl.store(out_row + cols, tl.zeros([BLOCK_V], dtype=out_ptr.dtype.element_ty), mask=in_vocab)
        return
    row_ptr = logits_ptr + row_offset(row, seq_len, stride_b, stride_t)
    z = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
    log_p = z * inv_temperature - tl.load(lse_ptr + row)
    p = tl.exp(log_p)
    # 1/tau folded into the per-row scalars: grad = g' 1[v=y] - p (g' + g_H' (log p + H))
    g = tl.load(grad_lp_ptr + row) * inv_temperature
    coef = g
    if HAS_ENTROPY_GRAD:
        g_h = tl.load(grad_entropy_ptr + row) * inv_temperature
        # where(log_p < floor, ...) rather than max(): keeps a NaN of a valid row (max would drop it)
        log_p = tl.where(log_p < LOGP_FLOOR, LOGP_FLOOR, log_p)
        coef = g + g_h * (log_p + tl.load(entropy_ptr + row))
    grad = tl.where(cols == target, g, 0.0) - p * coef
    tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=in_vocab)


def token_logprobs_backward(logits, token_ids, lse, entropy, grad_lp, grad_entropy, temperature, out) -> None:
    """Write ``d/dlogits`` (``[B, T, V]``, logits' dtype) into ``out``, which may be ``logits`` itself."""
    _, seq_len, vocab = logits.shape
    n = token_ids.shape[0]
    if n == 0:
        return
    block, num_warps = vocab_tiling(vocab, logits.element_size())
    has_entropy_grad = grad_entropy is not None
    with device_guard(logits):
        _token_logprobs_bwd_kernel[row_block_grid(n, vocab, block)](
            logits,
            out,
            token_ids,
            lse,
            entropy if has_entropy_grad else lse,
            grad_lp,
            grad_entropy if has_entropy_grad else grad_lp,
            seq_len,
            vocab,
            logits.stride(0),
            logits.stride(1),
            out.stride(0),
            out.stride(1),
            1.0 / temperature,
            HAS_ENTROPY_GRAD=has_entropy_grad,
            BLOCK_V=block,
            num_warps=num_warps,
        )
