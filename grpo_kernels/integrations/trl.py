"""TRL's ``GRPOTrainer`` with the training loss computed by :func:`grpo_kernels.grpo_loss`.

Switch with one import line; the constructor and ``GRPOConfig`` are TRL's::

    from grpo_kernels.integrations.trl import GRPOTrainer   # was: from trl import GRPOTrainer

Only ``_compute_loss`` changes hands. The model runs forward on prompt + completion and returns the completion logits
``[B, C, V]``; one fused op turns them into log-probs, entropy, the clipped-ratio + KL loss and, in the same forward,
the per-token gradient it writes over the logits in the backward. Generation, rewards, advantages, the old and
reference log-probs (TRL 1.16's chunked LM head, which never holds the logits), logging and everything else are TRL's
own code. Built and tested against TRL 1.16.0; ``docs/trl.md`` lists what is supported and what it costs.
"""

from __future__ import annotations

import functools
import inspect

try:
    import trl
except ImportError as error:
    raise ImportError(
        'grpo_kernels.integrations.trl needs TRL >= 1.16, which is not installed: pip install "grpo-kernels[trl]"'
    ) from error

import torch
from packaging.version import Version
from trl import GRPOConfig
from trl import GRPOTrainer as TRLGRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from ..api import grpo_loss, token_logprobs

if Version(trl.__version__) < Version("1.16"):
    raise ImportError(
        f"grpo_kernels.integrations.trl needs TRL >= 1.16 (it overrides GRPOTrainer internals of that version), "
        f'found {trl.__version__}: pip install "grpo-kernels[trl]"'
    )

# TRL loss_type -> ours. TRL's luspo aggregates mean_b sum_t m L, which is dr_grpo with max_completion_length = 1.
_LOSS_TYPES = {
    "grpo": "grpo",
    "bnpo": "bnpo",
    "dr_grpo": "dr_grpo",
    "dapo": "dapo",
    "cispo": "cispo",
    "sapo": "sapo",
    "luspo": "dr_grpo",
}
_CLIP_METRIC_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # TRL logs clip_ratio/* for these
_TRL_INIT_SIGNATURE = inspect.signature(TRLGRPOTrainer.__init__)


def check_config(args: GRPOConfig) -> None:
    """Raise ``ValueError`` when ``args`` asks for an objective this trainer does not compute exactly as TRL 1.16."""
    if args.loss_type not in _LOSS_TYPES:
        raise ValueError(
            f"loss_type={args.loss_type!r} is not supported by grpo_kernels' GRPOTrainer (supported: "
            f"{', '.join(_LOSS_TYPES)}); use trl.GRPOTrainer for it"
        )
    if args.importance_sampling_level not in ("token", "sequence"):
        raise ValueError(
            f"importance_sampling_level must be 'token' or 'sequence', got {args.importance_sampling_level!r}"
        )
    if args.use_liger_kernel:
        raise ValueError(
            "use_liger_kernel=True is not supported by grpo_kernels' GRPOTrainer: Liger patches the model whose "
            "logits this trainer reads, a combination that is not tested; set use_liger_kernel=False"
        )
    if args.cast_lm_head_to_fp32 and (args.bf16 or args.fp16):
        # TRL's fused head projects outside autocast; this trainer calls the model's own forward, where autocast
        # would run the float32 LM head in half precision after all.
        raise ValueError(
            "cast_lm_head_to_fp32=True with bf16/fp16 mixed precision is not supported by grpo_kernels' GRPOTrainer "
            "(autocast would run the LM head in half precision); load the model in half precision without mixed "
            "precision (bf16=False, model_init_kwargs={'dtype': 'bfloat16'}) or set cast_lm_head_to_fp32=False"
        )
    if not args.temperature > 0:
        raise ValueError(
            f"temperature must be > 0 (log-probs are those of softmax(logits / temperature)), got {args.temperature}"
        )
    if args.delta is not None and not args.delta > 1:
        raise ValueError(f"delta (the two-sided clip of the ratio) must be > 1, got {args.delta}")


