"""The executable spec: every number the package computes, in plain PyTorch.

This module is the ground truth every backend (chunked torch, Triton, CUDA) is tested against. It follows
``docs/math.md`` line by line and favours clarity over speed: it materialises the full softmax, uses
autograd for every gradient and loops over sequences in Python where that is the plainest way to say it.

Give it float64 tensors to get a float64 answer (that is how the tests use it); any other floating dtype is
computed in float32, as the kernels do.

Conventions shared with the public API (:mod:`grpo_kernels.api`):

* ``logits`` ``[B, T, V]`` aligned with ``token_ids`` ``[B, T]`` (the caller has already shifted), or packed
  ``[N, V]`` + ``[N]`` with ``cu_seqlens`` ``[S+1]``; packed input without ``cu_seqlens`` is one sequence.
* A position takes part when ``mask != 0`` and ``token_id != ignore_index``. Positions that do not take part are
  ignored entirely: their log-prob and entropy are 0, their gradient row is 0, and whatever the other per-token
  inputs hold there (even NaN) has no effect. A NaN at a position that does take part propagates to the loss.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from .config import (  # noqa: F401 - the choices, re-exported for the tests
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_SCALES,
    DEFAULT_AGGREGATION,
    ESTIMATORS_WITH_LENGTHS,
    IS_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    MULTI_REWARD_MODES,
    SAMPLED_KL_ESTIMATORS,
)

WHITEN_EPS = 1e-8  # reinforce_plus_plus_baseline: (x - mean) / sqrt(var + WHITEN_EPS), verl's masked_whiten


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, float32 for everything else (the accumulation dtype of every kernel)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# 1. Per-token log-probabilities and entropy
# ----------------------------------------------------------------------------------------------------------------
def token_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    compute_in: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lp = u_y - lse`` and ``H = -sum_v p_v log p_v`` with ``u = z / temperature``.

    Args:
        logits: ``[..., V]`` floating point.
        token_ids: ``[...]`` integer, in ``[0, V)`` or ``ignore_index``.
        mask: ``[...]``; positions with ``mask == 0`` do not take part.
        compute_in: compute the softmax in this dtype instead (the outputs are still float32/float64). Only the
            tests use it, to measure the error eager PyTorch makes in low precision (``compute_in=torch.bfloat16``).

    Returns:
        ``(lp, H)``, each ``[...]`` in float32 (float64 for float64 logits), differentiable w.r.t. ``logits``.
        Positions that do not take part hold 0 and get a zero gradient.
    """
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_ids = token_ids.reshape(-1).long()
    valid = flat_ids != ignore_index
    if mask is not None:
        valid = valid & (mask.reshape(-1) != 0)
    bad = valid & ((flat_ids < 0) | (flat_ids >= vocab))
    if bool(bad.any()):
        raise ValueError(f"token_ids must lie in [0, {vocab}) or equal ignore_index={ignore_index}")

    dtype = compute_dtype(logits)
    # Only the rows that take part are computed, so that NaN in an ignored row cannot reach a gradient.
    u = flat_logits[valid].to(compute_in or dtype) / temperature
    logp = torch.log_softmax(u, dim=-1)
    p = logp.exp()
    # 0 * log 0 = 0 for masked-out vocabulary entries (z = -inf): keep -inf out of both value and gradient.
    safe_logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    lp_valid = logp.gather(-1, flat_ids[valid].unsqueeze(-1)).squeeze(-1).to(dtype)
    h_valid = -(p * safe_logp).sum(-1).to(dtype)

    lp = torch.zeros(flat_ids.shape, dtype=dtype, device=logits.device)
    h = torch.zeros(flat_ids.shape, dtype=dtype, device=logits.device)
    lp = lp.index_put((valid.nonzero().squeeze(-1),), lp_valid)
    h = h.index_put((valid.nonzero().squeeze(-1),), h_valid)
    return lp.reshape(token_ids.shape), h.reshape(token_ids.shape)


