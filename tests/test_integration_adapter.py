"""The batch-dict adapter: logits layouts, the common batch layout, and verl's loss_agg_mode names.

verl's aggregation is written out here as verl's ``core_algos.agg_loss`` computes it (its masked means add 1e-8 to
the denominator; that term is left out, so the comparison can be float64-tight), with verl's dual-clip PPO policy
loss and low_var_kl KL term, and compared in float64 with the adapter's loss and gradient.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from grpo_kernels import grpo_loss, reference
from grpo_kernels.integrations.adapter import VERL_LOSS_AGG_MODES, completion_logits, grpo_loss_from_batch

B, P, T, V = 4, 3, 6, 11


def make_batch(seed=0, dtype=torch.float64):
    """Full-sequence logits [B, P + T, V] (position j predicts token j + 1) and a batch in the common layout."""
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, P + T, V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    input_ids = torch.randint(0, V, (B, P + T), generator=g)
    mask = torch.ones(B, T)
    for b, length in enumerate([T, 2, 4, 5]):
        mask[b, length:] = 0
    aligned = logits.detach()[:, P - 1 : -1]
    lp = torch.log_softmax(aligned.double(), -1).gather(-1, input_ids[:, P:].unsqueeze(-1)).squeeze(-1)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0]).unsqueeze(1)
    batch = dict(
        input_ids=input_ids,
        completion_mask=mask,
        advantages=torch.rand(B, generator=g, dtype=torch.float64) * sign.squeeze(1),
        old_logprobs=lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64) - 0.3 * sign,
        ref_logprobs=lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
    )
    return logits, batch


def verl_loss(logits, batch, loss_agg_mode, *, clip_low, clip_high, clip_c, kl_coef):
    """verl's actor loss: dual-clip PPO policy loss + kl_coef * low_var_kl, each aggregated by ``agg_loss``."""
    ids, mask = batch["input_ids"][:, -T:], batch["completion_mask"]
    lp = torch.log_softmax(logits[:, -T - 1 : -1], -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    adv = batch["advantages"].unsqueeze(1)
    ratio = torch.exp(torch.clamp(lp - batch["old_logprobs"], -20.0, 20.0))
    clipped = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    pg = torch.where(adv < 0, torch.minimum(-adv * clip_c, clipped), clipped)
    k = torch.clamp(batch["ref_logprobs"] - lp, -20.0, 20.0)
    kl = torch.clamp(torch.exp(k) - k - 1, -10.0, 10.0)

    def agg(x):
        if loss_agg_mode == "token-mean":
            return (x * mask).sum() / mask.sum()
        if loss_agg_mode == "seq-mean-token-mean":
            return ((x * mask).sum(-1) / mask.sum(-1)).mean()
        if loss_agg_mode == "seq-mean-token-sum":
            return (x * mask).sum(-1).mean()
        return (x * mask).sum(-1).sum() / mask.shape[-1]  # seq-mean-token-sum-norm

    return agg(pg) + kl_coef * agg(kl)


@pytest.mark.parametrize("loss_agg_mode", VERL_LOSS_AGG_MODES)
def test_verl_loss_agg_modes(loss_agg_mode):
    logits, batch = make_batch()
    expected = verl_loss(logits, batch, loss_agg_mode, clip_low=0.2, clip_high=0.28, clip_c=3.0, kl_coef=0.01)
    (grad_expected,) = torch.autograd.grad(expected, logits)
    out = grpo_loss_from_batch(
        SimpleNamespace(logits=logits),
        batch,
        loss_agg_mode=loss_agg_mode,
        beta=0.01,
        kl_estimator="low_var_kl",
        epsilon_low=0.2,
        epsilon_high=0.28,
        dual_clip=3.0,
        backend="torch",
    )
    (grad,) = torch.autograd.grad(out.loss, logits)
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-9, atol=1e-12)
    assert out.clip_region > 0  # the inputs exercise the clipping


@pytest.mark.parametrize("loss_agg_mode", ["seq-mean-token-mean", "token-mean"])
def test_verl_gspo_is_the_sequence_level_ratio(loss_agg_mode):
    """verl's GSPO token ratio sg[s_i] * pi_t / sg[pi_t] has the value and, since every aggregation weighs the
    tokens of a sequence alike, the gradient of our sequence-level ratio."""
    logits, batch = make_batch(seed=3)
    ids, mask = batch["input_ids"][:, -T:], batch["completion_mask"]
    lp = torch.log_softmax(logits[:, -T - 1 : -1], -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    log_ratio = lp - batch["old_logprobs"]
    seq = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    s = torch.exp(torch.clamp(lp - lp.detach() + seq.detach().unsqueeze(-1), max=10.0))
    adv = batch["advantages"].unsqueeze(1)
    pg = torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - 3e-3, 1 + 4e-3))
    if loss_agg_mode == "token-mean":
        expected = (pg * mask).sum() / mask.sum()
    else:
        expected = ((pg * mask).sum(-1) / mask.sum(-1)).mean()
    (grad_expected,) = torch.autograd.grad(expected, logits)
    out = grpo_loss_from_batch(
        logits,
        batch,
        loss_agg_mode=loss_agg_mode,
        importance_sampling_level="sequence",
        epsilon_low=3e-3,
        epsilon_high=4e-3,
        backend="torch",
    )
    (grad,) = torch.autograd.grad(out.loss, logits)
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-9, atol=1e-12)
    assert out.clip_region > 0


