"""The per-token half of the GRPO loss in closed form: everything after the log-probs.

Once ``lp_t`` is known, every other input of the loss is a per-token scalar, so the loss and its gradient
``g_t = d loss / d lp_t`` (docs/math.md section 8) are cheap ``[N]`` vector math. This module writes that math
with explicit derivatives (no autograd), in the form the Triton and CUDA kernels implement in their epilogues; the
torch backend uses it directly, and the GPU backends use it for the sequence-level ratio, whose ``g_t`` needs a
per-sequence reduction between the two passes over the logits.

Notation (all ``[N]`` over the flattened tokens): ``c_t`` the aggregation coefficient (so that ``loss =
sum_t c_t L_t``), ``r`` the log-ratio, ``rho = exp(r)``, ``P`` the policy term, ``K`` the KL estimate.

    L_t   = w_t P_t + beta K_t (rho if bias-corrected)
    token:    g_t = c_t (dL_t/dr + dL_t/dlp_t|direct)
    sequence: g_t = c_t dL_t/dlp_t|direct + sigma_t sum_{t' in s} c_t' dL_t'/dr_s,   sigma_t = m_t / max(1, n_s)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import LossConfig

CLIP_LOW = 1  # bit of LossForward.clip_flags: rho < 1 - eps_low and A < 0 (geo_mean: d < -eps_low and A < 0)
CLIP_HIGH = 2  # bit of LossForward.clip_flags: rho > 1 + eps_high and A > 0 (geo_mean: d > eps_high and A > 0)
COV_SELECTED = 4  # bit of LossForward.clip_flags: selected by clip_cov / kl_cov's covariance rule


class TokenBatch(NamedTuple):
    """The per-token inputs of the loss, flattened over ``N = B * T`` (padded) or ``N`` (packed) tokens.

    Built by the API from the user's tensors; every field is contiguous and on the logits' device.
    """

    token_ids: torch.Tensor  # [N] int64, -1 where the position does not take part
    coef: torch.Tensor  # [N] aggregation coefficient c_t (mask weight / normaliser; 0 where not taking part)
    advantages: torch.Tensor  # [N] float32, 0 where not taking part
    old_logprobs: torch.Tensor | None  # [N] float32 or None (ratio 1, gradient kept)
    ref_logprobs: torch.Tensor | None  # [N] float32, None when beta == 0
    is_weights: torch.Tensor | None  # [N] float32 or None
    cu_seqlens: torch.Tensor  # [S+1] int64: sequence s owns tokens cu_seqlens[s]:cu_seqlens[s+1]
    seq_ids: torch.Tensor  # [N] int64: the sequence of each token
    seq_weights: torch.Tensor  # [N] sigma_t = m_t / max(1, n_s): weight of token t in its sequence's mean
    mask_weights: torch.Tensor | None = None  # [N] m_t (0 where not taking part); read by vespo, clip_cov

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.shape[0] - 1


class LossForward(NamedTuple):
    """What a backend's fused forward returns. ``[N]`` tensors are float32 (float64 for float64 logits)."""

    loss: torch.Tensor  # [] sum_t c_t L_t
    logprobs: torch.Tensor  # [N] lp_t (0 where not taking part)
    lse: torch.Tensor  # [N] log-sum-exp of z/temperature, saved for the backward
    entropy: torch.Tensor  # [N] H_t, or [0] when not asked for
    grad_logprobs: torch.Tensor  # [N] g_t = d loss / d lp_t
    per_token_loss: torch.Tensor  # [N] L_t (0 where not taking part)
    kl: torch.Tensor  # [N] K_t after bias correction (0 when beta == 0)
    clip_flags: torch.Tensor  # [N] uint8, CLIP_LOW | CLIP_HIGH bits


