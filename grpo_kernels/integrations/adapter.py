"""The fused GRPO loss for trainers that are not TRL: model outputs + a batch dict in, loss and metrics out.

The batch uses one common layout (TRL's names where TRL has one). ``B`` sequences, ``T`` completion positions::

    completion_mask     [B, T]   1 where the completion token takes part in the loss (required)
    completion_ids      [B, T]   the completion tokens; or input_ids [B, L] whose last T columns are the completion
    advantages          [B] / [B, 1] / [B, T]
    old_logprobs        [B, T]   log-probs of the sampling policy (absent: on-policy, ratio 1)
    ref_logprobs        [B, T]   reference-policy log-probs (required when beta != 0)
    is_weights          [B] / [B, 1] / [B, T]   rollout importance weights (e.g. vLLM's truncated IS ratio)
    num_items_in_batch  number or 0-dim tensor  normaliser of dapo / cispo (e.g. the global token count)

verl's batch maps onto it as ``responses`` -> ``completion_ids``, ``response_mask`` -> ``completion_mask``,
``old_log_probs`` -> ``old_logprobs``, ``ref_log_prob`` -> ``ref_logprobs``, ``advantages`` -> ``advantages``, and
its ``policy_loss.loss_mode`` and ``loss_agg_mode`` names onto our loss types and aggregations through
``loss_mode=`` and ``loss_agg_mode=`` below (see ``docs/trl.md``; docs/math.md sections 6 and 9).

Only logits are accepted today. Hidden states + LM head (the fused-linear path, which never materialises the logits)
will enter here as a second way to give the model's outputs, next to ``completion_logits``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .._inputs import GRPOLossOutput
from ..api import grpo_loss

# verl loss_agg_mode -> (our loss_type, max_completion_length); "T" stands for the batch's completion width.
#   token-mean              sum m L / sum m                     = bnpo
#   seq-mean-token-mean     mean_b (sum_t m L / sum_t m)        = grpo
#   seq-mean-token-sum      mean_b sum_t m L  = sum m L / B     = dr_grpo with max_completion_length 1
#   seq-mean-token-sum-norm sum m L / T       (no 1/B in verl)  = dr_grpo with max_completion_length T, times B
VERL_LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# verl policy_loss.loss_mode -> our loss_type ("vanilla": the clip family, named by the aggregation as above). The
# others keep their verl name; loss_agg_mode then picks their ``aggregation`` (verl's geo_mean ignores it: always the
# mean over sequences).
VERL_LOSS_MODES = ("vanilla", "geo_mean", "clip_cov", "kl_cov", "gpg")


def completion_logits(logits: Tensor, num_completion: int) -> Tensor:
    """The logits aligned with the ``T`` completion tokens, as a view of ``logits`` (never a copy).

    Args:
        logits: ``[B, L', V]``. With ``L' == T`` they are taken as already aligned (``logits[:, t]`` scores
            completion token ``t``: the model ran on the sequence without its last token with ``logits_to_keep=T``,
            the layout that lets ``inplace_backward`` reuse the buffer). With ``L' > T`` they are the model's logits
            over the end of the full sequence (``logits_to_keep >= T + 1``, or all positions): position ``j``
            predicts token ``j + 1``, so ``logits[:, -T-1:-1]`` is used.
        num_completion: ``T``.

    Returns:
        ``[B, T, V]``, a view of ``logits``.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, L, V], got shape {list(logits.shape)}")
    length = logits.shape[1]
    if length == num_completion:
        return logits
    if length > num_completion:
        return logits[:, length - num_completion - 1 : length - 1]
    raise ValueError(
        f"logits cover {length} positions but the batch has {num_completion} completion positions: run the model "
        f"with logits_to_keep >= {num_completion + 1} (or on the sequence without its last token, logits_to_keep="
        f"{num_completion})"
    )


