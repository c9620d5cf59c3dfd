"""Who is benchmarked: our backends and the baselines, each as an objective function per op, and what is timed.

Providers:

* ``torch``, ``triton``, ``cuda``: grpo_kernels with that backend (and ``grpo_kernels.fused_linear`` for the
  fused-linear loss), when the backend is available on the device (:func:`grpo_kernels.available_backends`).
* ``cuda_gif``: ``grpo_loss(grad_in_forward=True, backend="cuda")``, the forward that also writes the gradient: on
  sm_90 the 2-pass cluster kernel where the row fits (token level), else the same 3 passes as ``cuda`` in one call.
* ``eager``: :mod:`benchmarks.eager` (log_softmax + gather + the loss through autograd; matmul first for the
  fused-linear loss; for ``distill_loss`` TRL's ``generalized_jsd_loss`` as written: two log_softmax + kl_div).
* ``compile``: ``torch.compile(dynamic=True)`` of the eager code (one compilation per op variant, reused across
  shapes).
* ``liger``: liger-kernel's ``fused_selective_log_softmax`` (log-probs), ``triton_grpo_loss`` (``inplace=False``,
  like ours) and ``LigerFusedLinearGRPOLoss``.
* ``trl``: TRL 1.16's ``selective_log_softmax_and_entropy`` Triton kernel (then the eager loss on its log-probs)
  and ``ChunkedLogProbFunction`` (the fused LM head, then the eager loss).

Every provider of an op computes the same function of the same inputs (:func:`summarize` checks it); what is timed
(:func:`build`) is the objective plus, for backward ops, ``torch.autograd.grad`` of it w.r.t. the logits (or hidden
and weight): nothing accumulates into ``.grad``, and the gradient is what the caller gets back.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable

import torch

from benchmarks import eager
from benchmarks.cases import BACKWARD_OPS, Case
from grpo_kernels import backends as registry
from grpo_kernels import distill_loss, group_advantages, grpo_loss, token_logprobs

OURS = registry.BACKENDS  # ("torch", "triton", "cuda")
# Our backends with other options: name -> (backend, the ops it applies to, extra keywords of the objective)
OUR_VARIANTS = {"cuda_gif": ("cuda", ("grpo_loss",), {"grad_in_forward": True})}
BASELINES = ("eager", "compile", "liger", "trl")
PROVIDERS = OURS + tuple(OUR_VARIANTS) + BASELINES

# TRL 1.16's vocabulary tile for its fused LM head (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE), not imported:
# that module pulls in the whole trainer.
TRL_CHUNK_SIZE = 32768
EPSILON = 0.2  # clip range, low and high (TRL's default epsilon); loss_type "dapo" (TRL's default) everywhere

# Input names each op's objective takes, in order, and the inputs its gradient is taken with respect to.
ARGS = {
    "token_logprobs": ("logits", "token_ids"),
    "token_logprobs_entropy_forward": ("logits", "token_ids"),
    "token_logprobs_entropy": ("logits", "token_ids", "grad_lp", "grad_entropy"),
    "grpo_loss": ("logits", "token_ids", "advantages", "mask", "old_logprobs", "ref_logprobs"),
    "group_advantages": ("rewards",),
    "fused_linear_grpo_loss": ("hidden", "weight", "token_ids", "advantages", "mask", "old_logprobs", "ref_logprobs"),
    "distill_loss": ("logits", "teacher_logits", "token_ids"),
    "grpo_loss_exact_kl": ("logits", "ref_logits", "token_ids", "advantages", "mask", "old_logprobs"),
}
WRT = {
    "token_logprobs_entropy": ("logits",),
    "grpo_loss": ("logits",),
    "fused_linear_grpo_loss": ("hidden", "weight"),
    "distill_loss": ("logits",),
    "grpo_loss_exact_kl": ("logits",),
}


def _statics(case: Case) -> dict:
    """The case's compile-time constants, passed to objectives as keywords."""
    if case.op in ("grpo_loss", "fused_linear_grpo_loss", "grpo_loss_exact_kl"):
        return dict(beta=case.beta, level=case.importance_sampling_level)
    if case.op == "group_advantages":
        return dict(group_size=case.group_size)
    if case.op == "distill_loss":
        return dict(divergence=case.divergence, beta=case.beta)
    return {}