def test_full_and_aligned_logits_agree_with_the_reference():
    """L' > T: the model's logits over the whole sequence; L' == T: already aligned. Same loss, same gradient, as
    reference.grpo_loss on the aligned slice; the adapter hands the op a view, never a copy."""
    logits, batch = make_batch(seed=1)
    aligned = logits.detach()[:, P - 1 : -1].clone().requires_grad_()
    config = dict(loss_type="dapo", beta=0.04, epsilon_high=0.28, return_entropy=True, backend="torch")
    full_out = grpo_loss_from_batch(logits, batch, **config)
    aligned_out = grpo_loss_from_batch(aligned, {**batch, "completion_ids": batch["input_ids"][:, P:]}, **config)
    ref = reference.grpo_loss(
        logits.detach()[:, P - 1 : -1].clone().requires_grad_(),
        batch["input_ids"][:, P:],
        batch["advantages"],
        mask=batch["completion_mask"],
        old_logprobs=batch["old_logprobs"],
        ref_logprobs=batch["ref_logprobs"],
        beta=0.04,
        epsilon_high=0.28,
        loss_type="dapo",
    )
    for out in (full_out, aligned_out):
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.entropy_mean, ref.entropy_mean, rtol=1e-10, atol=1e-12)
    (g_full,) = torch.autograd.grad(full_out.loss, logits)
    (g_aligned,) = torch.autograd.grad(aligned_out.loss, aligned)
    torch.testing.assert_close(g_full[:, P - 1 : -1], g_aligned, rtol=1e-10, atol=1e-12)
    assert g_full[:, : P - 1].abs().max() == 0 and g_full[:, -1].abs().max() == 0

    view = completion_logits(logits, T)
    assert view.data_ptr() == logits[:, P - 1].data_ptr() and view._base is logits
    assert completion_logits(aligned, T) is aligned


def test_dapo_num_items_in_batch_and_is_weights_come_from_the_batch():
    logits, batch = make_batch(seed=2, dtype=torch.float32)
    batch = {**batch, "num_items_in_batch": torch.tensor(40.0), "is_weights": torch.rand(B, T) + 0.5}
    ids = batch["input_ids"][:, P:]
    out = grpo_loss_from_batch(logits, batch, loss_type="dapo", beta=0.04)
    direct = grpo_loss(
        logits[:, P - 1 : -1],
        ids,
        batch["advantages"].float(),
        mask=batch["completion_mask"],
        old_logprobs=batch["old_logprobs"].float(),
        ref_logprobs=batch["ref_logprobs"].float(),
        beta=0.04,
        loss_type="dapo",
        num_items_in_batch=40.0,
        is_weights=batch["is_weights"],
    )
    torch.testing.assert_close(out.loss, direct.loss, rtol=0, atol=0)
    without = grpo_loss_from_batch(logits, {k: v for k, v in batch.items() if k != "is_weights"}, loss_type="dapo")
    assert not torch.allclose(out.loss, without.loss)


def test_errors():
    logits, batch = make_batch()
    with pytest.raises(ValueError, match="either loss_agg_mode"):
        grpo_loss_from_batch(logits, batch, loss_agg_mode="token-mean", loss_type="grpo")
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        grpo_loss_from_batch(logits, batch, loss_agg_mode="token-sum")
    with pytest.raises(ValueError, match="logits_to_keep >= 7"):
        grpo_loss_from_batch(logits[:, :4], batch)
    with pytest.raises(KeyError, match="completion_ids"):
        grpo_loss_from_batch(logits, {k: v for k, v in batch.items() if k != "input_ids"})


def test_loss_mode_errors_and_mapping():
    """verl's loss_mode: unknown names and a second loss_type are refused; loss_agg_mode picks the aggregation of
    gpg / clip_cov / kl_cov (not geo_mean's); "vanilla" without loss_agg_mode is verl's default token-mean (bnpo).
    (The values against verl's own formulas: tests/test_policy_losses.py.)"""
    logits, batch = make_batch()
    with pytest.raises(ValueError, match="loss_mode must be one of"):
        grpo_loss_from_batch(logits, batch, loss_mode="gspo")
    with pytest.raises(ValueError, match="either loss_mode"):
        grpo_loss_from_batch(logits, batch, loss_mode="gpg", loss_type="grpo")
    with pytest.raises(ValueError, match="either loss_agg_mode .* or aggregation"):
        grpo_loss_from_batch(logits, batch, loss_mode="gpg", loss_agg_mode="token-mean", aggregation="grpo")
    kw = dict(backend="torch")
    same = lambda a, b: torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)  # noqa: E731
    same(
        grpo_loss_from_batch(logits, batch, loss_mode="vanilla", **kw),
        grpo_loss_from_batch(logits, batch, loss_type="bnpo", **kw),
    )
    same(
        grpo_loss_from_batch(logits, batch, loss_mode="gpg", loss_agg_mode="seq-mean-token-mean", **kw),
        grpo_loss_from_batch(logits, batch, loss_type="gpg", aggregation="grpo", **kw),
    )
    same(
        grpo_loss_from_batch(logits, batch, loss_mode="geo_mean", loss_agg_mode="seq-mean-token-sum-norm", **kw),
        grpo_loss_from_batch(logits, batch, loss_type="geo_mean", **kw),
    )
    by_tokens = grpo_loss_from_batch(logits, batch, loss_mode="kl_cov", loss_agg_mode="token-mean", **kw)
    by_sequences = grpo_loss_from_batch(logits, batch, loss_mode="kl_cov", loss_agg_mode="seq-mean-token-mean", **kw)
    assert not torch.allclose(by_tokens.loss, by_sequences.loss)  # the ragged mask makes the two differ
