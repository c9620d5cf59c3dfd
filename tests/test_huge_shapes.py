"""Huge shapes through the public API on every backend: more than 65 535 rows / sequences / groups (a CUDA grid's
y/z limit), element offsets beyond 2^31 (int32 overflow), and a full-size N*V > 2^31 batch (slow).

Offsets beyond 2^31 are reached cheaply with strided logits: a few rows placed 2^24 elements apart in one huge
allocation of which only those rows' pages are ever touched (the rest stays virtual on the CPU)."""

import pytest
import torch
from conftest import DEVICE
from helpers import rel_err
from reliability_helpers import INTERPRETED, backend_params_slow_when_interpreted, grad_of

from grpo_kernels import group_advantages, grpo_loss, token_logprobs
from grpo_kernels import reference as ref

MANY = 66_000  # > 65 535
ROW_GAP = 2**24  # elements between consecutive strided rows: row 128 starts at 2^31


@pytest.fixture(params=backend_params_slow_when_interpreted())
def compiled_backend(request):
    """The backends, with the interpreted one (one program per row, in Python) only under -m slow."""
    return request.param


def _random(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _ids(shape, vocab, seed):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# ----------------------------------------------------------------------------------------------------------------
# more than 65 535 rows, sequences and groups
# ----------------------------------------------------------------------------------------------------------------
def test_more_than_65535_rows(compiled_backend):
    z = _random((2, MANY // 2 + 1, 8), seed=1)
    ids = _ids((2, MANY // 2 + 1), 8, seed=2)
    zz = z.clone().requires_grad_(True)
    lp, h = token_logprobs(zz, ids, return_entropy=True, backend=compiled_backend)
    z64 = z.double().requires_grad_(True)
    lp64, h64 = ref.token_logprobs(z64, ids)
    assert rel_err(lp, lp64) < 1e-5 and rel_err(h, h64) < 1e-5
    assert rel_err(grad_of(lp.sum() - h.sum(), zz), grad_of(lp64.sum() - h64.sum(), z64)) < 1e-5


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_more_than_65535_sequences(compiled_backend, level):
    """[S, 2, V] with S > 65 535: the per-sequence reductions (sequence-level ratio, grpo's per-sequence mean)."""
    z = _random((MANY, 2, 8), seed=3)
    ids = _ids((MANY, 2), 8, seed=4)
    mask = (_random((MANY, 2), seed=5) > -1).float()
    kw = dict(mask=mask, old_logprobs=_random((MANY, 2), seed=6) - 2, loss_type="grpo", importance_sampling_level=level)
    adv = _random((MANY,), seed=7)
    zz, z64 = z.clone().requires_grad_(True), z.double().requires_grad_(True)
    out, expect = grpo_loss(zz, ids, adv, backend=compiled_backend, **kw), ref.grpo_loss(z64, ids, adv, **kw)
    assert rel_err(out.loss, expect.loss) < 1e-5 and rel_err(out.per_token_loss, expect.per_token_loss) < 1e-5
    assert rel_err(grad_of(out.loss, zz), grad_of(expect.loss, z64)) < 1e-5


@pytest.mark.parametrize("by_ids", [False, True])
def test_more_than_65535_groups(compiled_backend, by_ids):
    """Groups of 2 (closed form: A = +-(r1 - r2) / 2 / (|r1 - r2| / sqrt 2 + eps)), fixed or shuffled group ids.
    |r1 - r2| >= 0.5, so that float32's rounding of the group mean stays far below the tolerance."""
    first = _random((MANY,), seed=8)
    gap = (0.5 + _random((MANY,), seed=21).abs()) * torch.where(_random((MANY,), seed=22) > 0, 1.0, -1.0)
    rewards = torch.stack([first, first + gap], dim=1).reshape(-1)
    pairs = rewards.double().view(MANY, 2)
    diff = pairs[:, 0] - pairs[:, 1]
    adv = diff / 2 / (diff.abs() / 2**0.5 + 1e-4)
    expect = torch.stack([adv, -adv], dim=1).reshape(-1)
    if by_ids:
        perm = torch.randperm(2 * MANY, generator=torch.Generator().manual_seed(9)).to(DEVICE)
        group_ids = (torch.arange(2 * MANY, device=DEVICE) // 2)[perm] * 7 + 3  # sparse, shuffled ids
        out = group_advantages(rewards[perm], group_ids=group_ids, backend=compiled_backend)
        expect = expect[perm]
    else:
        out = group_advantages(rewards, group_size=2, backend=compiled_backend)
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# element offsets beyond 2^31
# ----------------------------------------------------------------------------------------------------------------
class _NonLeaf(torch.autograd.Function):
    """A non-leaf alias of ``x`` (same memory, same strides), as a model's output is: in-place backward allowed."""

    @staticmethod
    def forward(ctx, x, anchor):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return None, grad.new_zeros(())


def _far_apart(values: torch.Tensor, stride_b: int, stride_t: int) -> torch.Tensor:
    """``values`` [B, T, V] copied into a view with strides (stride_b, stride_t, 1) of one huge allocation."""
    b, t, v = values.shape
    size = (b - 1) * stride_b + (t - 1) * stride_t + v
    storage = torch.empty(size, dtype=values.dtype, device=DEVICE)  # virtual on the CPU: only written rows count
    out = storage.as_strided((b, t, v), (stride_b, stride_t, 1))
    out.copy_(values)
    return out


LAYOUTS = {  # (B, T, stride_b, stride_t): the last row starts beyond element 2^31 in each
    "rows-along-B": (130, 1, ROW_GAP, 1),
    "rows-along-T": (1, 130, 1, ROW_GAP),
    "B-and-T-not-mergeable": (2, 65, 65 * ROW_GAP + ROW_GAP // 2, ROW_GAP),
}


def test_offsets_beyond_2_31(backend):
    """The loss, log-probs, entropy and gradient (out of place, and in place over the strided logits) of logits whose
    rows lie up to 2.2e9 elements (4.4 GB) apart are bitwise those of the same values stored compactly."""
    _check_far_apart(backend, "B-and-T-not-mergeable", "token")


@pytest.mark.parametrize(
    "layout,level",
    [(a, b) for a in LAYOUTS for b in ("token", "sequence") if (a, b) != ("B-and-T-not-mergeable", "token")],
)
def test_offsets_beyond_2_31_more_layouts(compiled_backend, layout, level):
    """As above for the other layouts and the sequence-level ratio (interpreted: -m slow, ~15 s each)."""
    _check_far_apart(compiled_backend, layout, level)


def _check_far_apart(backend, layout, level):
    batch, seq, stride_b, stride_t = LAYOUTS[layout]
    vocab = 33
    values = _random((batch, seq, vocab), seed=10, dtype=torch.bfloat16)
    ids = _ids((batch, seq), vocab, seed=11)
    adv = _random((batch, seq), seed=12)
    kw = dict(
        old_logprobs=_random((batch, seq), seed=13) - 3.5,
        ref_logprobs=_random((batch, seq), seed=14) - 3.5,
        beta=0.04,
        importance_sampling_level=level,
        return_entropy=True,
        backend=backend,
    )
    compact = values.clone().requires_grad_(True)
    expect = grpo_loss(compact, ids, adv, **kw)
    grad = grad_of(expect.loss - 0.01 * expect.entropy.sum(), compact)
    for inplace in (False, True):
        far = _far_apart(values, stride_b, stride_t)
        assert (batch - 1) * stride_b + (seq - 1) * stride_t >= 2**31
        z = _NonLeaf.apply(far, torch.zeros((), requires_grad=True))
        out = grpo_loss(z, ids, adv, inplace_backward=inplace, **kw)
        far_grad = grad_of(out.loss - 0.01 * out.entropy.sum(), z)  # in place: the strided memory itself
        assert (far_grad.data_ptr() == far.data_ptr()) == inplace
        for key in ("loss", "logprobs", "entropy", "per_token_loss"):
            assert torch.equal(getattr(out, key), getattr(expect, key)), key
        assert torch.equal(far_grad, grad)
    kw64 = {k: v for k, v in kw.items() if k not in ("return_entropy", "backend")}
    exact = ref.grpo_loss(values.double(), ids, adv, **kw64)
    assert rel_err(expect.loss, exact.loss) < 1e-5 and rel_err(expect.logprobs, exact.logprobs) < 1e-5


def test_offsets_beyond_2_31_out_of_place_gradient(compiled_backend):
    """token_logprobs on far-apart rows: the out-of-place gradient (a compact new buffer) matches the compact input."""
    batch, seq, stride_b, stride_t = LAYOUTS["rows-along-B"]
    values = _random((batch, seq, 40), seed=15, dtype=torch.bfloat16)
    ids = _ids((batch, seq), 40, seed=16)
    grads = []
    for x in (_far_apart(values, stride_b, stride_t), values.clone()):
        x.requires_grad_(True)
        lp, h = token_logprobs(x, ids, return_entropy=True, temperature=0.9, backend=compiled_backend)
        grads.append((lp, h, grad_of(lp.sum() + 0.3 * h.sum(), x)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# full size: N * V > 2^31 in one contiguous tensor (4.3 GB of bf16; the gradient writes every row)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_size_n_times_v_beyond_2_31(backend):
    """[16, 4100, 32768] bf16 (N = 65 600 rows > 65 535, N * V = 2.15e9 > 2^31), in-place backward so that only
    the logits' 4.3 GB are ever resident. Rows taking part are spread over the whole range, including the last
    ones (offsets > 2^31); every other row is masked and its gradient must come out exactly 0."""
    if backend in INTERPRETED:
        pytest.skip("interpreted backend: 65 600 programs over 4.3 GB in Python; this case is for a GPU")
    batch, seq, vocab = 16, 4100, 32768
    assert batch * seq * vocab > 2**31 and batch * seq > 65_535
    w = torch.ones((), device=DEVICE, requires_grad=True)
    logits = torch.empty(batch, seq, vocab, dtype=torch.bfloat16, device=DEVICE)  # pages touched only when written
    rows = torch.tensor(
        [0, 1, 7777, 2**31 // vocab - 1, 2**31 // vocab, 2**31 // vocab + 1, batch * seq - 1], device=DEVICE
    )
    picked = _random((rows.numel(), vocab), seed=17, dtype=torch.bfloat16) * 3
    flat = logits.view(-1, vocab)
    flat[rows] = picked
    mask = torch.zeros(batch * seq, device=DEVICE)
    mask[rows] = 1.0
    ids = torch.zeros(batch * seq, dtype=torch.long, device=DEVICE)
    ids[rows] = _ids((rows.numel(),), vocab, seed=18)
    adv = _random((batch,), seed=19)
    old = torch.zeros(batch * seq, device=DEVICE)
    old[rows] = _random((rows.numel(),), seed=20) - 10.0
    z = _NonLeaf.apply(logits, w)
    out = grpo_loss(
        z,
        ids.view(batch, seq),
        adv,
        mask=mask.view(batch, seq),
        old_logprobs=old.view(batch, seq),
        inplace_backward=True,
        loss_type="grpo",
        backend=backend,
    )
    out.loss.backward()
    # the reference on the rows that take part (each row's sequence has exactly its picked rows taking part)
    seq_of = rows // seq
    z64 = picked.double().requires_grad_(True)
    lp64 = ref.token_logprobs(z64, ids[rows])[0]
    rho = torch.exp(lp64 - old[rows].double())
    per_token = -torch.minimum(rho * adv[seq_of].double(), rho.clamp(0.8, 1.2) * adv[seq_of].double())
    counts = torch.bincount(seq_of, minlength=batch).double()
    loss64 = (per_token / counts[seq_of]).sum() / batch
    assert rel_err(out.loss, loss64) < 1e-5
    assert rel_err(out.logprobs.view(-1)[rows], lp64) < 1e-5
    grad64 = grad_of(loss64, z64)
    assert rel_err(flat[rows], grad64) < 2**-8  # the bf16 gradient's rounding (2^-9) dominates
    others = torch.ones(batch * seq, dtype=torch.bool, device=DEVICE)
    others[rows] = False
    assert not torch.amax(flat, dim=1)[others].any() and not torch.amin(flat, dim=1)[others].any()