# ----------------------------------------------------------------------------------------------------------------
# 2. Group-relative advantages
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class GroupAdvantages:
    """Advantages plus the statistics of the groups they came from.

    ``group_mean``/``group_std`` are indexed by group: group ``i`` is rows ``i*G .. i*G+G-1`` for a fixed group
    size, or the ``i``-th smallest distinct value of ``group_ids``.
    """

    advantages: torch.Tensor  # [B]
    group_mean: torch.Tensor  # [num_groups]
    group_std: torch.Tensor  # [num_groups]; NaN where a group has fewer than 2 valid rewards
    frac_zero_std: torch.Tensor  # scalar: fraction of groups whose std is (close to) 0


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std of the non-NaN entries of a 1-D tensor; NaN when fewer than 2 are valid."""
    v = x[~torch.isnan(x)]
    if v.numel() < 2:
        return torch.full((), float("nan"), dtype=x.dtype, device=x.device)
    return torch.sqrt(((v - v.mean()) ** 2).sum() / (v.numel() - 1))


def _nanmean(x: torch.Tensor) -> torch.Tensor:
    v = x[~torch.isnan(x)]
    if v.numel() == 0:
        return torch.full((), float("nan"), dtype=x.dtype, device=x.device)
    return v.mean()


def _group_index(batch: int, group_size: int | None, group_ids: torch.Tensor | None, device) -> torch.Tensor:
    if group_ids is not None:
        return torch.unique(group_ids.reshape(-1), sorted=True, return_inverse=True)[1]
    return torch.arange(batch, device=device) // group_size


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    scale: str | None = None,
    eps: float = 1e-4,
    reward_weights: torch.Tensor | None = None,
    multi_reward: str = "sum_then_normalize",
    estimator: str = "grpo",
    completion_lengths: torch.Tensor | None = None,
) -> GroupAdvantages:
    """Group-relative advantages (docs/math.md section 2; the estimators of docs/math.md section 10), with TRL's NaN
    handling.

    ``rewards`` is ``[B]`` or ``[B, R]`` (R reward functions, weighted by ``reward_weights`` ``[R]``, default 1).
    A NaN reward is excluded from the group statistics and gets advantage 0; a row whose rewards are all NaN is
    unscorable. A group with fewer than 2 valid rewards has no baseline: its members get advantage 0.
    ``estimator`` is one of :data:`ADVANTAGE_ESTIMATORS` (``scale=None``: the estimator's default scale);
    ``completion_lengths`` ``[B]`` (tokens per completion) is read by ``opo`` and ``reinforce_plus_plus_baseline``.
    ``group_mean``/``group_std`` are the plain statistics of the (summed) rewards whatever the estimator.
    """
    if scale is None:
        scale = ADVANTAGE_ESTIMATORS[estimator][0]
    dtype = compute_dtype(rewards)
    r = rewards.to(dtype)
    if r.dim() == 1:
        r = r.unsqueeze(1)
    batch, num_rewards = r.shape
    w = torch.ones(num_rewards, dtype=dtype) if reward_weights is None else reward_weights.to(dtype).cpu()
    w = w.to(r.device)
    group = _group_index(batch, group_size, group_ids, r.device)
    num_groups = int(group.max()) + 1 if batch else 0
    unscorable = torch.isnan(r).all(dim=1)

    def per_group(values: torch.Tensor, fn) -> torch.Tensor:
        return torch.stack([fn(values[group == g]) for g in range(num_groups)]) if num_groups else values[:0]

    if multi_reward == "sum_then_normalize":
        total = torch.where(torch.isnan(r), torch.zeros_like(r), r * w).sum(dim=1)
        total = torch.where(unscorable, torch.full_like(total, float("nan")), total)
        mean = per_group(total, _nanmean)
        std = per_group(total, _nanstd)
        centred = total - mean[group]
        if estimator != "grpo":
            lengths = None if completion_lengths is None else completion_lengths.to(dtype).reshape(-1).to(r.device)
            adv = _estimator_advantages(estimator, total, group, num_groups, scale, eps, lengths)
        elif scale == "group":
            adv = centred / (std[group] + eps)
        elif scale == "batch":
            adv = centred / (_nanstd(total) + eps)
        else:
            adv = centred
    else:  # normalize_then_sum: per reward column per group, weighted sum, then over the whole batch
        normalised = torch.empty_like(r)
        for k in range(num_rewards):
            col = r[:, k]
            mean_k = per_group(col, _nanmean)
            std_k = per_group(col, _nanstd)
            normalised[:, k] = (col - mean_k[group]) / (std_k[group] + eps)
        total = torch.where(torch.isnan(normalised), torch.zeros_like(normalised), normalised * w).sum(dim=1)
        total = torch.where(unscorable, torch.full_like(total, float("nan")), total)
        mean = per_group(total, _nanmean)
        std = per_group(total, _nanstd)
        adv = (total - _nanmean(total)) / (_nanstd(total) + eps)

    adv = torch.nan_to_num(adv, nan=0.0)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    frac_zero_std = zero_std.to(dtype).mean() if num_groups else torch.zeros((), dtype=dtype)
    return GroupAdvantages(adv, mean, std, frac_zero_std)


def _estimator_advantages(estimator, total, group, num_groups, scale, eps, lengths) -> torch.Tensor:
    """The estimators other than grpo on the row totals ``total [B]`` (NaN: unscorable), one group at a time.

    Rows without a baseline (a NaN total, or a group with fewer than 2 valid totals; opo: also a group whose valid
    completions have no tokens) get 0, and reinforce_plus_plus_baseline leaves them out of its whitening.
    """
    batch = total.shape[0]
    adv = torch.zeros_like(total)
    has_baseline = torch.zeros(batch, dtype=torch.bool, device=total.device)
    for g in range(num_groups):
        rows = (group == g).nonzero().squeeze(1)
        rows = rows[~torch.isnan(total[rows])]
        r = total[rows]
        n = r.numel()
        if n < 2:
            continue
        if estimator == "rloo":  # r_i minus the mean of the other n - 1 rewards
            a = r - (r.sum() - r) / (n - 1)
        elif estimator == "grpo_passk":  # only a unique best gets r_max - r_second; a tie at the top gives 0
            top = torch.sort(r, descending=True).values
            a = torch.zeros_like(r)
            if top[0] > top[1]:
                best = top[0] - top[1]
                a[torch.argmax(r)] = best / (_nanstd(r) + eps) if scale == "group" else best
        elif estimator == "opo":  # baseline: the length-weighted mean reward of the group
            w = lengths[rows]
            if w.sum() <= 0:
                continue
            a = r - (w * r).sum() / w.sum()
        else:  # gpg, reinforce_plus_plus_baseline: the group mean, scaled or whitened below
            a = r - r.mean()
        adv[rows] = a
        has_baseline[rows] = True
    if estimator == "gpg":  # alpha = B / (number of valid nonzero rewards in the batch), at least 1 in the count
        nonzero = int(((total != 0) & ~torch.isnan(total)).sum())
        adv = adv * (batch / max(nonzero, 1))
    if estimator == "reinforce_plus_plus_baseline":  # whitened over the batch's tokens: weight = completion length
        x, w = adv[has_baseline], lengths[has_baseline]
        tokens = w.sum()
        if tokens <= 1:
            return torch.zeros_like(adv)
        mu = (w * x).sum() / tokens
        var = (w * (x - mu) ** 2).sum() / (tokens - 1)
        adv[has_baseline] = (x - mu) / torch.sqrt(var + WHITEN_EPS)
    return adv


# ----------------------------------------------------------------------------------------------------------------
# 3-6. Ratio, per-token loss, KL, aggregation
# ----------------------------------------------------------------------------------------------------------------
def kl_divergence(lp: torch.Tensor, lp_ref: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate of the policy to the reference, from ``k = lp_ref - lp`` (docs/math.md section 5)."""
    k = lp_ref - lp
    if estimator == "k3":
        return torch.exp(k) - k - 1
    if estimator == "k1":
        return -k
    if estimator == "k2":
        return 0.5 * k * k
    if estimator == "low_var_kl":
        kc = torch.clamp(k, -20.0, 20.0)
        return torch.clamp(torch.exp(kc) - kc - 1, -10.0, 10.0)
    raise ValueError(f"unknown kl_estimator {estimator!r}")


def policy_loss(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    lp: torch.Tensor,
    *,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
    dual_clip: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
) -> torch.Tensor:
    """Per-token policy loss ``L`` (docs/math.md sections 4 and 9), before IS weights and KL, for the loss types
    whose term is per token (the others are in :func:`grpo_loss`)."""
    if loss_type == "gpg":
        return -advantages * lp
    if loss_type == "cispo":
        return -torch.clamp(ratio, max=epsilon_high).detach() * advantages * lp
    if loss_type == "sapo":
        tau = torch.where(
            advantages > 0,
            torch.full_like(advantages, sapo_temperature_pos),
            torch.full_like(advantages, sapo_temperature_neg),
        )
        return -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1)) * advantages
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    unclipped = torch.clamp(ratio, max=delta) if delta is not None else ratio
    loss = -torch.min(unclipped * advantages, clipped * advantages)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.min(loss, -dual_clip * advantages), loss)
    return loss


