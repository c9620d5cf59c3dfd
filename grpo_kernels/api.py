"""The public API: ``token_logprobs``, ``group_advantages``, ``grpo_loss`` and ``GRPOLoss``.

Everything here is validation, layout and bookkeeping on small per-token tensors; the passes over the logits
happen in the backend chosen by ``backend`` (see :mod:`grpo_kernels.backends`). The math is
``shared/spec/grpo-math.md``; :mod:`grpo_kernels.reference` is its executable form.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import _grad_in_forward, _ops
from .advantages import GroupAdvantages, make_layout
from .backends import resolve_backend
from .loss_math import CLIP_HIGH, CLIP_LOW, LossConfig, TokenBatch, segment_sum
from .reference import (
    ADVANTAGE_ESTIMATORS,
    ESTIMATORS_WITH_LENGTHS,
    IS_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    MULTI_REWARD_MODES,
)

LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class GRPOLossOutput(NamedTuple):
    """What :func:`grpo_loss` returns. Metrics are 0-dim float32 tensors (no host sync), without gradient."""

    loss: Tensor  # [] differentiable w.r.t. the logits
    logprobs: Tensor  # [B, T] (packed: [N]) float32, detached; 0 where not taking part
    entropy: Tensor | None  # [B, T] (packed: [N]) float32, differentiable; None unless return_entropy
    per_token_loss: Tensor  # [B, T] (packed: [N]) L_t after IS weights and KL, detached; 0 where not taking part
    kl_mean: Tensor  # masked token mean of the KL term (0 when beta == 0)
    clip_low: Tensor  # masked token mean of [rho < 1 - eps_low and A < 0]
    clip_high: Tensor  # masked token mean of [rho > 1 + eps_high and A > 0]
    clip_region: Tensor  # masked token mean of either
    entropy_mean: Tensor | None  # masked token mean of the entropy; None unless return_entropy
    logprob_mean: Tensor  # masked token mean of lp


# ----------------------------------------------------------------------------------------------------------------
# validation helpers: each error names the argument and what was expected
# ----------------------------------------------------------------------------------------------------------------
def _shape(x: Tensor) -> list[int]:
    return list(x.shape)


def _check_tensor(name: str, x, device: torch.device, source: str = "logits") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {source} are on {device}: all tensors must share one device")


def _check_float(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_logits(logits) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [B, T, V] or packed [N, V], got shape {_shape(logits)}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary of at least 1 entry, got shape {_shape(logits)}")
    if logits.stride(-1) != 1 and logits.numel() > 0:
        raise ValueError(
            f"logits must be contiguous in the vocabulary dimension (stride 1), got strides {list(logits.stride())}; "
            "call .contiguous() on them (a copy of the whole tensor) if this is really intended"
        )


def _check_number(name: str, value, *, low=None, low_inclusive=True, allow_none=False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_same_shape(name: str, x: Tensor, shape, what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of {what} {list(shape)}, got {_shape(x)}")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _kernel_token_ids(token_ids: Tensor, mask: Tensor | None, ignore_index: int, vocab: int) -> Tensor:
    """``[N]`` int64 ids with ``-1`` where a position does not take part (the kernels' convention).

    An id outside ``[0, V)`` at a position that takes part raises in eager mode. Under ``torch.compile`` (no
    data-dependent errors) it is dropped from the kernel and its log-prob becomes NaN instead (see ``_poison``).
    """
    ids = token_ids.reshape(-1).long()
    valid = ids != ignore_index
    if mask is not None:
        valid = valid & (mask.reshape(-1) != 0)
    in_range = (ids >= 0) & (ids < vocab)
    if not _compiling():
        bad = valid & ~in_range
        if bool(bad.any()):
            where = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"token_ids must lie in [0, {vocab}) (or equal ignore_index={ignore_index}) where mask != 0; "
                f"got {int(ids[where])} at flat position {where}"
            )
    return torch.where(valid & in_range, ids, -1)


def _poison(x: Tensor, token_ids: Tensor, kernel_ids: Tensor, mask: Tensor | None, ignore_index: int) -> Tensor:
    """NaN where an out-of-range id was dropped by ``_kernel_token_ids`` (only reachable under torch.compile)."""
    if not _compiling():
        return x
    wanted = token_ids.reshape(-1) != ignore_index
    if mask is not None:
        wanted = wanted & (mask.reshape(-1) != 0)
    return torch.where(wanted & (kernel_ids < 0), torch.full_like(x, float("nan")), x)


def _as_3d(logits: Tensor) -> Tensor:
    return logits if logits.dim() == 3 else logits.unsqueeze(0)


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

    Returns:
        ``lp`` float32 with the shape of ``token_ids``, differentiable w.r.t. ``logits``; with
        ``return_entropy=True``, ``(lp, H)``, both differentiable.
    """
    _check_logits(logits)
    device = logits.device
    _check_tensor("token_ids", token_ids, device)
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    _check_same_shape("token_ids", token_ids, logits.shape[:-1], "logits without the last dim")
    if mask is not None:
        _check_tensor("mask", mask, device)
        _check_same_shape("mask", mask, token_ids.shape, "token_ids")
    _check_number("temperature", temperature, low=0, low_inclusive=False)
    name = resolve_backend(backend, device, float64=logits.dtype == torch.float64)

    ids = _kernel_token_ids(token_ids, mask, ignore_index, logits.shape[-1])
    lp, _, entropy = _ops.token_logprobs(_as_3d(logits), ids, float(temperature), bool(return_entropy), name)
    lp = _poison(lp, token_ids, ids, mask, ignore_index).view(token_ids.shape)
    if return_entropy:
        return lp, _poison(entropy, token_ids, ids, mask, ignore_index).view(token_ids.shape)
    return lp


# ----------------------------------------------------------------------------------------------------------------
# group_advantages
# ----------------------------------------------------------------------------------------------------------------
def group_advantages(
    rewards: Tensor,
    *,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    scale: str | None = None,
    eps: float = 1e-4,
    reward_weights: Tensor | list[float] | None = None,
    multi_reward: str = "sum_then_normalize",
    backend: str = "auto",
    return_stats: bool = False,
    estimator: str = "grpo",
    completion_lengths: Tensor | None = None,
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
            mean_g)``), as verl 0.9 defines them (formulas, edge cases, differences: docs/advantage_estimators.md).
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
        raise ValueError(f"rewards must be [B] or [B, R], got shape {_shape(rewards)}")
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
            raise ValueError(f"group_ids must have shape [B]=[{batch}], got {_shape(group_ids)}")
    _check_choice("estimator", estimator, ADVANTAGE_ESTIMATORS)
    allowed = ADVANTAGE_ESTIMATORS[estimator]  # its scales, the default first
    scale = allowed[0] if scale is None else scale
    if scale not in allowed:
        which = "" if estimator == "grpo" else f" with estimator={estimator!r}"
        raise ValueError(f"scale must be one of {list(allowed)}{which}, got {scale!r}")
    _check_choice("multi_reward", multi_reward, MULTI_REWARD_MODES)
    if multi_reward == "normalize_then_sum" and estimator != "grpo":
        raise ValueError(f"multi_reward='normalize_then_sum' is defined for estimator='grpo' only, got {estimator!r}")
    lengths = _completion_lengths(completion_lengths, estimator, batch, device)
    if multi_reward == "normalize_then_sum" and scale != "group":
        raise ValueError("multi_reward='normalize_then_sum' normalises per group then over the batch; scale must be 'group'")
    _check_number("eps", eps, low=0)
    acc = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    if reward_weights is None:
        weights = torch.ones(num_rewards, dtype=acc, device=device)
    else:
        weights = torch.as_tensor(reward_weights, dtype=acc).to(device)
        if tuple(weights.shape) != (num_rewards,):
            raise ValueError(f"reward_weights must have shape [R]=[{num_rewards}], got {_shape(weights)}")
    # An infinite reward has no z-score (its group's mean and std are inf/NaN): an error, not a score to rank.
    infinite = torch.isinf(rewards)
    if not _compiling():
        if bool(infinite.any()):
            row = int(infinite.nonzero()[0, 0])
            raise ValueError(
                f"rewards must be finite, or NaN for 'no score'; got {rewards[row].tolist()} at row {row}"
            )
        if not bool(torch.isfinite(weights).all()):
            raise ValueError(f"reward_weights must be finite, got {weights.tolist()}")
    if lengths is not None:
        lengths = lengths.to(acc).contiguous()
        usable = torch.isfinite(lengths) & (lengths >= 0)
        if not _compiling() and not bool(usable.all()):
            row = int((~usable).nonzero()[0, 0])
            raise ValueError(f"completion_lengths must be finite and >= 0, got {lengths[row].item()} at row {row}")
    name = resolve_backend(backend, device, float64=acc == torch.float64)

    layout = make_layout(batch, group_size, group_ids, device)
    r = rewards.to(acc).reshape(batch, num_rewards).contiguous()
    adv, mean, std = _ops.group_advantages(
        r, weights, layout.order, layout.cu_groups, layout.group_index, layout.group_size or 0,
        scale, float(eps), multi_reward, estimator, lengths, name,
    )  # fmt: skip
    if _compiling():  # no data-dependent error under torch.compile: make every advantage NaN instead
        unusable = infinite.any() | ~torch.isfinite(weights).all()
        if lengths is not None:
            unusable = unusable | ~usable.all()
        adv = torch.where(unusable, torch.full_like(adv, float("nan")), adv)
    if not return_stats:
        return adv
    zero_std = torch.isclose(std, torch.zeros_like(std))
    frac = zero_std.to(acc).mean() if std.numel() else torch.zeros((), dtype=acc, device=device)
    return GroupAdvantages(adv, mean, std, frac)


