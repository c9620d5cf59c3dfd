"""The fused GRPO loss forward: log-probs and the per-token loss + its gradient ``g_t`` in one Triton program.

Once a row's ``lp`` is known, every other input of the loss is a per-token scalar, so the program that made one pass
over the row (``logprobs.row_logprobs``) goes on to compute, for token-level importance sampling (docs/math.md
sections 3-5, 8; the closed form of :func:`grpo_kernels.loss_math.loss_forward_from_logprobs`)::

    r = lp - lp_old,  rho = exp(r)
    L = w_is P(rho, A, lp) + beta K (rho if bias-corrected),    g = c (dL/dr + dL/dlp|direct)

and writes ``lp, lse, H, g, L, K`` and the clip flags. The backward is the shared log-prob backward
(``logprobs._token_logprobs_bwd_kernel``) driven by ``g`` times the incoming gradient: forward + backward = 3 passes
over the logits (read, read, write).

Sequence-level importance sampling (GSPO) needs each sequence's mean log-ratio before any ``g_t`` is known, and so
do the losses that couple tokens (vespo's per-sequence weight, geo_mean's per-sequence ratio; clip_cov's and
kl_cov's batch-level covariance selection: ``LossConfig.coupling``). Their forward is the log-prob kernel (pass 1)
followed by the ``[N]``-sized closed form of ``loss_math`` in torch (deterministic per-sequence prefix sums, one sort
for the selections): still no third pass over the logits. gpg (``-A lp``) is token-level and in the epilogue.

Modes are compile-time (``tl.constexpr``): loss family, KL estimator, has-old / has-KL / has-IS-weights / delta /
dual clip / bias correction / entropy, and the logits dtype. Every float hyper-parameter is a runtime argument, so
changing beta or epsilon does not recompile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _alloc
from ...loss_math import CLIP_HIGH, CLIP_LOW, LossConfig, LossForward, TokenBatch, loss_forward_from_logprobs
from .common import device_guard, maximum, minimum, row_grid, row_offset, vocab_tiling
from .logprobs import row_logprobs, token_logprobs_forward

# loss families (the clip family covers grpo, bnpo, dr_grpo and dapo: they differ only in the coefficient c_t)
CLIP = tl.constexpr(0)
CISPO = tl.constexpr(1)
SAPO = tl.constexpr(2)
GPG = tl.constexpr(3)
_FAMILY = {"grpo": 0, "bnpo": 0, "dr_grpo": 0, "dapo": 0, "cispo": 1, "sapo": 2, "gpg": 3}

_CLIP_LOW = tl.constexpr(CLIP_LOW)
_CLIP_HIGH = tl.constexpr(CLIP_HIGH)

# KL estimators of k = lp_ref - lp
K3 = tl.constexpr(0)
K1 = tl.constexpr(1)
K2 = tl.constexpr(2)
LOW_VAR_KL = tl.constexpr(3)
_ESTIMATOR = {"k3": 0, "k1": 1, "k2": 2, "low_var_kl": 3}


# ----------------------------------------------------------------------------------------------------------------
# per-token epilogue
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _min_grad(a, b, da, db):
    """Derivative of ``min(a, b)``: at a tie both sides share it equally, as ``torch.minimum``'s does."""
    return tl.where(a < b, da, tl.where(a > b, db, 0.5 * (da + db)))


@triton.jit
def _policy(
    rho,
    adv,
    lp,
    clip_low,
    clip_high,
    eps_high,
    delta,
    dual_clip,
    sapo_pos,
    sapo_neg,
    FAMILY: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr,
):
    """``(P, dP/dr, dP/dlp|direct)`` of docs/math.md section 4 for the ratio ``rho = exp(r)``."""
    if FAMILY == GPG:  # no ratio: the REINFORCE term
        p, dp_dr, dp_dlp = -adv * lp, 0.0, -adv
    elif FAMILY == CISPO:
        capped = minimum(rho, eps_high)  # stop-gradient: no dP/dr
        p, dp_dr, dp_dlp = -capped * adv * lp, 0.0, -capped * adv
    elif FAMILY == SAPO:
        tau = tl.where(adv > 0, sapo_pos, sapo_neg)
        x = tau * (rho - 1.0)
        sig = tl.sigmoid(x)
        # sigmoid' = sig (1 - sig), with 1 - sig as sigmoid(-x): no cancellation when sig rounds to 1; 0 once it
        # saturates, also when rho overflows (r > 88.7), where 0 * inf would put a NaN gradient under a finite loss
        slope = sig * tl.sigmoid(-x)
        p, dp_dr, dp_dlp = -(4.0 / tau) * sig * adv, tl.where(slope > 0, -4.0 * slope * rho * adv, 0.0), 0.0
    else:  # P = -min(rho1 A, clip(rho, 1 - eps_low, 1 + eps_high) A), then the dual clip
        rho2 = minimum(maximum(rho, clip_low), clip_high)
        drho2 = tl.where((rho >= clip_low) & (rho <= clip_high), rho, 0.0)
        rho1 = rho
        drho1 = rho
        if HAS_DELTA:
            rho1 = minimum(rho, delta)
            drho1 = tl.where(rho <= delta, rho, 0.0)
        a = rho1 * adv
        b = rho2 * adv
        p = -minimum(a, b)
        dp_dr = -_min_grad(a, b, drho1 * adv, drho2 * adv)
        if HAS_DUAL_CLIP:
            floor = -dual_clip * adv
            dual = adv < 0
            dp_dr = tl.where(dual, _min_grad(p, floor, dp_dr, 0.0), dp_dr)
            p = tl.where(dual, minimum(p, floor), p)
        dp_dlp = 0.0
    return p, dp_dr, dp_dlp