class GRPOTrainer(TRLGRPOTrainer):
    """TRL's ``GRPOTrainer`` (same constructor, same ``GRPOConfig``) whose training loss is one fused op.

    Computes exactly TRL 1.16's objective for ``loss_type`` grpo, bnpo, dr_grpo, dapo, cispo, sapo and luspo, at
    either ``importance_sampling_level``, with ``beta``, ``epsilon``/``epsilon_high``, ``delta``, ``temperature``,
    ``use_bias_correction_kl``, the vLLM importance-sampling ratio, ``top_entropy_quantile``, the entropy bonus (static
    or adaptive), ``off_policy_mask_threshold``, ``num_items_in_batch`` normalisation and gradient-accumulation
    scaling, ``cast_lm_head_to_fp32`` (without mixed precision); logs TRL's metrics under TRL's names. Raises
    ``ValueError`` at construction for what it does not support (other loss types, ``use_liger_kernel``,
    ``cast_lm_head_to_fp32`` under bf16/fp16 autocast, vision-language models, an MoE router auxiliary loss).
    """

    @functools.wraps(TRLGRPOTrainer.__init__)
    def __init__(self, *args, **kwargs):
        config = _TRL_INIT_SIGNATURE.bind(self, *args, **kwargs).arguments.get("args")
        if config is not None:
            check_config(config)  # before TRL loads the model
        super().__init__(*args, **kwargs)
        check_config(self.args)  # TRL's default config, when none was given
        if self._is_vlm:
            raise ValueError(
                "grpo_kernels' GRPOTrainer supports text-only models; a vision-language processor was given "
                "(use trl.GRPOTrainer for it)"
            )
        if self.aux_loss_enabled:
            raise ValueError(
                "grpo_kernels' GRPOTrainer does not add the MoE router auxiliary loss; set "
                "GRPOConfig(router_aux_loss_coef=0.0) or use trl.GRPOTrainer"
            )

    # ------------------------------------------------------------------------------------------------------------
    # the loss
    # ------------------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        """TRL 1.16's ``_compute_loss`` (same inputs, same loss, same metrics), through one fused op."""
        mode = "train" if self.model.training else "eval"
        completion_ids = inputs["completion_ids"]  # [B, C]
        mask = inputs["completion_mask"]  # [B, C]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        advantages = inputs["advantages"]  # [B], or [B, C] from subclasses that make per-token advantages
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old = inputs.get("old_per_token_logps")  # [B, C]; None: on-policy (ratio 1, as TRL's detached log-probs)

        logits = self._completion_logits(model, inputs)
        is_weights, entropy_mask = self._token_weights(logits, inputs, mask, advantages, old)
        out = grpo_loss(
            logits,
            completion_ids,
            advantages,
            mask=mask,
            old_logprobs=old,
            ref_logprobs=inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
            is_weights=is_weights,
            num_items_in_batch=inputs["num_items_in_batch"],
            return_entropy=True,
            # The logits are the LM head's output and nothing else keeps them for its backward (autograd would raise
            # if something did), so their buffer can take their gradient: no second [B, C, V] tensor.
            inplace_backward=True,
            **self._loss_config(),
        )

        # TRL 1.16's scaling: dapo/cispo divide by num_items_in_batch / num_processes, times accumulation steps /
        # steps_per_generation in training (the op divided by num_items_in_batch); the others divide by the
        # accumulation steps in training. The logged policy loss is taken where TRL takes it.
        if self.loss_type in ("dapo", "cispo"):
            scale = self.accelerator.num_processes
            if mode == "train":
                scale = scale * self.args.steps_per_generation / self.current_gradient_accumulation_steps
            loss = out.loss * scale
            policy_loss = loss.detach()
        else:
            policy_loss = out.loss.detach()
            loss = out.loss / self.current_gradient_accumulation_steps if mode == "train" else out.loss

        if self._entropy_bonus_enabled:
            loss = loss - self._entropy_bonus(out.entropy, mask, entropy_mask, policy_loss, mode)
        self._log_metrics(mode, out, advantages, mask, old)
        return loss

    def _completion_logits(self, model, inputs) -> torch.Tensor:
        """The completion logits ``[B, C, V]``: position t scores completion token t, and no bigger tensor holds them.

        The model runs on prompt + completion without its last token, so its last C positions predict exactly the C
        completion tokens (causal attention: dropping the last token changes no earlier position). The logits thus
        come out of the LM head aligned, not as a ``[:, :-1]`` slice: no copy now, and no zero-filled full-size
        gradient from a slice's backward later, which is what lets ``inplace_backward`` reuse this buffer.

        This is the one place that turns the model into per-token scores. The fused-linear path (hidden states + LM
        head weight, never the logits) belongs here, with the two ops ``_compute_loss`` and ``_token_weights`` apply
        to the result.
        """
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids[:, :-1]], dim=1)  # [B, P + C - 1]
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"][:, :-1]], dim=1)
        with self.accelerator.autocast():
            outputs = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                logits_to_keep=completion_ids.size(1),
                use_cache=False,
            )
        return outputs.logits

    def _token_weights(self, logits, inputs, mask, advantages, old):
        """TRL's per-token factors of the policy term, which it applies before adding the KL: our ``is_weights``.

        Returns ``(is_weights, entropy_mask)``: ``is_weights`` ``[B, 1]`` or ``[B, C]`` float, or None when no
        factor applies (off-policy sequence mask, high-entropy token mask, vLLM importance-sampling ratio);
        ``entropy_mask`` ``[B, C]`` bool or None (the entropy bonus uses it too).
        """
        factors, entropy_mask = [], None
        if self.top_entropy_quantile < 1.0 or self.off_policy_mask_threshold is not None:
            # Both masks depend on the current log-probs / entropies, so they cost one more read of the logits before
            # the fused loss (no gradient, nothing of size [B, C, V] allocated).
            with torch.no_grad():
                lp, entropy = token_logprobs(
                    logits, inputs["completion_ids"], temperature=self.temperature, return_entropy=True, mask=mask
                )
            if self.off_policy_mask_threshold is not None:
                sampling = inputs.get("sampling_per_token_logps", lp if old is None else old)
                factors.append(self.get_off_policy_mask(advantages, lp, sampling, mask, self.off_policy_mask_threshold))
            if self.top_entropy_quantile < 1.0:
                entropy_mask = self.get_high_entropy_mask(entropy, mask, 1 - self.top_entropy_quantile)
                factors.append(entropy_mask)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            factors.append(inputs["importance_sampling_ratio"])  # [B, C] (token modes) or [B, 1] (sequence modes)
        weights = None
        for factor in factors:
            weights = factor.float() if weights is None else weights * factor
        return weights, entropy_mask

    def _loss_config(self) -> dict:
        """The :func:`grpo_loss` arguments that come from the trainer's configuration (read per call, as TRL does)."""
        return dict(
            loss_type=_LOSS_TYPES[self.loss_type],
            beta=self.beta,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=self.args.delta,
            temperature=self.temperature,
            importance_sampling_level=self.importance_sampling_level,
            bias_corrected_kl=self.args.use_bias_correction_kl,
            max_completion_length=1 if self.loss_type == "luspo" else self.max_completion_length,
            sapo_temperature_pos=self.args.sapo_temperature_pos,
            sapo_temperature_neg=self.args.sapo_temperature_neg,
        )

    # ------------------------------------------------------------------------------------------------------------
    # entropy bonus (TRL 1.16: L = L_policy - coef * H, H the mean entropy over the tokens the policy term acts on)
    # ------------------------------------------------------------------------------------------------------------
    def _entropy_bonus(self, entropy, mask, entropy_mask, policy_loss, mode):
        if entropy_mask is not None:
            mask = mask * entropy_mask
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        mean_entropy = (entropy * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
        # The coefficient (and, adaptive, its gate) of the end of the previous optimizer step: every micro-batch of
        # an accumulation window gets the same bonus.
        if self.use_adaptive_entropy:
            coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        else:
            coef = self.entropy_coef
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            self._update_entropy_coef(entropy, mask)
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        return coef * mean_entropy

    def _update_entropy_coef(self, entropy, mask):
        """Adaptive control: accumulate the window's entropy; at the optimizer step, move the coefficient one step."""
        stats = torch.stack([(entropy * mask).sum(), mask.sum().float()]).detach()
        window = self._entropy_window_stats
        self._entropy_window_stats = stats if window is None else window + stats
        if not self.accelerator.sync_gradients:
            return
        totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
        if world_entropy <= self.args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min)
        self._last_world_entropy = world_entropy
        self._entropy_window_stats = None

    # ------------------------------------------------------------------------------------------------------------
    # metrics: TRL's names and definitions
    # ------------------------------------------------------------------------------------------------------------
    def _log_metrics(self, mode, out, advantages, mask, old):
        metrics = self._metrics[mode]
        count = mask.sum().float()

        def log_mean(name, total, denominator):  # global mean: sums and counts reduced over processes
            totals = self.accelerator.reduce(torch.stack([total, denominator]), reduction="sum")
            metrics[name].append((totals[0] / totals[1].clamp(min=1.0)).item())

        def log_masked_mean(name, x):  # x [B, 1]: one value per sequence; [B, C]: per token
            if x.shape[1] == 1:
                log_mean(name, x.sum(), torch.tensor(float(x.shape[0]), device=x.device))
            else:
                log_mean(name, (x * mask).sum(), count)

        def per_sequence_mean(x):  # NaN for a sequence without tokens (TRL's nanmin / nanmax skip it)
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        # The op's means are masked token means, as TRL's kl and entropy: back to sums for the cross-process mean.
        if self.beta != 0.0:
            log_mean("kl", out.kl_mean * count, count)
        log_mean("entropy", out.entropy_mean * count, count)

        # TRL's clip metrics use the importance ratio itself, one per sequence at sequence level (the op's clip
        # fractions are token-weighted), so they are recomputed here from the op's detached log-probs.
        if self.loss_type not in _CLIP_METRIC_LOSS_TYPES and self.loss_type != "cispo":
            return
        log_ratio = out.logprobs - old if old is not None else torch.zeros_like(out.logprobs)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(log_ratio)  # [B, C] or [B, 1]
        if self.loss_type == "cispo":
            log_masked_mean("cispo_clip_ratio", ((ratio > self.epsilon_high) & (advantages > 0)).float())
            return
        if self.args.delta is not None:
            ratio = torch.clamp(ratio, max=self.args.delta)  # TRL's metrics see the two-sided-clipped ratio
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        log_masked_mean("clip_ratio/low_mean", low)
        log_masked_mean("clip_ratio/high_mean", high)
        log_masked_mean("clip_ratio/region_mean", torch.maximum(low, high))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(per_sequence_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(per_sequence_mean(high))).item())


__all__ = ["GRPOConfig", "GRPOTrainer", "check_config"]