def _completion_lengths(lengths, estimator: str, batch: int, device) -> Tensor | None:
    """``completion_lengths`` checked against the estimator: ``[B]`` integer or float on the rewards' device."""
    if estimator not in ESTIMATORS_WITH_LENGTHS:
        if lengths is not None:
            raise ValueError(
                f"completion_lengths is read only by estimator {' / '.join(ESTIMATORS_WITH_LENGTHS)}, not {estimator!r}"
            )
        return None
    if lengths is None:
        hint = " (torch.ones(B) whitens over completions instead of tokens)" if estimator != "opo" else ""
        raise ValueError(f"estimator={estimator!r} needs completion_lengths [B], the tokens of each completion{hint}")
    if not isinstance(lengths, Tensor) or lengths.dtype == torch.bool or lengths.is_complex():
        got = lengths.dtype if isinstance(lengths, Tensor) else type(lengths).__name__
        raise TypeError(f"completion_lengths must be an integer or float torch.Tensor, got {got}")
    if lengths.device != device:
        raise ValueError(f"completion_lengths is on {lengths.device} but rewards are on {device}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"completion_lengths must have shape [B]=[{batch}], got {_shape(lengths)}")
    return lengths


# ----------------------------------------------------------------------------------------------------------------
# grpo_loss
# ----------------------------------------------------------------------------------------------------------------
def _per_seq_or_token(name: str, x: Tensor, layout: str, num_seqs: int, seq_shape, token_shape, seq_ids: Tensor):
    """``advantages`` / ``is_weights``: one value per sequence or per token -> ``[N]``."""
    if layout == "padded":
        if tuple(x.shape) in ((num_seqs,), (num_seqs, 1)):
            return x.reshape(num_seqs)[seq_ids]
        if tuple(x.shape) == tuple(token_shape):
            return x.reshape(-1)
        raise ValueError(
            f"{name} must be per sequence [B]={[num_seqs]} / [B, 1] or per token [B, T]={list(token_shape)}, "
            f"got {_shape(x)}"
        )
    if tuple(x.shape) == tuple(token_shape):  # packed: [N] per token wins (same meaning when S == N)
        return x.reshape(-1)
    if tuple(x.shape) in ((num_seqs,), (num_seqs, 1)):
        return x.reshape(num_seqs)[seq_ids]
    raise ValueError(
        f"{name} must be per sequence [S]={[num_seqs]} or per token [N]={list(token_shape)} for packed logits, "
        f"got {_shape(x)}"
    )


def _check_cu_seqlens(cu_seqlens: Tensor, n: int, device, source: str = "logits") -> Tensor:
    _check_tensor("cu_seqlens", cu_seqlens, device, source)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [S+1] with S >= 1, got {cu_seqlens.dtype} {_shape(cu_seqlens)}")
    cu = cu_seqlens.long()
    if not _compiling():
        if int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must start at 0, end at N={n} and never decrease, got {cu.tolist()[:8]}...")
    return cu


def grpo_loss(
    logits: Tensor,
    token_ids: Tensor,
    advantages: Tensor,
    *,
    mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
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
    is_weights: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    grad_in_forward: bool = False,
    loss_scale: float = 1.0,
    backend: str = "auto",
    cu_seqlens: Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    ignore_index: int = -100,
) -> GRPOLossOutput:
    """The GRPO policy loss from logits, fused: log-probs, ratio, clipping, KL and aggregation in one op.

    Per token (spec sections 3-5), with ``rho = exp(lp - lp_old)`` (sequence level: the masked mean log-ratio of
    the sequence, GSPO) and ``A`` the advantage::

        L = -min(rho1 A, clip(rho, 1 - eps_low, 1 + eps_high) A)   rho1 = min(rho, delta) if delta else rho
            (dual clip c: for A < 0, L = min(L, -c A));  cispo: -sg(min(rho, eps_high)) A lp;
            sapo: -(4 / tau_s) sigmoid(tau_s (rho - 1)) A
        L = L * w_is + beta * KL(lp, lp_ref)  (KL *= rho when bias_corrected_kl)

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
        ref_logprobs: ``[B, T]`` reference-policy log-probs; required when ``beta != 0``.
        beta: KL coefficient (TRL default 0.0). epsilon_low / epsilon_high: clip range (epsilon_high None means
            epsilon_low; for cispo epsilon_high is the cap of the ratio itself). delta: two-sided clip, > 1.
            dual_clip: c > 1 (verl). temperature: > 0, divides the logits.
        loss_type: grpo, bnpo, dr_grpo, dapo (default, as TRL), cispo, sapo.
        importance_sampling_level: "token" or "sequence" (GSPO).
        kl_estimator: k3 (default, TRL), k1, k2, low_var_kl (verl). bias_corrected_kl: KL *= rho (TRL's
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

    Returns:
        :class:`GRPOLossOutput`.
    """
    _check_logits(logits)
    base = logits._base if logits._base is not None else logits
    if inplace_backward and logits.requires_grad and (logits.is_leaf or (base.is_leaf and base.requires_grad)):
        raise ValueError(
            "inplace_backward=True would write the gradient over a leaf tensor that requires grad (or a view of one), "
            "whose .grad would then alias its data; use it on logits produced by the model (a non-leaf), or pass "
            "inplace_backward=False"
        )
    _check_number("loss_scale", loss_scale)
    if loss_scale == 0:
        raise ValueError("loss_scale must be != 0 (the backward divides the incoming gradient by it)")
    inputs = _prepare_loss_inputs(
        "logits", logits.shape[:-1], logits.shape[-1], logits.device, logits.dtype == torch.float64,
        token_ids, advantages, mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, beta=beta,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, dual_clip=dual_clip, temperature=temperature,
        loss_type=loss_type, importance_sampling_level=importance_sampling_level, kl_estimator=kl_estimator,
        bias_corrected_kl=bias_corrected_kl, is_weights=is_weights, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, backend=backend, cu_seqlens=cu_seqlens,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg, ignore_index=ignore_index,
    )  # fmt: skip
    c = inputs.config
    op_args = (
        *inputs.batch, c.loss_type, c.kl_estimator, c.importance_sampling_level, c.beta, c.epsilon_low,
        c.epsilon_high, c.delta, c.dual_clip, c.temperature, c.sapo_temperature_pos, c.sapo_temperature_neg,
        c.bias_corrected_kl, bool(return_entropy),
    )  # fmt: skip
    inplace = bool(inplace_backward and logits.requires_grad)
    if grad_in_forward and logits.requires_grad and torch.is_grad_enabled():
        out = _grad_in_forward.grpo_loss(
            _as_3d(logits), *op_args, inplace=inplace, loss_scale=float(loss_scale), backend=inputs.backend
        )
    else:
        out = _ops.grpo_loss(_as_3d(logits), *op_args, inplace, inputs.backend)
    loss, lp, _, entropy, _, per_token_loss, kl, flags = out
    return _loss_output(inputs, token_ids, mask, ignore_index, loss, lp, entropy if return_entropy else None,
                        per_token_loss, kl, flags)  # fmt: skip


class _LossInputs(NamedTuple):
    """A validated loss call in the backends' terms (shared by :func:`grpo_loss` and the fused-linear loss)."""

    backend: str  # resolved backend name
    batch: TokenBatch  # [N] per-token inputs; coefficients already normalised over the whole batch
    config: LossConfig
    mask_weights: Tensor  # [N] m_t: the mask value where the token takes part, 0 elsewhere (float32/float64)
    token_shape: torch.Size  # [B, T] or [N]


def _check_loss_config(
    loss_type, importance_sampling_level, kl_estimator, beta, epsilon_low, epsilon_high, delta, dual_clip,
    temperature, sapo_temperature_pos, sapo_temperature_neg, max_completion_length,
) -> None:
    """The scalar arguments of the loss (shared by :func:`grpo_loss`, the fused-linear loss and the modules)."""
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("importance_sampling_level", importance_sampling_level, IS_LEVELS)
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _check_number("beta", beta, low=0)
    _check_number("epsilon_low", epsilon_low, low=0)
    _check_number("epsilon_high", epsilon_high, low=0, allow_none=True)
    _check_number("delta", delta, low=1, low_inclusive=False, allow_none=True)
    _check_number("dual_clip", dual_clip, low=1, low_inclusive=False, allow_none=True)
    _check_number("temperature", temperature, low=0, low_inclusive=False)
    _check_number("sapo_temperature_pos", sapo_temperature_pos, low=0, low_inclusive=False)
    _check_number("sapo_temperature_neg", sapo_temperature_neg, low=0, low_inclusive=False)
    if loss_type == "dr_grpo":
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) or max_completion_length <= 0:
            raise ValueError(f"loss_type='dr_grpo' needs max_completion_length, a positive int; got {max_completion_length!r}")


