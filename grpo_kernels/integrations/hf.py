"""Hugging Face causal LMs on the fused-linear loss: backbone + fused head, ``model(...).logits`` never computed."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._inputs import GRPOLossOutput


def head_transform(config) -> tuple[float | None, float]:
    """``(logit_softcap, logit_scale)`` a Hugging Face config applies after its LM head.

    Read as TRL 1.16's fused LM head reads them: ``final_logit_softcapping`` (Gemma 2/3, Muse); the scale, first of
    ``logit_scale`` (Cohere), ``output_multiplier`` (Muse), ``lm_head_multiplier`` (Falcon-H1), ``logits_scaling``
    (Granite divides by it, HyperCLOVA X multiplies). Any other post-processing of the logits is not known here: pass
    ``logit_softcap`` / ``logit_scale`` explicitly for such a model.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None) if scale is None else scale
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        multiplies = getattr(text, "model_type", None) == "hyperclovax"
        scale = text.logits_scaling if multiplies else 1.0 / text.logits_scaling
    return softcap, 1.0 if scale is None else float(scale)


def router_aux_loss(config, router_logits, attention_mask: Tensor | None) -> Tensor:
    """The MoE load-balancing loss of one forward, as TRL 1.16's fused LM head computes it: transformers' Mixtral
    ``load_balancing_loss_func`` (the one every MoE family shares) over every layer's router logits, with the
    config's ``num_experts`` / ``num_experts_per_tok`` and the forward's ``attention_mask`` ``[B, L]`` (padding
    excluded). ``router_logits``: the backbone's ``router_logits`` (one ``[B * L, num_experts]`` tensor per layer),
    from a forward with ``output_router_logits=True``."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if router_logits is None:
        raise ValueError("router_logits is None: run the backbone with output_router_logits=True")
    return load_balancing_loss_func(router_logits, text.num_experts, text.num_experts_per_tok, attention_mask)


def lm_head_weight(head: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` that ``head`` computes ``hidden @ weight.T + bias`` with.

    A plain ``nn.Linear`` gives its own parameters. Anything else (a PEFT adapter on the LM head, a quantised layer,
    a subclass with its own ``forward``) raises ``ValueError``: its ``weight`` alone is not what it computes, and
    projecting with it would silently drop the adapter (the adapter would never train). TRL 1.16 refuses a PEFT
    adapter on ``lm_head`` for the same reason.
    """
    if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward:
        return head.weight, head.bias
    raise ValueError(
        f"the LM head is a {type(head).__name__}, not a plain torch.nn.Linear (e.g. a PEFT adapter or a quantised "
        "layer on lm_head): its weight alone is not what it computes, so the fused-linear path cannot use it; merge "
        "the adapter (merge_and_unload()), remove 'lm_head' from the adapter's target_modules, or compute the loss "
        "from the model's logits (grpo_kernels.grpo_loss)"
    )


def causal_lm_head_inputs(
    model: nn.Module,
    input_ids: Tensor,  # [B, L]
    attention_mask: Tensor | None,  # [B, L]
    logits_to_keep: int,
    *,
    completion_mask: Tensor | None = None,  # [B, C]
    model_kwargs: dict | None = None,
    return_backbone_output: bool = False,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """What :func:`causal_lm_grpo_loss` passes to :func:`fused_linear_grpo_loss`, for callers that make more than
    one fused call on one backbone run (e.g. a no-grad :func:`fused_linear_token_logprobs` pass, then the loss).

    Runs the backbone and returns ``(hidden [B, C, H], lm_head.weight, targets [B, C], head_kwargs)``: ``hidden`` a
    view of ``last_hidden_state`` whose row ``t`` predicts completion token ``t``, ``head_kwargs`` the ``bias``,
    ``mask`` (``completion_mask``), ``logit_softcap`` and ``logit_scale`` keyword arguments of both fused functions;
    with ``return_backbone_output=True`` the backbone's whole output comes fifth (e.g. its ``router_logits`` for
    :func:`router_aux_loss`). The LM head must be a plain ``nn.Linear`` (:func:`lm_head_weight`, else
    ``ValueError``). Arguments as :func:`causal_lm_grpo_loss`.
    """
    length = input_ids.shape[1]
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or not 0 < logits_to_keep < length:
        raise ValueError(
            f"logits_to_keep must be an int in [1, L) = [1, {length}) (the completion length; at least one prompt "
            f"token must precede the completion), got {logits_to_keep!r}"
        )
    weight, bias = lm_head_weight(model.get_output_embeddings())  # before the backbone runs: fail early
    outputs = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **(model_kwargs or {})
    )
    hidden = outputs.last_hidden_state[:, length - logits_to_keep - 1 : length - 1]  # a view: no copy
    if completion_mask is None and attention_mask is not None:
        completion_mask = attention_mask[:, -logits_to_keep:]
    softcap, scale = head_transform(model.config)
    kwargs = dict(bias=bias, mask=completion_mask, logit_softcap=softcap, logit_scale=scale)
    result = (hidden, weight, input_ids[:, -logits_to_keep:], kwargs)
    return (*result, outputs) if return_backbone_output else result


