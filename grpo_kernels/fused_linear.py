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
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .api import (
    LOGITS_DTYPES,
    GRPOLoss,
    GRPOLossOutput,
    _check_float,
    _check_number,
    _check_same_shape,
    _check_tensor,
    _kernel_token_ids,
    _loss_output,
    _poison,
    _prepare_loss_inputs,
)
from .backends import get_backend, resolve_backend
from .loss_math import LossConfig, TokenBatch, loss_forward_from_logprobs, segment_sum

# Default size of one logits tile (plus its float32 twin when a softcap is applied). The tile's row count c is the
# inner dimension of dW += G.T @ H, whose float32 [V, H] output is read and written once per tile: 2c FLOPs per 8
# bytes, above a GPU's ~300 FLOP/B ridge for c >~ 1200 (1664 rows for a bf16 [151936, H] head), while the tile stays
# small next to that float32 accumulator (V H 4 bytes). Not tuned on a GPU yet.
_TILE_BYTES = 512 * 2**20
# cuBLAS `addmm(..., out_dtype=float32)` from bf16/fp16 operands (torch >= 2.8): dW += G.T @ H without a bf16 product.
_ADDMM_OUT_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()
# Rows of a float32 upcast when the above is not available (CPU): bounds that temporary to about 8 MiB.
_UPCAST_ELEMENTS = 2 * 2**20


