"""The GRPO loss from the hidden states and the LM head: the ``[N, V]`` logits never exist.

    logits = softcap(logit_scale * (hidden @ weight.T + bias))     softcap(x) = c * tanh(x / c), optional
    loss   = grpo_loss(logits, ...)                                 (temperature divides the logits inside the loss)

The tokens that take part are gathered (masked positions are never projected), then processed in tiles of
``chunk_tokens`` rows with the whole vocabulary per tile. Per tile::

    Z    = H_t @ W.T (+ b)                 [c, V] in the compute dtype, float32 accumulation (cuBLAS on GPU)
    lp, lse, g_t  <- backend.grpo_loss_forward(Z)                  (one read of Z)
    Z   <- dloss/dZ                        written in place by backend.token_logprobs_backward (one read + write)
    dH_t = Z @ W                           complete for these rows: the tile has the whole vocabulary
    dW  += Z.T @ H_t,  db += sum_rows Z    float32 accumulators

so the gradients are finished when the forward returns (6 N H V FLOPs, no recompute), and the autograd backward only
scales them by the incoming gradient. The importance ratio at sequence level (GSPO) couples the tokens of a
sequence: when every sequence fits in a tile, tiles are cut at sequence boundaries and the same single pass is exact;
otherwise a first pass computes the log-probs of every tile, the closed-form loss math runs on the whole batch, and a
second pass recomputes each tile's logits to write its gradient (8 N H V FLOPs). ``docs/fused_linear.md`` has the
memory formula and the cost table.

Layout: ``tiles.py`` (the head and the tokens, tile by tile), ``op.py`` (the custom ops, fake kernels, autograd),
this file (the public functions and module); the Hugging Face helpers are in :mod:`grpo_kernels.integrations.hf`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import vocab_parallel
from .._inputs import (
    LOGITS_DTYPES,
    GRPOLossOutput,
    check_float,
    check_mask,
    check_number,
    check_same_shape,
    check_tensor,
    check_token_ids,
    kernel_token_ids,
    loss_output,
    poison,
    prepare_loss_inputs,
)
from ..api import ConfiguredLoss
from ..backends import resolve_backend
from ..config import LossConfig, config_from, with_knob_parameters
from . import op
from .tiles import acc_dtype, compute_dtype, default_chunk_tokens


def _check_head(hidden, weight, bias, logit_softcap, logit_scale, chunk_tokens) -> None:
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or packed [N, H], got shape {list(hidden.shape)}")
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if x is None and name == "bias":
            continue
        check_tensor(name, x, hidden.device, "hidden")
        if x.dtype not in LOGITS_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(
            f"weight must be the LM head [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]} and V >= 1, "
            f"got shape {list(weight.shape)}"
        )
    if bias is not None:
        check_same_shape("bias", bias, weight.shape[:1], "weight's vocabulary dim")
    _check_head_options(logit_softcap, logit_scale, chunk_tokens)


def _check_head_options(logit_softcap, logit_scale, chunk_tokens) -> None:
    check_number("logit_scale", logit_scale, low=0, low_inclusive=False)
    check_number("logit_softcap", logit_softcap, low=0, low_inclusive=False, allow_none=True)
    if chunk_tokens is not None and (
        isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1
    ):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")


def _check_reference(config: LossConfig, hidden, weight, ref_hidden, ref_weight, ref_bias):
    """The reference's hidden states and head of ``kl_estimator="exact"``: required with ``beta != 0``, refused by
    the other estimators. Returns ``(ref_hidden [N, H_ref], ref_weight, ref_bias)`` detached, or Nones."""
    given = ref_hidden is not None or ref_weight is not None or ref_bias is not None
    if not config.exact_kl:
        if given:
            raise ValueError(
                "ref_hidden / ref_weight / ref_bias are read only by kl_estimator='exact' (got "
                f"kl_estimator={config.kl_estimator!r}, which takes ref_logprobs)"
            )
        return None, None, None
    if not config.uses_reference:
        return None, None, None
    if ref_hidden is None or ref_weight is None:
        missing = "ref_hidden" if ref_hidden is None else "ref_weight"
        raise ValueError(
            f"kl_estimator='exact' with beta != 0 needs ref_hidden [B, T, H_ref] and ref_weight [V, H_ref] (the "
            f"reference model's last hidden states and LM head); {missing} is missing"
        )
    for name, x in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if x is not None:
            check_tensor(name, x, hidden.device, "hidden")
            if x.dtype not in LOGITS_DTYPES:
                raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    check_same_shape("ref_hidden", ref_hidden, (*hidden.shape[:-1], ref_hidden.shape[-1]), "hidden's positions")
    if ref_weight.dim() != 2 or tuple(ref_weight.shape) != (weight.shape[0], ref_hidden.shape[-1]):
        raise ValueError(
            f"ref_weight must be the reference's LM head [V, H_ref] = [{weight.shape[0]}, {ref_hidden.shape[-1]}] "
            f"(the policy's vocabulary, ref_hidden's size), got shape {list(ref_weight.shape)}"
        )
    if ref_bias is not None:
        check_same_shape("ref_bias", ref_bias, weight.shape[:1], "weight's vocabulary dim")
        ref_bias = ref_bias.detach()
    return ref_hidden.detach().reshape(-1, ref_hidden.shape[-1]), ref_weight.detach(), ref_bias


def _head_options(hidden, weight, logit_softcap, logit_scale, chunk_tokens, ref_dtype=None) -> dict:
    """The head's op options: softcap, scale, compute dtype, rows per tile (both tiles' with ``ref_dtype``)."""
    dtype = compute_dtype(hidden, weight)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0], dtype, logit_softcap is not None, ref_dtype)
    softcap = None if logit_softcap is None else float(logit_softcap)
    return dict(logit_softcap=softcap, logit_scale=float(logit_scale), dtype=dtype, chunk_tokens=chunk)


def fused_linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    advantages: Tensor,
    *,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    is_weights: Tensor | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    return_entropy: bool = False,
    entropy_coef: float = 0.0,
    entropy_weights: Tensor | None = None,
    backend: str = "auto",
    cu_seqlens: Tensor | None = None,
    ignore_index: int = -100,
    logit_softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_tokens: int | None = None,
    vocab_parallel_group=None,
    vocab_start: int | None = None,
    **knobs,
) -> GRPOLossOutput:
    """:func:`grpo_kernels.grpo_loss` of ``logits = softcap(logit_scale * (hidden @ weight.T + bias))``, without
    the logits: the LM head and the loss run fused, tile by tile, and the gradients w.r.t. ``hidden``, ``weight``
    and ``bias`` are finished during the forward (6 N H V FLOPs; 8 N H V at sequence level when a sequence is
    longer than ``chunk_tokens``). ``softcap(x) = logit_softcap * tanh(x / logit_softcap)`` (Gemma 2/3) when set;
    ``temperature`` then divides the logits inside the loss, as in TRL.

    Args:
        hidden: ``[B, T, H]`` (``hidden[:, t]`` predicts ``token_ids[:, t]``: the caller shifts) or packed
            ``[N, H]``; float16/bfloat16/float32 (float64 on the torch backend).
        weight: the LM head ``[V, H]``, possibly tied to the input embedding (its gradient adds to the
            embedding's, as autograd does for any shared parameter).
        bias: optional ``[V]``.
        ref_hidden, ref_weight, ref_bias: ``kl_estimator="exact"`` (with ``beta != 0``): the reference model's last
            hidden states ``[B, T, H_ref]`` (the layout of ``hidden``), its LM head ``[V, H_ref]`` and optional bias
            (the same softcap and scale as the policy's). Each tile's reference logits are projected next to the
            policy's (2 N H_ref V more FLOPs; the default tile then holds both); no gradient reaches them.
        token_ids, advantages, mask, ..., ignore_index: as :func:`grpo_kernels.grpo_loss` (every argument of it
            except ``inplace_backward``: the logits tile is always overwritten by its gradient here).
        return_entropy: also return the per-token entropy and its mean. The entropy carries no gradient (the
            gradients are finished before anything can use it; a backward through it raises): for an entropy bonus
            use ``entropy_coef`` or ``entropy_weights``.
        entropy_coef: adds ``-entropy_coef * sum_t c_t H_t`` to the loss, with ``c_t`` the aggregation weights of
            ``loss_type`` (verl's ``entropy_coeff`` with its ``loss_agg_mode``); its gradient is part of the fused
            backward. ``per_token_loss`` does not include it.
        entropy_weights: per-token weights ``w_t`` shaped like ``token_ids``: adds ``-sum_t w_t H_t`` to the loss
            (on top of ``entropy_coef``'s term), with its gradient in the fused backward; positions that do not take
            part are ignored. For an entropy bonus whose normalisation is not ``loss_type``'s (TRL's: a mean over a
            token mask of its own, whatever the loss type).
        logit_softcap: final logit soft-capping (Gemma 2/3's ``final_logit_softcapping``), > 0, or None.
        logit_scale: multiplies the projection before the softcap (Cohere's ``logit_scale``; Granite's
            ``1 / logits_scaling``), > 0.
        chunk_tokens: tokens per tile; default :func:`default_chunk_tokens` (one tile of logits ~ 512 MiB).
        backend: which backend runs the per-tile loss and gradient passes: "auto", "torch", "triton" or "cuda".
        vocab_parallel_group, vocab_start: ``weight`` (and ``bias``) is this rank's vocabulary shard ``[V_local, H]``
            of the head, over that ``torch.distributed.ProcessGroup``, as in :func:`grpo_kernels.token_logprobs`;
            ``hidden`` and ``token_ids`` (global ids) are the same on every rank. The loss and metrics are the
            global ones; ``weight`` / ``bias`` get this shard's gradient and ``hidden`` the full one (its shares are
            all-reduced in the forward, as a column-parallel head does). Two passes over the tiles
            (docs/distributed.md).

    Compute dtype: autocast's dtype when autocast is on, else ``promote_types(hidden.dtype, weight.dtype)``; the
    matmuls accumulate in float32, ``dW`` and ``db`` are accumulated across tiles in float32 and returned in the
    parameters' dtype, ``dH`` in ``hidden``'s dtype.

    Returns:
        :class:`grpo_kernels.GRPOLossOutput` (per-token fields shaped like ``token_ids``). ``loss`` is
        differentiable w.r.t. ``hidden``, ``weight`` and ``bias``; its backward only scales the stored gradients.
    """
    config = config_from(LossConfig, "fused_linear_grpo_loss", knobs)
    return _fused_linear_grpo_loss(
        hidden,
        weight,
        token_ids,
        advantages,
        config,
        bias=bias,
        mask=mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        is_weights=is_weights,
        num_items_in_batch=num_items_in_batch,
        return_entropy=return_entropy,
        entropy_coef=entropy_coef,
        entropy_weights=entropy_weights,
        backend=backend,
        cu_seqlens=cu_seqlens,
        ignore_index=ignore_index,
        logit_softcap=logit_softcap,
        logit_scale=logit_scale,
        chunk_tokens=chunk_tokens,
        vocab_parallel_group=vocab_parallel_group,
        vocab_start=vocab_start,
    )


with_knob_parameters(fused_linear_grpo_loss, LossConfig, after="ref_bias")


def _fused_linear_grpo_loss(
    hidden,
    weight,
    token_ids,
    advantages,
    config: LossConfig,
    *,
    bias,
    mask,
    old_logprobs,
    ref_logprobs,
    ref_hidden,
    ref_weight,
    ref_bias,
    is_weights,
    num_items_in_batch,
    return_entropy,
    entropy_coef,
    entropy_weights,
    backend,
    cu_seqlens,
    ignore_index,
    logit_softcap,
    logit_scale,
    chunk_tokens,
    vocab_parallel_group=None,
    vocab_start=None,
) -> GRPOLossOutput:
    """:func:`fused_linear_grpo_loss` once its configuration is built."""
    shard = None
    if vocab_parallel_group is not None or vocab_start is not None:
        weight, shard = vocab_parallel.resolve(weight, vocab_parallel_group, vocab_start, name="weight")
    _check_head(hidden, weight, bias, logit_softcap, logit_scale, chunk_tokens)
    entropy_coef = check_number("entropy_coef", entropy_coef)
    ref_hidden, ref_weight, ref_bias = _check_reference(config, hidden, weight, ref_hidden, ref_weight, ref_bias)
    if shard is not None and ref_hidden is not None:
        raise NotImplementedError(
            "ref_hidden / ref_weight (kl_estimator='exact') with vocab_parallel_group=: the exact KL over a vocabulary "
            "shard is not implemented; use a sampled kl_estimator (k1/k2/k3/low_var_kl) with ref_logprobs"
        )
    ref_dtype = None if ref_hidden is None else compute_dtype(ref_hidden, ref_weight)
    if ref_dtype is not None and (ref_dtype == torch.float64) != (compute_dtype(hidden, weight) == torch.float64):
        raise TypeError(
            f"ref_hidden / ref_weight compute in {ref_dtype} and hidden / weight in {compute_dtype(hidden, weight)}: "
            "float64 only with float64 on both sides (the torch backend's exact path)"
        )
    head = _head_options(hidden, weight, logit_softcap, logit_scale, chunk_tokens, ref_dtype)
    if entropy_weights is not None:
        check_tensor("entropy_weights", entropy_weights, hidden.device, "hidden")
        check_float("entropy_weights", entropy_weights)
        check_same_shape("entropy_weights", entropy_weights, token_ids.shape, "token_ids")
        entropy_weights = entropy_weights.detach().reshape(-1).to(acc_dtype(head["dtype"]))
    if shard is not None:
        backend = vocab_parallel.shard_backend(backend, hidden.device, head["dtype"] == torch.float64)
    inputs = prepare_loss_inputs(
        "hidden",
        hidden.shape[:-1],
        weight.shape[0] if shard is None else shard.vocab,
        hidden.device,
        head["dtype"] == torch.float64,
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
    grad = torch.is_grad_enabled()
    needs = [grad and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    with_entropy = bool(return_entropy) or entropy_coef != 0.0 or entropy_weights is not None
    if shard is not None:
        loss, lp, entropy, per_token_loss, kl, flags = vocab_parallel.fused_linear_grpo_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            bias,
            inputs.batch,
            config,
            shard,
            entropy_weights=entropy_weights,
            entropy_coef=entropy_coef,
            with_entropy=with_entropy,
            backend=inputs.backend,
            **head,
        )
        entropy = entropy if return_entropy else None
        return loss_output(inputs, token_ids, mask, ignore_index, loss, lp, entropy, per_token_loss, kl, flags)
    loss, lp, entropy, per_token_loss, kl, flags, *_ = op.fused_linear_grpo_loss(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        batch=inputs.batch,
        config=config,
        entropy_weights=entropy_weights,
        entropy_coef=entropy_coef,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        ref_dtype=ref_dtype or head["dtype"],
        with_entropy=with_entropy,
        backend=inputs.backend,
        grad_hidden=needs[0],
        grad_weight=needs[1],
        grad_bias=needs[2],
        **head,
    )
    return loss_output(
        inputs, token_ids, mask, ignore_index, loss, lp, entropy if return_entropy else None, per_token_loss, kl, flags
    )


def fused_linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: Tensor | None = None,
    backend: str = "auto",
    ignore_index: int = -100,
    logit_softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_tokens: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`grpo_kernels.token_logprobs` of ``softcap(logit_scale * (hidden @ weight.T + bias))``, tile by tile,
    without gradient: for the old / reference policy's log-probs (2 N H V FLOPs).

    Arguments as :func:`fused_linear_grpo_loss` and :func:`grpo_kernels.token_logprobs`. Returns ``lp`` float32
    (float64 for a float64 compute dtype) shaped like ``token_ids``, 0 where a position does not take part; with
    ``return_entropy=True``, ``(lp, H)``. Neither carries a gradient.
    """
    _check_head(hidden, weight, bias, logit_softcap, logit_scale, chunk_tokens)
    device = hidden.device
    check_token_ids(token_ids, hidden.shape[:-1], device, "hidden")
    check_mask(mask, token_ids, device, "hidden")
    check_number("temperature", temperature, low=0, low_inclusive=False)
    head = _head_options(hidden, weight, logit_softcap, logit_scale, chunk_tokens)
    name = resolve_backend(backend, device, float64=head["dtype"] == torch.float64)
    ids = kernel_token_ids(token_ids, mask, ignore_index, weight.shape[0])
    detach = lambda x: None if x is None else x.detach()  # noqa: E731
    lp, entropy = op.fused_linear_token_logprobs(
        hidden.reshape(-1, hidden.shape[-1]).detach(),
        weight.detach(),
        detach(bias),
        ids,
        temperature=temperature,
        with_entropy=bool(return_entropy),
        backend=name,
        **head,
    )
    lp = poison(lp, token_ids, ids, mask, ignore_index).view(token_ids.shape)
    if return_entropy:
        return lp, poison(entropy, token_ids, ids, mask, ignore_index).view(token_ids.shape)
    return lp


class FusedLinearGRPOLoss(ConfiguredLoss):
    """:func:`fused_linear_grpo_loss` as a module holding the configuration (the arguments of
    :class:`grpo_kernels.GRPOLoss` except ``inplace_backward``, ``grad_in_forward`` and ``loss_scale``, which do not
    apply: the logits tiles are always overwritten and the gradients are always finished in the forward; plus the
    head's).

    ``FusedLinearGRPOLoss(beta=0.04)(hidden, lm_head.weight, token_ids, advantages, mask=mask, ref_logprobs=ref)``.
    """

    def __init__(
        self,
        *,
        config: LossConfig | None = None,
        logit_softcap: float | None = None,
        logit_scale: float = 1.0,
        entropy_coef: float = 0.0,
        chunk_tokens: int | None = None,
        return_entropy: bool = False,
        backend: str = "auto",
        ignore_index: int = -100,
        **knobs,
    ):
        for key in ("inplace_backward", "grad_in_forward", "loss_scale"):
            if key in knobs:
                raise TypeError(
                    f"FusedLinearGRPOLoss has no {key}: its logits tiles are always overwritten and its gradients "
                    "always finished in the forward"
                )
        _check_head_options(logit_softcap, logit_scale, chunk_tokens)
        super().__init__(
            "FusedLinearGRPOLoss",
            config,
            knobs,
            logit_softcap=logit_softcap,
            logit_scale=logit_scale,
            entropy_coef=check_number("entropy_coef", entropy_coef),
            chunk_tokens=chunk_tokens,
            return_entropy=return_entropy,
            backend=backend,
            ignore_index=ignore_index,
        )

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        token_ids: Tensor,
        advantages: Tensor,
        *,
        bias: Tensor | None = None,
        mask: Tensor | None = None,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        is_weights: Tensor | None = None,
        num_items_in_batch: int | float | Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        entropy_weights: Tensor | None = None,
        vocab_parallel_group=None,
        vocab_start: int | None = None,
    ) -> GRPOLossOutput:
        return _fused_linear_grpo_loss(
            hidden,
            weight,
            token_ids,
            advantages,
            self.loss_config,
            bias=bias,
            mask=mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            is_weights=is_weights,
            num_items_in_batch=num_items_in_batch,
            cu_seqlens=cu_seqlens,
            entropy_weights=entropy_weights,
            vocab_parallel_group=vocab_parallel_group,
            vocab_start=vocab_start,
            **self.options,
        )


with_knob_parameters(FusedLinearGRPOLoss.__init__, LossConfig, after="ignore_index")

# The Hugging Face helpers moved to grpo_kernels.integrations.hf; their names stay importable from here.
from ..integrations.hf import (  # noqa: E402
    causal_lm_grpo_loss,
    causal_lm_head_inputs,
    causal_lm_token_logprobs,
    head_transform,
)

__all__ = [
    "FusedLinearGRPOLoss",
    "causal_lm_grpo_loss",
    "causal_lm_head_inputs",
    "causal_lm_token_logprobs",
    "compute_dtype",
    "default_chunk_tokens",
    "fused_linear_grpo_loss",
    "fused_linear_token_logprobs",
    "head_transform",
]
