"""Exact divergences over the vocabulary (distill_loss, its fused-linear form, the backends' per-row op) against the
float64 reference, torch.distributions and TRL's own generalized_jsd_loss; edge cases, gradcheck, properties.

The Triton backend runs through its interpreter on the CPU (conftest): shapes stay small there."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import DEVICE, backend_params
from helpers import low_precision_ok, make_batch, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import INTERPRETED, assert_matches

from grpo_kernels import distill_loss
from grpo_kernels import reference as ref
from grpo_kernels.backends import get_backend
from grpo_kernels.divergence import kernel_kind
from grpo_kernels.fused_linear.divergence import fused_linear_distill_loss

# (divergence, beta): TRL's jsd at an interior beta, near 0, and its two special cases; the two KLs
SPECS = [("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0), ("reverse_kl", 0.5), ("forward_kl", 0.5)]
SPEC_IDS = [f"{d}-{b:g}" for d, b in SPECS]


@pytest.fixture(params=backend_params(("torch", "triton")))
def backend(request):
    """The backends with divergence kernels (the CUDA backend has none: test_cuda_backend_refuses_by_name)."""
    return request.param


def _slow_when_interpreted():
    """The same backends, the interpreted one (Triton on a CPU) marked slow: for the larger shapes."""
    return [
        pytest.param(*p.values, marks=[*p.marks, *([pytest.mark.slow] if p.values[0] in INTERPRETED else [])], id=p.id)
        for p in backend_params(("torch", "triton"))
    ]


@pytest.fixture(params=_slow_when_interpreted())
def large_backend(request):
    return request.param


def _teacher(student: torch.Tensor, seed: int, *, dtype=None, spread: float = 1.0) -> torch.Tensor:
    """Teacher logits correlated with the student's (realistic, moderate divergences), never equal to them."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(student.shape, generator=g, dtype=torch.float64) * spread
    return (0.8 * student.detach().cpu().double() + noise).to(dtype or student.dtype).to(student.device)


def _weights(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)


def _loss_with_logprobs(out, w_lp):
    """The distillation loss plus a random combination of the returned log-probs: both backward terms are used."""
    return out.loss + (out.logprobs * w_lp.to(out.logprobs.dtype)).sum()


def _err(out: torch.Tensor, expect: torch.Tensor) -> float:
    """``rel_err`` for values that may all be ~0 (V = 1, equal rows): below a norm of 1e-3 an absolute error / 1e-3."""
    out, expect = out.detach().double().cpu(), expect.detach().double().cpu()
    return float((out - expect).norm() / expect.norm().clamp(min=1e-3)) if not torch.isnan(out).any() else math.inf


def _both_grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


def _within_twice_eager_float32(out, z, zt, kw) -> None:
    """For rows where float32 itself is the limit (large logits, near one-hot rows, gradients that nearly cancel):
    our error vs float64 at most twice eager PyTorch's in float32 (the reference on float32 inputs), plus 1e-6."""
    z64, zt64 = (x.detach().double().requires_grad_(True) for x in (z, zt))
    expect = ref.distill_loss(z64, zt64, **kw)
    ze, zte = (x.detach().clone().requires_grad_(True) for x in (z, zt))
    eager = ref.distill_loss(ze, zte, **kw)
    assert low_precision_ok(rel_err(out.divergence, expect.divergence), rel_err(eager.divergence, expect.divergence))
    pairs = zip(_both_grads(out.loss, z, zt), _both_grads(expect.loss, z64, zt64), _both_grads(eager.loss, ze, zte))
    for ours, exact, theirs in pairs:
        assert low_precision_ok(rel_err(ours, exact), rel_err(theirs, exact)), (
            rel_err(ours, exact),
            rel_err(theirs, exact),
        )