def causal_lm_grpo_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    logits_to_keep: int,
    advantages: Tensor,
    *,
    completion_mask: Tensor | None = None,
    model_kwargs: dict | None = None,
    **loss_kwargs,
) -> GRPOLossOutput:
    """The GRPO loss of a Hugging Face causal LM's completions: backbone, then :func:`fused_linear_grpo_loss` on its
    LM head; ``model(...).logits`` is never computed.

    Layout (TRL's): ``input_ids`` ``[B, L]`` is the prompt followed by the completion, whose tokens are the last
    ``C = logits_to_keep`` columns. The hidden state at position ``L - C - 1 + t`` predicts completion token ``t``
    (``input_ids[:, L - C + t]``), exactly as ``model(input_ids, logits_to_keep=C + 1).logits[:, :-1]`` would.

    Args:
        model: a ``transformers`` causal LM: ``model.base_model`` (the backbone, e.g. ``model.model``) returns
            ``last_hidden_state`` and ``model.get_output_embeddings()`` is the LM head (``model.lm_head``). The
            head's post-processing is read from the config by :func:`head_transform` (``loss_kwargs`` may override
            ``logit_softcap`` / ``logit_scale``).
        input_ids: ``[B, L]``; attention_mask: ``[B, L]`` or None, passed to the backbone.
        logits_to_keep: ``C``, the completion length, ``1 <= C < L``.
        advantages: ``[B]`` or ``[B, C]``.
        completion_mask: ``[B, C]``; default ``attention_mask[:, -C:]`` (all ones without a mask).
        model_kwargs: more keyword arguments for the backbone (e.g. ``position_ids``).
        **loss_kwargs: every other argument of :func:`fused_linear_grpo_loss` (``old_logprobs`` / ``ref_logprobs``
            ``[B, C]``, ``beta``, ``loss_type``, ``temperature``, ...).

    Returns:
        :class:`grpo_kernels.GRPOLossOutput`, per-token fields ``[B, C]``; ``loss`` is differentiable w.r.t. the
        model's parameters (through the head and the backbone).
    """
    hidden, weight, targets, kwargs = causal_lm_head_inputs(
        model, input_ids, attention_mask, logits_to_keep, completion_mask=completion_mask, model_kwargs=model_kwargs
    )
    from ..fused_linear import fused_linear_grpo_loss

    return fused_linear_grpo_loss(hidden, weight, targets, advantages, **{**kwargs, **loss_kwargs})


def causal_lm_token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    logits_to_keep: int,
    *,
    completion_mask: Tensor | None = None,
    model_kwargs: dict | None = None,
    **logprob_kwargs,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs ``[B, C]`` of the completion tokens under a Hugging Face causal LM (old / reference policy), under
    ``torch.no_grad`` and without the logits. Layout and arguments as :func:`causal_lm_grpo_loss`;
    ``logprob_kwargs`` go to :func:`fused_linear_token_logprobs` (``temperature``, ``return_entropy``, ...)."""
    with torch.no_grad():
        hidden, weight, targets, kwargs = causal_lm_head_inputs(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            completion_mask=completion_mask,
            model_kwargs=model_kwargs,
        )
        from ..fused_linear import fused_linear_token_logprobs

        return fused_linear_token_logprobs(hidden, weight, targets, **{**kwargs, **logprob_kwargs})


__all__ = [
    "causal_lm_grpo_loss",
    "causal_lm_head_inputs",
    "causal_lm_token_logprobs",
    "head_transform",
    "lm_head_weight",
    "router_aux_loss",
]
