"""torch.library custom ops: the one place where autograd and ``torch.compile`` meet the backends.

Every op takes the backend's name as its last argument and forwards to that backend's method, so Triton, CUDA
and torch share one set of op schemas, fake (meta) implementations and backward formulas. Fake implementations
make ``torch.compile(fullgraph=True)`` trace through the public API without graph breaks.

    token_logprobs           (logits, ids)            -> lp, lse, entropy
    token_logprobs_backward  (logits, ids, lse, ...)  -> grad_logits            (new buffer)
    token_logprobs_backward_ (logits!, ids, lse, ...) -> ()                     (gradient written over the logits)
    grpo_loss                (logits, ids, per-token inputs, config) -> loss, lp, lse, entropy, g, L, kl, flags
    group_advantages         (rewards, weights, layout, config)      -> advantages, group mean, group std

The backward of both forward ops is one pass over the logits (``token_logprobs_backward``) driven by the per-token
scalars ``g_t = d loss / d lp_t`` (times the incoming gradient) and, for the entropy, ``d loss / d H_t``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _alloc
from .advantages import AdvantageConfig, GroupLayout
from .backends import get_backend
from .loss_math import LossConfig, TokenBatch


def _acc(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# backward over the logits (shared by both forward ops)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("grpo_kernels::token_logprobs_backward", mutates_args=())
def token_logprobs_backward(
    logits: Tensor,  # [B, T, V]
    token_ids: Tensor,  # [N] int64, -1 = not taking part
    lse: Tensor,  # [N]
    entropy: Tensor,  # [N] or [0]
    grad_lp: Tensor,  # [N]
    grad_entropy: Tensor | None,  # [N]
    temperature: float,
    backend: str,
) -> Tensor:
    out = _alloc.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    get_backend(backend).token_logprobs_backward(
        logits, token_ids, lse, entropy, grad_lp, grad_entropy, temperature, out
    )
    return out


@token_logprobs_backward.register_fake
def _(logits, token_ids, lse, entropy, grad_lp, grad_entropy, temperature, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("grpo_kernels::token_logprobs_backward_", mutates_args=("logits",))
def token_logprobs_backward_(
    logits: Tensor,
    token_ids: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_lp: Tensor,
    grad_entropy: Tensor | None,
    temperature: float,
    backend: str,
) -> None:
    get_backend(backend).token_logprobs_backward(
        logits, token_ids, lse, entropy, grad_lp, grad_entropy, temperature, logits
    )


def _logits_grad(ctx, grad_lp: Tensor, grad_entropy: Tensor | None) -> Tensor:
    logits, token_ids, lse, entropy = ctx.saved_tensors[:4]
    if entropy.numel() == 0:
        grad_entropy = None
    elif grad_entropy is not None:
        grad_entropy = grad_entropy.contiguous()
    args = (token_ids, lse, entropy, grad_lp.contiguous(), grad_entropy, ctx.temperature, ctx.backend)
    if getattr(ctx, "inplace", False):
        token_logprobs_backward_(logits, *args)
        return logits
    return token_logprobs_backward(logits, *args)


# ----------------------------------------------------------------------------------------------------------------
# token log-probs (+ entropy)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("grpo_kernels::token_logprobs", mutates_args=())
def token_logprobs(
    logits: Tensor, token_ids: Tensor, temperature: float, with_entropy: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(get_backend(backend).token_logprobs_forward(logits, token_ids, temperature, with_entropy))


@token_logprobs.register_fake
def _(logits, token_ids, temperature, with_entropy, backend):
    n = token_ids.shape[0]
    acc = _acc(logits)
    new = lambda k: logits.new_empty(k, dtype=acc)  # noqa: E731
    return new(n), new(n), new(n if with_entropy else 0)


def _token_logprobs_setup(ctx, inputs, output):
    logits, token_ids, temperature, with_entropy, backend = inputs
    _, lse, entropy = output
    ctx.save_for_backward(logits, token_ids, lse, entropy)
    ctx.temperature, ctx.backend = temperature, backend
    ctx.set_materialize_grads(False)


def _token_logprobs_backward(ctx, grad_lp, grad_lse, grad_entropy):
    if grad_lp is None:
        grad_lp = torch.zeros_like(ctx.saved_tensors[2])
    return _logits_grad(ctx, grad_lp, grad_entropy), None, None, None, None


token_logprobs.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)


# ----------------------------------------------------------------------------------------------------------------
# fused GRPO loss
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("grpo_kernels::grpo_loss", mutates_args=())
def grpo_loss(
    logits: Tensor,  # [B, T, V]
    token_ids: Tensor,  # [N] int64, -1 = not taking part
    coef: Tensor,  # [N] aggregation coefficient
    advantages: Tensor,  # [N]
    old_logprobs: Tensor | None,  # [N]
    ref_logprobs: Tensor | None,  # [N]
    is_weights: Tensor | None,  # [N]
    cu_seqlens: Tensor,  # [S+1] int64
    seq_ids: Tensor,  # [N] int64
    seq_weights: Tensor,  # [N]
    loss_type: str,
    kl_estimator: str,
    importance_sampling_level: str,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    dual_clip: float | None,
    temperature: float,
    sapo_temperature_pos: float,
    sapo_temperature_neg: float,
    bias_corrected_kl: bool,
    with_entropy: bool,
    inplace_backward: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    batch = TokenBatch(
        token_ids, coef, advantages, old_logprobs, ref_logprobs, is_weights, cu_seqlens, seq_ids, seq_weights
    )
    config = LossConfig(
        loss_type=loss_type,
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        delta=delta,
        dual_clip=dual_clip,
        temperature=temperature,
        importance_sampling_level=importance_sampling_level,
        kl_estimator=kl_estimator,
        bias_corrected_kl=bias_corrected_kl,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
    )
    return tuple(get_backend(backend).grpo_loss_forward(logits, batch, config, with_entropy))


@grpo_loss.register_fake
def _(logits, token_ids, *args):
    with_entropy = args[-3]
    n = token_ids.shape[0]
    acc = _acc(logits)
    new = lambda k, dtype=acc: logits.new_empty(k, dtype=dtype)  # noqa: E731
    return new(()), new(n), new(n), new(n if with_entropy else 0), new(n), new(n), new(n), new(n, torch.uint8)


def _grpo_loss_setup(ctx, inputs, output):
    logits, token_ids = inputs[:2]
    temperature, inplace_backward, backend = inputs[18], inputs[23], inputs[24]
    _, _, lse, entropy, grad_logprobs = output[:5]
    ctx.save_for_backward(logits, token_ids, lse, entropy, grad_logprobs)
    ctx.temperature, ctx.backend, ctx.inplace = temperature, backend, inplace_backward
    ctx.set_materialize_grads(False)


def _grpo_loss_backward(ctx, grad_loss, grad_lp, grad_lse, grad_entropy, *unused):
    grad_logprobs = ctx.saved_tensors[4]
    g = grad_logprobs * grad_loss if grad_loss is not None else torch.zeros_like(grad_logprobs)
    return (_logits_grad(ctx, g, grad_entropy),) + (None,) * 24


grpo_loss.register_autograd(_grpo_loss_backward, setup_context=_grpo_loss_setup)


# ----------------------------------------------------------------------------------------------------------------
# grouped advantages (no gradient)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("grpo_kernels::group_advantages", mutates_args=())
def group_advantages(
    rewards: Tensor,  # [B, R]
    weights: Tensor,  # [R]
    order: Tensor,  # [B] int64
    cu_groups: Tensor,  # [G+1] int64
    group_index: Tensor,  # [B] int64
    group_size: int,  # 0 when groups are not consecutive runs of one size
    scale: str,
    eps: float,
    multi_reward: str,
    estimator: str,
    lengths: Tensor | None,  # [B] completion lengths, rewards' dtype (opo, reinforce_plus_plus_baseline)
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    layout = GroupLayout(order, cu_groups, group_index, group_size or None)
    config = AdvantageConfig(scale, eps, multi_reward, estimator)
    return tuple(get_backend(backend).group_advantages(rewards, weights, layout, config, lengths))


@group_advantages.register_fake
def _(rewards, weights, order, cu_groups, group_index, group_size, scale, eps, multi_reward, estimator, lengths,
      backend):  # fmt: skip
    g = cu_groups.shape[0] - 1
    return rewards.new_empty(rewards.shape[0]), rewards.new_empty(g), rewards.new_empty(g)
