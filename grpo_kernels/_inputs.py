"""Input checks and layout for the public entry points: every error names the argument and what was expected.

The entry points (:mod:`grpo_kernels.api`, :mod:`grpo_kernels.fused_linear`) check their tensors here and turn
them into the backends' terms: ``[N]`` per-token vectors with ``-1`` ids where a position does not take part, the
sequences as contiguous runs (``cu_seqlens``), the aggregation coefficients (``loss_math.aggregation_coef``); and
turn a backend's ``[N]`` outputs back into the user's shapes and masked-mean metrics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .backends import resolve_backend
from .config import ESTIMATORS_WITH_LENGTHS, AdvantageConfig, LossConfig, check_option
from .loss_math import CLIP_HIGH, CLIP_LOW, COV_SELECTED, TokenBatch, aggregation_coef, segment_sum, vespo_weights

LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class GRPOLossOutput(NamedTuple):
    """What :func:`grpo_kernels.grpo_loss` returns. Metrics are 0-dim float32 tensors (no host sync), without
    gradient."""

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
    phi_mean: Tensor | None = None  # vespo: masked token mean of the gamma weight phi; None for other loss types
    cov_selected: Tensor | None = None  # clip_cov / kl_cov: masked token mean of the selected tokens; else None


def _shape(x: Tensor) -> list[int]:
    return list(x.shape)


def check_tensor(name: str, x, device: torch.device, source: str = "logits") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {source} are on {device}: all tensors must share one device")


def check_float(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_logits(logits) -> None:
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


def check_number(name: str, value, *, low=None, low_inclusive=True, allow_none=False):
    """A number argument that is not a knob (``loss_scale``, ``temperature`` of ``token_logprobs``, ...)."""
    return check_option(name, value, float | None if allow_none else float, low=low, low_inclusive=low_inclusive)


def check_token_ids(token_ids, shape, device, source: str) -> None:
    check_tensor("token_ids", token_ids, device, source)
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    check_same_shape("token_ids", token_ids, shape, f"{source} without the last dim")


def check_mask(mask, token_ids: Tensor, device, source: str) -> None:
    if mask is not None:
        check_tensor("mask", mask, device, source)
        check_same_shape("mask", mask, token_ids.shape, "token_ids")


def check_completion_lengths(lengths, config: AdvantageConfig, batch: int, device) -> Tensor | None:
    """``completion_lengths`` checked against the estimator: ``[B]`` integer or float on the rewards' device."""
    if not config.reads_lengths:
        if lengths is not None:
            raise ValueError(
                f"completion_lengths is read only by estimator {' / '.join(ESTIMATORS_WITH_LENGTHS)}, "
                f"not {config.estimator!r}"
            )
        return None
    if lengths is None:
        hint = " (torch.ones(B) whitens over completions instead of tokens)" if config.estimator != "opo" else ""
        raise ValueError(
            f"estimator={config.estimator!r} needs completion_lengths [B], the tokens of each completion{hint}"
        )
    if not isinstance(lengths, Tensor) or lengths.dtype == torch.bool or lengths.is_complex():
        got = lengths.dtype if isinstance(lengths, Tensor) else type(lengths).__name__
        raise TypeError(f"completion_lengths must be an integer or float torch.Tensor, got {got}")
    if lengths.device != device:
        raise ValueError(f"completion_lengths is on {lengths.device} but rewards are on {device}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"completion_lengths must have shape [B]=[{batch}], got {_shape(lengths)}")
    return lengths


def check_same_shape(name: str, x: Tensor, shape, what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of {what} {list(shape)}, got {_shape(x)}")


def compiling() -> bool:
    return torch.compiler.is_compiling()


def kernel_token_ids(token_ids: Tensor, mask: Tensor | None, ignore_index: int, vocab: int) -> Tensor:
    """``[N]`` int64 ids with ``-1`` where a position does not take part (the kernels' convention).

    An id outside ``[0, V)`` at a position that takes part raises in eager mode. Under ``torch.compile`` (no
    data-dependent errors) it is dropped from the kernel and its log-prob becomes NaN instead (see ``poison``).
    """
    ids = token_ids.reshape(-1).long()
    valid = ids != ignore_index
    if mask is not None:
        valid = valid & (mask.reshape(-1) != 0)
    in_range = (ids >= 0) & (ids < vocab)
    if not compiling():
        bad = valid & ~in_range
        if bool(bad.any()):
            where = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"token_ids must lie in [0, {vocab}) (or equal ignore_index={ignore_index}) where mask != 0; "
                f"got {int(ids[where])} at flat position {where}"
            )
    return torch.where(valid & in_range, ids, -1)


def poison(x: Tensor, token_ids: Tensor, kernel_ids: Tensor, mask: Tensor | None, ignore_index: int) -> Tensor:
    """NaN where an out-of-range id was dropped by ``kernel_token_ids`` (only reachable under torch.compile)."""
    if not compiling():
        return x
    wanted = token_ids.reshape(-1) != ignore_index
    if mask is not None:
        wanted = wanted & (mask.reshape(-1) != 0)
    return torch.where(wanted & (kernel_ids < 0), torch.full_like(x, float("nan")), x)


def as_3d(logits: Tensor) -> Tensor:
    return logits if logits.dim() == 3 else logits.unsqueeze(0)


def per_seq_or_token(name: str, x: Tensor, layout: str, num_seqs: int, seq_shape, token_shape, seq_ids: Tensor):
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


def check_cu_seqlens(cu_seqlens: Tensor, n: int, device, source: str = "logits") -> Tensor:
    check_tensor("cu_seqlens", cu_seqlens, device, source)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.is_floating_point():
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor [S+1] with S >= 1, got {cu_seqlens.dtype} {_shape(cu_seqlens)}"
        )
    cu = cu_seqlens.long()
    if not compiling() and (int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any())):
        raise ValueError(f"cu_seqlens must start at 0, end at N={n} and never decrease, got {cu.tolist()[:8]}...")
    return cu


