"""The torch backend's compiled CPU passes (grpo_kernels/backends/torch/cpu_kernels.cpp) on their own: against
reference.py in float64 on the shapes and values that take their different code paths (vector tails, one-pass and
exact blocks, non-temporal stores, masked rows, strides, in place), bitwise the same for any thread count and when
traced by torch.compile, and the fallback to the torch-ops path (switched off, no compiler) with its logged reason.
The divergence passes (reverse_kl, forward_kl) against the torch-ops path of divergence.py and the float64
reference, mixed dtypes, non-finite rows.
The tests of the public API (test_token_logprobs.py, test_grpo_loss.py, ...) run through these passes too."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import low_precision_ok, rel_err
from reliability_helpers import assert_matches

from grpo_kernels import grpo_loss, token_logprobs
from grpo_kernels import reference as ref
from grpo_kernels.backends.torch import divergence as torch_divergence
from grpo_kernels.backends.torch import logprobs as torch_logprobs
from grpo_kernels.backends.torch import native

pytestmark = pytest.mark.skipif(
    native.unavailable_reason() is not None, reason=f"compiled CPU passes unavailable: {native.unavailable_reason()}"
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _randn(*shape, seed, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _ids(rows, vocab, seed):
    return torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed))


def _passes(z, ids, temperature, entropy, g, gh, out=None):
    """Forward and backward (of sum g lp + gH H) through the backend functions: the compiled passes here."""
    assert native.usable(z)
    lp, lse, h = torch_logprobs.token_logprobs_forward(z, ids, temperature, entropy)
    out = torch.empty_like(z) if out is None else out
    torch_logprobs.token_logprobs_backward(z, ids, lse, h, g, gh if entropy else None, temperature, out)
    return lp, lse, h, out


def _reference(z, ids, temperature, g, gh):
    """float64 lp, H and d/dz (sum g lp + gH H) over the rows with ids >= 0 (zeros elsewhere)."""
    z64 = z.detach().double().reshape(-1, z.shape[-1]).requires_grad_(True)
    lp, h = ref.token_logprobs(z64, ids, ignore_index=-1, temperature=temperature)
    loss = (lp * g.double()).sum() + ((h * gh.double()).sum() if gh is not None else 0.0)
    (grad,) = torch.autograd.grad(loss, z64)
    return lp, h, grad.reshape(z.shape)


# ----------------------------------------------------------------------------------------------------------------
# values against float64
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [1, 7, 15, 16, 17, 2047, 2048, 2049, 4099, 32000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float32_matches_reference_on_every_tail_and_block_boundary(vocab, temperature):
    rows = 9
    z = _randn(1, rows, vocab, seed=vocab).float()
    ids = _ids(rows, vocab, seed=1)
    ids[4] = -1
    g, gh = _randn(rows, seed=2, scale=1.0).float(), _randn(rows, seed=3, scale=1.0).float()
    lp, _, h, grad = _passes(z, ids, temperature, True, g, gh)
    lp64, h64, grad64 = _reference(z, ids, temperature, g, gh)
    assert rel_err(lp, lp64) < 1e-6 and rel_err(h, h64) < 1e-6
    assert rel_err(grad, grad64) < 1e-6
    assert lp[4].item() == 0.0 and h[4].item() == 0.0 and torch.equal(grad[0, 4], torch.zeros(vocab))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_eager_error(dtype):
    if dtype not in native._state["dtypes"]:
        pytest.skip(f"{dtype} not compiled in (the compiler has no _Float16)")
    rows, vocab = 6, 5003
    z = _randn(1, rows, vocab, seed=5).to(dtype)
    ids = _ids(rows, vocab, seed=6)
    g, gh = _randn(rows, seed=7, scale=1.0).float(), _randn(rows, seed=8, scale=1.0).float()
    lp, _, h, grad = _passes(z, ids, 1.0, True, g, gh)
    lp64, h64, grad64 = _reference(z, ids, 1.0, g, gh)
    ze = z.detach().clone().reshape(rows, vocab).requires_grad_(True)
    lpe, he = ref.token_logprobs(ze, ids, compute_in=dtype)
    (grade,) = torch.autograd.grad((lpe * g).sum() + (he * gh).sum(), ze)
    assert grad.dtype == dtype
    assert low_precision_ok(rel_err(lp, lp64), rel_err(lpe, lp64))
    assert low_precision_ok(rel_err(h, h64), rel_err(he, h64))
    assert low_precision_ok(rel_err(grad, grad64), rel_err(grade.reshape(grad.shape), grad64), floor=1e-3)


def test_rows_whose_max_rises_block_after_block():
    """The forward's one-pass blocks use the running max of the blocks before; a block whose max is more than 64
    above it is redone exactly. Rows: a steep ramp (every block redone), a gentle ramp (one-pass blocks that raise
    the max), a peak in the last block, -inf blocks before the first finite one, a flat row."""
    vocab = 5 * 2048 + 3
    ramp = torch.linspace(-300.0, 300.0, vocab, dtype=torch.float64)
    rows = [ramp, ramp / 20, _randn(vocab, seed=9), _randn(vocab, seed=10), torch.full((vocab,), 0.5)]
    rows[2][-5] = 80.0
    rows[3][: 2 * 2048 + 7] = -math.inf
    z = torch.stack(rows).float().unsqueeze(0)
    ids = torch.tensor([vocab - 1, 17, vocab - 5, 2 * 2048 + 100, 3])
    g, gh = _randn(5, seed=11, scale=1.0).float(), _randn(5, seed=12, scale=1.0).float()
    lp, _, h, grad = _passes(z, ids, 1.0, True, g, gh)
    lp64, h64, grad64 = _reference(z, ids, 1.0, g, gh)
    assert rel_err(lp, lp64) < 1e-6 and rel_err(h, h64) < 1e-6 and rel_err(grad, grad64) < 1e-6
    assert torch.equal(grad[0, 3, : 2 * 2048 + 7], torch.zeros(2 * 2048 + 7))  # -inf logits: exact zeros


@pytest.mark.parametrize("entropy", [True, False])
def test_non_finite_logits_as_the_torch_ops_path(entropy):
    """NaN anywhere in a row (here in its last block) -> NaN; +inf -> NaN with the entropy, lse = +inf without; a
    row of -inf -> NaN with the entropy, lse = -inf without; the same patterns as the torch-ops path."""
    vocab = 3 * 2048 + 5
    z = _randn(1, 4, vocab, seed=13).float()
    z[0, 0, -2] = math.nan
    z[0, 1, 2048 * 2 + 3] = math.inf
    z[0, 2] = -math.inf
    ids = torch.tensor([1, 2, 3, 4])
    got = torch_logprobs.token_logprobs_forward(z, ids, 1.0, entropy)
    usable = native.usable
    try:
        native.usable = lambda *a: False
        expect = torch_logprobs.token_logprobs_forward(z, ids, 1.0, entropy)
    finally:
        native.usable = usable
    for ours, theirs in zip(got, expect):
        if ours.numel():
            assert_matches(ours, theirs.double(), tol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# layouts and stores
# ----------------------------------------------------------------------------------------------------------------
def test_strided_logits_in_place_and_streamed_stores_are_bitwise_the_plain_ones():
    """logits[:, :-1] (B, T strides that do not merge), the gradient written over the logits, and a gradient of
    >= 16 MiB (non-temporal stores, huge-page advice) all give bitwise what row-by-row calls give."""
    batch, seq, vocab = 4, 33, 32768 + 5  # 17.3 MB of float32 gradient
    full = _randn(batch, seq + 1, vocab, seed=14).float()
    z = full[:, :-1]
    ids = _ids(batch * seq, vocab, seed=15)
    ids[7] = -1
    g, gh = _randn(batch * seq, seed=16, scale=1.0).float(), _randn(batch * seq, seed=17, scale=1.0).float()
    lp, lse, h, grad = _passes(z, ids, 0.9, True, g, gh)
    for n in (0, 7, 40, batch * seq - 1):  # one row at a time: small calls, plain stores
        b, t = divmod(n, seq)
        row = z[b : b + 1, t : t + 1]
        lp1, lse1, h1, grad1 = _passes(row, ids[n : n + 1], 0.9, True, g[n : n + 1], gh[n : n + 1])
        assert torch.equal(lp1, lp[n : n + 1]) and torch.equal(lse1, lse[n : n + 1]) and torch.equal(h1, h[n : n + 1])
        assert torch.equal(grad1[0, 0], grad[b, t])
    in_place = z.clone()
    _passes(in_place, ids, 0.9, True, g, gh, out=in_place)
    assert torch.equal(in_place, grad)


def test_bitwise_the_same_for_any_thread_count_and_run():
    z = _randn(2, 64, 3001, seed=18).float()
    ids = _ids(128, 3001, seed=19)
    g, gh = _randn(128, seed=20, scale=1.0).float(), _randn(128, seed=21, scale=1.0).float()
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            results.append(_passes(z, ids, 1.0, True, g, gh))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_torch_compile_traces_the_op_and_runs_the_compiled_passes():
    """fullgraph=True traces the custom op (its fake implementation): the compiled CPU passes are called at run time
    only, never while tracing, and give the eager call's numbers (bitwise for the op alone)."""
    z = _randn(2, 5, 999, seed=22).float().requires_grad_(True)
    ids = _ids(10, 999, seed=23).view(2, 5)
    adv = _randn(2, seed=24, scale=1.0).float()
    mask = torch.ones(2, 5)

    def loss_fn(z, ids, adv, mask):
        out = grpo_loss(z, ids, adv, mask=mask, backend="torch", return_entropy=True)
        return out.loss + 0.01 * out.entropy.sum()

    calls = []
    forward = native.token_logprobs_forward

    def spy(*args):
        calls.append(torch.compiler.is_compiling())
        return forward(*args)

    native.token_logprobs_forward = spy
    try:
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        got = compiled(z, ids, adv, mask)
        (grad,) = torch.autograd.grad(got, z)
    finally:
        native.token_logprobs_forward = forward
    assert calls and not any(calls)  # called, and never while tracing
    expect = loss_fn(z, ids, adv, mask)
    (expect_grad,) = torch.autograd.grad(expect, z)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expect_grad, rtol=1e-6, atol=1e-9)
    lp = token_logprobs(z.detach(), ids, backend="torch")
    traced = torch.compile(lambda z, i: token_logprobs(z, i, backend="torch"), fullgraph=True, backend="aot_eager")
    assert torch.equal(traced(z.detach(), ids), lp)


