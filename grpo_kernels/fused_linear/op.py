"""The fused-linear ops: the loss from hidden states + LM head with its gradients finished in the forward, and the
no-gradient log-probs of the same projection. Their schemas come from ``TokenBatch`` and ``LossConfig``.

    fused_linear_grpo_loss     (hidden [N, H], weight [V, H], bias [V]?; batch, config, head options)
        -> loss [], lp [N], entropy [N] / [0], per-token loss [N], kl [N], clip flags [N] uint8,
           d loss / d hidden [N, H] / [0], d loss / d weight [V, H] / [0], d loss / d bias [V] / [0]
    fused_linear_token_logprobs (hidden, weight, bias?, token_ids; head options) -> lp [N], entropy [N] / [0]

The backward of the loss only scales the stored gradients by the incoming gradient.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..backends import get_backend
from ..config import LossConfig
from ..loss_math import TokenBatch, loss_forward_from_logprobs
from ..ops._define import struct_op
from .tiles import acc_dtype, addmm_acc, exact_kl_pass, gather, logprob_pass, make_head, plan_tiles, slice_batch

_HEAD_OPTIONS = {
    "logit_softcap": float | None,  # softcap(x) = c tanh(x / c) of the projection, or None
    "logit_scale": float,  # multiplies the projection (before the softcap)
    "dtype": torch.dtype,  # compute dtype of the projection
    "chunk_tokens": int,  # rows per tile
    "with_entropy": bool,
    "backend": str,
}


# ----------------------------------------------------------------------------------------------------------------
# the fused op: loss, per-token outputs and the finished gradients
# ----------------------------------------------------------------------------------------------------------------
@struct_op(
    "grpo_kernels::fused_linear_grpo_loss",
    positional={"hidden": Tensor, "weight": Tensor, "bias": Tensor | None},  # [N, H], [V, H], [V]
    structs={"batch": TokenBatch, "config": LossConfig},
    options={
        "entropy_weights": Tensor | None,  # [N]: loss -= sum_t w_t H_t
        "entropy_coef": float,  # loss -= entropy_coef sum_t c_t H_t
        "ref_hidden": Tensor | None,  # [N, H_ref] kl_estimator="exact": the reference's hidden states ...
        "ref_weight": Tensor | None,  # [V, H_ref] ... and LM head (same softcap / scale); no gradient
        "ref_bias": Tensor | None,  # [V]
        "ref_dtype": torch.dtype,  # compute dtype of the reference's projection
        **_HEAD_OPTIONS,
        "grad_hidden": bool,  # which gradients to compute
        "grad_weight": bool,
        "grad_bias": bool,
    },
    returns="(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def fused_linear_grpo_loss(
    hidden,
    weight,
    bias,
    batch,
    config,
    entropy_weights,
    entropy_coef,
    ref_hidden,
    ref_weight,
    ref_bias,
    ref_dtype,
    logit_softcap,
    logit_scale,
    dtype,
    chunk_tokens,
    with_entropy,
    backend,
    grad_hidden,
    grad_weight,
    grad_bias,
) -> tuple[Tensor, ...]:
    """-> loss [], lp [N], entropy [N] / [0], per-token loss [N], kl [N], clip flags [N] uint8,
    d loss/d hidden [N, H] / [0], d loss/d weight [V, H] / [0], d loss/d bias [V] / [0].

    With ``ref_hidden`` (kl_estimator="exact"), each tile's reference logits are projected next to the policy's,
    the backend's exact-KL forward reads both, and the gradient of the tile is the divergence backward's
    (``beta c_t dKL/dz + g_t dlp/dz``, written over the policy's tile): neither [N, V] tensor ever exists."""
    if logit_softcap is None:  # logits * scale / tau == logits / (tau / scale): the scale costs nothing
        config = dataclasses.replace(config, temperature=config.temperature / logit_scale)
    be = get_backend(backend)
    device, acc = hidden.device, acc_dtype(dtype)
    grad_bias = grad_bias and bias is not None
    with torch.autocast(device.type, enabled=False):  # every dtype below is chosen, not autocast's
        tokens = gather(hidden, batch, dtype)
        batch, n = tokens.batch, tokens.hidden.shape[0]
        tiles, one_pass = plan_tiles(tokens.cu, chunk_tokens, config.coupling)
        head = make_head(weight, bias, dtype, logit_softcap, logit_scale, min(chunk_tokens, n))
        exact = ref_hidden is not None
        if exact:  # the reference's head: the same logit transform as the policy's, its own tile buffer
            ref_head = make_head(ref_weight, ref_bias, ref_dtype, logit_softcap, logit_scale, min(chunk_tokens, n))
            ref_rows = tokens.pick(ref_hidden).to(ref_dtype)
        d_h = torch.empty(n, hidden.shape[1], dtype=dtype, device=device) if grad_hidden else None
        d_w = torch.zeros(weight.shape, dtype=acc, device=device) if grad_weight else None  # float32 accumulator
        d_b = torch.zeros(bias.shape, dtype=acc, device=device) if grad_bias else None
        # d loss / d H_t of the entropy terms: -(entropy_coef * c_t + w_t), [n]; None without them
        g_entropy = None
        if entropy_coef != 0.0:
            g_entropy = batch.coef.to(acc) * -entropy_coef
        if entropy_weights is not None:
            w = tokens.pick(entropy_weights).to(acc)
            g_entropy = -w if g_entropy is None else g_entropy - w

        def fold_gradient(start, end, logits, lse, entropy, g, ref=None) -> None:
            """Overwrite the tile's logits with d loss / d logits, then fold it into dH, dW and db. ``ref``:
            ``(reference logits, lse_ref, KL)`` of the tile (kl_estimator="exact")."""
            z3 = logits.unsqueeze(0)
            ids = batch.token_ids[start:end]
            g_h = None if g_entropy is None else g_entropy[start:end]
            if ref is None:
                be.token_logprobs_backward(z3, ids, lse, entropy, g, g_h, config.temperature, z3)
            else:
                z_ref, lse_ref, kl = ref
                rows = (ids, lse, lse_ref, kl, torch.zeros_like(kl), batch.coef[start:end] * config.beta)
                kind = ("reverse_kl", 0.0, config.temperature)
                if g_h is None:
                    be.divergence_backward(z3, z_ref.unsqueeze(0), *rows, g, *kind, z3, None)
                else:  # the divergence kernel has no entropy term: its part in a buffer, the log-prob pass's over z
                    part = torch.empty_like(z3)
                    be.divergence_backward(z3, z_ref.unsqueeze(0), *rows, None, *kind, part, None)
                    be.token_logprobs_backward(z3, ids, lse.to(acc), entropy, g, g_h, config.temperature, z3)
                    z3.add_(part)
            grad = head.projection_grad(logits)  # [c, V] compute dtype
            if d_h is not None:
                torch.mm(grad, head.weight, out=d_h[start:end])
            if d_w is not None:
                addmm_acc(d_w, grad.T, tokens.hidden[start:end])
            if d_b is not None:
                d_b.add_(grad.sum(0, dtype=acc))

        wants_grad = grad_hidden or grad_weight or grad_bias
        if one_pass:
            new = lambda k, dt=acc: torch.zeros(k, dtype=dt, device=device)  # noqa: E731
            lp, entropy, per_token_loss, kl = new(n), new(n if with_entropy else 0), new(n), new(n)
            flags, loss = new(n, torch.uint8), new(())
            for start, end in tiles:
                logits = head.logits(tokens.hidden[start:end])
                part = slice_batch(batch, start, end, tokens.cu)
                ref = None
                if exact:
                    z_ref = ref_head.logits(ref_rows[start:end])
                    out, lse_ref = be.grpo_loss_exact_kl_forward(
                        logits.unsqueeze(0), z_ref.unsqueeze(0), part, config, with_entropy
                    )
                    ref = (z_ref, lse_ref, out.kl)
                else:
                    out = be.grpo_loss_forward(logits.unsqueeze(0), part, config, with_entropy)
                lp[start:end], per_token_loss[start:end], kl[start:end] = out.logprobs, out.per_token_loss, out.kl
                flags[start:end] = out.clip_flags
                if with_entropy:
                    entropy[start:end] = out.entropy
                loss += out.loss
                if wants_grad:
                    fold_gradient(start, end, logits, out.lse, out.entropy, out.grad_logprobs, ref)
        else:  # a sequence (or a batch) longer than a tile: every log-prob first, then the [N] math, then gradients
            exact_kl = None
            if exact:
                lp, lse, lse_ref, entropy, exact_kl = exact_kl_pass(
                    head, ref_head, tokens, ref_rows, tiles, be, config.temperature, with_entropy
                )
            else:
                lp, lse, entropy = logprob_pass(head, tokens, tiles, be, config.temperature, with_entropy)
            out = loss_forward_from_logprobs(lp, lse, entropy, batch, config, exact_kl=exact_kl)
            per_token_loss, kl, flags, loss = out.per_token_loss, out.kl, out.clip_flags, out.loss
            if wants_grad:
                for start, end in tiles:
                    logits = head.logits(tokens.hidden[start:end])  # recomputed: 2 n H V more FLOPs
                    part = entropy[start:end] if with_entropy else entropy
                    ref = None
                    if exact:  # and the reference's tile: 2 n H_ref V more
                        ref = (ref_head.logits(ref_rows[start:end]), lse_ref[start:end], kl[start:end])
                    fold_gradient(start, end, logits, lse[start:end], part, out.grad_logprobs[start:end], ref)
        if g_entropy is not None:
            loss = loss + (g_entropy * entropy).sum()

        none = lambda dt: torch.empty(0, dtype=dt, device=device)  # noqa: E731
        return (
            loss,
            tokens.spread(lp),
            tokens.spread(entropy) if with_entropy else none(acc),
            tokens.spread(per_token_loss),
            tokens.spread(kl),
            tokens.spread(flags),
            tokens.spread(d_h).to(hidden.dtype) if d_h is not None else none(hidden.dtype),
            d_w.to(weight.dtype) if d_w is not None else none(weight.dtype),
            d_b.to(bias.dtype) if d_b is not None else none(weight.dtype),
        )


@fused_linear_grpo_loss.register_fake
def _(
    hidden,
    weight,
    bias,
    batch,
    entropy_weights,
    entropy_coef,
    ref_hidden,
    ref_weight,
    ref_bias,
    ref_dtype,
    logit_softcap,
    logit_scale,
    dtype,
    chunk_tokens,
    with_entropy,
    backend,
    grad_hidden,
    grad_weight,
    grad_bias,
):
    n, acc = batch.token_ids.shape[0], acc_dtype(dtype)
    new = lambda shape, dt=acc: hidden.new_empty(shape, dtype=dt)  # noqa: E731
    has_bias = grad_bias and bias is not None
    return (
        new(()),
        new(n),
        new(n if with_entropy else 0),
        new(n),
        new(n),
        new(n, torch.uint8),
        new(hidden.shape if grad_hidden else 0, hidden.dtype),
        new(weight.shape if grad_weight else 0, weight.dtype),
        new(bias.shape if has_bias else 0, bias.dtype if has_bias else weight.dtype),
    )


def _setup(ctx, args, output):
    ctx.save_for_backward(*output[6:])
    ctx.computed = (args["grad_hidden"], args["grad_weight"], args["grad_bias"])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_lp, grad_entropy, *unused):
    if grad_entropy is not None:
        raise RuntimeError(
            "fused_linear_grpo_loss computes its gradients during the forward, so the returned entropy has no "
            "gradient of its own: for an entropy bonus pass entropy_coef (loss -= entropy_coef * sum_t c_t H_t) or "
            "entropy_weights (loss -= sum_t w_t H_t), or use out.entropy.detach() for logging"
        )
    # Scaled in place: the stored gradients are needed by nothing else, and a second [V, H] buffer would raise the
    # peak by the size of the head. A second backward through the same graph (retain_graph=True) therefore fails
    # autograd's saved-tensor version check instead of reusing scaled values.
    # g.mul_(0-dim float32 grad_loss) keeps g's dtype and rounds once, as g * grad_loss would.
    return tuple(
        g.mul_(grad_loss) if done and grad_loss is not None else None
        for g, done in zip(ctx.saved_tensors, ctx.computed)
    )


