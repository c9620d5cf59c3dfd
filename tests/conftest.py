"""Shared fixtures. Every backend test is parametrised over the backends; unavailable ones skip with the reason.

On a machine without a GPU the Triton backend runs through the Triton interpreter (TRITON_INTERPRET=1, set here
before anything imports triton), so the same tests run unchanged on CPU and on a GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from grpo_kernels import _alloc  # noqa: E402
from grpo_kernels.backends import BACKENDS, unavailable_reason  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_params(names=BACKENDS):
    """pytest params for the backends, each skipped with its reason when it cannot run on DEVICE."""
    params = []
    for name in names:
        reason = unavailable_reason(name, DEVICE)
        marks = [pytest.mark.skip(reason=f"backend {name!r} unavailable on {DEVICE}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=backend_params())
def backend(request):
    return request.param


@pytest.fixture
def poisoned():
    """Run the test with every kernel output buffer pre-filled with NaN."""
    with _alloc.poisoned_outputs():
        yield
