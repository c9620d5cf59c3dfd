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

from typing import NamedTuple

import torch

from .config import LossConfig

CLIP_LOW = 1  # bit of LossForward.clip_flags: rho < 1 - eps_low and A < 0
CLIP_HIGH = 2  # bit of LossForward.clip_flags: rho > 1 + eps_high and A > 0


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
    """``c_t`` of ``loss_type``: ``m`` ``[N]`` the mask weight of each token (0 where it does not take part),
    ``seq_weights`` ``[N]`` its weight in its sequence's mean (``m_t / max(1, n_s)``), ``num_seqs`` ``S``."""
    if config.loss_type in ("grpo", "sapo"):
        return seq_weights / max(num_seqs, 1)
    if config.loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if config.loss_type == "dr_grpo":
        return m / (max(num_seqs, 1) * config.max_completion_length)
    # dapo, cispo
    items = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=m.dtype, device=m.device)
    return m / items.reshape(()).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Per-token pieces with their derivatives
# ----------------------------------------------------------------------------------------------------------------
def kl_and_grad(
    lp: torch.Tensor, ref: torch.Tensor, estimator: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    if config.loss_type == "cispo":
        capped = torch.clamp(rho, max=config.epsilon_high)  # stop-gradient: no dP/dr
        return -capped * adv * lp, zero, -capped * adv
    if config.loss_type == "sapo":
        tau = torch.where(
            adv > 0, torch.full_like(rho, config.sapo_temperature_pos), torch.full_like(rho, config.sapo_temperature_neg)
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


def loss_forward_from_logprobs(
    lp: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, batch: TokenBatch, config: LossConfig
) -> LossForward:
    """The fused loss's forward once ``lp`` is known: loss, ``g_t``, per-token loss, KL and clip flags."""
    valid = batch.token_ids >= 0
    zero = torch.zeros_like(lp)
    cast = lambda x: None if x is None else x.to(lp.dtype)  # noqa: E731
    adv, old, ref, w = cast(batch.advantages), cast(batch.old_logprobs), cast(batch.ref_logprobs), cast(batch.is_weights)
    coef = batch.coef.to(lp.dtype)

    # lp_old absent: lp_old = stop_grad(lp), so r = lp - lp, which is 0 unless lp is NaN/inf: then NaN, which must
    # reach the loss (a constant 0 here would hide a NaN log-prob behind a plausible loss value).
    log_ratio = torch.where(valid, lp - (lp if old is None else old), zero)
    if config.sequence_level:
        seq_log_ratio = segment_sum(batch.seq_weights.to(lp.dtype) * log_ratio, batch.cu_seqlens)
        log_ratio = seq_log_ratio[batch.seq_ids]
    rho = torch.exp(log_ratio)

    p, dp_dr, dp_dlp = policy_and_grads(rho, adv, lp, config)
    if w is not None:
        p, dp_dr, dp_dlp = p * w, dp_dr * w, dp_dlp * w
    loss_t, dl_dr, dl_dlp = p, dp_dr, dp_dlp
    kl = zero
    if config.beta != 0.0:
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
        g = coef * dl_dlp + batch.seq_weights.to(lp.dtype) * seq_grad[batch.seq_ids]
    else:
        g = coef * (dl_dr + dl_dlp)

    loss_t = torch.where(valid, loss_t, zero)
    g = torch.where(valid, g, zero)
    kl = torch.where(valid, kl, zero) if config.beta != 0.0 else zero
    low = (rho < 1 - config.epsilon_low) & (adv < 0) & valid
    high = (rho > 1 + config.epsilon_high) & (adv > 0) & valid
    flags = low.to(torch.uint8) * CLIP_LOW + high.to(torch.uint8) * CLIP_HIGH
    loss = (coef * loss_t).sum()
    return LossForward(loss, lp, lse, entropy, g, loss_t, kl, flags)