def _prepare_loss_inputs(
    source: str,
    token_shape: torch.Size,
    vocab: int,
    device: torch.device,
    float64: bool,
    token_ids: Tensor,
    advantages: Tensor,
    *,
    mask: Tensor | None,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    beta: float,
    epsilon_low: float,
    epsilon_high: float | None,
    delta: float | None,
    dual_clip: float | None,
    temperature: float,
    loss_type: str,
    importance_sampling_level: str,
    kl_estimator: str,
    bias_corrected_kl: bool,
    is_weights: Tensor | None,
    max_completion_length: int | None,
    num_items_in_batch: int | float | Tensor | None,
    backend: str,
    cu_seqlens: Tensor | None,
    sapo_temperature_pos: float,
    sapo_temperature_neg: float,
    ignore_index: int,
) -> _LossInputs:
    """Validate every argument of :func:`grpo_loss` except the logits, and build the per-token ``TokenBatch``.

    ``source`` names the tensor the token layout comes from (in error messages): ``token_shape`` ``[B, T]`` is the
    padded layout, ``[N]`` the packed one; ``vocab`` bounds the token ids.
    """
    # --- scalar arguments -------------------------------------------------------------------------------------
    _check_loss_config(
        loss_type, importance_sampling_level, kl_estimator, beta, epsilon_low, epsilon_high, delta, dual_clip,
        temperature, sapo_temperature_pos, sapo_temperature_neg, max_completion_length,
    )  # fmt: skip
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high

    # --- tensors ---------------------------------------------------------------------------------------------
    _check_tensor("token_ids", token_ids, device, source)
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    _check_same_shape("token_ids", token_ids, token_shape, f"{source} without the last dim")
    _check_tensor("advantages", advantages, device, source)
    _check_float("advantages", advantages)
    if mask is not None:
        _check_tensor("mask", mask, device, source)
        _check_same_shape("mask", mask, token_shape, "token_ids")
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if x is not None:
            _check_tensor(name, x, device, source)
            _check_float(name, x)
            _check_same_shape(name, x, token_shape, "token_ids")
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs (the reference model's per-token log-probs)")
    if is_weights is not None:
        _check_tensor("is_weights", is_weights, device, source)
        _check_float("is_weights", is_weights)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a number or a 1-element tensor, got {_shape(num_items_in_batch)}")
        else:
            _check_number("num_items_in_batch", num_items_in_batch, low=0)
    name = resolve_backend(backend, device, float64=float64)
    acc = torch.float64 if float64 else torch.float32

    # --- layout: sequences as contiguous runs of the N flattened tokens ----------------------------------------
    n = token_ids.numel()
    if len(token_shape) == 2:
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens is for packed [N, ...] {source}; got [B, T, ...] {source}")
        layout, (num_seqs, seq_len) = "padded", token_shape
        cu = torch.arange(num_seqs + 1, device=device) * seq_len
        seq_ids = torch.arange(n, device=device) // max(seq_len, 1)
    else:
        layout = "packed"
        cu = _check_cu_seqlens(cu_seqlens, n, device, source) if cu_seqlens is not None else torch.tensor([0, n], device=device)
        num_seqs = cu.shape[0] - 1
        seq_ids = torch.searchsorted(cu[1:], torch.arange(n, device=device), right=True)
    seq_shape = (num_seqs,)

    ids = _kernel_token_ids(token_ids, mask, ignore_index, vocab)
    valid = ids >= 0
    zero = torch.zeros((), dtype=acc, device=device)
    m = torch.where(valid, mask.reshape(-1).to(acc) if mask is not None else torch.ones((), dtype=acc, device=device), zero)
    tokens_per_seq = segment_sum(m, cu)
    seq_weights = m / tokens_per_seq.clamp(min=1.0)[seq_ids]
    if loss_type in ("grpo", "sapo"):
        coef = seq_weights / max(num_seqs, 1)
    elif loss_type == "bnpo":
        coef = m / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        coef = m / (max(num_seqs, 1) * max_completion_length)
    else:  # dapo, cispo
        items = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=acc, device=device)
        coef = m / items.reshape(()).clamp(min=1.0)

    def per_token(x: Tensor | None) -> Tensor | None:
        return None if x is None else torch.where(valid, x.reshape(-1).to(acc), zero).contiguous()

    adv = per_token(_per_seq_or_token("advantages", advantages, layout, num_seqs, seq_shape, token_shape, seq_ids))
    w_is = None
    if is_weights is not None:
        w_is = per_token(_per_seq_or_token("is_weights", is_weights, layout, num_seqs, seq_shape, token_shape, seq_ids))

    config = LossConfig(
        loss_type=loss_type, beta=float(beta), epsilon_low=float(epsilon_low), epsilon_high=float(epsilon_high),
        delta=None if delta is None else float(delta), dual_clip=None if dual_clip is None else float(dual_clip),
        temperature=float(temperature), importance_sampling_level=importance_sampling_level, kl_estimator=kl_estimator,
        bias_corrected_kl=bool(bias_corrected_kl), sapo_temperature_pos=float(sapo_temperature_pos),
        sapo_temperature_neg=float(sapo_temperature_neg),
    )  # fmt: skip
    batch = TokenBatch(
        ids, coef.contiguous(), adv, per_token(old_logprobs), per_token(ref_logprobs) if beta != 0.0 else None, w_is,
        cu, seq_ids, seq_weights.contiguous(),
    )  # fmt: skip
    return _LossInputs(name, batch, config, m, token_shape)


