"""TRL's ``GRPOTrainer`` with the training loss computed by grpo_kernels' fused ops.

Switch with one import line; the constructor and ``GRPOConfig`` are TRL's::

    from grpo_kernels.integrations.trl import GRPOTrainer   # was: from trl import GRPOTrainer

Only ``_compute_loss`` changes hands, along one of two paths:

- ``"fused_linear"`` (the default whenever the model allows it): the backbone's hidden states and the LM head's
  weight go to :func:`grpo_kernels.fused_linear.fused_linear_grpo_loss`, which computes log-probs, entropy, the
  clipped-ratio + KL loss and finishes the gradients tile by tile: the ``[B, C, V]`` logits never exist.
- ``"logits"``: the model returns the completion logits ``[B, C, V]`` and :func:`grpo_kernels.grpo_loss` turns them
  into the same outputs, writing the gradient over the logits in the backward.

Generation, rewards, advantages, the old and reference log-probs (TRL 1.16's chunked LM head), logging and everything
else are TRL's own code. Built and tested against TRL 1.16.0; ``docs/trl.md`` lists what is supported and what each
path costs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import types

try:
    import trl
except ImportError as error:
    raise ImportError(
        'grpo_kernels.integrations.trl needs TRL >= 1.16, which is not installed: pip install "grpo-kernels[trl]"'
    ) from error

import torch
from packaging.version import Version
from torch import nn
from trl import GRPOConfig
from trl import GRPOTrainer as TRLGRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from ..api import grpo_loss, token_logprobs
from ..fused_linear import fused_linear_grpo_loss, fused_linear_token_logprobs
from .hf import causal_lm_head_inputs, head_transform, router_aux_loss

if Version(trl.__version__) < Version("1.16"):
    raise ImportError(
        f"grpo_kernels.integrations.trl needs TRL >= 1.16 (it overrides GRPOTrainer internals of that version), "
        f'found {trl.__version__}: pip install "grpo-kernels[trl]"'
    )

logger = logging.getLogger(__name__)

# TRL loss_type -> ours. TRL's luspo aggregates mean_b sum_t m L, which is dr_grpo with max_completion_length = 1.
_LOSS_TYPES = {
    "grpo": "grpo",
    "bnpo": "bnpo",
    "dr_grpo": "dr_grpo",
    "dapo": "dapo",
    "cispo": "cispo",
    "sapo": "sapo",
    "luspo": "dr_grpo",
    "vespo": "vespo",
}
_VESPO_MIN_LAMBDA = 1e-4  # TRL 1.16's get_gamma_weights clamps both decay rates to at least this
# GRPOTrainer (its GRPOConfig) -> the knobs of grpo_kernels.LossConfig: the one place where TRL's names meet ours.
# Knobs not listed keep LossConfig's defaults (TRL 1.16 has no dual_clip, its KL estimator is k3).
TRL_KNOBS = {
    "loss_type": lambda t: _LOSS_TYPES[t.loss_type],
    "beta": lambda t: t.beta,
    "epsilon_low": lambda t: t.epsilon_low,
    "epsilon_high": lambda t: t.epsilon_high,
    "delta": lambda t: None if t.loss_type == "vespo" else t.args.delta,  # TRL's vespo ignores delta
    "temperature": lambda t: t.temperature,
    "importance_sampling_level": lambda t: t.importance_sampling_level,
    "bias_corrected_kl": lambda t: t.args.use_bias_correction_kl,
    "max_completion_length": lambda t: 1 if t.loss_type == "luspo" else t.max_completion_length,
    "sapo_temperature_pos": lambda t: t.args.sapo_temperature_pos,
    "sapo_temperature_neg": lambda t: t.args.sapo_temperature_neg,
    "vespo_k_pos": lambda t: t.args.vespo_k_pos,
    "vespo_lambda_pos": lambda t: max(t.args.vespo_lambda_pos, _VESPO_MIN_LAMBDA),
    "vespo_k_neg": lambda t: t.args.vespo_k_neg,
    "vespo_lambda_neg": lambda t: max(t.args.vespo_lambda_neg, _VESPO_MIN_LAMBDA),
}
_ITEM_NORMALISED_LOSS_TYPES = ("dapo", "cispo", "vespo")  # TRL divides these by num_items_in_batch
_CLIP_METRIC_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # TRL logs clip_ratio/* for these
_LOSS_PATHS = ("auto", "fused_linear", "logits")
_TRL_INIT_SIGNATURE = inspect.signature(TRLGRPOTrainer.__init__)
_PROBE_TOKENS = 8  # sequence length of the construction-time check of the fused-linear path
# The batch keys TRL 1.16's _compute_loss hands to _get_per_token_logps_and_entropies (image inputs)
_TRL_LOGPS_PARAMETERS = list(inspect.signature(TRLGRPOTrainer._get_per_token_logps_and_entropies).parameters)
_TRL_FORWARD_INPUTS = tuple(_TRL_LOGPS_PARAMETERS[_TRL_LOGPS_PARAMETERS.index("compute_aux_loss") + 1 :])


def check_config(args: GRPOConfig, loss_path: str = "auto") -> None:
    """Raise ``ValueError`` when ``args`` asks for an objective this trainer does not compute exactly as TRL 1.16
    (on ``loss_path``; with ``"auto"`` the path-specific checks wait until the path is known)."""
    if loss_path not in _LOSS_PATHS:
        raise ValueError(f"loss_path must be one of {', '.join(map(repr, _LOSS_PATHS))}, got {loss_path!r}")
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
    if loss_path == "logits" and args.cast_lm_head_to_fp32 and (args.bf16 or args.fp16):
        # TRL's fused head projects outside autocast; the logits path calls the model's own forward, where autocast
        # would run the float32 LM head in half precision after all. The fused-linear path projects outside autocast.
        raise ValueError(
            "cast_lm_head_to_fp32=True with bf16/fp16 mixed precision is not supported on grpo_kernels' logits path "
            "(autocast would run the LM head in half precision); use the fused-linear path where the model allows "
            "it, load the model in half precision without mixed precision (bf16=False, "
            "model_init_kwargs={'dtype': 'bfloat16'}) or set cast_lm_head_to_fp32=False"
        )
    if not args.temperature > 0:
        raise ValueError(
            f"temperature must be > 0 (log-probs are those of softmax(logits / temperature)), got {args.temperature}"
        )
    if args.delta is not None and not args.delta > 1:
        raise ValueError(f"delta (the two-sided clip of the ratio) must be > 1, got {args.delta}")


def _route_loss_through_forward(model: nn.Module) -> None:
    """Let ``model(..., grpo_kernels_loss=fn)`` return ``fn(model, ...)`` from inside the model's forward.

    Wrappers (DDP, accelerate's autocast and float32 outputs, PEFT) do their bookkeeping only for calls that go
    through their forward: DDP, for one, arms its gradient all-reduce there. So the backbone and the fused loss run
    inside the forward, as TRL's own ``fused_lm_head=True`` does. Without the keyword the forward is unchanged.
    """
    forward = model.forward

    @functools.wraps(type(model).forward)  # keeps the signature that generate() validates its kwargs against
    def routed_forward(self, *args, grpo_kernels_loss=None, **kwargs):
        if grpo_kernels_loss is None:
            return forward(*args, **kwargs)
        return grpo_kernels_loss(self, *args, **kwargs)

    model.forward = types.MethodType(routed_forward, model)


def _project(hidden, head, softcap, scale):
    """The logits the fused-linear path computes: ``softcap(scale * head(hidden))``, in float32."""
    dtype = torch.promote_types(hidden.dtype, head.weight.dtype)
    bias = None if head.bias is None else head.bias.to(dtype)
    z = nn.functional.linear(hidden.to(dtype), head.weight.to(dtype), bias).float() * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


class GRPOTrainer(TRLGRPOTrainer):
    """TRL's ``GRPOTrainer`` (same constructor, same ``GRPOConfig``) whose training loss is one fused op.

    Computes exactly TRL 1.16's objective for ``loss_type`` grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo and vespo, at
    either ``importance_sampling_level``, with ``beta``, ``epsilon``/``epsilon_high``, ``delta``, ``temperature``,
    ``use_bias_correction_kl``, the vLLM importance-sampling ratio, ``top_entropy_quantile``, the entropy bonus (static
    or adaptive), ``off_policy_mask_threshold``, ``num_items_in_batch`` normalisation and gradient-accumulation
    scaling, ``cast_lm_head_to_fp32``, the MoE router auxiliary loss (``router_aux_loss_coef``) and vision-language
    models (TRL's image inputs); logs TRL's metrics under TRL's names. TRL's own constructor runs first, so what TRL
    refuses fails with TRL's error; then ``ValueError`` for what this trainer does not compute exactly (other loss
    types, ``use_liger_kernel``, ``cast_lm_head_to_fp32`` under bf16/fp16 autocast on the logits path; docs/trl.md).

    One keyword more than TRL's constructor:

    Args:
        loss_path: ``"auto"`` (default): the fused-linear path (hidden states + LM head, the logits never exist)
            when the model allows it, else the logits path, with the reason logged once at INFO level.
            ``"fused_linear"``: that path or a ``ValueError`` naming why the model does not allow it. ``"logits"``:
            the model's logits ``[B, C, V]`` and :func:`grpo_kernels.grpo_loss`.

    Attributes:
        loss_path: the path taken, ``"fused_linear"`` or ``"logits"``.
        loss_path_reason: why the fused-linear path is not taken (None when it is).
    """

    @functools.wraps(TRLGRPOTrainer.__init__)
    def __init__(self, *args, loss_path: str = "auto", **kwargs):
        # TRL validates first, so that what stock TRL refuses fails here with TRL's exception and message; then the
        # drop-in's own checks, for settings TRL accepts that it cannot compute exactly.
        super().__init__(*args, **kwargs)
        check_config(self.args, loss_path)
        self.loss_path, self.loss_path_reason = self._choose_loss_path(loss_path)
        self._loss_in_head_forward = False
        if self.loss_path == "logits":
            check_config(self.args, "logits")
        else:
            _route_loss_through_forward(self._patched_model())
            self._loss_in_head_forward = self._route_through_sharded_head()

    # ------------------------------------------------------------------------------------------------------------
    # which path
    # ------------------------------------------------------------------------------------------------------------
    def _patched_model(self) -> nn.Module:
        """The transformers model under a PEFT wrapper, if any: the one TRL gave its fused LM head."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _choose_loss_path(self, requested: str) -> tuple[str, str | None]:
        """``(path, reason)``: the fused-linear path unless ``requested`` is "logits" or the model does not allow it."""
        if requested == "logits":
            logger.info("grpo_kernels GRPOTrainer: the logits path computes the loss (loss_path='logits')")
            return "logits", "loss_path='logits' was asked for"
        reason = self._decided_by_rank_zero(self._fused_linear_unsupported())
        if reason is None:
            logger.info(
                "grpo_kernels GRPOTrainer: the fused-linear path computes the loss (hidden states + LM head; the "
                "[B, C, V] logits are never materialised)"
            )
            return "fused_linear", None
        if requested == "fused_linear":
            raise ValueError(f"loss_path='fused_linear' is not available for this model: {reason}")
        logger.info(
            "grpo_kernels GRPOTrainer: the logits path computes the loss (it holds the [B, C, V] logits); the "
            "fused-linear path is not available: %s",
            reason,
        )
        return "logits", reason

    def _fused_linear_unsupported(self) -> str | None:
        """Why the fused-linear path would not compute what the model's forward computes, or None.

        It runs ``model.base_model`` and projects with ``get_output_embeddings().weight`` / ``.bias`` and the logit
        transform of the config (:func:`grpo_kernels.fused_linear.head_transform`, the attributes TRL's fused head
        reads). So the head must be a plain ``nn.Linear`` whose weight is all there, and the model's logits must be
        exactly that projection: checked on a few tokens at construction.
        """
        sharding = self._sharded_engine_unsupported()
        if sharding is not None:
            return sharding
        model = self._patched_model()
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
            return (
                f"the LM head is a {type(head).__name__}, not a plain torch.nn.Linear (e.g. a PEFT adapter or a "
                "quantised layer on lm_head), so its weight alone is not what it computes"
            )
        if "forward" in vars(head) and not self.args.cast_lm_head_to_fp32:  # TRL's float32 cast replaces forward
            return "the LM head's forward is replaced (e.g. by accelerate's offloading hooks)"
        if head.weight.is_meta:
            return "the LM head's weight is on the meta device (offloaded)"
        if model.base_model is model:
            return f"{type(model).__name__} has no separate backbone (base_model is the model itself)"
        if self._sharded_engine() == "deepspeed_zero3":
            # ZeRO-3 partitions the weights when the model is loaded and gathers them only inside the forwards of
            # the engine it builds at train time: no forward can run here, so the probe is left out.
            logger.info(
                "grpo_kernels GRPOTrainer: DeepSpeed ZeRO-3: the construction-time probe of the logits is skipped"
            )
            return None
        return self._probe_fused_linear(model, head)

    @torch.no_grad()
    def _probe_fused_linear(self, model, head) -> str | None:
        """Compare the model's logits with what the fused-linear path projects, on ``_PROBE_TOKENS`` tokens.

        Catches post-processing of the logits that ``head_transform`` does not read (a scale, a cap, an offset), to
        the rounding of the model's dtype: 8 ulps of the largest logit. Runs in eval mode (no dropout).
        """
        device = head.weight.device
        input_ids = (torch.arange(_PROBE_TOKENS, device=device) % head.weight.shape[0]).unsqueeze(0)
        training = model.training
        model.eval()
        try:
            logits = model(input_ids=input_ids, use_cache=False).logits.float()
            hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
            if hidden.device != device:  # the fused op takes every tensor on one device
                return f"the backbone's output is on {hidden.device} and the LM head on {device} (a split model)"
            projected = _project(hidden, head, *head_transform(model.config))
        except Exception as error:  # noqa: BLE001 - any failure means the path is not for this model
            return f"running the backbone and the LM head separately failed ({type(error).__name__}: {error})"
        finally:
            model.train(training)
        if logits.shape != projected.shape:
            return f"the model's logits {list(logits.shape)} are not the LM head's output {list(projected.shape)}"
        error = (logits - projected).abs().max().item()
        tolerance = 8 * torch.finfo(head.weight.dtype).eps * logits.abs().max().item()
        if not error <= tolerance:
            return (
                "the model's logits are not softcap(scale * lm_head(hidden)) with the transform its config declares "
                f"(max |difference| {error:.3g} on a probe): it post-processes its logits in a way the fused-linear "
                "path does not know"
            )
        return None

    # ------------------------------------------------------------------------------------------------------------
    # what else the forward takes and gives: image inputs (vision-language models), the MoE router auxiliary loss
    # ------------------------------------------------------------------------------------------------------------
    def _forward_inputs(self, inputs, input_ids, attention_mask, logits_to_keep) -> dict:
        """The keyword arguments besides ``input_ids`` / ``attention_mask`` that TRL 1.16's ``_compute_loss`` passes
        to the model's forward: the image inputs of a vision-language model (``pixel_values``, ``image_grid_thw``,
        ``token_type_ids``, ...) and ``output_router_logits=True`` when the router auxiliary loss is on.

        Read off TRL's own ``_get_per_token_logps_and_entropies``, run on a stand-in model that records its keyword
        arguments: which inputs go to which model family, and how they are sliced, stay TRL's code.
        """
        recorded = {}

        def record(**kwargs):
            recorded.update(kwargs)
            zeros = input_ids.new_zeros(input_ids.shape, dtype=torch.float32)
            return types.SimpleNamespace(log_probs=zeros, entropy=zeros, aux_loss=zeros.sum())

        TRLGRPOTrainer._get_per_token_logps_and_entropies(
            self,
            record,
            input_ids,
            attention_mask,
            logits_to_keep,
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{name: inputs.get(name) for name in _TRL_FORWARD_INPUTS},
        )
        for name in ("input_ids", "attention_mask", "labels", "fused_lm_head"):
            recorded.pop(name, None)
        return recorded

    def _router_aux_loss(self, forward_kwargs, output, attention_mask) -> torch.Tensor | None:
        """TRL 1.16's load-balancing loss of one forward called with ``forward_kwargs`` (None unless they asked for
        ``output_router_logits``): ``output.router_logits`` the per-layer router logits of the whole prompt +
        completion, ``attention_mask`` ``[B, P + C]``."""
        if not forward_kwargs.get("output_router_logits"):
            return None
        return router_aux_loss(self.model.config, output.router_logits, attention_mask)

    def _add_router_aux_loss(self, loss, aux_loss, mode):
        """TRL's ``loss + router_aux_loss_coef * aux / accumulation_steps`` (train) and its ``aux_loss`` metric."""
        if aux_loss is None:
            return loss
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        return loss + self.router_aux_loss_coef * aux_loss / normalizer

    # ------------------------------------------------------------------------------------------------------------
    # sharded engines: FSDP2 and DeepSpeed ZeRO-3 (see docs/distributed.md, section 2)
    # ------------------------------------------------------------------------------------------------------------
    def _sharded_engine(self) -> str | None:
        """``"fsdp2"``, ``"fsdp1"``, ``"deepspeed_zero3"``, ``"deepspeed"`` (ZeRO 0-2: every weight whole on every
        rank) or None (a single process, DDP)."""
        state = self.accelerator.state
        if getattr(self, "is_fsdp_enabled", False):
            return "fsdp2" if getattr(state.fsdp_plugin, "fsdp_version", 1) == 2 else "fsdp1"
        if getattr(self, "is_deepspeed_enabled", False):
            return "deepspeed_zero3" if state.deepspeed_plugin.zero_stage == 3 else "deepspeed"
        return None

    def _sharded_engine_unsupported(self) -> str | None:
        if self._sharded_engine() == "fsdp1":
            return (
                "FSDP1 (fsdp_version=1) flattens the LM head's weight into a FlatParameter, so the fused pass "
                "cannot read it; FSDP2 (fsdp_version=2) and DeepSpeed (every ZeRO stage) are supported"
            )
        return None

    def _route_through_sharded_head(self) -> bool:
        """Under FSDP2 and ZeRO-3 the fused pass runs inside the LM head's forward, where the engine has gathered
        the head's full weight (FSDP2: the head's own group, or the root group when the head is in it; ZeRO-3: the
        head's parameters, gathered by its forward pre-hook), and where its backward hooks reduce the gradient."""
        if self._sharded_engine() not in ("fsdp2", "deepspeed_zero3"):
            return False
        _route_loss_through_forward(self._patched_model().get_output_embeddings())
        return True

    def _decided_by_rank_zero(self, reason: str | None) -> str | None:
        """Rank 0's ``reason``: every process must take the same path (their models are the same; with
        FSDP's cpu_ram_efficient_loading only rank 0 holds the weights when the trainer is built)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return reason
        decided = [reason]
        dist.broadcast_object_list(decided, src=0)
        return decided[0]

    # ------------------------------------------------------------------------------------------------------------
    # the loss
    # ------------------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        """TRL 1.16's ``_compute_loss`` (same inputs, same loss, same metrics), through one fused op."""
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]  # [B, C]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        advantages = inputs["advantages"]  # [B], or [B, C] from subclasses that make per-token advantages
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old = inputs.get("old_per_token_logps")  # [B, C]; None: on-policy (ratio 1, as TRL's detached log-probs)
        # TRL 1.16's scaling of the aggregated loss: dapo/cispo divide by num_items_in_batch / num_processes, times
        # accumulation steps / steps_per_generation in training (the op divides by num_items_in_batch); the others
        # divide by the accumulation steps in training.
        if self.loss_type in _ITEM_NORMALISED_LOSS_TYPES:
            scale = self.accelerator.num_processes
            if mode == "train":
                scale = scale * self.args.steps_per_generation / self.current_gradient_accumulation_steps
        else:
            scale = 1.0 / self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss_args = (inputs, mask, advantages, old, mode)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)  # [B, P + C]
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        forward_inputs = self._forward_inputs(inputs, input_ids, attention_mask, inputs["completion_ids"].shape[1])
        if self.loss_path == "fused_linear":
            loss_fn = functools.partial(
                self._fused_linear_loss, loss_args=loss_args, scale=scale, model_kwargs=forward_inputs
            )
            with self.accelerator.autocast():
                out, bonus, entropy_mask, aux_loss = model(
                    input_ids=input_ids, attention_mask=attention_mask, grpo_kernels_loss=loss_fn
                )
        else:
            out, bonus, entropy_mask, aux_loss = self._logits_loss(model, *loss_args, forward_inputs=forward_inputs)

        loss = out.loss * scale
        if self._entropy_bonus_enabled:
            # TRL's loss is policy * scale - bonus. The fused op's loss already holds - bonus / scale; on the logits
            # path the bonus is subtracted here, from the op's differentiable entropy.
            if self.loss_path == "fused_linear":
                policy_loss = out.loss.detach() + bonus / scale
            else:
                policy_loss = out.loss.detach()
                loss = loss - bonus
            if self.loss_type in _ITEM_NORMALISED_LOSS_TYPES:  # TRL logs the policy loss where it takes it: scaled
                policy_loss = policy_loss * scale
            self._entropy_bonus_metrics(out.entropy.detach(), mask, entropy_mask, policy_loss, mode)
        loss = self._add_router_aux_loss(loss, aux_loss, mode)
        self._log_metrics(mode, out, advantages, mask, old, inputs)
        return loss

    def _logits_loss(self, model, inputs, mask, advantages, old, mode, forward_inputs):
        """``(GRPOLossOutput, entropy bonus or None, entropy mask or None, router auxiliary loss or None)`` from the
        completion logits."""
        completion_ids = inputs["completion_ids"]
        if forward_inputs:
            logits, aux_loss = self._completion_logits_with_forward_inputs(model, inputs, forward_inputs)
        else:
            logits, aux_loss = self._completion_logits(model, inputs), None

        def score():  # one more read of the logits, nothing of size [B, C, V] allocated
            return token_logprobs(logits, completion_ids, temperature=self.temperature, return_entropy=True, mask=mask)

        advantages, is_weights, entropy_mask = self._token_weights(score, inputs, mask, advantages, old)
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
        weights = self._entropy_bonus_weights(mask, entropy_mask, mode)
        bonus = None if weights is None else (weights * out.entropy).sum()
        return out, bonus, entropy_mask, aux_loss

    def _fused_linear_loss(self, model, input_ids, attention_mask, *, loss_args, scale, model_kwargs, **unused):
        """``(GRPOLossOutput, entropy bonus or None, entropy mask or None, router auxiliary loss or None)`` from the
        hidden states and the LM head.

        Runs inside the model's forward (see :func:`_route_loss_through_forward`; ``unused``: the None-valued
        keywords a PEFT wrapper's forward passes on). ``model_kwargs`` go to the backbone (image inputs,
        ``output_router_logits``: see :meth:`_forward_inputs`); the router auxiliary loss comes from this one
        backbone run. The bonus goes into the fused op as per-token weights (``entropy_weights``, divided by
        ``scale`` because the caller multiplies the op's loss by it); the returned bonus is its detached value, for
        the policy-loss metric.
        """
        inputs, mask, advantages, old, mode = loss_args
        completion_length = inputs["completion_ids"].shape[1]
        hidden, weight, targets, head, backbone_output = causal_lm_head_inputs(
            model,
            input_ids,
            attention_mask,
            completion_length,
            completion_mask=mask,
            model_kwargs=model_kwargs,
            return_backbone_output=True,
        )
        aux_loss = self._router_aux_loss(model_kwargs, backbone_output, attention_mask)
        if self._loss_in_head_forward:  # FSDP2 / ZeRO-3: the head's weight is whole only inside its forward
            lm_head = model.get_output_embeddings()
            return lm_head(
                hidden,
                grpo_kernels_loss=functools.partial(
                    self._fused_linear_head_loss,
                    loss_args=loss_args,
                    targets=targets,
                    head=head,
                    scale=scale,
                    aux_loss=aux_loss,
                ),
            )
        return self._fused_linear_head_loss(
            None, hidden, loss_args=loss_args, targets=targets, head=head, scale=scale, weight=weight, aux_loss=aux_loss
        )

    def _fused_linear_head_loss(self, lm_head, hidden, *, loss_args, targets, head, scale, aux_loss, weight=None):
        """The fused pass on ``hidden`` and the LM head's weight: ``weight``, or ``lm_head``'s own, read inside its
        forward (FSDP2, ZeRO-3)."""
        inputs, mask, advantages, old, mode = loss_args
        if lm_head is not None:
            weight, head = lm_head.weight, {**head, "bias": lm_head.bias}

        def score():  # 2 n H V more FLOPs and one tile of logits, no gradient
            return fused_linear_token_logprobs(
                hidden, weight, targets, temperature=self.temperature, return_entropy=True, **head
            )

        # TRL's cast_lm_head_to_fp32 projects in float32 outside autocast: a float32 weight without autocast makes
        # float32 the fused ops' compute dtype.
        cast = self.args.cast_lm_head_to_fp32
        with torch.autocast(hidden.device.type, enabled=False) if cast else contextlib.nullcontext():
            advantages, is_weights, entropy_mask = self._token_weights(score, inputs, mask, advantages, old)
            weights = self._entropy_bonus_weights(mask, entropy_mask, mode)
            out = fused_linear_grpo_loss(
                hidden,
                weight,
                targets,
                advantages,
                old_logprobs=old,
                ref_logprobs=inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
                is_weights=is_weights,
                num_items_in_batch=inputs["num_items_in_batch"],
                return_entropy=True,
                entropy_weights=None if weights is None else weights / scale,
                **head,
                **self._loss_config(),
            )
        bonus = None if weights is None else (weights * out.entropy.detach()).sum()
        return out, bonus, entropy_mask, aux_loss

    def _completion_logits(self, model, inputs) -> torch.Tensor:
        """The completion logits ``[B, C, V]``: position t scores completion token t, and no bigger tensor holds them.

        The model runs on prompt + completion without its last token, so its last C positions predict exactly the C
        completion tokens (causal attention: dropping the last token changes no earlier position). The logits thus
        come out of the LM head aligned, not as a ``[:, :-1]`` slice: no copy now, and no zero-filled full-size
        gradient from a slice's backward later, which is what lets ``inplace_backward`` reuse this buffer.
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

    def _completion_logits_with_forward_inputs(self, model, inputs, forward_inputs):
        """``(logits [B, C, V], router auxiliary loss or None)`` from one forward on exactly TRL's inputs: the whole
        prompt + completion with the image inputs (a vision-language model) and, for the router auxiliary loss, the
        router logits of every token, the last completion token's included (which is why the shortcut of
        :meth:`_completion_logits` does not apply). ``logits_to_keep`` as the indices of the C positions that predict
        the completion: the LM head still projects only those, into a fresh aligned ``[B, C, V]`` tensor.
        """
        completion_length = inputs["completion_ids"].shape[1]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)  # [B, L]
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        length = input_ids.shape[1]
        keep = torch.arange(length - completion_length - 1, length - 1, device=input_ids.device)
        with self.accelerator.autocast():
            outputs = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                logits_to_keep=keep,
                use_cache=False,
                **forward_inputs,
            )
        return outputs.logits, self._router_aux_loss(forward_inputs, outputs, attention_mask)

    def _token_weights(self, score, inputs, mask, advantages, old):
        """TRL's per-token factors of the policy term, which it applies before adding the KL: our ``is_weights``.

        ``score()`` returns the current ``(log-probs, entropies)`` ``[B, C]`` without gradient; it is called only when
        a mask needs them (off-policy sequence mask, high-entropy token mask), before the loss: one more pass over
        the logits, or over the LM head on the fused-linear path.

        Returns ``(advantages, is_weights, entropy_mask)``: ``is_weights`` ``[B, 1]`` or ``[B, C]`` float, or None
        when no factor applies (those two masks, vLLM importance-sampling ratio); ``entropy_mask`` ``[B, C]`` bool or
        None (the entropy bonus uses it too). For vespo the vLLM ratio enters the gamma weight instead (TRL 1.16:
        ``get_gamma_weights``, and no multiplication by it), so it alone is ``is_weights``, and the 0/1 masks multiply
        the advantages: ``-phi (A f) lp`` is TRL's ``-phi A lp f`` for ``f`` in {0, 1}.
        """
        factors, entropy_mask = [], None
        if self.top_entropy_quantile < 1.0 or self.off_policy_mask_threshold is not None:
            with torch.no_grad():
                lp, entropy = score()
            if self.off_policy_mask_threshold is not None:
                sampling = inputs.get("sampling_per_token_logps", lp if old is None else old)
                factors.append(self.get_off_policy_mask(advantages, lp, sampling, mask, self.off_policy_mask_threshold))
            if self.top_entropy_quantile < 1.0:
                entropy_mask = self.get_high_entropy_mask(entropy, mask, 1 - self.top_entropy_quantile)
                factors.append(entropy_mask)
        if self.loss_type == "vespo":
            for factor in factors:
                advantages = advantages * factor.to(advantages.dtype)
            ratio = inputs.get("importance_sampling_ratio")  # TRL reads it whenever the batch holds it
            return advantages, None if ratio is None else ratio.float(), entropy_mask
        if self.use_vllm and self.vllm_importance_sampling_correction:
            factors.append(inputs["importance_sampling_ratio"])  # [B, C] (token modes) or [B, 1] (sequence modes)
        weights = None
        for factor in factors:
            weights = factor.float() if weights is None else weights * factor
        return advantages, weights, entropy_mask

    def _loss_config(self) -> dict:
        """The knobs of :class:`grpo_kernels.LossConfig` from the trainer's configuration (read per call, as TRL
        does), through the one table ``TRL_KNOBS``."""
        return {knob: read(self) for knob, read in TRL_KNOBS.items()}

    # ------------------------------------------------------------------------------------------------------------
    # entropy bonus (TRL 1.16: L = L_policy - coef * H, H the mean entropy over the tokens the policy term acts on)
    # ------------------------------------------------------------------------------------------------------------
    def _entropy_bonus_weights(self, mask, entropy_mask, mode):
        """TRL's bonus ``coef * sum_t m_t H_t / sum_t m_t / accumulation`` as per-token weights ``w`` ``[B, C]``
        (bonus = ``sum_t w_t H_t``), ``m`` = ``mask`` restricted to the high-entropy tokens; None without a bonus."""
        if not self._entropy_bonus_enabled:
            return None
        if entropy_mask is not None:
            mask = mask * entropy_mask
        mask = mask.float()
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        # The coefficient (and, adaptive, its gate) of the end of the previous optimizer step: every micro-batch of
        # an accumulation window gets the same bonus.
        if self.use_adaptive_entropy:
            coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        else:
            coef = self.entropy_coef
        return mask * (coef / (mask.sum().clamp(min=1.0) * accumulation))

    def _entropy_bonus_metrics(self, entropy, mask, entropy_mask, policy_loss, mode):
        """TRL's ``policy_loss`` and ``entropy_coef`` metrics, and the adaptive coefficient's update."""
        if entropy_mask is not None:
            mask = mask * entropy_mask
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            self._update_entropy_coef(entropy, mask)
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

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
    def _log_metrics(self, mode, out, advantages, mask, old, inputs):
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
        # fractions are token-weighted), so they are recomputed here from the op's detached log-probs; so is vespo's
        # gamma weight, by TRL's own function (one value per sequence for per-sequence advantages).
        log_ratio = out.logprobs - old if old is not None else torch.zeros_like(out.logprobs)
        if self.loss_type == "vespo":
            phi = self.get_gamma_weights(
                advantages=advantages,
                log_ratio_per_token=log_ratio,
                mask=mask,
                importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
                k_pos=self.args.vespo_k_pos,
                lambda_pos=self.args.vespo_lambda_pos,
                k_neg=self.args.vespo_k_neg,
                lambda_neg=self.args.vespo_lambda_neg,
            )
            log_masked_mean("vespo/phi_seq_mean", phi)
            return
        if self.loss_type not in _CLIP_METRIC_LOSS_TYPES and self.loss_type != "cispo":
            return
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


# TRL's constructor signature plus the keyword this subclass adds (functools.wraps would show TRL's alone)
GRPOTrainer.__init__.__signature__ = _TRL_INIT_SIGNATURE.replace(
    parameters=[
        *_TRL_INIT_SIGNATURE.parameters.values(),
        inspect.Parameter("loss_path", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation="str"),
    ]
)

__all__ = ["GRPOConfig", "GRPOTrainer", "check_config"]
