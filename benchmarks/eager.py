"""The eager baselines every benchmark compares against: what TRL's GRPOTrainer computed before fused kernels.

``log_softmax`` over the whole vocabulary in the logits' dtype, ``gather`` of the targets, the per-token loss in
float32 and autograd for the gradient. It materialises the log-softmax (N x V) in the forward and the gradient of
the gather plus the log-softmax's gradient (2 x N x V) in the backward.

The pieces are separate so that a baseline kernel that only computes log-probs (TRL's) can be followed by the same
eager loss: :func:`eager_logprobs`, :func:`eager_loss_from_logprobs`, and both together in :func:`eager_grpo_loss`.
:func:`eager_group_advantages` is TRL's grouped z-score (``view(-1, G)``, mean, std, ``repeat_interleave``).
"""

from __future__ import annotations

import torch

from grpo_kernels import reference as ref


def eager_logprobs(
    logits: torch.Tensor,  # [B, T, V]
    token_ids: torch.Tensor,  # [B, T]
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(lp, entropy or None)``, each ``[B, T]`` float32, through a full ``log_softmax`` in the logits' dtype."""
    logp = (logits / temperature if temperature != 1.0 else logits).log_softmax(-1)
    lp = logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1).float()
    entropy = -(logp.exp() * logp).sum(-1).float() if return_entropy else None
    return lp, entropy


def eager_loss_from_logprobs(
    lp: torch.Tensor,  # [B, T] float32
    advantages: torch.Tensor,  # [B]
    *,
    mask: torch.Tensor,  # [B, T]
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
) -> torch.Tensor:
    """The GRPO loss (scalar) from per-token log-probs: ratio, clip, KL and aggregation, as TRL writes it."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    old = lp.detach() if old_logprobs is None else old_logprobs
    log_ratio = lp - old
    m = mask.float()
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(log_ratio)
    per_token = ref.policy_loss(
        ratio, advantages.unsqueeze(1), lp, loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high
    )
    if beta != 0.0:
        per_token = per_token + beta * ref.kl_divergence(lp, ref_logprobs, "k3")
    if loss_type in ("grpo", "sapo"):
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    return (per_token * m).sum() / m.sum().clamp(min=1.0)  # bnpo, dapo, cispo (num_items_in_batch = sum m)


def eager_grpo_loss(
    logits: torch.Tensor,  # [B, T, V]
    token_ids: torch.Tensor,  # [B, T]
    advantages: torch.Tensor,  # [B]
    *,
    mask: torch.Tensor,  # [B, T]
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    temperature: float = 1.0,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns ``(loss, per_token_logps, entropy or None)``."""
    lp, entropy = eager_logprobs(logits, token_ids, temperature=temperature, return_entropy=return_entropy)
    loss = eager_loss_from_logprobs(
        lp,
        advantages,
        mask=mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
    )
    return loss, lp, entropy


def eager_group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """``(r - mean_g) / (std_g + eps)`` for ``[B]`` rewards in groups of ``group_size`` consecutive rows."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size, dim=0)
    std = grouped.std(dim=1).repeat_interleave(group_size, dim=0)
    return (rewards - mean) / (std + eps)


def eager_distill_loss(
    student_logits: torch.Tensor,  # [B, T, V]
    teacher_logits: torch.Tensor,  # [B, T, V]
    labels: torch.Tensor,  # [B, T], -100 where masked
    *,
    divergence: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """TRL 1.16's ``GKDTrainer.generalized_jsd_loss`` (``reduction="batchmean"``) as written there: two
    ``log_softmax`` over the whole vocabulary in the logits' dtype, ``F.kl_div`` element-wise, a masked sum over the
    count. ``reverse_kl`` / ``forward_kl`` are its beta = 1 / beta = 0 branches."""
    import torch.nn.functional as F

    if divergence != "jsd":
        beta = 1.0 if divergence == "reverse_kl" else 0.0
    logp = F.log_softmax(student_logits / temperature, dim=-1)
    logq = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(logp, logq, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(logq, logp, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=logp.dtype, device=logp.device)
        log_m = torch.logsumexp(torch.stack([logp + torch.log1p(-b), logq + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(log_m, logq, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            log_m, logp, reduction="none", log_target=True
        )
    mask = labels != -100
    return jsd[mask].sum() / mask.sum().clamp_min(1)


def eager_grpo_loss_exact_kl(
    logits: torch.Tensor,  # [B, T, V]
    ref_logits: torch.Tensor,  # [B, T, V]
    token_ids: torch.Tensor,  # [B, T]
    advantages: torch.Tensor,  # [B]
    *,
    mask: torch.Tensor,  # [B, T]
    old_logprobs: torch.Tensor,
    beta: float,
    epsilon_low: float = 0.2,
    importance_sampling_level: str = "token",
) -> torch.Tensor:
    """The dapo GRPO loss with the exact KL(p||q) over the vocabulary as its KL term, written the eager way: two
    ``log_softmax`` over the whole vocabulary in the logits' dtype, ``F.kl_div`` element-wise (``sum_v p (log p -
    log q)``), the policy term from the gathered log-probs, a masked mean of both (dapo's aggregation is linear, so
    the KL's masked mean adds to the policy's)."""
    import torch.nn.functional as F

    logp = F.log_softmax(logits, dim=-1)
    logq = F.log_softmax(ref_logits, dim=-1)
    kl = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1).float()  # [B, T]
    lp = logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1).float()
    policy = eager_loss_from_logprobs(
        lp,
        advantages,
        mask=mask,
        old_logprobs=old_logprobs,
        epsilon_low=epsilon_low,
        importance_sampling_level=importance_sampling_level,
    )
    m = mask.float()
    return policy + beta * (kl * m).sum() / m.sum().clamp(min=1.0)