def _loss_output(
    inputs: _LossInputs,
    token_ids: Tensor,
    mask: Tensor | None,
    ignore_index: int,
    loss: Tensor,  # []
    lp: Tensor,  # [N]
    entropy: Tensor | None,  # [N], None when not asked for
    per_token_loss: Tensor,  # [N]
    kl: Tensor,  # [N]
    flags: Tensor,  # [N] uint8 clip flags
) -> GRPOLossOutput:
    """The metrics (masked token means) and the user-facing shapes of a backend's loss forward."""
    m, ids, shape = inputs.mask_weights, inputs.batch.token_ids, inputs.token_shape
    count = m.sum().clamp(min=1.0)
    masked_mean = lambda x: (x.detach().to(m.dtype) * m).sum() / count  # noqa: E731
    low, high = (flags & CLIP_LOW) != 0, (flags & CLIP_HIGH) != 0
    lp = _poison(lp, token_ids, ids, mask, ignore_index)
    if _compiling():  # an out-of-range id (dropped from the kernel) must not leave a plausible loss behind
        loss = loss + lp.sum() * 0
    return GRPOLossOutput(
        loss=loss,
        logprobs=lp.detach().view(shape),
        entropy=entropy.view(shape) if entropy is not None else None,
        per_token_loss=per_token_loss.detach().view(shape),
        kl_mean=masked_mean(kl),
        clip_low=masked_mean(low),
        clip_high=masked_mean(high),
        clip_region=masked_mean(low | high),
        entropy_mean=masked_mean(entropy) if entropy is not None else None,
        logprob_mean=masked_mean(lp),
    )