# the arguments that hold the reference policy for kl_estimator="exact", by the entry point's source tensor
_REFERENCE = {"logits": "ref_logits", "hidden": "ref_hidden and ref_weight"}


def check_ref_logits(ref_logits, logits: Tensor, config: LossConfig) -> Tensor | None:
    """``ref_logits`` of :func:`grpo_kernels.grpo_loss`: required by ``kl_estimator="exact"`` with ``beta != 0``,
    refused by the other estimators; the logits' shape and device, float16/bfloat16/float32 (float64 only with
    float64 logits), stride 1 along V. Returned detached (no gradient reaches the reference), None when unused."""
    if not config.exact_kl:
        if ref_logits is not None:
            raise ValueError(
                f"ref_logits is read only by kl_estimator='exact' (got kl_estimator={config.kl_estimator!r}, which "
                "takes ref_logprobs)"
            )
        return None
    if ref_logits is None:
        if config.uses_reference:
            raise ValueError(
                "kl_estimator='exact' with beta != 0 needs ref_logits: the reference model's logits, in the layout of "
                f"logits {_shape(logits)}"
            )
        return None
    check_tensor("ref_logits", ref_logits, logits.device)
    check_same_shape("ref_logits", ref_logits, logits.shape, "logits")
    allowed = LOGITS_DTYPES if logits.dtype == torch.float64 else LOGITS_DTYPES[:3]
    if ref_logits.dtype not in allowed:
        raise TypeError(
            "ref_logits must be float16, bfloat16 or float32 (float64 only with float64 logits), got "
            f"{ref_logits.dtype} with {logits.dtype} logits"
        )
    if ref_logits.stride(-1) != 1 and ref_logits.numel() > 0:
        raise ValueError(
            f"ref_logits must be contiguous in the vocabulary dimension (stride 1), got strides "
            f"{list(ref_logits.stride())}"
        )
    return ref_logits.detach() if config.uses_reference else None


class LossInputs(NamedTuple):
    """A validated loss call in the backends' terms (shared by :func:`grpo_loss` and the fused-linear loss)."""

    backend: str  # resolved backend name
    batch: TokenBatch  # [N] per-token inputs; coefficients already normalised over the whole batch
    config: LossConfig
    mask_weights: Tensor  # [N] m_t: the mask value where the token takes part, 0 elsewhere (float32/float64)
    token_shape: torch.Size  # [B, T] or [N]