# ----------------------------------------------------------------------------------------------------------------
# values and gradients against the float64 reference
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("vocab,temperature", [(1, 1.0), (7, 0.7), (1000, 0.7)])
def test_float32_matches_reference(backend, spec, vocab, temperature, poisoned):
    divergence, beta = spec
    d = make_batch(3, 5, vocab, seed=vocab)
    z = d["logits"].requires_grad_(True)
    zt = _teacher(z, seed=vocab + 1).requires_grad_(True)
    kw = {"divergence": divergence, "beta": beta, "temperature": temperature, "mask": d["mask"]}
    out = distill_loss(z, zt, d["ids"], backend=backend, **kw)
    assert out.loss.dtype == torch.float32 and out.divergence.shape == d["ids"].shape
    z64, zt64 = (x.detach().double().requires_grad_(True) for x in (z, zt))
    expect = ref.distill_loss(z64, zt64, d["ids"], **kw)
    assert _err(out.loss, expect.loss) < 1e-5
    assert _err(out.divergence, expect.divergence) < 1e-5 and _err(out.logprobs, expect.logprobs) < 1e-5
    w_lp = _weights(d["ids"].shape, 1)
    grads = _both_grads(_loss_with_logprobs(out, w_lp), z, zt)
    grads64 = _both_grads(_loss_with_logprobs(expect, w_lp), z64, zt64)
    for g, g64 in zip(grads, grads64):
        assert g.dtype == torch.float32 and _err(g, g64) < 1e-5


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_kl_equals_torch_distributions(backend, divergence):
    d = make_batch(4, 6, 50, seed=3, masked_tail=False, empty_row=False)
    dtype = torch.float64 if backend == "torch" else torch.float32
    z = d["logits"].to(dtype)
    zt = _teacher(z, seed=4)
    out = distill_loss(z, zt, divergence=divergence, temperature=1.3, backend=backend)
    p = torch.distributions.Categorical(logits=z.double().cpu() / 1.3)
    q = torch.distributions.Categorical(logits=zt.double().cpu() / 1.3)
    expect = (
        torch.distributions.kl_divergence(p, q)
        if divergence == "reverse_kl"
        else torch.distributions.kl_divergence(q, p)
    )
    assert rel_err(out.divergence, expect) < (1e-12 if dtype == torch.float64 else 1e-5)


# ----------------------------------------------------------------------------------------------------------------
# TRL's generalized_jsd_loss itself
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trl_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd", reason="TRL >= 1.16 with its experimental GKD trainer")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize(
    "beta,temperature,normaliser",
    [
        (0.0, 1.0, "batchmean"),
        (0.25, 0.5, "num_items_int"),
        (0.5, 1.0, "num_items_tensor"),
        (0.5, 0.5, "batchmean"),
        (1.0, 0.5, "batchmean"),
        (1.0, 1.0, "num_items_int"),
    ],
)
def test_equals_trl_generalized_jsd_loss(backend, trl_jsd, beta, temperature, normaliser):
    d = make_batch(3, 6, 40, seed=21)
    labels = torch.where(d["mask"] != 0, d["ids"], -100)  # TRL's convention: -100 where masked
    items = {"batchmean": None, "num_items_int": 23, "num_items_tensor": torch.tensor(17.0)}[normaliser]
    dtypes = [torch.float64, torch.float32] if backend == "torch" else [torch.float32]
    for dtype in dtypes:
        z = d["logits"].to(dtype).requires_grad_(True)
        zt = _teacher(z, seed=22)
        out = distill_loss(z, zt, labels, beta=beta, temperature=temperature, num_items_in_batch=items, backend=backend)
        z_trl = z.detach().clone().requires_grad_(True)
        expect = trl_jsd(z_trl, zt, labels=labels, beta=beta, temperature=temperature, num_items_in_batch=items)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert rel_err(out.loss, expect) < tol
        assert rel_err(torch.autograd.grad(out.loss, z)[0], torch.autograd.grad(expect, z_trl)[0]) < tol


def test_without_any_mask_trl_divides_by_the_batch_size(trl_jsd):
    """Documented difference: with neither labels nor mask TRL's "batchmean" divides by B, ours by B * T."""
    d = make_batch(3, 6, 40, seed=23)
    zt = _teacher(d["logits"], seed=24)
    ours = distill_loss(d["logits"].double(), zt.double(), backend="torch").loss
    trl = trl_jsd(d["logits"].double(), zt.double())
    assert rel_err(ours * 6, trl) < 1e-12


# ----------------------------------------------------------------------------------------------------------------
# low precision, layouts, tiles
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,teacher_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("spec", [("jsd", 0.5), ("reverse_kl", 0.5), ("forward_kl", 0.5)], ids=["jsd", "rkl", "fkl"])
def test_low_precision_within_twice_eager_error(large_backend, dtype, teacher_dtype, spec):
    _low_precision(large_backend, dtype, teacher_dtype, spec)


@pytest.mark.parametrize("spec", [("jsd", 0.5), ("reverse_kl", 0.5), ("forward_kl", 0.5)], ids=["jsd", "rkl", "fkl"])
def test_low_precision_bf16_student_float32_teacher(backend, spec):
    """The case kept in the default run on every backend: teacher logits in another dtype than the student's."""
    _low_precision(backend, torch.bfloat16, torch.float32, spec)