class GRPOLoss(nn.Module):
    """:func:`grpo_loss` as a module holding the configuration (same arguments, same defaults, same output).

    ``GRPOLoss(beta=0.04, loss_type="grpo")(logits, token_ids, advantages, mask=mask, ref_logprobs=ref)``.
    """

    _CONFIG = (
        "beta", "epsilon_low", "epsilon_high", "delta", "dual_clip", "temperature", "loss_type",
        "importance_sampling_level", "kl_estimator", "bias_corrected_kl", "max_completion_length",
        "return_entropy", "inplace_backward", "grad_in_forward", "loss_scale", "backend", "sapo_temperature_pos",
        "sapo_temperature_neg", "ignore_index",
    )  # fmt: skip

    def __init__(
        self,
        *,
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
        max_completion_length: int | None = None,
        return_entropy: bool = False,
        inplace_backward: bool = False,
        grad_in_forward: bool = False,
        loss_scale: float = 1.0,
        backend: str = "auto",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        ignore_index: int = -100,
    ):
        super().__init__()
        values = dict(locals())
        self.config = {k: values[k] for k in self._CONFIG}
        # Fail at construction for what can be checked without tensors; grpo_loss re-checks everything per call.
        _check_loss_config(
            loss_type, importance_sampling_level, kl_estimator, beta, epsilon_low, epsilon_high, delta, dual_clip,
            temperature, sapo_temperature_pos, sapo_temperature_neg, max_completion_length,
        )  # fmt: skip
        _check_choice("backend", backend, ("auto", "torch", "triton", "cuda"))
        _check_number("loss_scale", loss_scale)

    def forward(
        self,
        logits: Tensor,
        token_ids: Tensor,
        advantages: Tensor,
        *,
        mask: Tensor | None = None,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        is_weights: Tensor | None = None,
        num_items_in_batch: int | float | Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> GRPOLossOutput:
        return grpo_loss(
            logits, token_ids, advantages, mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
            is_weights=is_weights, num_items_in_batch=num_items_in_batch, cu_seqlens=cu_seqlens, **self.config,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items() if v is not None)


__all__ = ["GRPOLoss", "GRPOLossOutput", "GroupAdvantages", "grpo_loss", "group_advantages", "token_logprobs"]

