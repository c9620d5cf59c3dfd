"""Helpers of the reliability tests (bad inputs, extreme numerics, huge shapes, determinism, properties)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICE, backend_params
from helpers import rel_err

# Backends that run through the Triton interpreter here (exact but slow): small shapes, few examples.
INTERPRETED = {"triton"} if os.environ.get("TRITON_INTERPRET") == "1" and DEVICE.type == "cpu" else set()


def backend_params_slow_when_interpreted():
    """:func:`conftest.backend_params`, with an interpreted backend marked slow (for work that is cheap compiled)."""
    params = []
    for p in backend_params():
        (name,) = p.values
        marks = list(p.marks) + ([pytest.mark.slow] if name in INTERPRETED else [])
        params.append(pytest.param(name, marks=marks, id=p.id))
    return params


def assert_matches(out: torch.Tensor, expect: torch.Tensor, tol: float = 1e-5) -> None:
    """``out`` agrees with ``expect`` (float64 reference) where both are finite (``rel_err < tol``), and has NaN,
    +inf and -inf at exactly the positions where ``expect`` has them."""
    out, expect = out.detach().double().cpu(), expect.detach().double().cpu()
    assert out.shape == expect.shape, (out.shape, expect.shape)
    for name, where in (
        ("NaN", torch.isnan),
        ("+inf", lambda x: x == float("inf")),
        ("-inf", lambda x: x == -float("inf")),
    ):
        mismatch = where(out) != where(expect)
        assert not mismatch.any(), f"{name} pattern differs at {mismatch.nonzero()[:5].tolist()}"
    finite = torch.isfinite(expect)
    assert rel_err(out[finite], expect[finite]) < tol, rel_err(out[finite], expect[finite])


def grad_of(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, x)
    return grad