def test_float64_and_other_layouts_take_the_torch_ops_path():
    z = _randn(1, 3, 50, seed=25)
    assert not native.usable(z)  # float64: exact, the torch-ops path
    assert not native.usable(z.float().transpose(1, 2))  # V not unit stride
    assert native.usable(z.float())


# ----------------------------------------------------------------------------------------------------------------
# the divergences: reverse_kl, forward_kl (divergence.py's torch-ops path is the specification)
# ----------------------------------------------------------------------------------------------------------------
def _div_passes(student, teacher, ids, kind, temperature, grad_div, grad_lp, out=None):
    """(div, lp, lse, lse_ref, kl_student, kl_teacher, grad) through the backend functions."""
    fwd = torch_divergence.divergence_forward(student, teacher, ids, kind, 0.0, temperature, True)
    out = torch.empty_like(student) if out is None else out
    torch_divergence.divergence_backward(
        student, teacher, ids, *fwd[2:], grad_div, grad_lp, kind, 0.0, temperature, out, None
    )
    return (*fwd, out)


def _div_torch_ops(monkeypatch_target, *args, **kwargs):
    usable = native.usable_pair
    native.usable_pair = lambda *a: False
    try:
        return _div_passes(*args, **kwargs)
    finally:
        native.usable_pair = usable


