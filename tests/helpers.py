"""Test helpers: random inputs (never zeros), error measures and the low-precision tolerance rule."""

from __future__ import annotations

import math

import torch
from conftest import DEVICE

from grpo_kernels import reference as ref


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf if out has a NaN where ref has none."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(out).any() and not torch.isnan(ref).any():
        return float("inf")
    diff = torch.nan_to_num(out - ref, nan=0.0)  # NaN in both: agreement
    return float(diff.norm() / ref.norm().clamp(min=1e-30))


def low_precision_ok(ours: float, eager: float, floor: float = 1e-6) -> bool:
    """The flash-attn / cut-cross-entropy rule: our error vs float64 within 2x eager's (same dtype) + a floor."""
    return ours <= 2.0 * eager + floor


def make_batch(
    batch: int,
    seq: int,
    vocab: int,
    *,
    dtype=torch.float32,
    seed: int = 0,
    scale: float = 2.0,
    masked_tail: bool = True,
    empty_row: bool = True,
    device=DEVICE,
):
    """Random logits [B, T, V] (scale * randn), ids, a mask with ragged tails (and one empty row), advantages [B],
    and old/ref log-probs near the current policy's (so ratios straddle the clip range)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=g) * scale).to(dtype)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq)
    if masked_tail:
        for b in range(batch):
            mask[b, int(torch.randint(1, seq + 1, (1,), generator=g)) :] = 0
    if empty_row and batch > 1:
        mask[-1] = 0
    adv = torch.randn(batch, generator=g)
    lp = torch.log_softmax(logits.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = (lp + 0.3 * torch.randn(batch, seq, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.3 * torch.randn(batch, seq, generator=g, dtype=torch.float64)).float()
    to = lambda x: x.to(device)  # noqa: E731
    return dict(logits=to(logits), ids=to(ids), mask=to(mask), adv=to(adv), old=to(old), ref=to(ref))


def advantage_amplification(estimator, rewards, group, lengths, eps):
    """What the estimator multiplies a float32 rounding error of the rewards by: B / #nonzero (gpg), 1 / (std_g +
    eps) (grpo, grpo_passk), 1 / sqrt(var + 1e-8) of the whitened values (reinforce_plus_plus_baseline, large when
    the centred rewards barely vary), about 1 for the others."""
    valid = ~torch.isnan(rewards)
    if estimator == "gpg":
        return rewards.numel() / max(int((valid & (rewards != 0)).sum()), 1)
    members = [rewards[(group == g) & valid] for g in group.unique()]
    if estimator in ("grpo", "grpo_passk"):
        return max([1.0] + [1.0 / (float(m.std()) + eps) for m in members if m.numel() > 1])
    if estimator == "reinforce_plus_plus_baseline":
        centred = torch.cat([m - m.mean() for m in members if m.numel() > 1] + [rewards[:0]])
        weights = torch.cat(
            [lengths[(group == g) & valid].double() for g in group.unique() if int(((group == g) & valid).sum()) > 1]
            + [rewards[:0]]
        )
        total = float(weights.sum())
        if total <= 1:
            return 1.0
        mu = float((weights * centred).sum()) / total
        var = float((weights * (centred - mu) ** 2).sum()) / (total - 1)
        return 1.0 / math.sqrt(var + ref.WHITEN_EPS)
    return 1.0


def assert_advantages_close(out, expect, estimator, rewards, group, lengths, eps=1e-4):
    """A float32 ``group_advantages`` result against the float64 reference: rtol 1e-5, atol 1e-5 plus a few ulps of
    the rewards (row totals ``rewards [B]``, groups ``group [B]``) times the estimator's amplification."""
    assert out.dtype == torch.float32 and not torch.isnan(out).any()
    reach = float(torch.nan_to_num(rewards, nan=0.0).abs().max()) if rewards.numel() else 0.0
    atol = 1e-5 + 1e-6 * reach * advantage_amplification(estimator, rewards, group, lengths, eps)
    torch.testing.assert_close(out.cpu().double(), expect, rtol=1e-5, atol=atol)


def vespo_tolerance(lp, old, adv, mask, is_weights, config) -> float:
    """float32 tolerance of vespo's outputs. ``phi = exp(lambda + k l - lambda e^l)`` has relative error
    ``|k - lambda e^l|`` per unit of error in its log-weight ``l`` (a float32 sum of log-ratios, off by ~1e-6): that
    condition, over the tokens whose weight is not negligible (>= 1% of the largest), times 1e-6, and at least 1e-5.
    TRL computes the same function in float32."""
    from grpo_kernels import reference as ref

    valid = mask > 0
    phi = ref.vespo_phi(
        lp - (lp if old is None else old),
        mask,
        adv,
        is_weights,
        valid,
        k_pos=config.vespo_k_pos,
        lambda_pos=config.vespo_lambda_pos,
        k_neg=config.vespo_k_neg,
        lambda_neg=config.vespo_lambda_neg,
    )
    seq = ((lp - (lp if old is None else old)).clamp(-20, 20) * mask).sum(-1, keepdim=True)
    if is_weights is not None:
        seq = seq + torch.where(valid, is_weights.log().clamp(math.log(1e-8), 20), 0.0).sum(-1, keepdim=True)
    log_w = seq.clamp(math.log(1e-8), 20).expand_as(lp)
    nonneg = adv.expand_as(lp) >= 0
    k = torch.where(nonneg, config.vespo_k_pos, config.vespo_k_neg)
    lam = torch.where(nonneg, config.vespo_lambda_pos, config.vespo_lambda_neg)
    condition = (k - lam * log_w.exp()).abs()[valid & (phi >= 0.01 * phi.max())]
    return max(1e-5, 1e-6 * condition.max().item()) if condition.numel() else 1e-5