# ----------------------------------------------------------------------------------------------------------------
# eager (and torch.compile of it)
# ----------------------------------------------------------------------------------------------------------------
def _eager_token_logprobs(logits, token_ids):
    return eager.eager_logprobs(logits, token_ids)[0]


def _eager_token_logprobs_entropy_forward(logits, token_ids):
    return eager.eager_logprobs(logits, token_ids, return_entropy=True)


def _eager_token_logprobs_entropy(logits, token_ids, grad_lp, grad_entropy):
    lp, entropy = eager.eager_logprobs(logits, token_ids, return_entropy=True)
    return (lp * grad_lp).sum() + (entropy * grad_entropy).sum()


def _eager_grpo_loss(logits, token_ids, advantages, mask, old_logprobs, ref_logprobs, *, beta, level):
    return eager.eager_grpo_loss(
        logits,
        token_ids,
        advantages,
        mask=mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        beta=beta,
        epsilon_low=EPSILON,
        importance_sampling_level=level,
    )[0]


def _eager_group_advantages(rewards, *, group_size):
    return eager.eager_group_advantages(rewards, group_size)


def _eager_fused_linear(hidden, weight, token_ids, advantages, mask, old_logprobs, ref_logprobs, *, beta, level):
    logits = hidden @ weight.T  # [B, T, V] materialised, as a model's LM head does
    return _eager_grpo_loss(logits, token_ids, advantages, mask, old_logprobs, ref_logprobs, beta=beta, level=level)


def _eager_distill_loss(logits, teacher_logits, token_ids, *, divergence, beta):
    return eager.eager_distill_loss(logits, teacher_logits, token_ids, divergence=divergence, beta=beta)


def _eager_grpo_loss_exact_kl(logits, ref_logits, token_ids, advantages, mask, old_logprobs, *, beta, level):
    return eager.eager_grpo_loss_exact_kl(
        logits,
        ref_logits,
        token_ids,
        advantages,
        mask=mask,
        old_logprobs=old_logprobs,
        beta=beta,
        epsilon_low=EPSILON,
        importance_sampling_level=level,
    )


EAGER = {
    "distill_loss": _eager_distill_loss,
    "grpo_loss_exact_kl": _eager_grpo_loss_exact_kl,
    "token_logprobs": _eager_token_logprobs,
    "token_logprobs_entropy_forward": _eager_token_logprobs_entropy_forward,
    "token_logprobs_entropy": _eager_token_logprobs_entropy,
    "grpo_loss": _eager_grpo_loss,
    "group_advantages": _eager_group_advantages,
    "fused_linear_grpo_loss": _eager_fused_linear,
}

_compiled: dict[tuple, Callable] = {}


def _compile(op: str, statics: dict) -> Callable:
    """``torch.compile(dynamic=True)`` of the eager objective, once per (op, constants): shapes do not recompile."""
    key = (op, tuple(sorted(statics.items())))
    if key not in _compiled:
        config = torch._dynamo.config  # every variant recompiles the same eager code object: allow them all
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), 64))
        _compiled[key] = torch.compile(functools.partial(EAGER[op], **statics), dynamic=True)
    return _compiled[key]


# ----------------------------------------------------------------------------------------------------------------
# ours
# ----------------------------------------------------------------------------------------------------------------
def _ours_token_logprobs(logits, token_ids, *, backend):
    return token_logprobs(logits, token_ids, backend=backend)


def _ours_token_logprobs_entropy_forward(logits, token_ids, *, backend):
    return token_logprobs(logits, token_ids, return_entropy=True, backend=backend)


def _ours_token_logprobs_entropy(logits, token_ids, grad_lp, grad_entropy, *, backend):
    lp, entropy = token_logprobs(logits, token_ids, return_entropy=True, backend=backend)
    return (lp * grad_lp).sum() + (entropy * grad_entropy).sum()


def _ours_grpo_loss(
    logits, token_ids, advantages, mask, old_logprobs, ref_logprobs, *, beta, level, backend, **options
):
    return grpo_loss(
        logits,
        token_ids,
        advantages,
        mask=mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs if beta else None,
        beta=beta,
        epsilon_low=EPSILON,
        importance_sampling_level=level,
        backend=backend,
        **options,
    ).loss


def _ours_group_advantages(rewards, *, group_size, backend):
    return group_advantages(rewards, group_size=group_size, backend=backend)