# ----------------------------------------------------------------------------------------------------------------
# 9. The losses that couple tokens, on the padded [B, T] layout (m the mask weights, zero where not taking part)
# ----------------------------------------------------------------------------------------------------------------
def vespo_phi(log_ratio, m, advantages, is_weights, valid, *, k_pos, lambda_pos, k_neg, lambda_neg):
    """VESPO's gamma weight ``phi`` ``[B, T]`` (TRL 1.16 ``get_gamma_weights``), detached; 0 where not taking part.
    ``is_weights``: token-level IS ratios (their clamped logs join the sum), or None."""
    with torch.no_grad():
        low = math.log(1e-8)
        seq = (torch.clamp(log_ratio, -20.0, 20.0) * m).sum(-1, keepdim=True)
        if is_weights is not None:
            log_is = torch.clamp(torch.log(is_weights), low, 20.0)
            seq = seq + torch.where(valid, log_is, torch.zeros_like(log_is)).sum(-1, keepdim=True)
        log_w = torch.clamp(seq, low, 20.0)
        nonneg = advantages >= 0
        full = lambda value: torch.full_like(log_ratio, value)  # noqa: E731
        k = torch.where(nonneg, full(k_pos), full(k_neg))
        lam = torch.where(nonneg, full(lambda_pos), full(lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        return torch.where(valid, phi, torch.zeros_like(phi))


def geo_mean_loss(log_ratio, m, advantages, is_weights, valid, *, epsilon_low, epsilon_high):
    """GMPO (verl ``geo_mean``): the per-sequence loss ``-mean(A) exp(mean(d~)) [B, 1]``, ``d~`` the token
    log-ratio clipped to ``[-eps_low, eps_high]`` on the side of the advantage's sign; means weighted by ``m`` over
    ``max(1, n_s)`` (verl: ``n_s + 1e-8``). IS weights: their geometric mean per sequence multiplies the loss."""
    n = m.sum(-1, keepdim=True).clamp(min=1.0)
    sgn = torch.sign(advantages)
    clipped = torch.clamp(log_ratio, -epsilon_low, epsilon_high)
    d_tilde = sgn * torch.min(sgn * log_ratio, sgn * clipped)
    loss = -((advantages * m).sum(-1, keepdim=True) / n) * torch.exp((d_tilde * m).sum(-1, keepdim=True) / n)
    if is_weights is not None:
        log_w = torch.where(valid, torch.log(is_weights + 1e-10), torch.zeros_like(is_weights))
        loss = loss * torch.exp((log_w * m).sum(-1, keepdim=True) / n)
    return loss


def _hash32(x: int) -> int:
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


def _bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]  # float32 bit pattern


def selection_key(rank: int, advantage: float, old_logprob: float | None) -> int:
    """The key that orders clip_cov's candidates (docs/math.md section 9): a hash of the token's rank among the
    tokens that take part and of the float32 bits of its advantage and old log-prob; the smallest keys go first."""
    key = _hash32(rank) ^ _hash32(_bits(advantage))
    if old_logprob is not None:
        key ^= _hash32(_bits(old_logprob) ^ 0x9E3779B9)
    return _hash32(key)


def clip_cov_selected(lp, advantages, ratio, m, valid, old, *, epsilon_low, epsilon_high, ratio_of_tokens, lb, ub):
    """``[B, T]`` bool: the tokens whose clip_cov loss is dropped (no gradient)."""
    with torch.no_grad():
        count = m.sum().clamp(min=1.0)
        cov = (advantages - (advantages * m).sum() / count) * (lp - (lp * m).sum() / count)
        clipped = -advantages * torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) > -advantages * ratio
        candidate = valid & ~clipped & (cov > lb) & (cov < ub)
        flat = [tuple(i) for i in valid.nonzero().tolist()]  # row-major: the rank among tokens that take part
        keys = {
            pos: (selection_key(rank, float(advantages[pos]), None if old is None else float(old[pos])), rank)
            for rank, pos in enumerate(flat)
        }
        chosen = sorted((pos for pos in flat if candidate[pos]), key=keys.__getitem__)
        number = max(1, math.floor(ratio_of_tokens * float(m.sum())))
        selected = torch.zeros_like(valid)
        for pos in chosen[:number]:
            selected[pos] = True
        return selected


