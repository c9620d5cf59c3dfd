"""Output allocation shared by every backend, with a poisoning switch for the tests.

Backends allocate their outputs through :func:`empty`. With poisoning on, new buffers are filled with NaN (float)
or the largest value (integer), so a test can check that a kernel wrote every element it owns.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_poison = False


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan") if out.is_floating_point() else torch.iinfo(dtype).max)
    return out


@contextmanager
def poisoned_outputs():
    """Within this block, every output buffer starts as NaN instead of uninitialised memory."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous
