"""The LM head one tile at a time, and the tokens cut into tiles: the pieces of the fused-linear loss.

``_Head`` projects a tile of hidden states to its logits (softcapped when the model caps them) and turns the logits'
gradient back into the projection's; ``_Tokens`` keeps the tokens that take part (masked positions are never
projected); ``plan_tiles`` cuts them so that a tile is exact on its own (whole sequences when a token's gradient needs
its sequence, the whole batch when it needs the batch).
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import torch
from torch import Tensor

from ..loss_math import TokenBatch, segment_sum

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
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the projection: autocast's when it is on (and nothing is float64), else the promoted dtype."""
    device_type = hidden.device.type
    if torch.float64 not in (hidden.dtype, weight.dtype) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def default_chunk_tokens(
    vocab: int, dtype: torch.dtype, softcap: bool = False, ref_dtype: torch.dtype | None = None
) -> int:
    """Rows per tile so that one tile of logits (+ its float32 copy with a softcap) is about ``_TILE_BYTES``; with
    ``ref_dtype`` (``kl_estimator="exact"``), the policy's and the reference's tiles together."""
    row_bytes = max(vocab, 1) * (dtype.itemsize + (4 if softcap else 0))
    if ref_dtype is not None:
        row_bytes += max(vocab, 1) * (ref_dtype.itemsize + (4 if softcap else 0))
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


def make_head(weight, bias, dtype, softcap, scale, chunk) -> _Head:
    shape = (max(1, chunk), weight.shape[0])
    return _Head(
        weight.to(dtype),
        None if bias is None else bias.to(dtype),
        softcap,
        scale,
        torch.empty(shape, dtype=dtype, device=weight.device),
        None if softcap is None else torch.empty(shape, dtype=acc_dtype(dtype), device=weight.device),
    )


def addmm_acc(acc: Tensor, a: Tensor, b: Tensor) -> None:
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


def gather(hidden: Tensor, batch: TokenBatch, dtype: torch.dtype) -> _Tokens:
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
            pick(batch.token_ids),
            pick(batch.coef),
            pick(batch.advantages),
            pick(batch.old_logprobs),
            pick(batch.ref_logprobs),
            pick(batch.is_weights),
            torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
            pick(batch.seq_ids),
            pick(batch.seq_weights),
            pick(batch.mask_weights),
        )
        hidden = hidden.index_select(0, keep)
    return _Tokens(hidden.to(dtype), batch, batch.cu_seqlens.tolist(), keep, total)


def slice_batch(batch: TokenBatch, start: int, end: int, cu: list[int]) -> TokenBatch:
    """Tokens ``start:end`` as a batch of their own: the sequences they touch, clipped to the tile."""
    first = bisect.bisect_right(cu, start) - 1  # the sequence holding token `start` (skips empty ones)
    last = bisect.bisect_right(cu, end - 1) - 1
    bounds = [max(c, start) - start for c in cu[first : last + 1]] + [end - start]
    part = lambda x: None if x is None else x[start:end]  # noqa: E731
    return TokenBatch(
        part(batch.token_ids),
        part(batch.coef),
        part(batch.advantages),
        part(batch.old_logprobs),
        part(batch.ref_logprobs),
        part(batch.is_weights),
        torch.tensor(bounds, device=batch.cu_seqlens.device),
        batch.seq_ids[start:end] - first,
        part(batch.seq_weights),
        part(batch.mask_weights),
    )


def plan_tiles(cu: list[int], chunk: int, coupling: str | None) -> tuple[list[tuple[int, int]], bool]:
    """``(tiles, one_pass)``: ``[start, end)`` token ranges of at most ``chunk`` tokens.

    ``coupling`` is :attr:`grpo_kernels.LossConfig.coupling`. When a token's gradient needs its sequence
    (``"sequence"``) a tile must hold whole sequences for its loss (and gradient) to be exact on its own; when it needs
    the batch (``"batch"``) the one tile must hold every token. Where that is impossible: fixed tiles and two passes
    (``one_pass = False``: every log-prob first, then the [N] math, then the gradients).
    """
    n = cu[-1]
    fixed = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if coupling is None:
        return fixed, True
    if coupling == "batch":
        return fixed, len(fixed) <= 1
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


def logprob_pass(head: _Head, tokens: _Tokens, tiles, be, temperature: float, with_entropy: bool):
    """``lp, lse, entropy`` (``[n]``; entropy ``[0]`` unless asked for) over every tile: 2 n H V FLOPs."""
    n = tokens.hidden.shape[0]
    new = lambda k: torch.zeros(k, dtype=acc_dtype(head.weight.dtype), device=tokens.hidden.device)  # noqa: E731
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


def exact_kl_pass(
    head: _Head, ref_head: _Head, tokens: _Tokens, ref_hidden: Tensor, tiles, be, temperature, with_entropy
):
    """``lp, lse, lse_ref, entropy, kl`` (``[n]``; ``lse``, ``lse_ref`` float64; entropy ``[0]`` unless asked for)
    over every tile, both logits tiles per tile (``kl_estimator="exact"``): 2 n (H + H_ref) V FLOPs."""
    n, device, acc = tokens.hidden.shape[0], tokens.hidden.device, acc_dtype(head.weight.dtype)
    new = lambda k, dtype=acc: torch.zeros(k, dtype=dtype, device=device)  # noqa: E731
    lp, kl, entropy = new(n), new(n), new(n if with_entropy else 0)
    lse, lse_ref = new(n, torch.float64), new(n, torch.float64)
    for start, end in tiles:
        z = head.logits(tokens.hidden[start:end]).unsqueeze(0)
        z_ref = ref_head.logits(ref_hidden[start:end]).unsqueeze(0)
        ids = tokens.batch.token_ids[start:end]
        kl[start:end], lp[start:end], lse[start:end], lse_ref[start:end], _, _ = be.divergence_forward(
            z, z_ref, ids, "reverse_kl", 0.0, temperature, True
        )
        if with_entropy:
            entropy[start:end] = be.token_logprobs_forward(z, ids, temperature, True)[2]
    return lp, lse, lse_ref, entropy, kl