def prepare_loss_inputs(
    source: str,
    token_shape: torch.Size,
    vocab: int,
    device: torch.device,
    float64: bool,
    token_ids: Tensor,
    advantages: Tensor,
    config: LossConfig,
    *,
    mask: Tensor | None,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    is_weights: Tensor | None,
    num_items_in_batch: int | float | Tensor | None,
    backend: str,
    cu_seqlens: Tensor | None,
    ignore_index: int,
) -> LossInputs:
    """Check the per-batch arguments of a loss call (``config`` is checked already) and build its ``TokenBatch``.

    ``source`` names the tensor the token layout comes from (in error messages): ``token_shape`` ``[B, T]`` is the
    padded layout, ``[N]`` the packed one; ``vocab`` bounds the token ids.
    """
    # --- tensors ---------------------------------------------------------------------------------------------
    check_token_ids(token_ids, token_shape, device, source)
    check_tensor("advantages", advantages, device, source)
    check_float("advantages", advantages)
    check_mask(mask, token_ids, device, source)
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if x is not None:
            check_tensor(name, x, device, source)
            check_float(name, x)
            check_same_shape(name, x, token_shape, "token_ids")
    if config.exact_kl:
        if ref_logprobs is not None:
            raise ValueError(
                f"kl_estimator='exact' reads the reference policy's whole distribution ({_REFERENCE[source]}), not "
                "ref_logprobs: pass ref_logprobs=None"
            )
    elif config.uses_reference and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs (the reference model's per-token log-probs)")
    if is_weights is not None:
        check_tensor("is_weights", is_weights, device, source)
        check_float("is_weights", is_weights)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    f"num_items_in_batch must be a number or a 1-element tensor, got {_shape(num_items_in_batch)}"
                )
        else:
            check_number("num_items_in_batch", num_items_in_batch, low=0)
    if config.exact_kl and config.uses_reference:  # the divergence kernels: "auto" never picks cuda (it has none)
        from .divergence import divergence_backend

        name = divergence_backend(backend, device, float64)
    else:
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
        cu = (
            check_cu_seqlens(cu_seqlens, n, device, source)
            if cu_seqlens is not None
            else torch.tensor([0, n], device=device)
        )
        num_seqs = cu.shape[0] - 1
        seq_ids = torch.searchsorted(cu[1:], torch.arange(n, device=device), right=True)
    seq_shape = (num_seqs,)

    ids = kernel_token_ids(token_ids, mask, ignore_index, vocab)
    valid = ids >= 0
    zero = torch.zeros((), dtype=acc, device=device)
    m = torch.where(
        valid, mask.reshape(-1).to(acc) if mask is not None else torch.ones((), dtype=acc, device=device), zero
    )
    tokens_per_seq = segment_sum(m, cu)
    seq_weights = m / tokens_per_seq.clamp(min=1.0)[seq_ids]
    coef = aggregation_coef(m, seq_weights, num_seqs, config, num_items_in_batch)

    def per_token(x: Tensor | None) -> Tensor | None:
        return None if x is None else torch.where(valid, x.reshape(-1).to(acc), zero).contiguous()

    adv = per_token(per_seq_or_token("advantages", advantages, layout, num_seqs, seq_shape, token_shape, seq_ids))
    w_is = None
    if is_weights is not None:
        if config.loss_type == "vespo" and tuple(is_weights.shape) != tuple(token_shape):
            raise ValueError(
                f"loss_type='vespo' takes token-level is_weights (the shape of token_ids {list(token_shape)}): their "
                f"logs join each sequence's log-ratio sum, as TRL's token_* vLLM modes; got {_shape(is_weights)}"
            )
        w_is = per_token(per_seq_or_token("is_weights", is_weights, layout, num_seqs, seq_shape, token_shape, seq_ids))

    batch = TokenBatch(
        ids,
        coef.contiguous(),
        adv,
        per_token(old_logprobs),
        per_token(ref_logprobs) if config.uses_reference else None,
        w_is,
        cu,
        seq_ids,
        seq_weights.contiguous(),
        m.contiguous(),
    )
    return LossInputs(name, batch, config, m, token_shape)


def loss_output(
    inputs: LossInputs,
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
    lp = poison(lp, token_ids, ids, mask, ignore_index)
    phi_mean = cov_selected = None
    if inputs.config.loss_type == "vespo":  # recomputed from the detached log-probs: [N] vector math
        batch = inputs.batch
        cast = lambda x: None if x is None else x.to(lp.dtype)  # noqa: E731
        old = cast(batch.old_logprobs)
        log_ratio = torch.where(ids >= 0, lp.detach() - (lp.detach() if old is None else old), 0.0)
        phi_mean = masked_mean(
            vespo_weights(log_ratio, cast(batch.is_weights), cast(batch.advantages), batch, inputs.config)
        )
    if inputs.config.loss_type in ("clip_cov", "kl_cov"):
        cov_selected = masked_mean((flags & COV_SELECTED) != 0)
    if compiling():  # an out-of-range id (dropped from the kernel) must not leave a plausible loss behind
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
        phi_mean=phi_mean,
        cov_selected=cov_selected,
    )
