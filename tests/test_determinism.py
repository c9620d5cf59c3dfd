"""Run-to-run determinism on every backend: the same inputs give bitwise the same loss, log-probs, entropy, per-token
loss, metrics and gradient, for every loss type and both importance-sampling levels, and the same advantages and
group statistics (no order-dependent atomics). One of the two runs starts from NaN-poisoned output buffers, so a
kernel that leaves an element unwritten (or reads one it did not write) cannot pass either."""

import itertools
import zlib

import pytest
import torch
from conftest import DEVICE
from helpers import make_batch
from reliability_helpers import INTERPRETED

from grpo_kernels import _alloc, group_advantages, grpo_loss, token_logprobs

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
# docs/math.md section 9: token level only, but for vespo
CASES = list(itertools.product(LOSS_TYPES, ["token", "sequence"])) + [
    ("vespo", "token"),
    ("vespo", "sequence"),
    ("geo_mean", "token"),
    ("gpg", "token"),
    ("clip_cov", "token"),
    ("kl_cov", "token"),
]
OUTPUTS = [
    "loss",
    "logprobs",
    "entropy",
    "per_token_loss",
    "kl_mean",
    "clip_low",
    "clip_high",
    "clip_region",
    "entropy_mean",
    "logprob_mean",
    "phi_mean",
    "cov_selected",
]


def _shape(backend):
    """Big enough on a compiled backend for many programs to race on one reduction; small when interpreted."""
    return (3, 5, 33) if backend in INTERPRETED else (8, 48, 1000)


def _twice(run):
    """``run()`` once normally and once with every kernel output buffer pre-filled with NaN."""
    first = run()
    with _alloc.poisoned_outputs():
        second = run()
    return first, second


def _assert_identical(first, second, names):
    for name, a, b in zip(names, first, second):
        assert a is None and b is None or torch.equal(a, b), name


@pytest.mark.parametrize("loss_type,level", CASES)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
def test_grpo_loss_is_bitwise_reproducible(backend, loss_type, level, inplace):
    if backend in INTERPRETED and inplace:
        pytest.skip("interpreted backend: the in-place variant runs on a GPU / under the full matrix there")
    d = make_batch(*_shape(backend), seed=zlib.crc32(f"{loss_type}{level}".encode()) % 1000)
    w_is = (0.5 + torch.rand(d["ids"].shape, generator=torch.Generator().manual_seed(1))).to(DEVICE)

    def run():
        weight = torch.ones((), device=DEVICE, requires_grad=True)
        z = d["logits"] * weight  # a non-leaf, so that in-place backward is allowed
        out = grpo_loss(
            z,
            d["ids"],
            d["adv"],
            mask=d["mask"],
            old_logprobs=d["old"],
            ref_logprobs=d["ref"],
            beta=0.04,
            is_weights=w_is,
            loss_type=loss_type,
            importance_sampling_level=level,
            max_completion_length=64,
            clip_cov_ratio=0.05,
            clip_cov_lb=-0.5,
            kl_cov_ratio=0.05,
            return_entropy=True,
            inplace_backward=inplace,
            backend=backend,
        )
        (grad,) = torch.autograd.grad(out.loss - 0.01 * out.entropy.sum(), z)
        return [None if getattr(out, key) is None else getattr(out, key).detach() for key in OUTPUTS] + [grad.clone()]

    _assert_identical(*_twice(run), OUTPUTS + ["grad"])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_is_bitwise_reproducible(backend, temperature):
    d = make_batch(*_shape(backend), dtype=torch.bfloat16, seed=2)

    def run():
        z = d["logits"].clone().requires_grad_(True)
        lp, h = token_logprobs(
            z, d["ids"], mask=d["mask"], temperature=temperature, return_entropy=True, backend=backend
        )
        (grad,) = torch.autograd.grad(lp.sum() + 0.5 * h.sum(), z)
        return lp, h, grad

    _assert_identical(*_twice(run), ["lp", "entropy", "grad"])


@pytest.mark.parametrize(
    "scale,mode",
    [
        ("group", "sum_then_normalize"),
        ("batch", "sum_then_normalize"),
        ("none", "sum_then_normalize"),
        ("group", "normalize_then_sum"),
    ],
)
@pytest.mark.parametrize("by_ids", [False, True], ids=["group_size", "group_ids"])
def test_group_advantages_are_bitwise_reproducible(backend, scale, mode, by_ids):
    batch = 64 if backend in INTERPRETED else 8192
    g = torch.Generator().manual_seed(3)
    rewards = (torch.randint(0, 3, (batch, 2), generator=g) + 0.1 * torch.randn(batch, 2, generator=g)).to(DEVICE)
    rewards[::7, 0] = float("nan")
    groups = (
        dict(group_ids=torch.randint(0, batch // 5, (batch,), generator=g).to(DEVICE))
        if by_ids
        else dict(group_size=16)
    )

    def run():
        out = group_advantages(
            rewards,
            scale=scale,
            multi_reward=mode,
            reward_weights=[1.0, 0.5],
            return_stats=True,
            backend=backend,
            **groups,
        )
        return list(out)

    first, second = _twice(run)
    for name, a, b in zip(["advantages", "group_mean", "group_std", "frac_zero_std"], first, second):
        assert torch.equal(a.nan_to_num(123.0), b.nan_to_num(123.0)) and torch.equal(a.isnan(), b.isnan()), name
