"""token_logprobs on every backend against reference.py (float64), for values and gradients."""

import math

import pytest
import torch
from conftest import DEVICE
from helpers import low_precision_ok, make_batch, rel_err

from grpo_kernels import reference as ref
from grpo_kernels import token_logprobs

VOCABS = [1, 7, 1000, 4099]


def _grads(lp, h, z, seed):
    """Gradient of a random combination of lp and H (so both backward terms are exercised)."""
    g = torch.Generator().manual_seed(seed)
    w_lp = torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.device, lp.dtype)
    w_h = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.device, h.dtype)
    (grad,) = torch.autograd.grad((lp * w_lp).sum() + (h * w_h).sum(), z)
    return grad


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float32_matches_reference(backend, vocab, temperature, poisoned):
    d = make_batch(3, 5, vocab, seed=vocab)
    z = d["logits"].requires_grad_(True)
    lp, h = token_logprobs(z, d["ids"], mask=d["mask"], temperature=temperature, return_entropy=True, backend=backend)
    assert lp.dtype == torch.float32 and lp.shape == d["ids"].shape
    z64 = d["logits"].detach().double().requires_grad_(True)
    lp64, h64 = ref.token_logprobs(z64, d["ids"], mask=d["mask"], temperature=temperature)
    assert rel_err(lp, lp64) < 1e-5 and rel_err(h, h64) < 1e-5
    assert rel_err(_grads(lp, h, z, 1), _grads(lp64, h64, z64, 1)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [7, 4099])
def test_low_precision_within_twice_eager_error(backend, dtype, vocab):
    d = make_batch(4, 6, vocab, dtype=dtype, seed=11)
    z = d["logits"].requires_grad_(True)
    lp, h = token_logprobs(z, d["ids"], mask=d["mask"], return_entropy=True, backend=backend)
    z64 = d["logits"].detach().double().requires_grad_(True)
    lp64, h64 = ref.token_logprobs(z64, d["ids"], mask=d["mask"])
    ze = d["logits"].detach().clone().requires_grad_(True)
    lpe, he = ref.token_logprobs(ze, d["ids"], mask=d["mask"], compute_in=dtype)  # eager in low precision
    assert low_precision_ok(rel_err(lp, lp64), rel_err(lpe, lp64))
    assert low_precision_ok(rel_err(h, h64), rel_err(he, h64))
    g, g64, ge = _grads(lp, h, z, 2), _grads(lp64, h64, z64, 2), _grads(lpe, he, ze, 2)
    assert g.dtype == dtype
    assert low_precision_ok(rel_err(g, g64), rel_err(ge, g64), floor=1e-3)


def test_strided_logits_are_not_copied_and_match(backend):
    d = make_batch(3, 8, 33, seed=4)
    full = d["logits"].requires_grad_(True)
    z = full[:, 1:-1]  # B and T strides do not merge
    ids, mask = d["ids"][:, 1:-1], d["mask"][:, 1:-1]
    lp = token_logprobs(z, ids, mask=mask, backend=backend)
    lp_ref, _ = ref.token_logprobs(z.detach().double(), ids, mask=mask)
    assert rel_err(lp, lp_ref) < 1e-6
    lp.sum().backward()
    assert torch.equal(full.grad[:, 0], torch.zeros_like(full.grad[:, 0]))


def test_packed_2d_input(backend):
    d = make_batch(1, 9, 50, seed=5)
    z, ids = d["logits"][0], d["ids"][0]
    lp = token_logprobs(z, ids, backend=backend)
    assert lp.shape == (9,)
    assert rel_err(lp, ref.token_logprobs(z.double(), ids)[0]) < 1e-6


def test_masked_rows_are_zero_and_skip_nan(backend):
    d = make_batch(2, 4, 16, seed=6, masked_tail=False, empty_row=False)
    z = d["logits"].clone()
    z[0, 2] = math.nan  # a masked position holding NaN must not leak
    mask = torch.ones(2, 4, device=DEVICE)
    mask[0, 2] = 0
    ids = d["ids"].clone()
    ids[1, 1] = -100  # ignore_index
    z.requires_grad_(True)
    lp, h = token_logprobs(z, ids, mask=mask, return_entropy=True, backend=backend)
    assert lp[0, 2] == 0 and h[0, 2] == 0 and lp[1, 1] == 0
    assert torch.isfinite(lp).all() and torch.isfinite(h).all()
    (lp.sum() + h.sum()).backward()
    assert torch.equal(z.grad[0, 2], torch.zeros_like(z.grad[0, 2]))
    assert torch.equal(z.grad[1, 1], torch.zeros_like(z.grad[1, 1]))
    assert torch.isfinite(z.grad).all()


def test_minus_inf_vocabulary_entries(backend):
    d = make_batch(2, 3, 40, seed=7, masked_tail=False, empty_row=False)
    z = d["logits"].clone()
    z[..., ::3] = -math.inf  # a masked-out vocabulary
    ids = (d["ids"] // 3) * 3 + 1  # targets are finite
    z[1, 2, :] = -math.inf
    z[1, 2, ids[1, 2]] = 0.5  # only the target is finite: lp = 0, H = 0
    z.requires_grad_(True)
    lp, h = token_logprobs(z, ids, return_entropy=True, backend=backend)
    lp64, h64 = ref.token_logprobs(z.detach().double(), ids)
    assert rel_err(lp, lp64) < 1e-6 and rel_err(h, h64) < 1e-5
    assert lp[1, 2] == 0 and h[1, 2] == 0
    (lp.sum() + h.sum()).backward()
    assert torch.isfinite(z.grad).all()


def test_gradcheck_float64_torch_backend():
    d = make_batch(2, 3, 5, dtype=torch.float64, seed=8)
    z = d["logits"].requires_grad_(True)
    f = lambda x: token_logprobs(x, d["ids"], mask=d["mask"], temperature=0.9, return_entropy=True, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(f, (z,))


def test_deterministic(backend):
    d = make_batch(3, 7, 300, seed=9)
    runs = []
    for _ in range(2):
        z = d["logits"].clone().requires_grad_(True)
        lp, h = token_logprobs(z, d["ids"], mask=d["mask"], return_entropy=True, backend=backend)
        (lp.sum() + 0.5 * h.sum()).backward()
        runs.append((lp, h, z.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