def kl_cov_selected(lp, advantages, valid, *, ratio_of_tokens):
    """``[B, T]`` bool: kl_cov's tokens, the largest covariances with unweighted means (NaN first, ties by order)."""
    with torch.no_grad():
        flat = [tuple(i) for i in valid.nonzero().tolist()]
        selected = torch.zeros_like(valid)
        if not flat:
            return selected
        a = torch.stack([advantages[pos] for pos in flat])
        x = torch.stack([lp[pos] for pos in flat])
        cov = ((a - a.mean()) * (x - x.mean())).tolist()
        nan = [math.isnan(c) for c in cov]
        order = sorted(range(len(flat)), key=lambda i: (not nan[i], 0.0 if nan[i] else -cov[i], i))
        for i in order[: max(1, math.floor(len(flat) * ratio_of_tokens))]:
            selected[flat[i]] = True
        return selected


@dataclass
class GRPOLossResult:
    loss: torch.Tensor  # scalar
    logprobs: torch.Tensor  # [B, T] (packed: [N]), differentiable here (the API detaches it)
    entropy: torch.Tensor  # [B, T] (packed: [N])
    per_token_loss: torch.Tensor  # [B, T] (packed: [N]), L after IS weights and KL; 0 where not taking part
    kl_mean: torch.Tensor
    clip_low: torch.Tensor
    clip_high: torch.Tensor
    clip_region: torch.Tensor
    entropy_mean: torch.Tensor
    logprob_mean: torch.Tensor
    phi_mean: torch.Tensor | None = None  # vespo only
    cov_selected: torch.Tensor | None = None  # clip_cov / kl_cov only