def _low_precision(backend, dtype, teacher_dtype, spec):
    divergence, beta = spec
    d = make_batch(4, 6, 1000, dtype=dtype, seed=31)
    z = d["logits"].requires_grad_(True)
    zt = _teacher(z, seed=32, dtype=teacher_dtype)
    kw = {"divergence": divergence, "beta": beta, "mask": d["mask"]}
    out = distill_loss(z, zt, d["ids"], backend=backend, **kw)
    z64 = z.detach().double().requires_grad_(True)
    expect = ref.distill_loss(z64, zt.double(), d["ids"], **kw)
    ze = z.detach().clone().requires_grad_(True)
    eager = ref.distill_loss(ze, zt, d["ids"], compute_in=dtype, **kw)  # eager PyTorch in the logits' precision
    for name in ("loss", "divergence", "logprobs"):
        ours, theirs = (
            rel_err(getattr(out, name), getattr(expect, name)),
            rel_err(getattr(eager, name), getattr(expect, name)),
        )
        assert low_precision_ok(ours, theirs), (name, ours, theirs)
    w_lp = _weights(d["ids"].shape, 2)
    (g,), (g64,), (ge,) = (
        torch.autograd.grad(_loss_with_logprobs(o, w_lp), x) for o, x in ((out, z), (expect, z64), (eager, ze))
    )
    assert g.dtype == dtype
    assert low_precision_ok(rel_err(g, g64), rel_err(ge, g64), floor=1e-3)


def test_packed_input(backend):
    d = make_batch(1, 11, 60, seed=41)
    z, ids, mask = d["logits"][0].requires_grad_(True), d["ids"][0], d["mask"][0]
    zt = _teacher(z, seed=42)
    out = distill_loss(z, zt, ids, mask=mask, divergence="jsd", beta=0.3, backend=backend)
    assert out.divergence.shape == (11,) and out.logprobs.shape == (11,)
    z64 = z.detach().double().requires_grad_(True)
    expect = ref.distill_loss(z64, zt.double(), ids, mask=mask, divergence="jsd", beta=0.3)
    assert rel_err(out.divergence, expect.divergence) < 1e-5
    assert rel_err(torch.autograd.grad(out.loss, z)[0], torch.autograd.grad(expect.loss, z64)[0]) < 1e-5


def test_strided_views_are_not_copied_and_match(backend):
    d = make_batch(3, 8, 33, seed=43)
    full = d["logits"].requires_grad_(True)
    z = full[:, :-1]  # B and T strides do not merge
    zt_full = _teacher(full, seed=44)
    zt = zt_full[:, 1:]  # the teacher's window is offset by one: different strides and offsets from the student
    ids, mask = d["ids"][:, :-1], d["mask"][:, :-1]
    out = distill_loss(z, zt, ids, mask=mask, divergence="reverse_kl", backend=backend)
    expect = ref.distill_loss(z.detach().double(), zt.double(), ids, mask=mask, divergence="reverse_kl")
    assert rel_err(out.divergence, expect.divergence) < 1e-5
    out.loss.backward()
    assert torch.equal(full.grad[:, -1], torch.zeros_like(full.grad[:, -1]))


@pytest.mark.parametrize("spec", [("jsd", 0.5), ("reverse_kl", 0.5), ("forward_kl", 0.5)], ids=["jsd", "rkl", "fkl"])
def test_vocabulary_of_several_tiles_with_moving_maxima(backend, spec, monkeypatch):
    """V not a multiple of the Triton tile (4096) with the row maxima in the last, partial tile (the online
    rescaling), and torch blocks of 2 rows with a ragged last block."""
    _several_tiles(backend, spec, 4096 + 3, monkeypatch)


@pytest.mark.parametrize("vocab", [32000, pytest.param(151936, marks=pytest.mark.slow)])
def test_real_vocabularies(large_backend, vocab, monkeypatch):
    _several_tiles(large_backend, ("jsd", 0.5), vocab, monkeypatch)
    _several_tiles(large_backend, ("reverse_kl", 0.5), vocab, monkeypatch)


def _several_tiles(backend, spec, vocab, monkeypatch):
    from grpo_kernels.backends.torch import divergence as torch_divergence

    monkeypatch.setattr(torch_divergence, "_BUFFER_BYTES", 2 * 4 * vocab)
    g = torch.Generator().manual_seed(45)
    z = torch.randn(1, 5, vocab, generator=g) * 3
    zt = torch.randn(1, 5, vocab, generator=g) * 3
    z[0, 0, -3:] += 25  # the student's maximum sits in the last (partial) tile
    zt[0, 1, :5] += 25  # the teacher's in the first
    z, zt = z.to(DEVICE).requires_grad_(True), zt.to(DEVICE).requires_grad_(True)
    out = distill_loss(z, zt, divergence=spec[0], beta=spec[1], temperature=0.8, backend=backend)
    _within_twice_eager_float32(out, z, zt, {"divergence": spec[0], "beta": spec[1], "temperature": 0.8})


