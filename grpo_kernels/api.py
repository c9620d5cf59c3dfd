"""The public entry points: ``token_logprobs``, ``group_advantages``, ``grpo_loss`` and ``GRPOLoss``.

Each one checks its arguments and lays them out (:mod:`grpo_kernels._inputs`), builds its configuration
(:mod:`grpo_kernels.config`) and calls its op (:mod:`grpo_kernels.ops`); the passes over the logits happen in the
backend chosen by ``backend`` (see :mod:`grpo_kernels.backends`). The math is ``docs/math.md``;
:mod:`grpo_kernels.reference` is its executable form.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from . import vocab_parallel
from ._inputs import (
    GRPOLossOutput,
    as_3d,
    check_completion_lengths,
    check_logits,
    check_mask,
    check_number,
    check_ref_logits,
    check_token_ids,
    compiling,
    kernel_token_ids,
    loss_output,
    poison,
    prepare_loss_inputs,
)
from .advantages import GroupAdvantages, make_layout
from .backends import BACKENDS, resolve_backend
from .config import AdvantageConfig, LossConfig, config_from, with_knob_parameters
from .ops import advantages as advantages_op
from .ops import grad_in_forward as grad_in_forward_op
from .ops import grpo_loss as grpo_loss_op
from .ops import logprobs as logprobs_op


# ----------------------------------------------------------------------------------------------------------------
# token_logprobs
# ----------------------------------------------------------------------------------------------------------------
def token_logprobs(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: Tensor | None = None,
    backend: str = "auto",
    ignore_index: int = -100,
    vocab_parallel_group=None,
    vocab_start: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probabilities (and entropy) of ``token_ids`` under ``softmax(logits / temperature)``.

    ``lp = u_y - logsumexp(u)`` and ``H = logsumexp(u) - sum_v p_v u_v`` with ``u = logits / temperature``,
    accumulated in float32 without materialising the softmax.

    Args:
        logits: ``[B, T, V]`` or ``[N, V]``, float16/bfloat16/float32 (float64 on the torch backend), stride 1
            along V; ``logits[:, t]`` must already be aligned with ``token_ids[:, t]`` (the caller shifts).
        token_ids: ``[B, T]`` or ``[N]`` integer ids in ``[0, V)``, or ``ignore_index``.
        temperature: sampling temperature, finite and > 0.
        return_entropy: also return the entropy ``H`` (nats).
        mask: optional ``[B, T]`` / ``[N]``; positions where ``mask == 0`` (or id == ``ignore_index``) are not
            computed: their outputs are 0 and their gradient rows are 0.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        vocab_parallel_group: a ``torch.distributed.ProcessGroup`` over which the vocabulary is split: ``logits``
            is then this rank's shard ``[..., V_local]`` and ``token_ids`` stay global ids in ``[0, V)``
            (docs/distributed.md). A DTensor sharded on its last dimension needs neither this nor ``vocab_start``.
        vocab_start: global id of the shard's first column; default: after the shards of the lower group ranks
            (``rank * V_local`` for even shards). Given on every rank of the group or on none.

    Returns:
        ``lp`` float32 with the shape of ``token_ids``, differentiable w.r.t. ``logits``; with
        ``return_entropy=True``, ``(lp, H)``, both differentiable. With a vocabulary shard, the global values
        (the same on every rank), differentiable w.r.t. the shard.
    """
    shard = None
    if vocab_parallel.wanted(logits, vocab_parallel_group, vocab_start):
        logits, shard = vocab_parallel.resolve(logits, vocab_parallel_group, vocab_start)
    check_logits(logits)
    device = logits.device
    check_token_ids(token_ids, logits.shape[:-1], device, "logits")
    check_mask(mask, token_ids, device, "logits")
    check_number("temperature", temperature, low=0, low_inclusive=False)
    float64 = logits.dtype == torch.float64
    name = (
        resolve_backend(backend, device, float64=float64)
        if shard is None
        else vocab_parallel.shard_backend(backend, device, float64)
    )

    ids = kernel_token_ids(token_ids, mask, ignore_index, logits.shape[-1] if shard is None else shard.vocab)
    if shard is None:
        lp, _, entropy = logprobs_op.token_logprobs(
            as_3d(logits), ids, temperature=temperature, with_entropy=bool(return_entropy), backend=name
        )
    else:
        lp, entropy = vocab_parallel.token_logprobs(
            logits, ids, shard, temperature=temperature, with_entropy=bool(return_entropy), backend=name
        )
    lp = poison(lp, token_ids, ids, mask, ignore_index).view(token_ids.shape)
    if return_entropy:
        return lp, poison(entropy, token_ids, ids, mask, ignore_index).view(token_ids.shape)
    return lp