def _div_reference(student, teacher, ids, kind, temperature, grad_div, grad_lp):
    """float64 divergence, lp and d/dz of sum (grad_div D + grad_lp lp) over the rows with ids >= 0."""
    v = student.shape[-1]
    z64 = student.detach().double().reshape(-1, v).requires_grad_(True)
    t64 = teacher.detach().double().reshape(-1, v)
    d = ref.vocab_divergence(z64, t64, divergence=kind, temperature=temperature)
    lp = torch.log_softmax(z64 / temperature, -1).gather(1, ids.clamp(min=0).unsqueeze(1)).squeeze(1)
    valid = ids >= 0
    d, lp = torch.where(valid, d, 0.0), torch.where(valid, lp, 0.0)
    (grad,) = torch.autograd.grad((d * grad_div.double()).sum() + (lp * grad_lp.double()).sum(), z64)
    return d, lp, grad.reshape(student.shape)


def _spy_native(monkeypatch):
    calls = []
    for name in ("divergence_forward", "divergence_backward"):
        fn = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    return calls


KINDS = ["reverse_kl", "forward_kl"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vocab", [7, 17, 2047, 2049, 5003])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_divergence_float32_against_reference_and_torch_ops(monkeypatch, kind, vocab, temperature):
    rows = 9
    z = _randn(1, rows, vocab, seed=vocab).float()
    zt = (0.8 * z.double() + _randn(1, rows, vocab, seed=vocab + 1, scale=1.0)).float()
    ids = _ids(rows, vocab, seed=30)
    ids[4] = -1
    gd, gl = _randn(rows, seed=31, scale=1.0).float(), _randn(rows, seed=32, scale=1.0).float()
    calls = _spy_native(monkeypatch)
    got = _div_passes(z, zt, ids, kind, temperature, gd, gl)
    assert calls == ["divergence_forward", "divergence_backward"]
    ops = _div_torch_ops(None, z, zt, ids, kind, temperature, gd, gl)
    d64, lp64, grad64 = _div_reference(z, zt, ids, kind, temperature, gd, gl)
    div, lp, lse, lse_ref, kl_s, kl_t, grad = got
    assert div.dtype == torch.float32 and lse.dtype == torch.float64 and grad.dtype == torch.float32
    assert rel_err(div, d64) < 2e-6 and rel_err(lp, lp64) < 1e-6 and rel_err(grad, grad64) < 2e-6
    for ours, theirs in zip(got[:6], ops[:6]):  # the torch-ops path's values, to float32 rounding
        assert_matches(ours.double(), theirs.double(), tol=2e-6)
    assert torch.equal(kl_s if kind == "reverse_kl" else kl_t, div)
    assert torch.equal(kl_t if kind == "reverse_kl" else kl_s, torch.zeros(rows))
    assert div[4] == 0 and lp[4] == 0 and lse[4] == 0 and lse_ref[4] == 0
    assert torch.equal(grad[0, 4], torch.zeros(vocab))  # a row not taking part: zero, never read


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "dtypes",
    [(torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16)],
    ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}",
)
def test_divergence_mixed_dtypes_within_twice_the_torch_ops_error(kind, dtypes):
    if any(d not in native._state["dtypes"] for d in dtypes):
        pytest.skip("float16 not compiled in (the compiler has no _Float16)")
    rows, vocab = 6, 4099
    z = _randn(2, rows // 2, vocab, seed=33).to(dtypes[0])
    zt = (0.8 * z.double() + _randn(2, rows // 2, vocab, seed=34, scale=1.0)).to(dtypes[1])
    ids = _ids(rows, vocab, seed=35)
    ids[2] = -1
    gd, gl = _randn(rows, seed=36, scale=1.0).float(), _randn(rows, seed=37, scale=1.0).float()
    assert native.usable_pair(z, zt)
    got = _div_passes(z, zt, ids, kind, 0.9, gd, gl)
    ops = _div_torch_ops(None, z, zt, ids, kind, 0.9, gd, gl)
    d64, lp64, grad64 = _div_reference(z, zt, ids, kind, 0.9, gd, gl)
    assert got[-1].dtype == dtypes[0]
    assert low_precision_ok(rel_err(got[0], d64), rel_err(ops[0], d64))
    assert low_precision_ok(rel_err(got[1], lp64), rel_err(ops[1], lp64))
    assert low_precision_ok(rel_err(got[-1], grad64), rel_err(ops[-1], grad64), floor=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_near_one_hot_rows(kind):
    """A confident student (one logit 30 above the rest) against a teacher that disagrees or agrees: the reverse-KL
    gradient p (log p - log q - K) nearly cancels there; float32 within 1e-5 of float64 all the same."""
    rows, vocab = 4, 3001
    z = _randn(1, rows, vocab, seed=38, scale=1.0)
    zt = _randn(1, rows, vocab, seed=39, scale=1.0)
    z[0, :, 5] += 30.0
    zt[0, 0, 5] += 30.0  # agrees
    zt[0, 1, 9] += 30.0  # disagrees
    zt[0, 2, 5] += 12.0  # half agrees
    z[0, 3] *= 40.0  # a wide spread, near one-hot by itself
    z, zt = z.float(), zt.float()
    ids = torch.tensor([5, 5, 9, 100])
    gd, gl = _randn(rows, seed=40, scale=1.0).float(), _randn(rows, seed=41, scale=1.0).float()
    got = _div_passes(z, zt, ids, kind, 1.0, gd, gl)
    ops = _div_torch_ops(None, z, zt, ids, kind, 1.0, gd, gl)
    d64, lp64, grad64 = _div_reference(z, zt, ids, kind, 1.0, gd, gl)
    assert rel_err(got[0], d64) < 1e-5 and rel_err(got[1], lp64) < 1e-6
    # Row by row, on the gradient's own scale |grad_div| + |grad_lp| (rows 0 and 1 have gradients of 1e-10 and
    # 1e-8: p_y = 1 - 1e-13 cancels there in float32, for every float32 implementation), and against the torch-ops
    # path's error on the same row.
    for r in range(rows):
        scale = abs(gd[r].item()) + abs(gl[r].item())
        err = (got[-1][0, r].double() - grad64[0, r]).abs().max().item()
        err_ops = (ops[-1][0, r].double() - grad64[0, r]).abs().max().item()
        assert err < 1e-6 * scale and err <= 2 * err_ops + 1e-7 * scale
    for r in (2, 3):
        assert rel_err(got[-1][0, r], grad64[0, r]) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_non_finite_rows_as_the_torch_ops_path(kind):
    """Row by row: the weighting row finite where the other is -inf (KL = +inf; with grad_div = 0 the gradient is
    the lp term alone, else NaN for the reverse KL), -inf student entries (p = 0), a teacher of -inf only, NaN and
    +inf logits on either side (NaN divergence; the other side's lse as computed), a last block with a NaN. The same
    values, infinities and NaNs as the torch-ops path."""
    rows, vocab = 10, 2 * 2048 + 9
    z = _randn(1, rows, vocab, seed=42).float()
    zt = (0.8 * z.double() + _randn(1, rows, vocab, seed=43, scale=1.0)).float()
    zt[0, 0, 11] = -math.inf  # KL(p||q) = inf
    zt[0, 1, 11] = -math.inf  # the same, grad_div = 0
    z[0, 2, 11] = -math.inf  # KL(q||p) = inf
    z[0, 2, 2048 + 3 :] = -math.inf  # and a -inf tail
    zt[0, 3] = -math.inf
    z[0, 4, 2 * 2048 + 1] = math.nan
    zt[0, 5, 70] = math.inf
    z[0, 6, 3000] = math.inf
    z[0, 7, :2048] = -math.inf  # -inf blocks before the first finite one, in both rows
    zt[0, 7, :4000] = -math.inf
    zt[0, 7, 3000] = 1.0
    ids = torch.arange(rows) * 37
    gd, gl = _randn(rows, seed=44, scale=1.0).float(), _randn(rows, seed=45, scale=1.0).float()
    gd[1] = 0.0
    got = _div_passes(z, zt, ids, kind, 1.0, gd, gl)
    ops = _div_torch_ops(None, z, zt, ids, kind, 1.0, gd, gl)
    for ours, theirs in zip(got, ops):
        ours, theirs = ours.double(), theirs.double()
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
        assert torch.equal(torch.isposinf(ours), torch.isposinf(theirs))
        assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs))
        finite = torch.isfinite(theirs)
        assert_matches(ours[finite], theirs[finite], tol=2e-6)
    div, grad = got[0], got[-1]
    infinite_row = 0 if kind == "reverse_kl" else 2
    assert div[infinite_row] == math.inf
    if kind == "reverse_kl":
        assert div[1] == math.inf and torch.isnan(grad[0, 0]).all()
        # grad_div = 0: the lp term g_lp (1[v = y] - p) alone
        _, lp64, grad_lp64 = _div_reference(z[:, 1:2], zt[:, 1:2], ids[1:2], kind, 1.0, gd[1:2], gl[1:2])
        assert rel_err(grad[0, 1], grad_lp64[0, 0]) < 1e-6
    else:
        assert torch.isfinite(grad[0, 2]).all()  # d/dz KL(q||p) = p - q: finite
    assert torch.isnan(div[3:7]).all() and torch.isfinite(div[8:]).all()
    # row 7: the student is finite on 2048..3999 where the teacher is -inf: KL(p||q) = inf, KL(q||p) finite
    assert div[7] == math.inf if kind == "reverse_kl" else math.isfinite(div[7])


def test_divergence_bitwise_the_same_for_any_thread_count_in_place_and_strided():
    batch, seq, vocab = 2, 40, 3001  # 240k logits: more than one thread
    full = _randn(batch, seq + 1, vocab, seed=46).float()
    z = full[:, :-1]  # B and T strides that do not merge
    zt = (0.8 * z.double() + _randn(batch, seq, vocab, seed=47, scale=1.0)).to(torch.bfloat16)
    ids = _ids(batch * seq, vocab, seed=48)
    ids[3] = -1
    gd, gl = _randn(batch * seq, seed=49, scale=1.0).float(), _randn(batch * seq, seed=50, scale=1.0).float()
    threads = torch.get_num_threads()
    try:
        results = {}
        for kind in KINDS:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results.setdefault(kind, []).append(_div_passes(z, zt, ids, kind, 0.8, gd, gl))
            in_place = z.clone()
            _div_passes(in_place, zt, ids, kind, 0.8, gd, gl, out=in_place)
            assert torch.equal(in_place, results[kind][0][-1])
    finally:
        torch.set_num_threads(threads)
    for runs in results.values():
        for other in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_divergence_jsd_teacher_gradients_and_float64_take_the_torch_ops_path(monkeypatch):
    z = _randn(1, 3, 50, seed=51).float()
    zt = _randn(1, 3, 50, seed=52).float()
    ids = _ids(3, 50, seed=53)
    calls = _spy_native(monkeypatch)
    fwd = torch_divergence.divergence_forward(z, zt, ids, "jsd", 0.5, 1.0, True)
    torch_divergence.divergence_backward(z, zt, ids, *fwd[2:], torch.ones(3), None, "jsd", 0.5, 1.0, z.clone(), None)
    fwd = torch_divergence.divergence_forward(z.double(), zt, ids, "reverse_kl", 0.0, 1.0, True)
    fwd = torch_divergence.divergence_forward(z, zt, ids, "reverse_kl", 0.0, 1.0, True)
    assert calls == ["divergence_forward"]
    out_t = torch.empty_like(zt)
    torch_divergence.divergence_backward(
        z, zt, ids, *fwd[2:], torch.ones(3), None, "reverse_kl", 0.0, 1.0, torch.empty_like(z), out_t
    )
    assert calls == ["divergence_forward"]  # a teacher gradient: the torch-ops path (both gradients at once)


def test_exact_kl_grpo_loss_runs_the_compiled_divergence_passes(monkeypatch):
    """grpo_loss(kl_estimator="exact") on the CPU: the divergence forward and backward are the compiled ones, the
    loss and gradient those of the float64 reference."""
    batch, seq, vocab = 2, 4, 2100
    z0 = _randn(batch, seq, vocab, seed=54).float()
    zr = (0.8 * z0.double() + _randn(batch, seq, vocab, seed=55, scale=1.0)).float()
    ids = _ids(batch * seq, vocab, seed=56).view(batch, seq)
    adv = _randn(batch, seed=57, scale=1.0).float()
    mask = torch.ones(batch, seq)
    mask[1, 3] = 0
    calls = _spy_native(monkeypatch)
    z = z0.clone().requires_grad_(True)
    out = grpo_loss(z, ids, adv, mask=mask, beta=0.04, kl_estimator="exact", ref_logits=zr, backend="torch")
    (grad,) = torch.autograd.grad(out.loss, z)
    assert calls == ["divergence_forward", "divergence_backward"]
    z64 = z0.double().requires_grad_(True)
    expect = ref.grpo_loss(z64, ids, adv, mask=mask, beta=0.04, kl_estimator="exact", ref_logits=zr.double())
    (grad64,) = torch.autograd.grad(expect.loss, z64)
    assert abs(out.loss.item() - expect.loss.item()) <= 1e-6 * max(1.0, abs(expect.loss.item()))
    assert rel_err(grad, grad64) < 2e-6


# ----------------------------------------------------------------------------------------------------------------
# availability: switched off, no compiler, the cache
# ----------------------------------------------------------------------------------------------------------------
_PROBE = """
import json, logging, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
from grpo_kernels import token_logprobs
from grpo_kernels.backends.torch import native
z = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(0))
ids = torch.randint(0, 40, (2, 3), generator=torch.Generator().manual_seed(1))
lp = token_logprobs(z, ids, backend="torch")
lp = token_logprobs(z, ids, backend="torch")
print(json.dumps(dict(reason=native.unavailable_reason(), lp=lp.tolist())))
"""


def _probe(tmp_path, **env):
    full_env = dict(os.environ, PYTHONPATH=ROOT, GRPO_KERNELS_CACHE_DIR=str(tmp_path / "cache"), **env)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], env=full_env, capture_output=True, text=True, timeout=300, check=True, cwd=ROOT
    )
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_fallback_when_switched_off_or_without_a_compiler_logs_the_reason_once(tmp_path):
    built, log = _probe(tmp_path)
    assert built["reason"] is None and "compiled the torch backend's CPU kernels" in log
    cached, log = _probe(tmp_path)
    assert cached["reason"] is None and "loaded from the cache" in log
    off, log = _probe(tmp_path, GRPO_KERNELS_CPU_NATIVE="0")
    assert off["reason"] == "GRPO_KERNELS_CPU_NATIVE=0" and log.count("torch-ops path") == 1
    no_cxx, log = _probe(tmp_path, CXX="/nonexistent/c++")
    assert "could not build" in no_cxx["reason"] and log.count("torch-ops path") == 1
    for other in (off, no_cxx):  # the torch-ops path: the same log-probs to float32 rounding
        assert max(abs(a - b) for ra, rb in zip(other["lp"], built["lp"]) for a, b in zip(ra, rb)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_torch_ops_path_still_matches_reference(monkeypatch, dtype):
    """With the compiled passes off (no compiler, GRPO_KERNELS_CPU_NATIVE=0) the torch-ops path serves float32 and
    low precision again: the public API's values and gradients still meet the project's tolerances (checked for
    both paths)."""
    batch, seq, vocab = 3, 4, 1003
    z0 = _randn(batch, seq, vocab, seed=26).to(dtype)
    ids = _ids(batch * seq, vocab, seed=27).view(batch, seq)
    mask = torch.ones(batch, seq)
    mask[1, 2:] = 0
    runs = {}
    for name in ("compiled", "torch-ops"):
        if name == "torch-ops":
            monkeypatch.setattr(native, "usable", lambda *a: False)
        z = z0.clone().requires_grad_(True)
        lp, h = token_logprobs(z, ids, mask=mask, temperature=0.8, return_entropy=True, backend="torch")
        (grad,) = torch.autograd.grad((lp * 0.3).sum() - h.sum(), z)
        runs[name] = (lp, h, grad)
    z64 = z0.double().requires_grad_(True)
    lp64, h64 = ref.token_logprobs(z64, ids, mask=mask, temperature=0.8)
    (grad64,) = torch.autograd.grad((lp64 * 0.3).sum() - h64.sum(), z64)
    ze = z0.clone().requires_grad_(True)
    lpe, he = ref.token_logprobs(ze, ids, mask=mask, temperature=0.8, compute_in=dtype)
    (grade,) = torch.autograd.grad((lpe * 0.3).sum() - he.sum(), ze)
    for lp, h, grad in runs.values():
        if dtype == torch.float32:
            assert rel_err(lp, lp64) < 1e-5 and rel_err(h, h64) < 1e-5 and rel_err(grad, grad64) < 1e-5
        else:
            assert low_precision_ok(rel_err(lp, lp64), rel_err(lpe, lp64))
            assert low_precision_ok(rel_err(h, h64), rel_err(he, h64))
            assert low_precision_ok(rel_err(grad, grad64), rel_err(grade, grad64), floor=1e-3)