@triton.jit
def _kl(lp, ref, ESTIMATOR: tl.constexpr):
    """``(K, dK/dlp, K + dK/dlp)`` for ``k = lp_ref - lp`` (docs/math.md section 5).

    ``K + dK/dlp`` is the derivative of the bias-corrected ``rho K`` over ``rho``; it is returned in a closed form
    because summing the first two cancels catastrophically for k3 (``(e^k - k - 1) + (1 - e^k) = -k``).
    """
    k = ref - lp
    if ESTIMATOR == K1:
        kl, dkl = -k, 1.0
        both = 1.0 - k
    elif ESTIMATOR == K2:
        kl, dkl = 0.5 * k * k, -k
        both = kl + dkl
    elif ESTIMATOR == LOW_VAR_KL:  # clamp's gradient passes at the bounds, as torch.clamp's does
        kc = minimum(maximum(k, -20.0), 20.0)
        ekc = tl.exp(kc)
        raw = ekc - kc - 1.0
        passes = (k >= -20.0) & (k <= 20.0) & (raw <= 10.0)
        kl, dkl = minimum(maximum(raw, -10.0), 10.0), tl.where(passes, 1.0 - ekc, 0.0)
        both = tl.where(passes, -kc, kl)
    else:  # k3
        ek = tl.exp(k)
        kl, dkl = ek - k - 1.0, 1.0 - ek
        both = -k
    return kl, dkl, both


# ----------------------------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _grpo_loss_fwd_kernel(
    logits_ptr,  # [B, T, V] bf16/fp16/fp32, unit stride along V
    token_ids_ptr,  # [N] int64, -1 = not taking part
    coef_ptr,  # [N] float32 inputs: aggregation coefficient c_t
    adv_ptr,  # [N] advantage
    old_ptr,  # [N] lp_old (HAS_OLD)
    ref_ptr,  # [N] lp_ref (HAS_KL)
    is_weights_ptr,  # [N] w_is (HAS_IS_WEIGHTS)
    lp_ptr,  # [N] float32 outputs: lp
    lse_ptr,  # [N] lse
    entropy_ptr,  # [N] H (WITH_ENTROPY)
    grad_ptr,  # [N] g = dloss/dlp
    loss_ptr,  # [N] L
    kl_ptr,  # [N] K (after bias correction; 0 without KL)
    flags_ptr,  # [N] uint8 CLIP_LOW | CLIP_HIGH
    seq_len,  # shapes
    vocab,
    stride_b,  # logits strides, in elements
    stride_t,
    inv_temperature,  # runtime hyper-parameters (never constexpr)
    beta,
    clip_low,  # 1 - eps_low
    clip_high,  # 1 + eps_high
    eps_high,
    delta,
    dual_clip,
    sapo_pos,
    sapo_neg,
    FAMILY: tl.constexpr,  # modes
    ESTIMATOR: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    HAS_IS_WEIGHTS: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr,
    BIAS_CORRECTED: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,  # tiling
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(token_ids_ptr + row)
    if target < 0:  # not taking part: the row is never read, every output is 0
        tl.store(lp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        tl.store(grad_ptr + row, 0.0)
        tl.store(loss_ptr + row, 0.0)
        tl.store(kl_ptr + row, 0.0)
        tl.store(flags_ptr + row, tl.full([], 0, tl.uint8))
        return
    row_ptr = logits_ptr + row_offset(row, seq_len, stride_b, stride_t)
    lp, lse, entropy = row_logprobs(row_ptr, target, vocab, inv_temperature, WITH_ENTROPY, BLOCK_V)

    # ratio (lp_old absent: lp_old = stop_grad(lp), ratio 1 with the gradient kept; lp - lp, not a constant 1,
    # so that a NaN log-prob reaches the loss)
    adv = tl.load(adv_ptr + row)
    log_ratio = lp - lp
    if HAS_OLD:
        log_ratio = lp - tl.load(old_ptr + row)
    rho = tl.exp(log_ratio)

    loss, dl_dr, dl_dlp = _policy(
        rho,
        adv,
        lp,
        clip_low,
        clip_high,
        eps_high,
        delta,
        dual_clip,
        sapo_pos,
        sapo_neg,
        FAMILY,
        HAS_DELTA,
        HAS_DUAL_CLIP,
    )
    if HAS_IS_WEIGHTS:
        w = tl.load(is_weights_ptr + row)
        loss, dl_dr, dl_dlp = loss * w, dl_dr * w, dl_dlp * w
    kl = 0.0
    if HAS_KL:
        kl, dkl, kl_plus_dkl = _kl(lp, tl.load(ref_ptr + row), ESTIMATOR)
        if BIAS_CORRECTED:  # d(K rho)/dlp = K' rho + K rho dr/dlp = rho (K + K') at token level (dr/dlp = 1)
            dkl = rho * kl_plus_dkl
            kl = kl * rho
        loss = loss + beta * kl
        dl_dlp = dl_dlp + beta * dkl
    grad = tl.load(coef_ptr + row) * (dl_dr + dl_dlp)

    low = (rho < clip_low) & (adv < 0)
    high = (rho > clip_high) & (adv > 0)
    tl.store(lp_ptr + row, lp)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy)
    tl.store(grad_ptr + row, grad)
    tl.store(loss_ptr + row, loss)
    tl.store(kl_ptr + row, kl)
    tl.store(flags_ptr + row, (low.to(tl.uint8) * _CLIP_LOW + high.to(tl.uint8) * _CLIP_HIGH).to(tl.uint8))