def _ours_fused_linear(
    hidden, weight, token_ids, advantages, mask, old_logprobs, ref_logprobs, *, beta, level, backend
):
    from grpo_kernels.fused_linear import fused_linear_grpo_loss

    return fused_linear_grpo_loss(
        hidden,
        weight,
        token_ids,
        advantages,
        mask=mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs if beta else None,
        beta=beta,
        epsilon_low=EPSILON,
        importance_sampling_level=level,
        backend=backend,
    ).loss


def _ours_distill_loss(logits, teacher_logits, token_ids, *, divergence, beta, backend):
    return distill_loss(logits, teacher_logits, token_ids, divergence=divergence, beta=beta, backend=backend).loss


def _ours_grpo_loss_exact_kl(logits, ref_logits, token_ids, advantages, mask, old_logprobs, *, beta, level, backend):
    return grpo_loss(
        logits,
        token_ids,
        advantages,
        mask=mask,
        old_logprobs=old_logprobs,
        ref_logits=ref_logits,
        kl_estimator="exact",
        beta=beta,
        epsilon_low=EPSILON,
        importance_sampling_level=level,
        backend=backend,
    ).loss


OURS_OBJECTIVES = {
    "distill_loss": _ours_distill_loss,
    "grpo_loss_exact_kl": _ours_grpo_loss_exact_kl,
    "token_logprobs": _ours_token_logprobs,
    "token_logprobs_entropy_forward": _ours_token_logprobs_entropy_forward,
    "token_logprobs_entropy": _ours_token_logprobs_entropy,
    "grpo_loss": _ours_grpo_loss,
    "group_advantages": _ours_group_advantages,
    "fused_linear_grpo_loss": _ours_fused_linear,
}


# ----------------------------------------------------------------------------------------------------------------
# Liger (liger-kernel) and TRL 1.16
# ----------------------------------------------------------------------------------------------------------------
def _liger_token_logprobs(logits_full, token_ids):
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

    return fused_selective_log_softmax(logits_full, token_ids, temperature=1.0)  # [B, T+1, V] -> [B, T]


def _liger_grpo_loss(logits_full, token_ids, advantages, mask, old_logprobs, ref_logprobs, *, beta, level):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    loss, _ = triton_grpo_loss(
        logits_full,
        old_logprobs,
        ref_logprobs if beta else None,
        token_ids,
        advantages,
        mask,
        temperature=1.0,
        beta=beta,
        eps_low=EPSILON,
        eps_high=EPSILON,
        inplace=False,
        loss_type="dapo",
        importance_sampling_level=level,
        reduce=True,
    )
    return loss


def _liger_fused_linear(hidden, weight, token_ids, advantages, mask, old_logprobs, ref_logprobs, *, beta, level):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # compiled=True (Liger's default) on a GPU; on the CPU its torch.compile would dominate a short run
    head = LigerFusedLinearGRPOLoss(
        beta=beta,
        use_ref_model=beta != 0,
        epsilon_low=EPSILON,
        epsilon_high=EPSILON,
        loss_type="dapo",
        importance_sampling_level=level,
        temperature=1.0,
        compiled=hidden.is_cuda,
    )
    loss, _ = head(
        hidden,
        weight,
        token_ids,
        mask,
        advantages,
        ref_per_token_logps=ref_logprobs if beta else None,
        old_per_token_logps=old_logprobs,
    )
    return loss


def _trl_token_logprobs(logits, token_ids):
    from trl.kernels import selective_log_softmax_and_entropy

    return selective_log_softmax_and_entropy(logits, token_ids)[0]  # computes the entropy too: it has no lp-only mode


def _trl_lp_entropy_fwd(logits, token_ids):
    from trl.kernels import selective_log_softmax_and_entropy

    return selective_log_softmax_and_entropy(logits, token_ids)


def _trl_token_logprobs_entropy(logits, token_ids, grad_lp, grad_entropy):
    from trl.kernels import selective_log_softmax_and_entropy

    lp, entropy = selective_log_softmax_and_entropy(logits, token_ids)
    return (lp * grad_lp).sum() + (entropy * grad_entropy).sum()


def _trl_grpo_loss(logits, token_ids, advantages, mask, old_logprobs, ref_logprobs, *, beta, level):
    from trl.kernels import selective_log_softmax_and_entropy

    lp, _ = selective_log_softmax_and_entropy(logits, token_ids)
    return eager.eager_loss_from_logprobs(
        lp,
        advantages,
        mask=mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        beta=beta,
        epsilon_low=EPSILON,
        importance_sampling_level=level,
    )