def grpo_loss_from_batch(
    outputs,
    batch: Mapping[str, Tensor],
    *,
    loss_agg_mode: str | None = None,
    loss_mode: str | None = None,
    **loss_kwargs,
) -> GRPOLossOutput:
    """:func:`grpo_kernels.grpo_loss` on a model's outputs and a batch dict in the common layout (module docstring).

    Args:
        outputs: the model's output (anything with a ``.logits`` attribute, e.g. a transformers ``ModelOutput``) or
            the logits tensor itself; see :func:`completion_logits` for the accepted lengths.
        batch: the batch dict.
        loss_agg_mode: a verl name (``VERL_LOSS_AGG_MODES``) instead of ``loss_type``; the returned ``loss`` is then
            exactly verl's aggregation (up to verl's ``+ 1e-8`` in its masked means), including
            ``seq-mean-token-sum-norm``'s division by ``T`` alone.
        loss_mode: verl's ``actor.policy_loss.loss_mode`` (``VERL_LOSS_MODES``) instead of ``loss_type``:
            ``"vanilla"`` (the clip family: ``loss_type`` from ``loss_agg_mode``, default bnpo = token-mean, verl's
            default), ``"geo_mean"``, ``"clip_cov"``, ``"kl_cov"``, ``"gpg"``; with ``loss_agg_mode`` the latter three
            aggregate as verl would (``aggregation=``), geo_mean ignores it as verl does. Their knobs keep verl's names
            (``clip_cov_ratio``, ``clip_cov_lb``, ``clip_cov_ub``, ``kl_cov_ratio``, ``ppo_kl_coef``; ``epsilon_low``
            / ``epsilon_high`` are verl's ``clip_ratio_low`` / ``clip_ratio_high``).
        **loss_kwargs: every other keyword of :func:`grpo_kernels.grpo_loss` (``loss_type``, ``beta``,
            ``epsilon_low``, ``epsilon_high``, ``dual_clip``, ``kl_estimator``, ``temperature``,
            ``importance_sampling_level``, ``return_entropy``, ``inplace_backward``, ``backend``, ...).

    Returns:
        :class:`grpo_kernels.GRPOLossOutput`: the differentiable ``loss`` and the metrics (``kl_mean``, ``clip_low``,
        ``clip_high``, ``clip_region``, ``entropy_mean``, ``logprob_mean``; 0-dim tensors, no host sync).
    """
    logits = outputs if isinstance(outputs, Tensor) else outputs.logits
    mask = batch["completion_mask"]
    num_completion = mask.shape[-1]
    if "completion_ids" in batch:
        token_ids = batch["completion_ids"]
    elif "input_ids" in batch:
        token_ids = batch["input_ids"][:, -num_completion:]
    else:
        raise KeyError("batch needs 'completion_ids' [B, T] or 'input_ids' [B, L] (its last T columns)")

    if loss_mode is not None:
        if loss_mode not in VERL_LOSS_MODES:
            raise ValueError(f"loss_mode must be one of {list(VERL_LOSS_MODES)}, got {loss_mode!r}")
        if "loss_type" in loss_kwargs:
            raise ValueError("pass either loss_mode (verl's name) or loss_type, not both")
        if loss_mode == "vanilla" and loss_agg_mode is None:
            loss_agg_mode = "token-mean"  # verl's default
    own_policy = loss_mode not in (None, "vanilla")  # a verl loss of its own: the aggregation is a separate knob
    if own_policy:
        loss_kwargs["loss_type"] = loss_mode

    scale = 1.0
    if loss_agg_mode is not None and loss_mode != "geo_mean":
        key = "aggregation" if own_policy else "loss_type"
        if key in loss_kwargs or "max_completion_length" in loss_kwargs:
            raise ValueError(f"pass either loss_agg_mode (verl's name) or {key} / max_completion_length, not both")
        if loss_agg_mode == "token-mean":
            loss_kwargs[key] = "bnpo"
        elif loss_agg_mode == "seq-mean-token-mean":
            loss_kwargs[key] = "grpo"
        elif loss_agg_mode == "seq-mean-token-sum":
            loss_kwargs.update({key: "dr_grpo", "max_completion_length": 1})
        elif loss_agg_mode == "seq-mean-token-sum-norm":
            loss_kwargs.update({key: "dr_grpo", "max_completion_length": num_completion})
            scale = float(mask.shape[0])
        else:
            raise ValueError(f"loss_agg_mode must be one of {list(VERL_LOSS_AGG_MODES)}, got {loss_agg_mode!r}")

    out = grpo_loss(
        completion_logits(logits, num_completion),
        token_ids,
        batch["advantages"],
        mask=mask,
        old_logprobs=batch.get("old_logprobs"),
        ref_logprobs=batch.get("ref_logprobs"),
        is_weights=batch.get("is_weights"),
        num_items_in_batch=batch.get("num_items_in_batch"),
        **loss_kwargs,
    )
    return out if scale == 1.0 else out._replace(loss=out.loss * scale)


__all__ = ["VERL_LOSS_AGG_MODES", "VERL_LOSS_MODES", "completion_logits", "grpo_loss_from_batch"]