# ----------------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------------
def grpo_loss_forward(logits: torch.Tensor, batch: TokenBatch, config: LossConfig, with_entropy: bool) -> LossForward:
    """The fused forward (see :class:`grpo_kernels.loss_math.LossForward` for the outputs)."""
    if config.coupling is not None:  # g_t needs its sequence or the batch: log-probs, then the [N] closed form
        lp, lse, entropy = token_logprobs_forward(logits, batch.token_ids, config.temperature, with_entropy)
        return loss_forward_from_logprobs(lp, lse, entropy, batch, config)

    _, seq_len, vocab = logits.shape
    n = batch.token_ids.shape[0]
    new = lambda k, dtype=torch.float32: _alloc.empty(k, dtype=dtype, device=logits.device)  # noqa: E731
    lp, lse, entropy, grad, loss_t, kl = new(n), new(n), new(n if with_entropy else 0), new(n), new(n), new(n)
    flags = new(n, torch.uint8)
    if n:
        has_kl = config.beta != 0.0
        block, num_warps = vocab_tiling(vocab, logits.element_size())
        unused = batch.coef  # stands in for absent optional inputs (never read: their mode flag is off)
        with device_guard(logits):
            _grpo_loss_fwd_kernel[row_grid(n)](
                logits,
                batch.token_ids,
                batch.coef,
                batch.advantages,
                unused if batch.old_logprobs is None else batch.old_logprobs,
                batch.ref_logprobs if has_kl else unused,
                unused if batch.is_weights is None else batch.is_weights,
                lp,
                lse,
                entropy if with_entropy else lp,
                grad,
                loss_t,
                kl,
                flags,
                seq_len,
                vocab,
                logits.stride(0),
                logits.stride(1),
                1.0 / config.temperature,
                config.beta,
                1.0 - config.epsilon_low,
                1.0 + config.epsilon_high,
                config.epsilon_high,
                config.delta or 0.0,
                config.dual_clip or 0.0,
                config.sapo_temperature_pos,
                config.sapo_temperature_neg,
                FAMILY=_FAMILY[config.loss_type],
                ESTIMATOR=_ESTIMATOR[config.kl_estimator] if has_kl else 0,  # "exact" at beta = 0 comes here
                HAS_OLD=batch.old_logprobs is not None,
                HAS_KL=has_kl,
                HAS_IS_WEIGHTS=batch.is_weights is not None,
                HAS_DELTA=config.delta is not None,
                HAS_DUAL_CLIP=config.dual_clip is not None,
                BIAS_CORRECTED=config.bias_corrected_kl,
                WITH_ENTROPY=with_entropy,
                BLOCK_V=block,
                num_warps=num_warps,
            )
    loss = (batch.coef * loss_t).sum()
    return LossForward(loss, lp, lse, entropy, grad, loss_t, kl, flags)