def _trl_fused_linear(hidden, weight, token_ids, advantages, mask, old_logprobs, ref_logprobs, *, beta, level):
    from trl.kernels import ChunkedLogProbFunction

    b, t, h = hidden.shape
    lp = ChunkedLogProbFunction.apply(
        hidden.reshape(b * t, h), weight, None, token_ids.reshape(-1), 1.0, TRL_CHUNK_SIZE, None, 1.0, ()
    )[0].view(b, t)
    return eager.eager_loss_from_logprobs(
        lp,
        advantages,
        mask=mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        beta=beta,
        epsilon_low=EPSILON,
        importance_sampling_level=level,
    )


# (provider, op) -> (objective, needs a Triton kernel on the device, module that must import)
EXTERNAL = {
    ("liger", "token_logprobs"): (_liger_token_logprobs, True, "liger_kernel.ops.grpo_loss"),
    ("liger", "grpo_loss"): (_liger_grpo_loss, True, "liger_kernel.transformers.grpo_loss"),
    ("liger", "fused_linear_grpo_loss"): (_liger_fused_linear, False, "liger_kernel.chunked_loss"),
    ("trl", "token_logprobs"): (_trl_token_logprobs, True, "trl.kernels.logprob_entropy"),
    ("trl", "token_logprobs_entropy_forward"): (_trl_lp_entropy_fwd, True, "trl.kernels.logprob_entropy"),
    ("trl", "token_logprobs_entropy"): (_trl_token_logprobs_entropy, True, "trl.kernels.logprob_entropy"),
    ("trl", "grpo_loss"): (_trl_grpo_loss, True, "trl.kernels.logprob_entropy"),
    ("trl", "fused_linear_grpo_loss"): (_trl_fused_linear, False, "trl.kernels.chunked_logprob"),
}
# Liger's kernels take the model's [B, T+1, V] logits (they drop the last position themselves).
FULL_LOGITS = {"logits": "logits_full"}


# ----------------------------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------------------------
def unavailable_reason(provider: str, case: Case, device: torch.device, *, interpreter: bool = False) -> str | None:
    """None when ``provider`` can run ``case`` on ``device``, else why not (printed as a note by the report).

    ``interpreter=True`` lets Triton code run on the CPU through ``TRITON_INTERPRET=1`` (the tests check the
    baselines' call signatures that way; such runs are never timed).
    """
    return _reason(provider, case.op, device.type, interpreter)


@functools.cache
def _reason(provider: str, op: str, device_type: str, interpreter: bool) -> str | None:
    device = torch.device(device_type)
    if provider in OUR_VARIANTS:
        backend, ops, _ = OUR_VARIANTS[provider]
        if op not in ops:
            return f"{provider} is {backend} with options of {', '.join(ops)} only"
        return _reason(backend, op, device_type, interpreter)
    if provider in OURS:
        if provider == "triton" and device_type == "cpu" and not interpreter:
            return "Triton runs on the CPU only through its interpreter: not benchmarked"
        if provider == "cuda" and op in ("distill_loss", "grpo_loss_exact_kl"):
            return "the CUDA backend has no divergence kernels (the exact divergences run on triton or torch)"
        reason = registry.unavailable_reason(provider, device)
        if reason is None and op == "fused_linear_grpo_loss":
            reason = _fused_linear_reason(provider, device)
        return reason
    if provider in ("eager", "compile"):
        return None
    if provider not in BASELINES:
        raise ValueError(f"unknown provider {provider!r}; providers are {PROVIDERS}")
    if (provider, op) not in EXTERNAL:
        return {"liger": "liger-kernel has no kernel for this op", "trl": "TRL 1.16 has no kernel for this op"}[
            provider
        ]
    _, needs_triton, module = EXTERNAL[(provider, op)]
    if needs_triton and device_type != "cuda" and not interpreter:
        return "a Triton kernel: needs a GPU (interpreter runs are not benchmarks)"
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a missing package or a broken one of its dependencies: not available
        return f"cannot import {module}: {type(e).__name__}: {e}"
    return None