# ----------------------------------------------------------------------------------------------------------------
# Deterministic segment reductions (no atomics): segments are contiguous runs of tokens.
# ----------------------------------------------------------------------------------------------------------------
def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``out[s] = sum(values[cu[s]:cu[s+1]])`` via a float64 prefix sum: deterministic on every device.

    A prefix sum carries a NaN/inf into every later prefix, and ``inf - inf`` would then turn the following segments
    into NaN; so the prefix runs over the finite values only, and each segment's non-finite entries are added back
    from exact integer counts: NaN (or +inf and -inf together) -> NaN, +inf -> +inf, -inf -> -inf.
    """

    def prefix_diff(x: torch.Tensor) -> torch.Tensor:  # [N, ...] -> [S, ...]
        prefix = torch.cat([x.new_zeros((1,) + x.shape[1:]), torch.cumsum(x, dim=0)])
        return prefix[cu_seqlens[1:]] - prefix[cu_seqlens[:-1]]

    finite = torch.isfinite(values)
    total = prefix_diff(torch.where(finite, values.to(torch.float64), 0.0))
    special = torch.stack([values == float("inf"), values == float("-inf"), torch.isnan(values)], dim=1)
    pos, neg, nan = (prefix_diff(special.to(torch.int64)) > 0).unbind(dim=1)
    total = torch.where(pos, float("inf"), torch.where(neg, float("-inf"), total))
    total = torch.where(nan | (pos & neg), float("nan"), total)
    return total.to(values.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Aggregation: loss = sum_t c_t L_t (docs/math.md section 6)
# ----------------------------------------------------------------------------------------------------------------
def aggregation_coef(
    m: torch.Tensor, seq_weights: torch.Tensor, num_seqs: int, config: LossConfig, num_items_in_batch=None
) -> torch.Tensor:
    """``c_t`` of the aggregation in force (``config.aggregation_mode``: ``aggregation``, or the loss type's own):
    ``m`` ``[N]`` the mask weight of each token (0 where it does not take part), ``seq_weights`` ``[N]`` its weight
    in its sequence's mean (``m_t / max(1, n_s)``), ``num_seqs`` ``S``."""
    mode = config.aggregation_mode
    if mode == "grpo":
        return seq_weights / max(num_seqs, 1)
    if mode == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if mode == "dr_grpo":
        return m / (max(num_seqs, 1) * config.max_completion_length)
    # dapo
    items = (
        m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=m.dtype, device=m.device)
    )
    return m / items.reshape(()).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Per-token pieces with their derivatives