def _pad(x: torch.Tensor, cu_seqlens: list[int], fill: float) -> torch.Tensor:
    """Packed ``[N, ...]`` -> padded ``[S, T_max, ...]``, filling the tail of short sequences with ``fill``."""
    lengths = [cu_seqlens[s + 1] - cu_seqlens[s] for s in range(len(cu_seqlens) - 1)]
    out = x.new_full((len(lengths), max(lengths, default=0), *x.shape[1:]), fill)
    for s, n in enumerate(lengths):
        out[s, :n] = x[cu_seqlens[s] : cu_seqlens[s] + n]
    return out


def _unpad(x: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
    """Padded ``[S, T_max]`` -> packed ``[N]``."""
    parts = [x[s, : cu_seqlens[s + 1] - cu_seqlens[s]] for s in range(len(cu_seqlens) - 1)]
    return torch.cat(parts) if parts else x.reshape(0)


def _seq_or_token(x: torch.Tensor, num_seqs: int, cu_seqlens: list[int]) -> torch.Tensor:
    """Packed per-sequence (``[S]``, ``[S, 1]``) or per-token (``[N]``) input -> padded ``[S, 1]`` or ``[S, T]``."""
    if x.numel() == num_seqs and x.dim() <= 2 and (x.dim() < 2 or x.shape[-1] == 1):
        return x.reshape(num_seqs, 1)
    return _pad(x.reshape(-1), cu_seqlens, 0.0)


def grpo_loss(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    dual_clip: float | None = None,
    temperature: float = 1.0,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    kl_estimator: str = "k3",
    bias_corrected_kl: bool = False,
    is_weights: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    aggregation: str | None = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 2e-4,
    ppo_kl_coef: float = 1.0,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
    compute_in: torch.dtype | None = None,
) -> GRPOLossResult:
    """The GRPO loss of docs/math.md sections 1, 3-7 and 9, written the obvious way (full softmax + autograd).

    Padded input: ``logits [B, T, V]``, per-token tensors ``[B, T]``, ``advantages``/``is_weights`` ``[B]``,
    ``[B, 1]`` or ``[B, T]``. Packed input: ``logits [N, V]`` with ``cu_seqlens [S+1]`` (absent: one sequence),
    per-token tensors ``[N]``, ``advantages``/``is_weights`` ``[S]`` or ``[N]``.

    ``kl_estimator="exact"`` takes ``ref_logits`` (the layout of ``logits``) instead of ``ref_logprobs``: the KL
    term is then KL(softmax(logits / tau) || softmax(ref_logits / tau)) over the vocabulary
    (:func:`vocab_divergence`, section 11), differentiable w.r.t. ``logits`` only.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    packed = logits.dim() == 2
    if packed:  # bring everything to the padded layout; the outputs are packed again at the end
        cu = [0, logits.shape[0]] if cu_seqlens is None else [int(c) for c in cu_seqlens.tolist()]
        num_seqs = len(cu) - 1
        logits = _pad(logits, cu, 0.0)
        token_ids = _pad(token_ids.reshape(-1), cu, ignore_index)
        mask = _pad(mask.reshape(-1), cu, 0) if mask is not None else None
        advantages = _seq_or_token(advantages, num_seqs, cu)
        is_weights = _seq_or_token(is_weights, num_seqs, cu) if is_weights is not None else None
        old_logprobs = _pad(old_logprobs.reshape(-1), cu, 0.0) if old_logprobs is not None else None
        ref_logprobs = _pad(ref_logprobs.reshape(-1), cu, 0.0) if ref_logprobs is not None else None
        ref_logits = _pad(ref_logits, cu, 0.0) if ref_logits is not None else None

    lp, entropy = token_logprobs(
        logits, token_ids, temperature=temperature, mask=mask, ignore_index=ignore_index, compute_in=compute_in
    )
    dtype = lp.dtype
    valid = token_ids != ignore_index
    if mask is not None:
        valid = valid & (mask != 0)
    m = torch.where(valid, mask.to(dtype) if mask is not None else torch.ones_like(lp), torch.zeros_like(lp))

    def per_token(x: torch.Tensor | None) -> torch.Tensor | None:
        """``[B]``, ``[B, 1]`` or ``[B, T]`` -> ``[B, T]``, zero where not taking part (NaN there has no effect)."""
        if x is None:
            return None
        x = x.to(dtype)
        x = (x.unsqueeze(1) if x.dim() == 1 else x).expand_as(lp)
        return torch.where(valid, x, torch.zeros_like(x))

    adv, old, ref, w_is = (per_token(x) for x in (advantages, old_logprobs, ref_logprobs, is_weights))

    # 3. Importance ratio. lp_old absent => stop_grad(lp): ratio 1 with the gradient kept.
    token_log_ratio = lp - (old if old is not None else lp.detach())
    log_ratio = token_log_ratio
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(log_ratio)

    # 4 and 9. Per-token policy loss, then IS weights (except vespo, geo_mean: inside their weight), then KL.
    phi = selected = None
    if loss_type == "vespo":
        phi = vespo_phi(
            token_log_ratio,
            m,
            adv,
            w_is,
            valid,
            k_pos=vespo_k_pos,
            lambda_pos=vespo_lambda_pos,
            k_neg=vespo_k_neg,
            lambda_neg=vespo_lambda_neg,
        )
        per_token_loss = -phi * adv * lp
    elif loss_type == "geo_mean":
        per_token_loss = geo_mean_loss(
            token_log_ratio, m, adv, w_is, valid, epsilon_low=epsilon_low, epsilon_high=epsilon_high
        ).expand_as(lp)
    else:
        if loss_type == "kl_cov":
            selected = kl_cov_selected(lp, adv, valid, ratio_of_tokens=kl_cov_ratio)
            penalty = ppo_kl_coef * token_log_ratio.abs()
            per_token_loss = -adv * ratio + torch.where(selected, penalty, torch.zeros_like(penalty))
        else:
            per_token_loss = policy_loss(
                ratio,
                adv,
                lp,
                loss_type=loss_type,
                epsilon_low=epsilon_low,
                epsilon_high=epsilon_high,
                delta=delta,
                dual_clip=dual_clip,
                sapo_temperature_pos=sapo_temperature_pos,
                sapo_temperature_neg=sapo_temperature_neg,
            )
        if loss_type == "clip_cov":
            selected = clip_cov_selected(
                lp,
                adv,
                ratio,
                m,
                valid,
                old,
                epsilon_low=epsilon_low,
                epsilon_high=epsilon_high,
                ratio_of_tokens=clip_cov_ratio,
                lb=clip_cov_lb,
                ub=clip_cov_ub,
            )
            per_token_loss = torch.where(selected, torch.zeros_like(per_token_loss), per_token_loss)
        if w_is is not None:
            per_token_loss = per_token_loss * w_is
    kl = torch.zeros_like(lp)
    if beta != 0.0 and kl_estimator == "exact":  # section 11: over the vocabulary, at the rows that take part
        kl_valid = vocab_divergence(
            logits[valid],
            ref_logits[valid].detach(),
            divergence="reverse_kl",
            temperature=temperature,
            compute_in=compute_in,
        ).to(dtype)
        kl = kl.masked_scatter(valid, kl_valid)
        per_token_loss = per_token_loss + beta * kl
    elif beta != 0.0:
        kl = kl_divergence(lp, ref, kl_estimator)
        if bias_corrected_kl:
            kl = kl * ratio
        per_token_loss = per_token_loss + beta * kl
    per_token_loss = torch.where(valid, per_token_loss, torch.zeros_like(per_token_loss))

    # 6. Aggregation (the loss type's own, unless `aggregation` names another).
    num_seqs = m.shape[0]
    weighted = per_token_loss * m
    mode = aggregation or DEFAULT_AGGREGATION[loss_type]
    if mode == "grpo":
        loss = (weighted.sum(-1) / m.sum(-1).clamp(min=1.0)).mean() if num_seqs else weighted.sum()
    elif mode == "bnpo":
        loss = weighted.sum() / m.sum().clamp(min=1.0)
    elif mode == "dr_grpo":
        loss = weighted.sum() / (num_seqs * max_completion_length)
    elif mode == "dapo":
        items = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=dtype)
        loss = weighted.sum() / items.clamp(min=1.0)
    else:
        raise ValueError(f"unknown aggregation {mode!r}")

    # 7. Metrics: masked token means, no gradient.
    with torch.no_grad():
        count = m.sum().clamp(min=1.0)

        def masked_mean(x: torch.Tensor) -> torch.Tensor:
            return (x.expand_as(m) * m).sum() / count

        if loss_type == "geo_mean":  # its clip is in log space, per token
            low = ((token_log_ratio < -epsilon_low) & (adv < 0)).to(dtype)
            high = ((token_log_ratio > epsilon_high) & (adv > 0)).to(dtype)
        else:
            low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(dtype)
            high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(dtype)
        metrics = dict(
            kl_mean=masked_mean(kl),
            clip_low=masked_mean(low),
            clip_high=masked_mean(high),
            clip_region=masked_mean(torch.maximum(low, high)),
            entropy_mean=masked_mean(entropy),
            logprob_mean=masked_mean(lp),
            phi_mean=masked_mean(phi) if phi is not None else None,
            cov_selected=masked_mean(selected.to(dtype)) if selected is not None else None,
        )

    if packed:
        lp, entropy, per_token_loss = (_unpad(x, cu) for x in (lp, entropy, per_token_loss))
    return GRPOLossResult(loss=loss, logprobs=lp, entropy=entropy, per_token_loss=per_token_loss, **metrics)


def gradient_of_loss_wrt_logprobs(loss: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """``g_t = d loss / d lp_t`` (docs/math.md section 8): what a fused kernel computes per token."""
    (g,) = torch.autograd.grad(loss, lp, retain_graph=True)
    return g


__all__ = [
    "ADVANTAGE_SCALES",
    "GRPOLossResult",
    "GroupAdvantages",
    "IS_LEVELS",
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "MULTI_REWARD_MODES",
    "SAMPLED_KL_ESTIMATORS",
    "compute_dtype",
    "gradient_of_loss_wrt_logprobs",
    "group_advantages",
    "grpo_loss",
    "clip_cov_selected",
    "geo_mean_loss",
    "kl_cov_selected",
    "kl_divergence",
    "policy_loss",
    "selection_key",
    "vespo_phi",
    "token_logprobs",
]


# ================================================================================================================
# 11. Exact divergences over the vocabulary (distillation; the exact KL to the reference policy)
# ================================================================================================================
# Appended as its own section: nothing above depends on it. p = softmax(student / tau) (the policy), q =
# softmax(teacher / tau) (the reference / teacher), at every position. Conventions at -inf logits (masked
# vocabulary): a_v = 0 exactly where its logit is -inf, the term a_v log(a_v / b_v) is 0 there, and +inf where
# a_v > 0 and b_v = 0. So KL(a||b) = +inf when b has a -inf logit where a has a finite one.
DIVERGENCES = ("jsd", "reverse_kl", "forward_kl")


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``a_v (log a_v - log b_v)`` with the conventions above, differentiable wherever it is finite.

    Both branches of each ``where`` are kept finite (the double-where idiom), so that no NaN reaches a gradient
    through the branch that is not taken.
    """
    a_pos = log_a > -math.inf
    b_zero = log_b == -math.inf
    zero = torch.zeros_like(log_a)
    safe_a = torch.where(a_pos, log_a, zero)
    safe_b = torch.where(b_zero, zero, log_b)
    terms = torch.where(a_pos, safe_a.exp() * (safe_a - safe_b), zero)
    return torch.where(a_pos & b_zero, torch.full_like(terms, math.inf), terms)


def _mixture_log(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """``log m = log(beta q + (1 - beta) p)`` for 0 < beta < 1; -inf where both p and q are 0."""
    both_zero = (logp == -math.inf) & (logq == -math.inf)
    zero = torch.zeros_like(logp)
    mixed = torch.logaddexp(
        torch.where(both_zero, zero, logp) + math.log1p(-beta), torch.where(both_zero, zero, logq) + math.log(beta)
    )
    return torch.where(both_zero, torch.full_like(mixed, -math.inf), mixed)


def vocab_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    compute_in: torch.dtype | None = None,
) -> torch.Tensor:
    """The exact per-position divergence between ``p = softmax(student / tau)`` and ``q = softmax(teacher / tau)``.

    ``reverse_kl``: KL(p||q) = sum_v p_v (log p_v - log q_v). ``forward_kl``: KL(q||p). ``jsd``: TRL's
    ``generalized_jsd_loss`` (GKD), beta weighting the teacher: m = beta q + (1 - beta) p,
    JSD = beta KL(q||m) + (1 - beta) KL(p||m); at beta = 0 exactly it is KL(q||p) and at beta = 1 exactly KL(p||q)
    (TRL's special cases; the limits of the formula there are 0).

    Args:
        student_logits, teacher_logits: ``[..., V]``, the same shape, any floating dtypes.
        compute_in: compute in this dtype (only for measuring eager PyTorch's low-precision error in the tests).

    Returns:
        ``[...]`` float64 when either input is float64, else float32; differentiable w.r.t. both inputs.
    """
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    work = compute_in or dtype
    logp = torch.log_softmax(student_logits.to(work) / temperature, dim=-1)
    logq = torch.log_softmax(teacher_logits.to(work) / temperature, dim=-1)
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "reverse_kl":
        terms = _kl_terms(logp, logq)
    elif divergence == "forward_kl":
        terms = _kl_terms(logq, logp)
    elif divergence == "jsd":
        logm = _mixture_log(logp, logq, beta)
        terms = beta * _kl_terms(logq, logm) + (1.0 - beta) * _kl_terms(logp, logm)
    else:
        raise ValueError(f"divergence must be one of {list(DIVERGENCES)}, got {divergence!r}")
    return terms.sum(-1).to(dtype)


@dataclass
class DistillResult:
    loss: torch.Tensor  # []
    divergence: torch.Tensor  # [B, T] (packed: [N]), 0 where not taking part
    logprobs: torch.Tensor | None  # [B, T] student log-probs of token_ids, 0 where not taking part


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    token_ids: torch.Tensor | None = None,
    *,
    divergence: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    compute_in: torch.dtype | None = None,
) -> DistillResult:
    """The distillation loss: the per-position divergence, masked, reduced as TRL's ``generalized_jsd_loss``.

    A position takes part when ``mask != 0`` and ``token_id != ignore_index`` (TRL's ``labels != -100``). With
    weights ``m_t`` (the mask value where the position takes part, else 0):
    ``loss = sum_t m_t D_t / max(1, sum_t m_t)`` (TRL's ``reduction="batchmean"`` with labels), or
    ``sum_t m_t D_t / num_items_in_batch`` when that is given (TRL's gradient-accumulation form, no clamp).
    ``logprobs`` are the student's ``log p(token_id)`` at temperature ``tau`` (None without ``token_ids``).
    """
    shape = student_logits.shape[:-1]
    valid = torch.ones(shape, dtype=torch.bool, device=student_logits.device)
    if token_ids is not None:
        valid = valid & (token_ids != ignore_index)
    if mask is not None:
        valid = valid & (mask != 0)
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    # Only the rows that take part are computed: NaN in an ignored row cannot reach the loss or a gradient.
    div_valid = vocab_divergence(
        student_logits[valid],
        teacher_logits[valid],
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        compute_in=compute_in,
    )
    div = torch.zeros(shape, dtype=dtype, device=student_logits.device).masked_scatter(valid, div_valid)
    weights = torch.where(valid, mask.to(dtype) if mask is not None else torch.ones((), dtype=dtype), 0.0)
    total = (div * weights).sum()
    if num_items_in_batch is not None:
        loss = total / torch.as_tensor(num_items_in_batch, dtype=dtype)
    else:
        loss = total / weights.sum().clamp(min=1.0)
    lp = None
    if token_ids is not None:
        logp = torch.log_softmax(student_logits[valid].to(compute_in or dtype) / temperature, dim=-1)
        lp_valid = logp.gather(-1, token_ids[valid].long().unsqueeze(-1)).squeeze(-1).to(dtype)
        lp = torch.zeros(shape, dtype=dtype, device=student_logits.device).masked_scatter(valid, lp_valid)
    return DistillResult(loss=loss, divergence=div, logprobs=lp)


__all__ += ["DIVERGENCES", "DistillResult", "distill_loss", "vocab_divergence"]