def _fused_linear_reason(backend: str, device: torch.device) -> str | None:
    """Whether ``grpo_kernels.fused_linear`` exists and runs with ``backend`` on a tiny input."""
    if importlib.util.find_spec("grpo_kernels.fused_linear") is None:
        return "grpo_kernels.fused_linear is not importable (not merged yet)"
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(1, 4, 8, generator=g, device=device, requires_grad=True)
    weight = torch.randn(16, 8, generator=g, device=device, requires_grad=True)
    ids = torch.randint(0, 16, (1, 4), generator=g, device=device)
    ones = torch.ones(1, 4, device=device)
    try:
        loss = _ours_fused_linear(
            hidden, weight, ids, ones[:, 0], ones, -ones, -ones, beta=0.0, level="token", backend=backend
        )
        loss.backward()
    except Exception as e:  # noqa: BLE001 - the note names it; the real cases never run for this backend
        return f"fused_linear_grpo_loss(backend={backend!r}) failed on a tiny input: {type(e).__name__}: {e}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# what is timed, and the check
# ----------------------------------------------------------------------------------------------------------------
def objective(provider: str, case: Case) -> tuple[Callable, tuple[str, ...], tuple[str, ...]]:
    """``(fn, arg names, gradient-input names)`` of ``provider`` for ``case``."""
    statics = _statics(case)
    args, wrt = ARGS[case.op], WRT.get(case.op, ())
    if provider in OURS:
        fn = functools.partial(OURS_OBJECTIVES[case.op], **statics, backend=provider)
    elif provider in OUR_VARIANTS:
        backend, _, options = OUR_VARIANTS[provider]
        fn = functools.partial(OURS_OBJECTIVES[case.op], **statics, backend=backend, **options)
    elif provider == "eager":
        fn = functools.partial(EAGER[case.op], **statics)
    elif provider == "compile":
        fn = _compile(case.op, statics)
    else:
        fn = functools.partial(EXTERNAL[(provider, case.op)][0], **statics)
        if provider == "liger":
            args = tuple(FULL_LOGITS.get(a, a) for a in args)
            wrt = tuple(FULL_LOGITS.get(a, a) for a in wrt)
    return fn, args, wrt


def build(provider: str, case: Case, inputs: dict) -> Callable[[], tuple]:
    """The timed call: the objective (under ``no_grad`` for forward-only ops), then its gradient for backward ops.

    Returns ``(objective,)`` (``(lp, entropy)`` for ``token_logprobs_entropy_forward``) or
    ``(objective, *gradients)``.
    """
    fn, arg_names, wrt_names = objective(provider, case)
    args = [inputs[name] for name in arg_names]
    if case.op in BACKWARD_OPS:
        wrt = [inputs[name] for name in wrt_names]

        def run():
            value = fn(*args)
            return (value.detach(), *torch.autograd.grad(value, wrt))

        return run

    def run_no_grad():
        with torch.no_grad():
            out = fn(*args)
        return out if isinstance(out, tuple) else (out,)  # (lp,) or (lp, entropy)

    return run_no_grad


def summarize(case: Case, outputs: tuple) -> dict:
    """Check values of one run: the loss (backward ops) and the norms compared across providers.

    The norms are of the gradients (backward ops) or of the output (forward ops): sizes that every correct
    provider reproduces to rounding, unlike the loss itself, which can sit near 0.
    """
    checked = outputs[1:] if case.op in BACKWARD_OPS else outputs
    norms = [_norm(t) for t in checked]
    loss = float(outputs[0]) if case.op in BACKWARD_OPS else None
    return dict(loss=loss, norms=norms)


def _norm(t: torch.Tensor, chunk: int = 1 << 24) -> float:
    """2-norm accumulated in float64, a chunk at a time through one reused buffer (a float64 copy of a GPU case's
    gradient would be 20 GB; a new buffer per chunk would page-fault in every chunk on the CPU)."""
    flat = t.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    buffer = torch.empty(min(chunk, flat.numel()), dtype=torch.float64, device=t.device)
    for start in range(0, flat.numel(), chunk):
        part = buffer[: min(chunk, flat.numel() - start)]
        part.copy_(flat[start : start + chunk])
        total += part.square_().sum()
    return float(total.sqrt())


def check_tolerance(case: Case) -> float:
    """Relative tolerance of a norm against eager's: rounding of the logits' dtype (eager computes in it)."""
    return 1e-4 if case.torch_dtype in (torch.float32, torch.float64) else 3e-2