# ----------------------------------------------------------------------------------------------------------------
def kl_and_grad(lp: torch.Tensor, ref: torch.Tensor, estimator: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(K, dK/dlp, K + dK/dlp)`` for ``k = lp_ref - lp`` (docs/math.md section 5).

    ``K + dK/dlp`` is the token-level derivative of the bias-corrected ``rho K`` over ``rho``; it is returned in a
    closed form because summing the first two cancels catastrophically for k3: ``(e^k - k - 1) + (1 - e^k) = -k``.
    """
    k = ref - lp
    if estimator == "k3":
        ek = torch.exp(k)
        return ek - k - 1, 1 - ek, -k
    if estimator == "k1":
        return -k, torch.ones_like(k), 1 - k
    if estimator == "k2":
        return 0.5 * k * k, -k, 0.5 * k * k - k
    if estimator == "low_var_kl":  # clamp's gradient passes at the bounds (as torch.clamp's does)
        kc = torch.clamp(k, -20.0, 20.0)
        ekc = torch.exp(kc)
        raw = ekc - kc - 1
        passes = (k >= -20.0) & (k <= 20.0) & (raw <= 10.0)
        kl = torch.clamp(raw, -10.0, 10.0)
        return kl, torch.where(passes, 1 - ekc, torch.zeros_like(k)), torch.where(passes, -kc, kl)
    raise ValueError(f"unknown kl_estimator {estimator!r}")


def _min_grad(a: torch.Tensor, b: torch.Tensor, da: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """Derivative of ``min(a, b)``; at a tie the two sides share it equally, as ``torch.minimum`` does."""
    return torch.where(a < b, da, torch.where(a > b, db, 0.5 * (da + db)))


def policy_and_grads(
    rho: torch.Tensor, adv: torch.Tensor, lp: torch.Tensor, config: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P, dP/dr, dP/dlp|direct)`` of docs/math.md section 4 for ratio ``rho = exp(r)``."""
    zero = torch.zeros_like(rho)
    if config.loss_type == "gpg":  # no ratio at all: the REINFORCE term with the group-relative advantage
        return -adv * lp, zero, -adv
    if config.loss_type == "cispo":
        capped = torch.clamp(rho, max=config.epsilon_high)  # stop-gradient: no dP/dr
        return -capped * adv * lp, zero, -capped * adv
    if config.loss_type == "sapo":
        tau = torch.where(
            adv > 0,
            torch.full_like(rho, config.sapo_temperature_pos),
            torch.full_like(rho, config.sapo_temperature_neg),
        )
        x = tau * (rho - 1)
        s = torch.sigmoid(x)
        # d/dr of sigmoid(tau (e^r - 1)) is tau s (1 - s) rho, with 1 - s as sigmoid(-x) (no cancellation when s
        # rounds to 1); 0 once s saturates, also when rho overflows float32 (r > 88.7), where 0 * inf would put a
        # NaN gradient under a finite loss.
        slope = s * torch.sigmoid(-x)
        return -(4.0 / tau) * s * adv, torch.where(slope > 0, -4.0 * slope * rho * adv, zero), zero
    # clip family: P = -min(rho1 A, rho2 A), then the dual clip
    lo, hi = 1 - config.epsilon_low, 1 + config.epsilon_high
    rho2 = torch.clamp(rho, lo, hi)
    drho2 = torch.where((rho >= lo) & (rho <= hi), rho, zero)
    if config.delta is not None:
        rho1 = torch.clamp(rho, max=config.delta)
        drho1 = torch.where(rho <= config.delta, rho, zero)
    else:
        rho1, drho1 = rho, rho
    a, b = rho1 * adv, rho2 * adv
    p = -torch.minimum(a, b)
    dp = -_min_grad(a, b, drho1 * adv, drho2 * adv)
    if config.dual_clip is not None:
        floor = -config.dual_clip * adv
        dual = adv < 0
        dp = torch.where(dual, _min_grad(p, floor, dp, zero), dp)
        p = torch.where(dual, torch.minimum(p, floor), p)
    return p, dp, zero


# ----------------------------------------------------------------------------------------------------------------
# Losses that couple tokens (docs/math.md section 9): vespo's weight, geo_mean's ratio, the covariance selections.
# Each is [N]-sized vector math on the log-probs (segment sums, one sort): the step between the log-prob pass and
# the gradient pass.
# ----------------------------------------------------------------------------------------------------------------
LOG_1E8 = math.log(1e-8)  # TRL's lower clamp of vespo's log-weights
_MASK32 = 0xFFFFFFFF


def vespo_weights(
    log_ratio: torch.Tensor, is_weights: torch.Tensor | None, adv: torch.Tensor, batch: TokenBatch, config: LossConfig
) -> torch.Tensor:
    """VESPO's detached gamma weight ``phi_t`` ``[N]`` (TRL 1.16 ``GRPOTrainer.get_gamma_weights``; 0 where not
    taking part): ``log_ratio`` the token log-ratios ``lp - lp_old``, ``is_weights`` the token-level rollout IS
    ratios (their clamped logs join the sequence's sum), ``adv`` the advantages (their sign picks ``(k, lambda)``)."""
    valid = batch.token_ids >= 0
    zero = torch.zeros_like(log_ratio)
    m = batch.mask_weights.to(log_ratio.dtype)
    seq = segment_sum(m * torch.clamp(log_ratio, -20.0, 20.0), batch.cu_seqlens)  # summed, not averaged
    if is_weights is not None:
        log_is = torch.clamp(torch.log(is_weights), LOG_1E8, 20.0)
        seq = seq + segment_sum(torch.where(valid, log_is, zero), batch.cu_seqlens)
    log_w = torch.clamp(seq, LOG_1E8, 20.0)[batch.seq_ids]
    nonneg = adv >= 0
    k = torch.where(nonneg, torch.full_like(zero, config.vespo_k_pos), torch.full_like(zero, config.vespo_k_neg))
    lam = torch.where(
        nonneg, torch.full_like(zero, config.vespo_lambda_pos), torch.full_like(zero, config.vespo_lambda_neg)
    ).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return torch.where(valid, phi, zero)


def geo_mean_terms(
    log_ratio: torch.Tensor, adv: torch.Tensor, is_weights: torch.Tensor | None, batch: TokenBatch, config: LossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """GMPO (verl's ``geo_mean``): ``(L, tau)``, both ``[N]``. ``L_t = L_s = -A_s exp(R_s) w_s`` for every token of
    sequence ``s``, with ``R_s = sum_t sigma_t d~_t`` the mean of the sign-clipped token log-ratios, ``A_s`` the
    sequence's mean advantage and ``w_s`` the geometric mean of its IS weights; ``tau_t = d d~_t / d lp_t``, so that
    ``d L_s / d lp_t = sigma_t tau_t L_s``."""
    valid = batch.token_ids >= 0
    zero = torch.zeros_like(log_ratio)
    sigma = batch.seq_weights.to(log_ratio.dtype)
    lo, hi = -config.epsilon_low, config.epsilon_high
    sgn = torch.sign(adv)
    clipped = torch.clamp(log_ratio, lo, hi)
    passes = ((log_ratio >= lo) & (log_ratio <= hi)).to(log_ratio.dtype)  # clamp's gradient passes at the bounds
    a, b = sgn * log_ratio, sgn * clipped
    d_tilde = sgn * torch.minimum(a, b)  # A > 0: min(d, clip(d)); A < 0: max(d, clip(d)); A = 0: 0
    tau = sgn * _min_grad(a, b, sgn, sgn * passes)
    ratio = torch.exp(segment_sum(sigma * torch.where(valid, d_tilde, zero), batch.cu_seqlens))
    loss_s = -segment_sum(sigma * adv, batch.cu_seqlens) * ratio
    if is_weights is not None:  # verl: the geometric mean of the sequence's token weights, log(w + 1e-10)
        log_w = torch.where(valid, torch.log(is_weights + 1e-10), zero)
        loss_s = loss_s * torch.exp(segment_sum(sigma * log_w, batch.cu_seqlens))
    return loss_s[batch.seq_ids], torch.where(valid, tau, zero)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """An integer mix of ``x`` (int64 holding values in ``[0, 2^32)``) into ``[0, 2^32)``; no product overflows."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def _float_bits(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & _MASK32


def selection_keys(batch: TokenBatch) -> torch.Tensor:
    """``[N]`` int64 keys in ``[0, 2^32)`` that order clip_cov's candidates (the smallest keys are dropped first):
    a hash of the token's rank among the tokens that take part and of the float32 bits of its advantage and old
    log-prob. Deterministic (same batch, same keys, on every backend and layout), varying from batch to batch."""
    valid = batch.token_ids >= 0
    rank = torch.cumsum(valid.to(torch.int64), 0) - 1
    key = _hash32(rank & _MASK32) ^ _hash32(_float_bits(batch.advantages))
    if batch.old_logprobs is not None:
        key = key ^ _hash32(_float_bits(batch.old_logprobs) ^ 0x9E3779B9)
    return _hash32(key)


def _rank(order: torch.Tensor) -> torch.Tensor:
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=order.device)
    return rank


def clip_cov_selection(
    lp: torch.Tensor, adv: torch.Tensor, rho: torch.Tensor, batch: TokenBatch, config: LossConfig
) -> torch.Tensor:
    """``[N]`` bool: the tokens whose clip_cov loss is dropped. Candidates: tokens that take part, are not clipped
    already (``-A clip(rho) > -A rho``) and whose covariance ``(A - <A>)(lp - <lp>)`` lies strictly inside
    ``(clip_cov_lb, clip_cov_ub)``; of those, the ``max(1, floor(clip_cov_ratio sum m))`` with the smallest
    :func:`selection_keys` (verl draws them with an unseeded ``torch.randperm``). ``lp`` is detached."""
    valid = batch.token_ids >= 0
    m = batch.mask_weights.to(lp.dtype)
    total = m.sum()
    count = total.clamp(min=1.0)
    cov = (adv - (m * adv).sum() / count) * (lp - (m * lp).sum() / count)
    lo, hi = 1 - config.epsilon_low, 1 + config.epsilon_high
    clipped = -adv * torch.clamp(rho, lo, hi) > -adv * rho
    candidate = valid & ~clipped & (cov > config.clip_cov_lb) & (cov < config.clip_cov_ub)
    number = torch.floor(config.clip_cov_ratio * total).clamp(min=1.0)
    keys = torch.where(candidate, selection_keys(batch), 1 << 32)
    return candidate & (_rank(torch.sort(keys, stable=True).indices) < number)


def kl_cov_selection(lp: torch.Tensor, adv: torch.Tensor, batch: TokenBatch, config: LossConfig) -> torch.Tensor:
    """``[N]`` bool: the tokens that get kl_cov's penalty, the ``max(1, floor(kl_cov_ratio n))`` of the ``n`` tokens
    that take part with the largest covariance ``(A - mean A)(lp - mean lp)`` (unweighted means over those tokens,
    as verl's); ties go to the earlier token, NaN counts as the largest (as ``torch.topk``). ``lp`` is detached."""
    valid = batch.token_ids >= 0
    zero = torch.zeros_like(lp)
    n = valid.sum().to(lp.dtype)
    count = n.clamp(min=1.0)
    cov = (adv - torch.where(valid, adv, zero).sum() / count) * (lp - torch.where(valid, lp, zero).sum() / count)
    by_cov = torch.sort(cov, descending=True, stable=True).indices
    order = by_cov[torch.sort((~valid[by_cov]).to(torch.uint8), stable=True).indices]  # taking part first
    number = torch.floor(config.kl_cov_ratio * n).clamp(min=1.0)
    return valid & (_rank(order) < number)


# ----------------------------------------------------------------------------------------------------------------
# The fused loss's forward once lp is known
# ----------------------------------------------------------------------------------------------------------------
def loss_forward_from_logprobs(
    lp: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    batch: TokenBatch,
    config: LossConfig,
    exact_kl: torch.Tensor | None = None,
) -> LossForward:
    """The fused loss's forward once ``lp`` is known: loss, ``g_t``, per-token loss, KL and clip flags.

    ``exact_kl`` ``[N]`` (``kl_estimator="exact"``): the exact KL(p||q) of each position, computed from both logits
    rows. It enters ``L_t`` as ``beta K_t`` and adds nothing to ``g_t``: its gradient does not go through ``lp`` but
    straight to the logits (``beta c_t dK/dz``, the divergence backward; docs/math.md section 11)."""
    valid = batch.token_ids >= 0
    zero = torch.zeros_like(lp)
    cast = lambda x: None if x is None else x.to(lp.dtype)  # noqa: E731
    adv, old, ref, w = (
        cast(batch.advantages),
        cast(batch.old_logprobs),
        cast(batch.ref_logprobs),
        cast(batch.is_weights),
    )
    coef = batch.coef.to(lp.dtype)
    sigma = batch.seq_weights.to(lp.dtype)
    kind = config.loss_type

    # lp_old absent: lp_old = stop_grad(lp), so r = lp - lp, which is 0 unless lp is NaN/inf: then NaN, which must
    # reach the loss (a constant 0 here would hide a NaN log-prob behind a plausible loss value).
    token_log_ratio = torch.where(valid, lp - (lp if old is None else old), zero)
    log_ratio = token_log_ratio
    if config.sequence_level:
        log_ratio = segment_sum(sigma * token_log_ratio, batch.cu_seqlens)[batch.seq_ids]
    rho = torch.exp(log_ratio)

    # The policy term P with dP/dr (r the ratio of docs/math.md section 3), dP/dlp|direct, and, for geo_mean, dP/dR_s
    # of its own per-sequence log-ratio R_s (dR_s / dlp_t = sigma_t tau_t).
    selected = None
    d_seq = tau = None
    if kind == "vespo":  # the IS weights enter phi: TRL does not multiply the loss by them again
        phi = vespo_weights(token_log_ratio, w, adv, batch, config)
        p, dp_dr, dp_dlp = -phi * adv * lp, zero, -phi * adv
    elif kind == "geo_mean":  # the IS weights enter the sequence's geometric mean
        p, tau = geo_mean_terms(token_log_ratio, adv, w, batch, config)
        dp_dr, dp_dlp, d_seq = zero, zero, p
    else:
        if kind == "kl_cov":  # -A rho (no clip), + kappa |d| on the selected tokens
            selected = kl_cov_selection(lp.detach(), adv, batch, config)
            kappa = config.ppo_kl_coef
            p = -adv * rho + torch.where(selected, kappa * token_log_ratio.abs(), zero)
            dp_dr = -adv * rho + torch.where(selected, kappa * torch.sign(token_log_ratio), zero)
            dp_dlp = zero
        else:
            p, dp_dr, dp_dlp = policy_and_grads(rho, adv, lp, config)
        if kind == "clip_cov":  # the clip family's loss, dropped (detached) on the selected tokens
            selected = clip_cov_selection(lp.detach(), adv, rho.detach(), batch, config)
            p, dp_dr = torch.where(selected, zero, p), torch.where(selected, zero, dp_dr)
        if w is not None:
            p, dp_dr, dp_dlp = p * w, dp_dr * w, dp_dlp * w
    loss_t, dl_dr, dl_dlp = p, dp_dr, dp_dlp
    kl = zero
    if config.beta != 0.0 and config.exact_kl:
        kl = exact_kl.to(lp.dtype)
        loss_t = loss_t + config.beta * kl
    elif config.beta != 0.0:
        kl, dkl, kl_plus_dkl = kl_and_grad(lp, ref, config.kl_estimator)
        if config.bias_corrected_kl:  # d(K rho)/dlp = K' rho + (K rho) dr/dlp
            if config.sequence_level:  # the (K rho) dr/dlp part goes through the sequence's sum
                dl_dr = dl_dr + config.beta * kl * rho
                dkl = dkl * rho
            else:  # dr/dlp = 1: rho (K + K'), in closed form
                dkl = rho * kl_plus_dkl
            kl = kl * rho
        loss_t = loss_t + config.beta * kl
        dl_dlp = dl_dlp + config.beta * dkl

    if config.sequence_level:
        seq_grad = segment_sum(coef * torch.where(valid, dl_dr, zero), batch.cu_seqlens)
        g = coef * dl_dlp + sigma * seq_grad[batch.seq_ids]
    else:
        g = coef * (dl_dr + dl_dlp)
    if d_seq is not None:
        g = g + sigma * tau * segment_sum(coef * torch.where(valid, d_seq, zero), batch.cu_seqlens)[batch.seq_ids]

    loss_t = torch.where(valid, loss_t, zero)
    g = torch.where(valid, g, zero)
    kl = torch.where(valid, kl, zero) if config.beta != 0.0 else zero
    if kind == "geo_mean":  # the tokens whose log-space clip binds
        low = (token_log_ratio < -config.epsilon_low) & (adv < 0) & valid
        high = (token_log_ratio > config.epsilon_high) & (adv > 0) & valid
    else:
        low = (rho < 1 - config.epsilon_low) & (adv < 0) & valid
        high = (rho > 1 + config.epsilon_high) & (adv > 0) & valid
    flags = low.to(torch.uint8) * CLIP_LOW + high.to(torch.uint8) * CLIP_HIGH
    if selected is not None:
        flags = flags + selected.to(torch.uint8) * COV_SELECTED
    loss = (coef * loss_t).sum()
    return LossForward(loss, lp, lse, entropy, g, loss_t, kl, flags)
