"""Helpers shared by the Triton kernels: launch grids, vocabulary tiling, 64-bit row addressing, NaN-safe min/max.

Everything here is small on purpose; each op's file (``logprobs.py``, ``grpo_loss.py``, ``advantages.py``) reads
top to bottom without jumping back here more than once.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

# CUDA grid limits: x up to 2^31 - 1 blocks, y and z up to 65535. Tokens always go on x (T >= 65536 must work).
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535

# Elements of one 16-byte vector load, and how many such vectors one thread handles per loop step.
_VECTOR_BYTES = 16
_VECTORS_PER_THREAD = 4
_MAX_WARPS = 8

FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


def vocab_tiling(vocab: int, element_size: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a pass over rows of ``vocab`` elements of ``element_size`` bytes.

    A step over the vocabulary moves 16 KiB (8192 bf16/fp16 or 4096 fp32 elements): 8 warps, each thread four
    16-byte vector loads. That keeps enough bytes in flight per SM (two or more resident programs) to cover DRAM
    latency while the float32 working set stays far below the register file (no spills; see
    ``benchmarks/static_report_triton.py``). Short rows get the next power of two and fewer warps, one 16-byte
    vector per thread at most, so small vocabularies do not leave most lanes masked.
    """
    vector = _VECTOR_BYTES // element_size
    block = min(triton.next_power_of_2(max(vocab, 1)), vector * 32 * _MAX_WARPS * _VECTORS_PER_THREAD)
    num_warps = max(1, min(_MAX_WARPS, block // (vector * 32)))
    return block, num_warps


def row_grid(n_rows: int) -> tuple[int]:
    """One program per row, rows on grid axis x (no 65535 limit)."""
    if n_rows > MAX_GRID_X:
        raise ValueError(f"{n_rows} rows exceed the CUDA grid limit of {MAX_GRID_X} programs on axis x")
    return (n_rows,)


def row_block_grid(n_rows: int, vocab: int, block: int) -> tuple[int, int]:
    """One program per (row, vocabulary block): rows on axis x, blocks on axis y."""
    blocks = triton.cdiv(vocab, block)
    if blocks > MAX_GRID_YZ:
        raise ValueError(f"vocabulary {vocab} needs {blocks} blocks of {block}: more than {MAX_GRID_YZ} on axis y")
    return row_grid(n_rows)[0], blocks


def device_guard(tensor: torch.Tensor):
    """Launch on ``tensor``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


@triton.jit
def row_offset(row, seq_len, stride_b, stride_t):
    """Element offset of row ``n = b * T + t`` of a ``[B, T, V]`` tensor, in int64 (N * V may exceed 2^31)."""
    row = row.to(tl.int64)
    b = row // seq_len
    return b * stride_b + (row - b * seq_len) * stride_t


@triton.jit
def minimum(a, b):
    """``min`` that propagates NaN, as ``torch.minimum`` does (``tl.minimum``'s default drops it)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def maximum(a, b):
    """``max`` that propagates NaN, as ``torch.maximum`` does."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