# ----------------------------------------------------------------------------------------------------------------
# -inf, one-hot rows, NaN
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_minus_inf_entries_that_keep_the_divergence_finite(backend, spec):
    """-inf where both rows have it, where only the weighting distribution has it (its p = 0: the term is 0), and,
    for the jsd, anywhere (the mixture is positive wherever p or q is)."""
    divergence, beta = spec
    kind = kernel_kind(divergence, beta)
    d = make_batch(2, 4, 30, seed=51, masked_tail=False, empty_row=False)
    z, zt = d["logits"].clone(), _teacher(d["logits"], seed=52)
    z[..., ::7] = -math.inf
    zt[..., ::7] = -math.inf  # both: a masked-out vocabulary
    if kind in ("reverse_kl", "jsd"):
        z[0, 1, 3] = -math.inf  # p = 0 where q > 0
    if kind in ("forward_kl", "jsd"):
        zt[1, 2, 5] = -math.inf  # q = 0 where p > 0
    z, zt = z.requires_grad_(True), zt.requires_grad_(True)
    out = distill_loss(z, zt, d["ids"] // 7 * 7 + 1, divergence=divergence, beta=beta, backend=backend)
    z64, zt64 = (x.detach().double().requires_grad_(True) for x in (z, zt))
    expect = ref.distill_loss(z64, zt64, d["ids"] // 7 * 7 + 1, divergence=divergence, beta=beta)
    assert torch.isfinite(out.divergence).all()
    assert rel_err(out.divergence, expect.divergence) < 1e-5 and rel_err(out.logprobs, expect.logprobs) < 1e-5
    for g, g64 in zip(_both_grads(out.loss, z, zt), _both_grads(expect.loss, z64, zt64)):
        assert torch.isfinite(g).all() and rel_err(g, g64) < 1e-5


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_log_zero_against_positive_mass_is_inf_not_nan(backend, kind):
    """KL(a||b) with b = 0 (a -inf logit) where a > 0 is +inf: the divergence, and the loss, are +inf. The gradient
    of that row is NaN where the infinite term moves with the logits (the student's for reverse_kl, the teacher's
    for forward_kl), the formula's finite value otherwise; every other row is unaffected. The jsd stays finite."""
    d = make_batch(2, 3, 20, seed=53, masked_tail=False, empty_row=False)
    z, zt = d["logits"].clone(), _teacher(d["logits"], seed=54)
    bad = (0, 1)
    if kind == "forward_kl":
        z[bad][4] = -math.inf  # the student puts no mass where the teacher does
    else:
        zt[bad][4] = -math.inf  # the teacher puts no mass where the student does
    z, zt = z.requires_grad_(True), zt.requires_grad_(True)
    mask = torch.ones(2, 3, device=DEVICE)
    out = distill_loss(z, zt, divergence=kind, beta=0.5, temperature=0.9, mask=mask, backend=backend)
    z64, zt64 = (x.detach().double().requires_grad_(True) for x in (z, zt))
    expect = ref.distill_loss(z64, zt64, divergence=kind, beta=0.5, temperature=0.9, mask=mask)
    assert not torch.isnan(out.divergence).any()
    assert_matches(out.divergence, expect.divergence)
    grad, grad_t = _both_grads(out.loss, z, zt)
    if kind == "jsd":
        assert torch.isfinite(out.loss)
        g64, gt64 = _both_grads(expect.loss, z64, zt64)
        assert rel_err(grad, g64) < 1e-5 and rel_err(grad_t, gt64) < 1e-5
        return
    assert out.loss == math.inf and out.divergence[bad] == math.inf
    others = torch.ones(2, 3, dtype=torch.bool, device=DEVICE)
    others[bad] = False
    # the other rows: the gradient of the sum of their divergences, over the same count (6)
    (g_rest,) = torch.autograd.grad(expect.divergence[others].sum() / 6, z64)
    assert rel_err(grad[others], g_rest[others]) < 1e-5
    p = torch.softmax(z64.detach()[bad] / 0.9, -1)
    q = torch.softmax(zt64.detach()[bad] / 0.9, -1)
    moving, fixed = (grad, grad_t) if kind == "reverse_kl" else (grad_t, grad)
    assert torch.isnan(moving[bad]).all()
    finite = (q - p if kind == "reverse_kl" else p - q) / 0.9 / 6  # d/dz_ref of KL(p||q), d/dz of KL(q||p)
    assert rel_err(fixed[bad], finite) < 1e-5
    # masked, the same row changes nothing
    mask[bad] = 0
    out = distill_loss(z, zt, divergence=kind, mask=mask, backend=backend)
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in _both_grads(out.loss, z, zt))


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_near_one_hot_rows(backend, kind):
    """One distribution nearly one-hot: log-probs of -40 .. -1e4 (finite in float32), divergences up to ~1e4."""
    g = torch.Generator().manual_seed(55)
    z = torch.randn(1, 4, 300, generator=g) * 2
    zt = torch.randn(1, 4, 300, generator=g) * 2
    zt[0, 0, 7] += 40  # q ~ one-hot
    z[0, 1, 9] += 40  # p ~ one-hot
    zt[0, 2] = -1e4
    zt[0, 2, 0] = 0.0  # q one-hot to float32 precision, log q = -1e4 elsewhere
    z[0, 3] = -1e4
    z[0, 3, 1] = 0.0
    z, zt = z.to(DEVICE).requires_grad_(True), zt.to(DEVICE).requires_grad_(True)
    out = distill_loss(z, zt, divergence=kind, beta=0.5, backend=backend)
    assert torch.isfinite(out.divergence).all()
    _within_twice_eager_float32(out, z, zt, {"divergence": kind, "beta": 0.5})


def test_nan_logits_propagate_where_taken_and_nowhere_else(backend):
    d = make_batch(2, 4, 16, seed=56, masked_tail=False, empty_row=False)
    z, zt = d["logits"].clone(), _teacher(d["logits"], seed=57)
    z[0, 1, 3] = math.nan  # a position that takes part
    zt[1, 2, 5] = math.nan  # a masked position
    mask = torch.ones(2, 4, device=DEVICE)
    mask[1, 2] = 0
    z.requires_grad_(True)
    out = distill_loss(z, zt, d["ids"], mask=mask, backend=backend)
    assert torch.isnan(out.divergence[0, 1]) and torch.isnan(out.loss)
    assert out.divergence[1, 2] == 0 and torch.isfinite(out.divergence[torch.arange(2) != 0]).all()
    mask[0, 1] = 0
    out = distill_loss(z, zt, d["ids"], mask=mask, backend=backend)
    assert torch.isfinite(out.loss)
    (grad,) = torch.autograd.grad(out.loss, z)
    assert torch.isfinite(grad).all() and torch.equal(grad[0, 1], torch.zeros_like(grad[0, 1]))


# ----------------------------------------------------------------------------------------------------------------
# gradcheck, properties, determinism, compile
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_gradcheck_float64_torch_backend(spec):
    d = make_batch(2, 3, 6, dtype=torch.float64, seed=61)
    z = d["logits"].requires_grad_(True)
    zt = _teacher(z, seed=62).requires_grad_(True)

    def f(a, b):
        out = distill_loss(
            a, b, d["ids"], divergence=spec[0], beta=spec[1], temperature=0.9, mask=d["mask"], backend="torch"
        )
        return out.loss, out.divergence, out.logprobs

    assert torch.autograd.gradcheck(f, (z, zt))


def _property_settings(backend):
    return settings(
        max_examples=40 if backend == "torch" else 3,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def test_divergences_are_nonnegative_and_zero_exactly_for_shifted_rows(backend):
    """KL >= 0 and the jsd in [0, h(beta)] (h the binary entropy: its value for disjoint supports); all are 0 when the
    rows are equal up to a shift, and clearly positive when they are not."""

    @_property_settings(backend)
    @given(
        vocab=st.sampled_from([2, 5, 64, 300]),
        scale=st.sampled_from([0.5, 2.0, 8.0]),
        beta=st.sampled_from([0.1, 0.5, 0.9]),
        temperature=st.sampled_from([0.5, 1.0, 2.0]),
        seed=st.integers(0, 2**16),
    )
    def check(vocab, scale, beta, temperature, seed):
        g = torch.Generator().manual_seed(seed)
        z = (torch.randn(4, vocab, generator=g) * scale).to(DEVICE)
        other = (torch.randn(4, vocab, generator=g) * scale).to(DEVICE)
        shifted = z + (torch.randn(4, 1, generator=g) * 10).to(DEVICE)  # the same distribution
        binary_entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        for kind in ("reverse_kl", "forward_kl", "jsd"):
            kw = {"divergence": kind, "beta": beta, "temperature": temperature, "backend": backend}
            differ, same = distill_loss(z, other, **kw).divergence, distill_loss(z, shifted, **kw).divergence
            expect = ref.vocab_divergence(
                z.double(), other.double(), divergence=kind, beta=beta, temperature=temperature
            )
            # float32 rounding of values near 0: a few ulps of the log-sum-exps (|u| <= ~8 scale / tau)
            tol = 1e-6 * (1 + 4 * scale / temperature)
            assert (differ >= -tol).all() and (same.abs() <= tol).all()
            assert (differ[expect > 10 * tol] > tol).all()
            if kind == "jsd":
                assert (differ <= binary_entropy + tol).all()

    check()


def test_deterministic(backend):
    d = make_batch(3, 7, 300, seed=63)
    zt = _teacher(d["logits"], seed=64)
    runs = []
    for _ in range(2):
        z = d["logits"].clone().requires_grad_(True)
        out = distill_loss(z, zt, d["ids"], mask=d["mask"], backend=backend)
        (grad,) = torch.autograd.grad(out.loss + out.logprobs.sum(), z)
        runs.append((out.loss, out.divergence, out.logprobs, grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_inplace_backward_gives_the_same_gradients(backend):
    d = make_batch(2, 5, 50, seed=67)
    zt = _teacher(d["logits"], seed=68)
    grads = []
    for inplace in (False, True):
        leaf, teacher = d["logits"].clone().requires_grad_(True), zt.clone().requires_grad_(True)
        z = leaf * 1.0  # a non-leaf, as a model's output (its backward needs nothing saved)
        out = distill_loss(z, teacher, d["ids"], mask=d["mask"], beta=0.3, inplace_backward=inplace, backend=backend)
        (out.loss + 0.1 * out.logprobs.sum()).backward()
        grads.append((leaf.grad, teacher.grad, z.detach().clone()))
    (g, g_t, z_after), (g_in, g_t_in, z_in_after) = grads
    assert torch.equal(g, g_in) and torch.equal(g_t, g_t_in)
    assert torch.equal(z_in_after, g_in) and torch.equal(z_after, d["logits"])  # overwritten only in place
    with pytest.raises(ValueError, match="inplace_backward"):
        distill_loss(d["logits"].clone().requires_grad_(True), zt, inplace_backward=True, backend=backend)


def test_torch_compile_fullgraph(backend):
    d = make_batch(2, 5, 40, seed=65)
    zt = _teacher(d["logits"], seed=66)

    def step(z, zt, ids, mask):
        out = distill_loss(
            z, zt, ids, mask=mask, divergence="jsd", beta=0.3, temperature=0.8, num_items_in_batch=7, backend=backend
        )
        return out.loss + 0.1 * out.logprobs.sum(), out.divergence

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z1, z2 = (d["logits"].clone().requires_grad_(True) for _ in range(2))
    (loss_c, div_c), (loss_e, div_e) = compiled(z1, zt, d["ids"], d["mask"]), step(z2, zt, d["ids"], d["mask"])
    assert torch.equal(loss_c, loss_e) and torch.equal(div_c, div_e)
    loss_c.backward()
    loss_e.backward()
    assert torch.equal(z1.grad, z2.grad)


# ----------------------------------------------------------------------------------------------------------------
# the backends' per-row op (what grpo_loss's exact KL will call)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_backend_row_outputs_and_in_place_backward(backend, kind):
    d = make_batch(2, 5, 70, seed=71)
    z, zt = d["logits"], _teacher(d["logits"], seed=72)
    ids = torch.where(d["mask"].reshape(-1) != 0, d["ids"].reshape(-1), -1)
    be = get_backend(backend)
    div, lp, lse, lse_ref, kl_s, kl_t = be.divergence_forward(z, zt, ids, kind, 0.3, 0.7, True)
    valid = ids >= 0
    u, u_r = z.double().reshape(-1, 70)[valid] / 0.7, zt.double().reshape(-1, 70)[valid] / 0.7
    assert rel_err(lse[valid], u.logsumexp(-1)) < 1e-6 and rel_err(lse_ref[valid], u_r.logsumexp(-1)) < 1e-6
    assert rel_err(lp[valid], u.log_softmax(-1).gather(1, ids[valid].unsqueeze(1)).squeeze(1)) < 1e-6
    log_p, log_q = u.log_softmax(-1), u_r.log_softmax(-1)

    def kl(a, b):
        return (a.exp() * (a - b)).sum(-1)

    if kind == "jsd":
        log_m = torch.logaddexp(log_p + math.log(0.7), log_q + math.log(0.3))
        assert rel_err(kl_s[valid], kl(log_p, log_m)) < 1e-5 and rel_err(kl_t[valid], kl(log_q, log_m)) < 1e-5
    elif kind == "reverse_kl":
        assert rel_err(kl_s[valid], kl(log_p, log_q)) < 1e-5 and torch.equal(kl_t, torch.zeros_like(kl_t))
    else:
        assert rel_err(kl_t[valid], kl(log_q, log_p)) < 1e-5 and torch.equal(kl_s, torch.zeros_like(kl_s))
    for x in (div, lp, lse, lse_ref, kl_s, kl_t):
        assert torch.equal(x[~valid], torch.zeros_like(x[~valid]))
    # grad_div = 0 and grad_lp given: the log-prob gradient alone, (1[v=y] - p) g / tau
    g_lp = _weights(ids.shape, 3).float()
    out = torch.empty_like(z)
    be.divergence_backward(z, zt, ids, lse, lse_ref, kl_s, kl_t, torch.zeros_like(lse), g_lp, kind, 0.3, 0.7, out, None)
    onehot = torch.nn.functional.one_hot(ids[valid], 70).double()
    expect = (onehot - log_p.exp()) * g_lp[valid].double().unsqueeze(1) / 0.7
    assert rel_err(out.reshape(-1, 70)[valid], expect) < 1e-5
    assert torch.equal(out.reshape(-1, 70)[~valid], torch.zeros_like(out.reshape(-1, 70)[~valid]))
    # in place over the student's logits: the same numbers as into a new buffer
    g_div = _weights(ids.shape, 4).float()
    be.divergence_backward(z, zt, ids, lse, lse_ref, kl_s, kl_t, g_div, g_lp, kind, 0.3, 0.7, out, None)
    work = z.clone()
    be.divergence_backward(work, zt, ids, lse, lse_ref, kl_s, kl_t, g_div, g_lp, kind, 0.3, 0.7, work, None)
    assert torch.equal(work, out)


# ----------------------------------------------------------------------------------------------------------------
# the fused-linear form
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec", [("jsd", 0.3), ("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 1.0)], ids=["jsd", "rkl", "fkl", "jsd-1"]
)
def test_fused_linear_matches_reference_on_materialised_logits(backend, spec):
    divergence, beta = spec
    g = torch.Generator().manual_seed(81)
    dtypes = [torch.float64, torch.float32] if backend == "torch" else [torch.float32]
    for dtype in dtypes:
        hidden, weight, bias, t_hidden, t_weight = (
            torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)
            for shape in ((2, 5, 8), (40, 8), (40,), (2, 5, 6), (40, 6))  # the teacher's hidden size differs
        )
        ids = torch.randint(0, 40, (2, 5), generator=g).to(DEVICE)
        ids[1, 3] = -100
        mask = torch.ones(2, 5, device=DEVICE)
        mask[0, 4] = 0
        leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
        t_weight.requires_grad_(True)  # a teacher's parameter: must get no gradient
        out = fused_linear_distill_loss(
            leaves[0],
            leaves[1],
            t_hidden,
            t_weight,
            ids,
            student_bias=leaves[2],
            divergence=divergence,
            beta=beta,
            temperature=0.8,
            mask=mask,
            num_items_in_batch=6,
            chunk_tokens=3,
            backend=backend,
        )
        out.loss.backward()
        assert t_weight.grad is None
        leaves64 = [x.detach().double().requires_grad_(True) for x in (hidden, weight, bias)]
        z = leaves64[0] @ leaves64[1].T + leaves64[2]
        zt = t_hidden.double() @ t_weight.detach().double().T
        expect = ref.distill_loss(
            z, zt, ids, divergence=divergence, beta=beta, temperature=0.8, mask=mask, num_items_in_batch=6
        )
        expect.loss.backward()
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert rel_err(out.loss, expect.loss) < tol
        assert rel_err(out.divergence, expect.divergence) < tol and rel_err(out.logprobs, expect.logprobs) < tol
        for ours, theirs in zip(leaves, leaves64):
            assert ours.grad.dtype == dtype and rel_err(ours.grad, theirs.grad) < tol


