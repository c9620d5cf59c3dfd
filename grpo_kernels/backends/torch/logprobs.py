"""The torch backend's passes over the logits: chunked log-probs / entropy and their hand-written gradient.

Two implementations of the same two passes:

* on the CPU, for float32 / bfloat16 / float16 logits, the compiled loops of ``cpu_kernels.cpp`` (:mod:`.native`):
  each row read once from memory in the forward (lse, lp and the entropy together), read once and its gradient
  written once in the backward, on ``torch.get_num_threads()`` threads;
* everywhere else (float64, other devices, no C++ compiler, ``GRPO_KERNELS_CPU_NATIVE=0``) torch ops over blocks
  of rows, below.

Neither materialises a full ``[N, V]`` float32 softmax: the torch-ops path processes rows in blocks of about
``_BLOCK_BYTES`` of float32, and writes the gradient w.r.t. the logits directly (``g (1[v=y] - p_v) / tau`` plus
the entropy term), into a new buffer or over the logits. Traffic: forward reads the logits once; backward reads
them once and writes the gradient once (3 passes in all, like the fused GPU kernels), plus (torch-ops path only)
block-local temporaries.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ... import _alloc
from . import native

# Rows per block: about this many bytes of float32 temporaries. Measured on a 2-core CPU (benchmarks/NOTES.md):
# small enough to stay in L2/L3 between the passes of a block, large enough to amortise per-op overhead.
_BLOCK_BYTES = 8 * 1024 * 1024
# log p below this underflows to p = 0 in float32 and float64 alike; clamping there keeps 0 * log 0 = 0 (masked
# vocabulary entries, z = -inf) out of NaN without touching any term that contributes.
_LOGP_FLOOR = -1.0e4


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_blocks(tensors: list[torch.Tensor], rows_per_block: int) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """Yield ``(start, end, blocks)``: ``[end - start, V]`` views of each ``[B, T, V]`` tensor, over the same rows."""
    batch, seq, vocab = tensors[0].shape
    try:
        flats = [t.view(batch * seq, vocab) for t in tensors]
    except RuntimeError:  # B and T strides do not merge (e.g. logits[:, :-1]): walk each sequence
        flats = None
    if flats is not None:
        for start in range(0, batch * seq, rows_per_block):
            end = min(start + rows_per_block, batch * seq)
            yield start, end, [f[start:end] for f in flats]
        return
    for b in range(batch):
        for start in range(0, seq, rows_per_block):
            end = min(start + rows_per_block, seq)
            yield b * seq + start, b * seq + end, [t[b, start:end] for t in tensors]


def _rows_per_block(vocab: int) -> int:
    return max(1, _BLOCK_BYTES // (4 * max(vocab, 1)))


def token_logprobs_forward(logits, token_ids, temperature, with_entropy):
    if native.usable(logits):
        out = native.token_logprobs_forward(logits, token_ids, temperature, with_entropy)
        if out is not None:
            return out
    acc = _acc_dtype(logits)
    n = token_ids.shape[0]
    lp = _alloc.empty(n, dtype=acc, device=logits.device)
    lse = _alloc.empty(n, dtype=acc, device=logits.device)
    entropy = _alloc.empty(n if with_entropy else 0, dtype=acc, device=logits.device)
    valid = token_ids >= 0
    vocab = logits.shape[-1]
    elsewhere = token_ids == vocab  # the target is in another vocabulary shard (vocab_parallel.py): u_y := 0
    safe_ids = token_ids.clamp(min=0, max=vocab - 1).unsqueeze(1)
    for start, end, (block,) in _row_blocks([logits], _rows_per_block(vocab)):
        u = block.to(acc)
        if temperature != 1.0:
            u = u / temperature
        row_max = u.amax(dim=1, keepdim=True)
        if with_entropy:
            shifted = (u - row_max).clamp_(min=_LOGP_FLOOR)  # u - max
            e = torch.exp(shifted)
            total = e.sum(dim=1)
            # H = lse - sum p u = log(total) - sum(e * (u - max)) / total
            entropy[start:end] = torch.log(total) - torch.einsum("rv,rv->r", e, shifted) / total
            block_lse = row_max.squeeze(1) + torch.log(total)
        else:
            block_lse = torch.logsumexp(u, dim=1)
        lse[start:end] = block_lse
        u_y = u.gather(1, safe_ids[start:end]).squeeze(1)
        lp[start:end] = torch.where(elsewhere[start:end], 0.0, u_y) - block_lse
    zero = torch.zeros((), dtype=acc, device=logits.device)
    lp = torch.where(valid, lp, zero)
    if with_entropy:
        entropy = torch.where(valid, entropy, zero)
    return lp, lse, entropy


def token_logprobs_backward(logits, token_ids, lse, entropy, grad_lp, grad_entropy, temperature, out):
    acc = _acc_dtype(logits)
    valid = token_ids >= 0
    # Fold 1/tau into the per-row scalars: grad = (g 1[v=y] - p (g + gH (log p + H))) / tau.
    zero = torch.zeros((), dtype=acc, device=logits.device)
    g = torch.where(valid, grad_lp.to(acc), zero) / temperature
    g_h = None if grad_entropy is None else torch.where(valid, grad_entropy.to(acc), zero) / temperature
    if native.usable(logits, out) and native.token_logprobs_backward(
        logits, token_ids, lse, entropy, g, g_h, temperature, out
    ):
        return
    vocab = logits.shape[-1]
    safe_ids = token_ids.clamp(min=0, max=vocab - 1).unsqueeze(1)
    g_target = torch.where(token_ids == vocab, zero, g)  # no 1[v = y] term where the target is in another shard
    all_valid = bool(valid.all())
    tensors = [logits] if out is logits else [logits, out]
    for start, end, blocks in _row_blocks(tensors, _rows_per_block(logits.shape[-1])):
        block, out_block = blocks[0], blocks[-1]
        work = out_block if out_block.dtype == acc else torch.empty(out_block.shape, dtype=acc, device=out.device)
        if temperature != 1.0:  # divide in float32, as the forward does: in bf16, z / tau is off by an ulp of
            torch.div(block.to(acc), temperature, out=work)  # z / tau and p by a factor up to e^ulp
        elif work.data_ptr() != block.data_ptr() or work.dtype != block.dtype:
            work.copy_(block)
        work.sub_(lse[start:end].unsqueeze(1))  # log p
        g_rows = g[start:end].unsqueeze(1)
        if g_h is not None:
            work.clamp_(min=_LOGP_FLOOR)
            p = torch.exp(work)
            # -p (g + gH (log p + H))
            work.add_(entropy[start:end].unsqueeze(1)).mul_(g_h[start:end].unsqueeze(1)).add_(g_rows)
            work.mul_(p).neg_()
        else:
            work.exp_().mul_(g_rows.neg())
        work.scatter_add_(1, safe_ids[start:end], g_target[start:end].unsqueeze(1))
        if not all_valid:
            work.masked_fill_(~valid[start:end].unsqueeze(1), 0.0)
        if work is not out_block:
            out_block.copy_(work)