fused_linear_grpo_loss.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------------------------
# log-probs of the projection, no gradient (old / reference policy)
# ----------------------------------------------------------------------------------------------------------------
@struct_op(
    "grpo_kernels::fused_linear_token_logprobs",
    positional={"hidden": Tensor, "weight": Tensor, "bias": Tensor | None, "token_ids": Tensor},  # token_ids [N]
    options={"temperature": float, **_HEAD_OPTIONS},
    returns="(Tensor, Tensor)",
)
def fused_linear_token_logprobs(
    hidden, weight, bias, token_ids, temperature, logit_softcap, logit_scale, dtype, chunk_tokens, with_entropy, backend
) -> tuple[Tensor, Tensor]:
    """-> lp [N], entropy [N] / [0] (float32; float64 for a float64 compute dtype). No gradient."""
    if logit_softcap is None:
        temperature = temperature / logit_scale
    device = hidden.device
    one_sequence = torch.tensor([0, token_ids.shape[0]], device=device)
    batch = TokenBatch(token_ids, None, None, None, None, None, one_sequence, None, None)  # only the ids are read
    with torch.autocast(device.type, enabled=False):
        tokens = gather(hidden, batch, dtype)
        tiles, _ = plan_tiles(tokens.cu, chunk_tokens, None)
        head = make_head(weight, bias, dtype, logit_softcap, logit_scale, min(chunk_tokens, tokens.hidden.shape[0]))
        lp, _, entropy = logprob_pass(head, tokens, tiles, get_backend(backend), temperature, with_entropy)
        return tokens.spread(lp), tokens.spread(entropy) if with_entropy else entropy


@fused_linear_token_logprobs.register_fake
def _(
    hidden, weight, bias, token_ids, temperature, logit_softcap, logit_scale, dtype, chunk_tokens, with_entropy, backend
):
    n, acc = token_ids.shape[0], acc_dtype(dtype)
    return hidden.new_empty(n, dtype=acc), hidden.new_empty(n if with_entropy else 0, dtype=acc)