# ----------------------------------------------------------------------------------------------------------------
# the LM head, one tile at a time
# ----------------------------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the projection: autocast's when it is on (and nothing is float64), else the promoted dtype."""
    device_type = hidden.device.type
    if torch.float64 not in (hidden.dtype, weight.dtype) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def default_chunk_tokens(vocab: int, dtype: torch.dtype, softcap: bool = False) -> int:
    """Rows per tile so that one tile of logits (+ its float32 copy with a softcap) is about ``_TILE_BYTES``."""
    row_bytes = max(vocab, 1) * (dtype.itemsize + (4 if softcap else 0))
    rows = max(1, _TILE_BYTES // row_bytes)
    return rows - rows % 128 if rows >= 128 else rows


class _Head(NamedTuple):
    """``W``, ``b`` in the compute dtype, the logit transform, and the per-tile buffers (reused by every tile)."""

    weight: Tensor  # [V, H] compute dtype
    bias: Tensor | None  # [V] compute dtype
    softcap: float | None
    scale: float  # applied here only with a softcap; otherwise folded into the loss temperature
    tile: Tensor  # [chunk, V] compute dtype: the projection, then its gradient
    capped: Tensor | None  # [chunk, V] float32 (float64): the softcapped logits, then their gradient

    def logits(self, hidden: Tensor) -> Tensor:
        """``[n, V]`` logits of ``hidden [n, H]`` as the loss sees them (softcapped, not yet scaled when uncapped).

        With a softcap, ``self.tile`` keeps ``d logits / d projection = scale * (1 - tanh^2)`` (rounded once to the
        compute dtype) for :meth:`projection_grad`, and the float32 ``self.capped`` holds the logits.
        """
        n = hidden.shape[0]
        y = self.tile[:n]
        if self.bias is None:
            torch.mm(hidden, self.weight.T, out=y)
        else:
            torch.addmm(self.bias, hidden, self.weight.T, out=y)
        if self.softcap is None:
            return y
        z = self.capped[:n]
        z.copy_(y).mul_(self.scale / self.softcap).tanh_()  # t = tanh(scale * y / c), in float32 from here on
        scale = torch.full((), self.scale, dtype=z.dtype, device=z.device)
        torch.addcmul(scale, z, z, value=-self.scale, out=y)  # scale * (1 - t^2) in float32, rounded once into y
        return z.mul_(self.softcap)

    def projection_grad(self, logits_grad: Tensor) -> Tensor:
        """``d loss / d projection`` (``[n, V]``, compute dtype) from ``d loss / d logits`` written over the logits."""
        if self.softcap is None:
            return logits_grad
        y = self.tile[: logits_grad.shape[0]]
        return y.mul_(logits_grad)


def _make_head(weight, bias, dtype, softcap, scale, chunk) -> _Head:
    shape = (max(1, chunk), weight.shape[0])
    return _Head(
        weight.to(dtype), None if bias is None else bias.to(dtype), softcap, scale,
        torch.empty(shape, dtype=dtype, device=weight.device),
        None if softcap is None else torch.empty(shape, dtype=_acc(dtype), device=weight.device),
    )  # fmt: skip


def _addmm_acc(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` float32 (float64) and ``a``, ``b`` maybe bf16/fp16, never rounding ``a @ b``.

    Rounding each tile's product to bf16 before the sum is the error the float32 accumulator exists to avoid.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _ADDMM_OUT_DTYPE and acc.is_cuda and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # no mixed-precision GEMM here: upcast a slice of rows at a time
        b = b.to(acc.dtype)
        rows = max(1, _UPCAST_ELEMENTS // max(a.shape[1], 1))
        for start in range(0, a.shape[0], rows):
            acc[start : start + rows].addmm_(a[start : start + rows].to(acc.dtype), b)


# ----------------------------------------------------------------------------------------------------------------
# tokens: keep the ones that take part, cut them into tiles
# ----------------------------------------------------------------------------------------------------------------
class _Tokens(NamedTuple):
    """The tokens that take part, gathered, and the way back to all ``N`` positions."""

    hidden: Tensor  # [n, H] compute dtype
    batch: TokenBatch  # [n] tokens; sequences are still contiguous runs (cu_seqlens counts only these tokens)
    cu: list[int]  # batch.cu_seqlens on the host
    keep: Tensor | None  # [n] int64 positions among the N; None when every token takes part
    total: int  # N

    def pick(self, x: Tensor | None) -> Tensor | None:
        """``[N, ...]`` -> ``[n, ...]``: the rows of the tokens that take part."""
        if x is None or self.keep is None:
            return x
        return x.index_select(0, self.keep)

    def spread(self, x: Tensor) -> Tensor:
        """``[n, ...]`` -> ``[N, ...]``, zeros where a token does not take part."""
        if self.keep is None:
            return x
        return x.new_zeros((self.total, *x.shape[1:])).index_copy_(0, self.keep, x)


def _gather(hidden: Tensor, batch: TokenBatch, dtype: torch.dtype) -> _Tokens:
    """Masked positions are never projected: no FLOPs for padding, and NaN there (an all-masked attention row)
    cannot reach ``dW`` through ``0 * NaN``."""
    total = hidden.shape[0]
    keep = torch.nonzero(batch.token_ids >= 0).squeeze(1)  # [n]; a host sync, as is cu_seqlens.tolist() below
    if keep.shape[0] == total:
        keep = None
    else:
        counts = segment_sum(batch.token_ids.ge(0).to(torch.float64), batch.cu_seqlens).round().long()
        pick = lambda x: None if x is None else x.index_select(0, keep)  # noqa: E731
        batch = TokenBatch(
            pick(batch.token_ids), pick(batch.coef), pick(batch.advantages), pick(batch.old_logprobs),
            pick(batch.ref_logprobs), pick(batch.is_weights), torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
            pick(batch.seq_ids), pick(batch.seq_weights),
        )  # fmt: skip
        hidden = hidden.index_select(0, keep)
    return _Tokens(hidden.to(dtype), batch, batch.cu_seqlens.tolist(), keep, total)


def _slice(batch: TokenBatch, start: int, end: int, cu: list[int]) -> TokenBatch:
    """Tokens ``start:end`` as a batch of their own: the sequences they touch, clipped to the tile."""
    first = bisect.bisect_right(cu, start) - 1  # the sequence holding token `start` (skips empty ones)
    last = bisect.bisect_right(cu, end - 1) - 1
    bounds = [max(c, start) - start for c in cu[first : last + 1]] + [end - start]
    part = lambda x: None if x is None else x[start:end]  # noqa: E731
    return TokenBatch(
        part(batch.token_ids), part(batch.coef), part(batch.advantages), part(batch.old_logprobs),
        part(batch.ref_logprobs), part(batch.is_weights), torch.tensor(bounds, device=batch.cu_seqlens.device),
        batch.seq_ids[start:end] - first, part(batch.seq_weights),
    )  # fmt: skip


def _plan_tiles(cu: list[int], chunk: int, sequence_level: bool) -> tuple[list[tuple[int, int]], bool]:
    """``(tiles, one_pass)``: ``[start, end)`` token ranges of at most ``chunk`` tokens.

    At sequence level a tile must hold whole sequences for its loss (and gradient) to be exact on its own. When a
    sequence is longer than ``chunk`` that is impossible: fixed tiles and two passes (``one_pass = False``).
    """
    n = cu[-1]
    fixed = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if not sequence_level:
        return fixed, True
    if any(b - a > chunk for a, b in zip(cu, cu[1:])):
        return fixed, False
    tiles, start, previous = [], 0, 0
    for end in cu[1:]:
        if end - start > chunk:  # this sequence does not fit: close the tile before it
            tiles.append((start, previous))
            start = previous
        previous = end
    if previous > start:
        tiles.append((start, previous))
    return tiles, True


def _logprob_pass(head: _Head, tokens: _Tokens, tiles, be, temperature: float, with_entropy: bool):
    """``lp, lse, entropy`` (``[n]``; entropy ``[0]`` unless asked for) over every tile: 2 n H V FLOPs."""
    n = tokens.hidden.shape[0]
    new = lambda k: torch.zeros(k, dtype=_acc(head.weight.dtype), device=tokens.hidden.device)  # noqa: E731
    lp, lse, entropy = new(n), new(n), new(n if with_entropy else 0)
    for start, end in tiles:
        logits = head.logits(tokens.hidden[start:end])
        lp_t, lse_t, entropy_t = be.token_logprobs_forward(
            logits.unsqueeze(0), tokens.batch.token_ids[start:end], temperature, with_entropy
        )
        lp[start:end], lse[start:end] = lp_t, lse_t
        if with_entropy:
            entropy[start:end] = entropy_t
    return lp, lse, entropy


# ----------------------------------------------------------------------------------------------------------------
# the fused op: loss, per-token outputs and the finished gradients
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("grpo_kernels::fused_linear_grpo_loss", mutates_args=())
def _fused_linear_grpo_loss(
    hidden: Tensor,  # [N, H]
    weight: Tensor,  # [V, H]
    bias: Tensor | None,  # [V]
    token_ids: Tensor,  # [N] int64, -1 = not taking part    (the fields of TokenBatch, in order)
    coef: Tensor,  # [N]
    advantages: Tensor,  # [N]
    old_logprobs: Tensor | None,  # [N]
    ref_logprobs: Tensor | None,  # [N]
    is_weights: Tensor | None,  # [N]
    cu_seqlens: Tensor,  # [S+1] int64
    seq_ids: Tensor,  # [N] int64
    seq_weights: Tensor,  # [N]
    entropy_weights: Tensor | None,  # [N]: loss -= sum_t w_t H_t
    loss_type: str,  # (the fields of LossConfig, in order)
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    dual_clip: float | None,
    temperature: float,
    importance_sampling_level: str,
    kl_estimator: str,
    bias_corrected_kl: bool,
    sapo_temperature_pos: float,
    sapo_temperature_neg: float,
    logit_softcap: float | None,  # the head
    logit_scale: float,
    dtype: torch.dtype,  # compute dtype of the projection
    chunk_tokens: int,
    entropy_coef: float,
    with_entropy: bool,
    grad_hidden: bool,  # which gradients to compute
    grad_weight: bool,
    grad_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> loss [], lp [N], entropy [N] / [0], per-token loss [N], kl [N], clip flags [N] uint8,
    d loss/d hidden [N, H] / [0], d loss/d weight [V, H] / [0], d loss/d bias [V] / [0]."""
    batch = TokenBatch(
        token_ids, coef, advantages, old_logprobs, ref_logprobs, is_weights, cu_seqlens, seq_ids, seq_weights
    )
    config = LossConfig(
        loss_type, beta, epsilon_low, epsilon_high, delta, dual_clip, temperature, importance_sampling_level,
        kl_estimator, bias_corrected_kl, sapo_temperature_pos, sapo_temperature_neg,
    )  # fmt: skip
    if logit_softcap is None:  # logits * scale / tau == logits / (tau / scale): the scale costs nothing
        config = dataclasses.replace(config, temperature=temperature / logit_scale)
    be = get_backend(backend)
    device, acc = hidden.device, _acc(dtype)
    grad_bias = grad_bias and bias is not None
    with torch.autocast(device.type, enabled=False):  # every dtype below is chosen, not autocast's
        tokens = _gather(hidden, batch, dtype)
        batch, n = tokens.batch, tokens.hidden.shape[0]
        tiles, one_pass = _plan_tiles(tokens.cu, chunk_tokens, config.sequence_level)
        head = _make_head(weight, bias, dtype, logit_softcap, logit_scale, min(chunk_tokens, n))
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

        def fold_gradient(start: int, end: int, logits: Tensor, lse: Tensor, entropy: Tensor, g: Tensor) -> None:
            """Overwrite the tile's logits with d loss / d logits, then fold it into dH, dW and db."""
            z3 = logits.unsqueeze(0)
            g_h = None if g_entropy is None else g_entropy[start:end]
            be.token_logprobs_backward(z3, batch.token_ids[start:end], lse, entropy, g, g_h, config.temperature, z3)
            grad = head.projection_grad(logits)  # [c, V] compute dtype
            if d_h is not None:
                torch.mm(grad, head.weight, out=d_h[start:end])
            if d_w is not None:
                _addmm_acc(d_w, grad.T, tokens.hidden[start:end])
            if d_b is not None:
                d_b.add_(grad.sum(0, dtype=acc))

        wants_grad = grad_hidden or grad_weight or grad_bias
        if one_pass:
            new = lambda k, dt=acc: torch.zeros(k, dtype=dt, device=device)  # noqa: E731
            lp, entropy, per_token_loss, kl = new(n), new(n if with_entropy else 0), new(n), new(n)
            flags, loss = new(n, torch.uint8), new(())
            for start, end in tiles:
                logits = head.logits(tokens.hidden[start:end])
                out = be.grpo_loss_forward(
                    logits.unsqueeze(0), _slice(batch, start, end, tokens.cu), config, with_entropy
                )
                lp[start:end], per_token_loss[start:end], kl[start:end] = out.logprobs, out.per_token_loss, out.kl
                flags[start:end] = out.clip_flags
                if with_entropy:
                    entropy[start:end] = out.entropy
                loss += out.loss
                if wants_grad:
                    fold_gradient(start, end, logits, out.lse, out.entropy, out.grad_logprobs)
        else:  # a sequence longer than a tile: every log-prob first, then the sequence-level math, then gradients
            lp, lse, entropy = _logprob_pass(head, tokens, tiles, be, config.temperature, with_entropy)
            out = loss_forward_from_logprobs(lp, lse, entropy, batch, config)
            per_token_loss, kl, flags, loss = out.per_token_loss, out.kl, out.clip_flags, out.loss
            if wants_grad:
                for start, end in tiles:
                    logits = head.logits(tokens.hidden[start:end])  # recomputed: 2 n H V more FLOPs
                    part = entropy[start:end] if with_entropy else entropy
                    fold_gradient(start, end, logits, lse[start:end], part, out.grad_logprobs[start:end])
        if g_entropy is not None:
            loss = loss + (g_entropy * entropy).sum()

        none = lambda dt: torch.empty(0, dtype=dt, device=device)  # noqa: E731
        return (
            loss, tokens.spread(lp), tokens.spread(entropy) if with_entropy else none(acc),
            tokens.spread(per_token_loss), tokens.spread(kl), tokens.spread(flags),
            tokens.spread(d_h).to(hidden.dtype) if d_h is not None else none(hidden.dtype),
            d_w.to(weight.dtype) if d_w is not None else none(weight.dtype),
            d_b.to(bias.dtype) if d_b is not None else none(weight.dtype),
        )  # fmt: skip


@_fused_linear_grpo_loss.register_fake
def _(hidden, weight, bias, token_ids, *args):
    dtype, with_entropy, grad_hidden, grad_weight, grad_bias = args[-10], args[-5], args[-4], args[-3], args[-2]
    n, acc = token_ids.shape[0], _acc(dtype)
    new = lambda shape, dt=acc: hidden.new_empty(shape, dtype=dt)  # noqa: E731
    has_bias = grad_bias and bias is not None
    return (
        new(()), new(n), new(n if with_entropy else 0), new(n), new(n), new(n, torch.uint8),
        new(hidden.shape if grad_hidden else 0, hidden.dtype), new(weight.shape if grad_weight else 0, weight.dtype),
        new(bias.shape if has_bias else 0, bias.dtype if has_bias else weight.dtype),
    )  # fmt: skip


def _fused_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[6:])
    ctx.computed = inputs[-4:-1]  # grad_hidden, grad_weight, grad_bias
    ctx.num_inputs = len(inputs)
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_loss, grad_lp, grad_entropy, *unused):
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
    grads = [g.mul_(grad_loss) if done and grad_loss is not None else None
             for g, done in zip(ctx.saved_tensors, ctx.computed)]  # fmt: skip
    return (*grads, *(None,) * (ctx.num_inputs - 3))


_fused_linear_grpo_loss.register_autograd(_fused_backward, setup_context=_fused_setup)


@torch.library.custom_op("grpo_kernels::fused_linear_token_logprobs", mutates_args=())
def _fused_linear_token_logprobs(
    hidden: Tensor,  # [N, H]
    weight: Tensor,  # [V, H]
    bias: Tensor | None,  # [V]
    token_ids: Tensor,  # [N] int64, -1 = not taking part
    temperature: float,
    logit_softcap: float | None,
    logit_scale: float,
    dtype: torch.dtype,
    chunk_tokens: int,
    with_entropy: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """-> lp [N], entropy [N] / [0] (float32; float64 for a float64 compute dtype). No gradient."""
    if logit_softcap is None:
        temperature = temperature / logit_scale
    device = hidden.device
    one_sequence = torch.tensor([0, token_ids.shape[0]], device=device)
    batch = TokenBatch(token_ids, None, None, None, None, None, one_sequence, None, None)  # only the ids are read
    with torch.autocast(device.type, enabled=False):
        tokens = _gather(hidden, batch, dtype)
        tiles, _ = _plan_tiles(tokens.cu, chunk_tokens, False)
        head = _make_head(weight, bias, dtype, logit_softcap, logit_scale, min(chunk_tokens, tokens.hidden.shape[0]))
        lp, _, entropy = _logprob_pass(head, tokens, tiles, get_backend(backend), temperature, with_entropy)
        return tokens.spread(lp), tokens.spread(entropy) if with_entropy else entropy


@_fused_linear_token_logprobs.register_fake
def _(
    hidden, weight, bias, token_ids, temperature, logit_softcap, logit_scale, dtype, chunk_tokens, with_entropy, backend
):
    n, acc = token_ids.shape[0], _acc(dtype)
    return hidden.new_empty(n, dtype=acc), hidden.new_empty(n if with_entropy else 0, dtype=acc)


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
def _check_head(hidden, weight, bias, logit_softcap, logit_scale, chunk_tokens) -> None:
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or packed [N, H], got shape {list(hidden.shape)}")
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if x is None and name == "bias":
            continue
        _check_tensor(name, x, hidden.device, "hidden")
        if x.dtype not in LOGITS_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(
            f"weight must be the LM head [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]} and V >= 1, "
            f"got shape {list(weight.shape)}"
        )
    if bias is not None:
        _check_same_shape("bias", bias, weight.shape[:1], "weight's vocabulary dim")
    _check_number("logit_scale", logit_scale, low=0, low_inclusive=False)
    _check_number("logit_softcap", logit_softcap, low=0, low_inclusive=False, allow_none=True)
    if chunk_tokens is not None and (
        isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1
    ):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")


def _head_args(hidden, weight, logit_softcap, logit_scale, chunk_tokens):
    """``(hidden [N, H], compute dtype, softcap, scale, chunk_tokens)`` as the ops take them."""
    dtype = compute_dtype(hidden, weight)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0], dtype, logit_softcap is not None)
    softcap = None if logit_softcap is None else float(logit_softcap)
    return hidden.reshape(-1, hidden.shape[-1]), dtype, softcap, float(logit_scale), chunk


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
    entropy_coef: float = 0.0,
    entropy_weights: Tensor | None = None,
    backend: str = "auto",
    cu_seqlens: Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    ignore_index: int = -100,
    logit_softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_tokens: int | None = None,
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

    Compute dtype: autocast's dtype when autocast is on, else ``promote_types(hidden.dtype, weight.dtype)``; the
    matmuls accumulate in float32, ``dW`` and ``db`` are accumulated across tiles in float32 and returned in the
    parameters' dtype, ``dH`` in ``hidden``'s dtype.

    Returns:
        :class:`grpo_kernels.GRPOLossOutput` (per-token fields shaped like ``token_ids``). ``loss`` is
        differentiable w.r.t. ``hidden``, ``weight`` and ``bias``; its backward only scales the stored gradients.
    """
    _check_head(hidden, weight, bias, logit_softcap, logit_scale, chunk_tokens)
    _check_number("entropy_coef", entropy_coef)
    hidden2d, dtype, softcap, scale, chunk = _head_args(hidden, weight, logit_softcap, logit_scale, chunk_tokens)
    if entropy_weights is not None:
        _check_tensor("entropy_weights", entropy_weights, hidden.device, "hidden")
        _check_float("entropy_weights", entropy_weights)
        _check_same_shape("entropy_weights", entropy_weights, token_ids.shape, "token_ids")
        entropy_weights = entropy_weights.detach().reshape(-1).to(_acc(dtype))
    inputs = _prepare_loss_inputs(
        "hidden", hidden.shape[:-1], weight.shape[0], hidden.device, dtype == torch.float64, token_ids, advantages,
        mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, beta=beta, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, delta=delta, dual_clip=dual_clip, temperature=temperature, loss_type=loss_type,
        importance_sampling_level=importance_sampling_level, kl_estimator=kl_estimator,
        bias_corrected_kl=bias_corrected_kl, is_weights=is_weights, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, backend=backend, cu_seqlens=cu_seqlens,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg, ignore_index=ignore_index,
    )  # fmt: skip
    grad = torch.is_grad_enabled()
    needs = [grad and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    c = inputs.config
    config = (c.loss_type, c.beta, c.epsilon_low, c.epsilon_high, c.delta, c.dual_clip, c.temperature,
              c.importance_sampling_level, c.kl_estimator, c.bias_corrected_kl, c.sapo_temperature_pos,
              c.sapo_temperature_neg)  # fmt: skip
    with_entropy = bool(return_entropy) or entropy_coef != 0.0 or entropy_weights is not None
    loss, lp, entropy, per_token_loss, kl, flags, *_ = _fused_linear_grpo_loss(
        hidden2d, weight, bias, *inputs.batch, entropy_weights, *config, softcap, scale, dtype, chunk,
        float(entropy_coef), with_entropy, *needs, inputs.backend,
    )  # fmt: skip
    return _loss_output(inputs, token_ids, mask, ignore_index, loss, lp, entropy if return_entropy else None,
                        per_token_loss, kl, flags)  # fmt: skip


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
    _check_tensor("token_ids", token_ids, device, "hidden")
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    _check_same_shape("token_ids", token_ids, hidden.shape[:-1], "hidden without the last dim")
    if mask is not None:
        _check_tensor("mask", mask, device, "hidden")
        _check_same_shape("mask", mask, token_ids.shape, "token_ids")
    _check_number("temperature", temperature, low=0, low_inclusive=False)
    hidden2d, dtype, softcap, scale, chunk = _head_args(hidden, weight, logit_softcap, logit_scale, chunk_tokens)
    name = resolve_backend(backend, device, float64=dtype == torch.float64)
    ids = _kernel_token_ids(token_ids, mask, ignore_index, weight.shape[0])
    detach = lambda x: None if x is None else x.detach()  # noqa: E731
    lp, entropy = _fused_linear_token_logprobs(
        hidden2d.detach(), weight.detach(), detach(bias), ids, float(temperature), softcap, scale, dtype, chunk,
        bool(return_entropy), name,
    )  # fmt: skip
    lp = _poison(lp, token_ids, ids, mask, ignore_index).view(token_ids.shape)
    if return_entropy:
        return lp, _poison(entropy, token_ids, ids, mask, ignore_index).view(token_ids.shape)
    return lp


class FusedLinearGRPOLoss(GRPOLoss):
    """:func:`fused_linear_grpo_loss` as a module holding the configuration (the arguments of
    :class:`grpo_kernels.GRPOLoss` except ``inplace_backward``, ``grad_in_forward`` and ``loss_scale``, which do not
    apply: the logits tiles are always overwritten and the gradients are always finished in the forward; plus the
    head's).

    ``FusedLinearGRPOLoss(beta=0.04)(hidden, lm_head.weight, token_ids, advantages, mask=mask, ref_logprobs=ref)``.
    """

    def __init__(
        self,
        *,
        logit_softcap: float | None = None,
        logit_scale: float = 1.0,
        entropy_coef: float = 0.0,
        chunk_tokens: int | None = None,
        **loss_config,
    ):
        for key in ("inplace_backward", "grad_in_forward", "loss_scale"):
            if key in loss_config:
                raise TypeError(
                    f"FusedLinearGRPOLoss has no {key}: its logits tiles are always overwritten and its gradients "
                    "always finished in the forward"
                )
        super().__init__(**loss_config)
        for key in ("inplace_backward", "grad_in_forward", "loss_scale"):
            del self.config[key]
        _check_number("logit_scale", logit_scale, low=0, low_inclusive=False)
        _check_number("logit_softcap", logit_softcap, low=0, low_inclusive=False, allow_none=True)
        _check_number("entropy_coef", entropy_coef)
        self.config.update(
            logit_softcap=logit_softcap, logit_scale=logit_scale, entropy_coef=entropy_coef, chunk_tokens=chunk_tokens
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
        is_weights: Tensor | None = None,
        num_items_in_batch: int | float | Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        entropy_weights: Tensor | None = None,
    ) -> GRPOLossOutput:
        return fused_linear_grpo_loss(
            hidden, weight, token_ids, advantages, bias=bias, mask=mask, old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs, is_weights=is_weights, num_items_in_batch=num_items_in_batch,
            cu_seqlens=cu_seqlens, entropy_weights=entropy_weights, **self.config,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face causal LMs: backbone + fused head, no model(...).logits
# ----------------------------------------------------------------------------------------------------------------
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


def causal_lm_head_inputs(
    model: nn.Module,
    input_ids: Tensor,  # [B, L]
    attention_mask: Tensor | None,  # [B, L]
    logits_to_keep: int,
    *,
    completion_mask: Tensor | None = None,  # [B, C]
    model_kwargs: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """What :func:`causal_lm_grpo_loss` passes to :func:`fused_linear_grpo_loss`, for callers that make more than
    one fused call on one backbone run (e.g. a no-grad :func:`fused_linear_token_logprobs` pass, then the loss).

    Runs the backbone and returns ``(hidden [B, C, H], lm_head.weight, targets [B, C], head_kwargs)``: ``hidden`` a
    view of ``last_hidden_state`` whose row ``t`` predicts completion token ``t``, ``head_kwargs`` the ``bias``,
    ``mask`` (``completion_mask``), ``logit_softcap`` and ``logit_scale`` keyword arguments of both fused functions.
    Arguments as :func:`causal_lm_grpo_loss`.
    """
    length = input_ids.shape[1]
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or not 0 < logits_to_keep < length:
        raise ValueError(
            f"logits_to_keep must be an int in [1, L) = [1, {length}) (the completion length; at least one prompt "
            f"token must precede the completion), got {logits_to_keep!r}"
        )
    outputs = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **(model_kwargs or {})
    )
    hidden = outputs.last_hidden_state[:, length - logits_to_keep - 1 : length - 1]  # a view: no copy
    if completion_mask is None and attention_mask is not None:
        completion_mask = attention_mask[:, -logits_to_keep:]
    head = model.get_output_embeddings()
    softcap, scale = head_transform(model.config)
    kwargs = dict(bias=head.bias, mask=completion_mask, logit_softcap=softcap, logit_scale=scale)
    return hidden, head.weight, input_ids[:, -logits_to_keep:], kwargs


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
            model, input_ids, attention_mask, logits_to_keep,
            completion_mask=completion_mask, model_kwargs=model_kwargs,
        )  # fmt: skip
        return fused_linear_token_logprobs(hidden, weight, targets, **{**kwargs, **logprob_kwargs})


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