def test_fused_linear_skips_masked_positions_and_has_one_gradient(backend):
    g = torch.Generator().manual_seed(82)
    hidden = torch.randn(7, 8, generator=g).to(DEVICE)
    hidden[2] = math.nan  # a masked position (e.g. an all-padding attention row): never projected
    weight = torch.randn(30, 8, generator=g).to(DEVICE).requires_grad_(True)
    t_hidden, t_weight = torch.randn(7, 8, generator=g).to(DEVICE), torch.randn(30, 8, generator=g).to(DEVICE)
    mask = torch.ones(7, device=DEVICE)
    mask[2] = 0
    hidden.requires_grad_(True)
    out = fused_linear_distill_loss(hidden, weight, t_hidden, t_weight, mask=mask, backend=backend)
    assert torch.isfinite(out.loss) and out.divergence[2] == 0
    out.loss.backward(retain_graph=True)
    assert torch.isfinite(weight.grad).all() and torch.equal(hidden.grad[2], torch.zeros_like(hidden.grad[2]))
    with pytest.raises(RuntimeError, match="only .loss carries a gradient"):
        out.divergence.sum().backward()


def test_fused_linear_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(83)
    hidden, weight = torch.randn(2, 4, 8, generator=g), torch.randn(30, 8, generator=g)
    t_hidden, t_weight = torch.randn(2, 4, 8, generator=g), torch.randn(30, 8, generator=g)

    def step(h, w):
        return fused_linear_distill_loss(h, w, t_hidden, t_weight, divergence="reverse_kl", backend="torch").loss

    h1, w1, h2, w2 = (x.clone().requires_grad_(True) for x in (hidden, weight, hidden, weight))
    loss_c = torch.compile(step, fullgraph=True, backend="aot_eager")(h1, w1)
    loss_e = step(h2, w2)
    assert torch.equal(loss_c, loss_e)
    loss_c.backward()
    loss_e.backward()
    assert torch.equal(h1.grad, h2.grad) and torch.equal(w1.grad, w2.grad)