# ----------------------------------------------------------------------------------------------------------------
# group_advantages
# ----------------------------------------------------------------------------------------------------------------
def group_advantages(
    rewards: Tensor,
    *,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    reward_weights: Tensor | list[float] | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    completion_lengths: Tensor | None = None,
    **settings,
) -> Tensor | GroupAdvantages:
    """Group-relative advantages: each reward minus its group's mean, over a std.

    ``A = (r - mean_g) / (std_g + eps)`` (``scale="group"``), ``/ (std_batch + eps)`` (``"batch"``) or no division
    (``"none"``, Dr. GRPO). Statistics ignore NaN rewards; std is Bessel-corrected. A NaN reward gets A = 0, and so
    does every member of a group with fewer than 2 valid rewards (verl passes the raw score through instead).
    An infinite reward (or reward weight) raises ``ValueError``; under ``torch.compile`` it makes every advantage NaN.

    Args:
        rewards: ``[B]`` or ``[B, R]`` for R reward functions; finite, or NaN where a function gave no score.
        group_size: G; the G completions of prompt i are rows ``i*G .. i*G+G-1`` (TRL's layout). ``B % G == 0``.
        group_ids: ``[B]`` integer group of each row, any order (instead of ``group_size``).
        scale: ``"group"``, ``"batch"`` or ``"none"`` (``"group"`` only with ``normalize_then_sum``); default
            (None): the estimator's own (``"group"`` for grpo and grpo_passk, ``"none"`` for the others, which
            accept no other).
        eps: added to the std; TRL's default 1e-4 (verl uses 1e-6).
        reward_weights: ``[R]`` weights of the reward columns (default all 1).
        multi_reward: ``"sum_then_normalize"`` (weighted NaN-sum of the columns, then the above) or
            ``"normalize_then_sum"`` (each column normalised within its group, weighted sum, then normalised over
            the batch), as TRL's ``multi_objective_aggregation``.
        return_stats: return a :class:`GroupAdvantages` with the per-group mean/std and ``frac_zero_std``.
        estimator: ``"grpo"`` (the z-score above), ``"rloo"`` (leave-one-out baseline, ``n/(n-1) (r - mean_g)``),
            ``"grpo_passk"`` (only a group's unique best gets ``r_max - r_second``, over ``std_g + eps`` with
            ``scale="group"``), ``"reinforce_plus_plus_baseline"`` (``r - mean_g``, then whitened over the batch's
            tokens), ``"opo"`` (``r`` minus the length-weighted group mean), ``"gpg"`` (``B / #nonzero · (r -
            mean_g)``), as verl 0.9 defines them (formulas, edge cases, differences: docs/math.md section 10).
            All but grpo take ``multi_reward="sum_then_normalize"`` only.
        completion_lengths: ``[B]`` tokens per completion (integer or float, >= 0), required by ``opo`` and
            ``reinforce_plus_plus_baseline`` and refused by the others.

    Returns:
        ``advantages`` ``[B]`` float32 (float64 for float64 rewards on the torch backend), or
        :class:`GroupAdvantages` with ``return_stats=True``.
    """
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [B] or [B, R], got shape {list(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating-point tensor, got {rewards.dtype}")
    device = rewards.device
    batch = rewards.shape[0]
    num_rewards = 1 if rewards.dim() == 1 else rewards.shape[1]
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size and group_ids")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if batch % group_size:
            raise ValueError(f"group_size={group_size} must divide the batch size B={batch}")
    else:
        if not isinstance(group_ids, Tensor) or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
            raise TypeError("group_ids must be an integer torch.Tensor")
        if group_ids.device != device:
            raise ValueError(f"group_ids is on {group_ids.device} but rewards are on {device}")
        if tuple(group_ids.shape) != (batch,):
            raise ValueError(f"group_ids must have shape [B]=[{batch}], got {list(group_ids.shape)}")
    config = config_from(AdvantageConfig, "group_advantages", settings)
    lengths = check_completion_lengths(completion_lengths, config, batch, device)
    acc = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    if reward_weights is None:
        weights = torch.ones(num_rewards, dtype=acc, device=device)
    else:
        weights = torch.as_tensor(reward_weights, dtype=acc).to(device)
        if tuple(weights.shape) != (num_rewards,):
            raise ValueError(f"reward_weights must have shape [R]=[{num_rewards}], got {list(weights.shape)}")
    # An infinite reward has no z-score (its group's mean and std are inf/NaN): an error, not a score to rank.
    infinite = torch.isinf(rewards)
    if not compiling():
        if bool(infinite.any()):
            row = int(infinite.nonzero()[0, 0])
            raise ValueError(f"rewards must be finite, or NaN for 'no score'; got {rewards[row].tolist()} at row {row}")
        if not bool(torch.isfinite(weights).all()):
            raise ValueError(f"reward_weights must be finite, got {weights.tolist()}")
    if lengths is not None:
        lengths = lengths.to(acc).contiguous()
        usable = torch.isfinite(lengths) & (lengths >= 0)
        if not compiling() and not bool(usable.all()):
            row = int((~usable).nonzero()[0, 0])
            raise ValueError(f"completion_lengths must be finite and >= 0, got {lengths[row].item()} at row {row}")
    name = resolve_backend(backend, device, float64=acc == torch.float64)

    layout = make_layout(batch, group_size, group_ids, device)
    r = rewards.to(acc).reshape(batch, num_rewards).contiguous()
    adv, mean, std = advantages_op.group_advantages(r, weights, lengths, layout=layout, config=config, backend=name)
    if compiling():  # no data-dependent error under torch.compile: make every advantage NaN instead
        unusable = infinite.any() | ~torch.isfinite(weights).all()
        if lengths is not None:
            unusable = unusable | ~usable.all()
        adv = torch.where(unusable, torch.full_like(adv, float("nan")), adv)
    if not return_stats:
        return adv
    zero_std = torch.isclose(std, torch.zeros_like(std))
    frac = zero_std.to(acc).mean() if std.numel() else torch.zeros((), dtype=acc, device=device)
    return GroupAdvantages(adv, mean, std, frac)


with_knob_parameters(group_advantages, AdvantageConfig, after="group_ids")


# ----------------------------------------------------------------------------------------------------------------
# grpo_loss
# ----------------------------------------------------------------------------------------------------------------
def grpo_loss(
    logits: Tensor,
    token_ids: Tensor,
    advantages: Tensor,
    *,
    mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    ref_logits: Tensor | None = None,
    is_weights: Tensor | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    grad_in_forward: bool = False,
    loss_scale: float = 1.0,
    backend: str = "auto",
    cu_seqlens: Tensor | None = None,
    ignore_index: int = -100,
    vocab_parallel_group=None,
    vocab_start: int | None = None,
    **knobs,
) -> GRPOLossOutput:
    """The GRPO policy loss from logits, fused: log-probs, ratio, clipping, KL and aggregation in one op.

    Per token (docs/math.md sections 3-5), with ``rho = exp(lp - lp_old)`` (sequence level: the masked mean log-ratio of
    the sequence, GSPO) and ``A`` the advantage::

        L = -min(rho1 A, clip(rho, 1 - eps_low, 1 + eps_high) A)   rho1 = min(rho, delta) if delta else rho
            (dual clip c: for A < 0, L = min(L, -c A));  cispo: -sg(min(rho, eps_high)) A lp;
            sapo: -(4 / tau_s) sigmoid(tau_s (rho - 1)) A
        L = L * w_is + beta * KL(lp, lp_ref)  (KL *= rho when bias_corrected_kl; kl_estimator="exact": KL(p||q))

    aggregated by ``loss_type`` (section 6): grpo/sapo ``mean_b(sum_t m L / max(1, sum_t m))``, bnpo
    ``sum m L / max(1, sum m)``, dr_grpo ``sum m L / (B * max_completion_length)``, dapo/cispo
    ``sum m L / max(1, num_items_in_batch)`` (default ``sum m``). Gradient-accumulation scaling is the caller's.

    Args:
        logits: ``[B, T, V]`` aligned with ``token_ids [B, T]``, or packed ``[N, V]`` + ``[N]`` (one sequence, or
            the sequences of ``cu_seqlens``). float16/bfloat16/float32 (float64 on the torch backend), stride 1
            along V; other strides are free (``logits[:, :-1]`` is not copied).
        token_ids: integer ids in ``[0, V)`` or ``ignore_index``.
        advantages: per sequence ``[B]``/``[B, 1]`` (packed ``[S]``) or per token ``[B, T]`` (packed ``[N]``).
        mask: completion mask ``[B, T]`` (any dtype); 0 = not taking part. Positions that do not take part are
            ignored entirely (their other inputs, even NaN, have no effect).
        old_logprobs: ``[B, T]`` log-probs of the sampling policy; None = on-policy (ratio 1, gradient kept).
        ref_logprobs: ``[B, T]`` reference-policy log-probs; required when ``beta != 0`` (except with
            ``kl_estimator="exact"``, which refuses them).
        ref_logits: the reference model's logits, in the layout of ``logits`` (float16/bfloat16/float32, any of
            them whatever the logits' dtype; float64 with float64 logits): required by ``kl_estimator="exact"``
            when ``beta != 0`` (unused when ``beta == 0``), refused by the other estimators. No gradient reaches
            them.
        beta: KL coefficient (TRL default 0.0). epsilon_low / epsilon_high: clip range (epsilon_high None means
            epsilon_low; for cispo epsilon_high is the cap of the ratio itself). delta: two-sided clip, > 1.
            dual_clip: c > 1 (verl). temperature: > 0, divides the logits.
        loss_type: grpo, bnpo, dr_grpo, dapo (default, as TRL), cispo, sapo; vespo (TRL), geo_mean, gpg, clip_cov,
            kl_cov (verl), docs/math.md section 9. aggregation: another loss type's aggregation (grpo, bnpo,
            dr_grpo, dapo) instead of ``loss_type``'s own. vespo_k_pos / vespo_lambda_pos / vespo_k_neg /
            vespo_lambda_neg, clip_cov_ratio / clip_cov_lb / clip_cov_ub, kl_cov_ratio / ppo_kl_coef: their knobs.
        importance_sampling_level: "token" or "sequence" (GSPO).
        kl_estimator: k3 (default, TRL), k1, k2, low_var_kl (verl), or "exact": the exact KL(p||q) over the
            vocabulary between ``softmax(logits / tau)`` and ``softmax(ref_logits / tau)`` (docs/math.md section
            11; its gradient goes to the logits directly, ``kl_mean`` is the exact KL; torch and Triton backends,
            not with ``grad_in_forward`` or ``bias_corrected_kl``). bias_corrected_kl: KL *= rho (TRL's
            ``use_bias_correction_kl``).
        is_weights: rollout importance weights ``[B]``, ``[B, 1]`` or ``[B, T]`` (e.g. vLLM's IS ratio).
        max_completion_length: required for dr_grpo. num_items_in_batch: dapo/cispo normaliser (int, float or
            0-dim tensor, e.g. the global token count under data parallelism).
        return_entropy: also return the per-token entropy (differentiable) and its mean.
        inplace_backward: write the logits' gradient over the logits buffer in the backward (no second ``[N, V]``
            allocation). The logits' values are gone after the backward; autograd raises if anything else saved
            them for its own backward. Not allowed on a leaf tensor that requires grad.
        grad_in_forward: compute the logits' gradient in the forward (times ``loss_scale``): 2 passes over the
            logits instead of 3 where the backend has such a kernel (CUDA on sm_90, token-level ratio), same numbers
            elsewhere. With ``inplace_backward`` the gradient is written over the logits already in the forward, so
            their values are gone when this returns. The backward returns the stored gradient as it is when the
            incoming gradient equals ``loss_scale`` and rescales it otherwise (one more pass). The entropy is
            returned without gradient in this mode (a metric).
        loss_scale: the gradient the loss will receive in the backward (e.g. ``1 / gradient_accumulation_steps``
            for ``(loss * loss_scale).backward()``), finite and != 0; used only with ``grad_in_forward``.
        backend: "auto" (fastest available for the device), "torch", "triton" or "cuda".
        cu_seqlens: ``[S+1]`` sequence offsets for packed ``[N, V]`` logits.
        sapo_temperature_pos / sapo_temperature_neg: SAPO's temperatures (TRL defaults 1.0 / 1.05).
        ignore_index: token id that marks a position as not taking part (default -100).
        vocab_parallel_group, vocab_start: ``logits`` is this rank's vocabulary shard, as in :func:`token_logprobs`
            (or a DTensor sharded on its last dimension); the loss, every metric and the per-token outputs are the
            global ones, the same on every rank, and the gradient is this shard's. Forward: 2 all-reduces of
            ``[N]``-sized vectors; backward: none (docs/distributed.md). Not with ``grad_in_forward``.

    Returns:
        :class:`GRPOLossOutput`.
    """
    config = config_from(LossConfig, "grpo_loss", knobs)
    return _grpo_loss(
        logits,
        token_ids,
        advantages,
        config,
        mask=mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        ref_logits=ref_logits,
        is_weights=is_weights,
        num_items_in_batch=num_items_in_batch,
        cu_seqlens=cu_seqlens,
        return_entropy=return_entropy,
        inplace_backward=inplace_backward,
        grad_in_forward=grad_in_forward,
        loss_scale=loss_scale,
        backend=backend,
        ignore_index=ignore_index,
        vocab_parallel_group=vocab_parallel_group,
        vocab_start=vocab_start,
    )


with_knob_parameters(grpo_loss, LossConfig, after="ref_logits")


def _grpo_loss(
    logits,
    token_ids,
    advantages,
    config: LossConfig,
    *,
    mask,
    old_logprobs,
    ref_logprobs,
    ref_logits,
    is_weights,
    num_items_in_batch,
    cu_seqlens,
    return_entropy,
    inplace_backward,
    grad_in_forward,
    loss_scale,
    backend,
    ignore_index,
    vocab_parallel_group=None,
    vocab_start=None,
) -> GRPOLossOutput:
    """:func:`grpo_loss` once its configuration is built (:class:`GRPOLoss` builds it once, at construction)."""
    shard = None
    if vocab_parallel.wanted(logits, vocab_parallel_group, vocab_start):
        logits, shard = vocab_parallel.resolve(logits, vocab_parallel_group, vocab_start)
        if grad_in_forward:
            raise ValueError("grad_in_forward=True is not supported with a vocabulary shard (vocab_parallel_group)")
        backend = vocab_parallel.shard_backend(backend, logits.device, logits.dtype == torch.float64)
    check_logits(logits)
    base = logits._base if logits._base is not None else logits
    if inplace_backward and logits.requires_grad and (logits.is_leaf or (base.is_leaf and base.requires_grad)):
        raise ValueError(
            "inplace_backward=True would write the gradient over a leaf tensor that requires grad (or a view of one), "
            "whose .grad would then alias its data; use it on logits produced by the model (a non-leaf), or pass "
            "inplace_backward=False"
        )
    check_number("loss_scale", loss_scale)
    if loss_scale == 0:
        raise ValueError("loss_scale must be != 0 (the backward divides the incoming gradient by it)")
    ref_logits = check_ref_logits(ref_logits, logits, config)
    if ref_logits is not None and grad_in_forward:
        raise ValueError(
            "grad_in_forward=True is not implemented for kl_estimator='exact' (its gradient is the divergence "
            "backward's, over both logits); pass grad_in_forward=False"
        )
    inputs = prepare_loss_inputs(
        "logits",
        logits.shape[:-1],
        logits.shape[-1] if shard is None else shard.vocab,
        logits.device,
        logits.dtype == torch.float64,
        token_ids,
        advantages,
        config,
        mask=mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        is_weights=is_weights,
        num_items_in_batch=num_items_in_batch,
        backend=backend,
        cu_seqlens=cu_seqlens,
        ignore_index=ignore_index,
    )
    inplace = bool(inplace_backward and logits.requires_grad)
    call = dict(batch=inputs.batch, config=config, with_entropy=bool(return_entropy), backend=inputs.backend)
    if shard is not None:
        if ref_logits is not None:
            raise NotImplementedError(
                "ref_logits (kl_estimator='exact') with vocab_parallel_group=: the exact KL over a vocabulary shard "
                "is not implemented; use a sampled kl_estimator (k1/k2/k3/low_var_kl) with ref_logprobs"
            )
        out = vocab_parallel.grpo_loss(logits, shard=shard, inplace=inplace, **call)
        loss, lp, entropy, per_token_loss, kl, flags = out
        entropy = entropy if return_entropy else None
        return loss_output(inputs, token_ids, mask, ignore_index, loss, lp, entropy, per_token_loss, kl, flags)
    if ref_logits is not None:
        out = grpo_loss_op.grpo_loss_exact_kl(as_3d(logits), as_3d(ref_logits), inplace_backward=inplace, **call)[:8]
    elif grad_in_forward and logits.requires_grad and torch.is_grad_enabled():
        out = grad_in_forward_op.grpo_loss(as_3d(logits), inplace=inplace, loss_scale=float(loss_scale), **call)
    else:
        out = grpo_loss_op.grpo_loss(as_3d(logits), inplace_backward=inplace, **call)
    loss, lp, _, entropy, _, per_token_loss, kl, flags = out
    return loss_output(
        inputs, token_ids, mask, ignore_index, loss, lp, entropy if return_entropy else None, per_token_loss, kl, flags
    )


class ConfiguredLoss(nn.Module):
    """What the loss modules share: a :class:`LossConfig` checked once, at construction (``loss_config``), the
    call options (``options``), and ``config``, both as one dict."""

    def __init__(self, where: str, config: LossConfig | None, knobs: dict, *, backend: str, **options):
        super().__init__()
        if config is None:
            config = config_from(LossConfig, where, knobs)
        elif knobs:
            raise TypeError(f"{where}() takes either config= or the knobs as keywords, not both (got {sorted(knobs)})")
        elif not isinstance(config, LossConfig):
            raise TypeError(f"config must be a grpo_kernels.LossConfig, got {type(config).__name__}")
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {backend!r}")
        self.loss_config = config
        self.options = dict(options, backend=backend)

    @property
    def config(self) -> dict:
        return {**dataclasses.asdict(self.loss_config), **self.options}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items() if v is not None)


class GRPOLoss(ConfiguredLoss):
    """:func:`grpo_loss` as a module holding the configuration (same arguments, same defaults, same output), which
    is checked once, here.

    ``GRPOLoss(beta=0.04, loss_type="grpo")(logits, token_ids, advantages, mask=mask, ref_logprobs=ref)``, or
    ``GRPOLoss(config=LossConfig(...))``. ``loss_config`` is the :class:`LossConfig`; ``config`` every argument
    (knobs and options) as a dict.
    """

    def __init__(
        self,
        *,
        config: LossConfig | None = None,
        return_entropy: bool = False,
        inplace_backward: bool = False,
        grad_in_forward: bool = False,
        loss_scale: float = 1.0,
        backend: str = "auto",
        ignore_index: int = -100,
        **knobs,
    ):
        super().__init__(
            "GRPOLoss",
            config,
            knobs,
            return_entropy=return_entropy,
            inplace_backward=inplace_backward,
            grad_in_forward=grad_in_forward,
            loss_scale=check_number("loss_scale", loss_scale),
            backend=backend,
            ignore_index=ignore_index,
        )

    def forward(
        self,
        logits: Tensor,
        token_ids: Tensor,
        advantages: Tensor,
        *,
        mask: Tensor | None = None,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        ref_logits: Tensor | None = None,
        is_weights: Tensor | None = None,
        num_items_in_batch: int | float | Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        vocab_parallel_group=None,
        vocab_start: int | None = None,
    ) -> GRPOLossOutput:
        return _grpo_loss(
            logits,
            token_ids,
            advantages,
            self.loss_config,
            mask=mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            ref_logits=ref_logits,
            is_weights=is_weights,
            num_items_in_batch=num_items_in_batch,
            cu_seqlens=cu_seqlens,
            vocab_parallel_group=vocab_parallel_group,
            vocab_start=vocab_start,
            **self.options,
        )


with_knob_parameters(GRPOLoss.__init__, LossConfig, after="ignore_index")


__all__ = ["GRPOLoss", "GRPOLossOutput", "GroupAdvantages", "grpo_loss", "group_advantages", "token_logprobs"]