# ----------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------
def _bad_calls():
    z = torch.randn(2, 3, 5)
    zt = torch.randn(2, 3, 5)
    ids = torch.randint(0, 5, (2, 3))
    return [
        ("divergence", ValueError, lambda: distill_loss(z, zt, divergence="kl")),
        ("beta", ValueError, lambda: distill_loss(z, zt, beta=1.5)),
        ("beta", ValueError, lambda: distill_loss(z, zt, beta=-0.1)),
        ("temperature", ValueError, lambda: distill_loss(z, zt, temperature=0.0)),
        ("teacher_logits", ValueError, lambda: distill_loss(z, zt[..., :4])),
        ("student_logits", ValueError, lambda: distill_loss(z[0, 0], zt[0, 0])),
        ("teacher_logits", TypeError, lambda: distill_loss(z, zt.long())),
        ("student_logits", ValueError, lambda: distill_loss(z.transpose(1, 2), zt.transpose(1, 2))),
        ("token_ids", TypeError, lambda: distill_loss(z, zt, ids.float())),
        ("token_ids", ValueError, lambda: distill_loss(z, zt, ids[:, :2])),
        ("token_ids", ValueError, lambda: distill_loss(z, zt, ids + 5)),
        ("mask", ValueError, lambda: distill_loss(z, zt, mask=torch.ones(2, 4))),
        ("num_items_in_batch", ValueError, lambda: distill_loss(z, zt, num_items_in_batch=0)),
        ("num_items_in_batch", ValueError, lambda: distill_loss(z, zt, num_items_in_batch=torch.ones(2))),
        ("backend", ValueError, lambda: distill_loss(z, zt, backend="cpu")),
        ("teacher_weight", ValueError, lambda: fused_linear_distill_loss(z, torch.randn(9, 5), zt, torch.randn(8, 5))),
        ("student_weight", ValueError, lambda: fused_linear_distill_loss(z, torch.randn(9, 4), zt, torch.randn(9, 5))),
        (
            "teacher_hidden",
            ValueError,
            lambda: fused_linear_distill_loss(z, torch.randn(9, 5), zt[:, :2], torch.randn(9, 5)),
        ),
        (
            "chunk_tokens",
            ValueError,
            lambda: fused_linear_distill_loss(z, torch.randn(9, 5), zt, torch.randn(9, 5), chunk_tokens=0),
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    name, error, call = _bad_calls()[case]
    with pytest.raises(error, match=name):
        call()


def test_cuda_backend_refuses_by_name():
    from grpo_kernels.backends.cuda import BACKEND

    z = torch.randn(1, 2, 5)
    with pytest.raises(RuntimeError, match="CUDA backend has no kernel for vocab_divergence"):
        BACKEND.divergence_forward(z, z, torch.zeros(2, dtype=torch.long), "jsd", 0.5, 1.0, False)
    with pytest.raises(RuntimeError, match="vocab_divergence"):
        BACKEND.divergence_backward(*(None,) * 14)
