"""Triton backend, beyond the backend-parametrised suites: every epilogue mode against reference.py (float64),
vocabulary sizes and odd row counts for the fused loss, in-place backward on strided views, outputs fully written,
NaN / -inf handling, the launch helpers at sizes the interpreter cannot run, runtime hyper-parameters, determinism.

Shapes are tiny: on a CPU the kernels run in the Triton interpreter (about 10 ms per program)."""

import inspect
import math

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from conftest import DEVICE  # noqa: E402
from helpers import low_precision_ok, make_batch, rel_err  # noqa: E402

from grpo_kernels import _alloc, group_advantages, grpo_loss  # noqa: E402
from grpo_kernels import reference as ref  # noqa: E402
from grpo_kernels.backends import unavailable_reason  # noqa: E402

REASON = unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"backend 'triton' unavailable on {DEVICE}: {REASON}")
if REASON is None:
    from grpo_kernels.backends.triton import BACKEND, advantages, common, logprobs
    from grpo_kernels.backends.triton import grpo_loss as fused

METRICS = ["kl_mean", "clip_low", "clip_high", "clip_region", "entropy_mean", "logprob_mean"]


def _compare(d, z, z64, tol=1e-5, entropy_weight=0.0, **kw):
    """Run grpo_loss (triton) and the float64 reference on the same inputs; compare outputs and logits grads."""
    out = grpo_loss(z, d["ids"], d["adv"], mask=d["mask"], return_entropy=True, backend="triton", **kw)
    expect = ref.grpo_loss(z64, d["ids"], d["adv"], mask=d["mask"], **kw)
    (grad,) = torch.autograd.grad(out.loss + entropy_weight * out.entropy.sum(), z)
    (grad64,) = torch.autograd.grad(expect.loss + entropy_weight * expect.entropy.sum(), z64)
    for key in ("loss", "logprobs", "entropy", "per_token_loss"):
        assert rel_err(getattr(out, key), getattr(expect, key)) < tol, key
    assert rel_err(grad, grad64) < tol
    for key in METRICS:  # relative once large (the extreme KL estimates reach hundreds)
        value, expected = getattr(out, key).item(), getattr(expect, key).item()
        assert abs(value - expected) < tol * max(1.0, abs(expected)), key
    return out, grad


def _extreme_ratios(d, temperature=1.0):
    """old/ref log-probs that push some tokens far out: ratios e^{+-3}, k = lp_ref - lp of +-25 and 3."""
    logp = torch.log_softmax(d["logits"].double().cpu() / temperature, -1)
    lp = logp.gather(-1, d["ids"].cpu().unsqueeze(-1))[..., 0]
    old, ref_lp = d["old"].cpu().clone(), d["ref"].cpu().clone()
    old[:, 0], old[:, 1] = lp[:, 0] - 3.0, lp[:, 1] + 3.0
    ref_lp[:, 0], ref_lp[:, 1], ref_lp[:, 2] = lp[:, 0] + 25.0, lp[:, 1] - 25.0, lp[:, 2] + 3.0
    return {**d, "old": old.float().to(DEVICE), "ref": ref_lp.float().to(DEVICE)}


# ----------------------------------------------------------------------------------------------------------------
# every mode of the fused epilogue
# ----------------------------------------------------------------------------------------------------------------
def _variants():
    """Each (family, estimator, bias correction) with the binary options cycled so each meets both values."""
    cases = []
    for i, (family, estimator, corrected) in enumerate(
        (f, e, c) for f in ("clip", "cispo", "sapo") for e in ref.SAMPLED_KL_ESTIMATORS for c in (False, True)
    ):
        bits = [(i >> k) & 1 for k in range(5)]
        loss_type = ("grpo", "bnpo", "dr_grpo", "dapo")[i % 4] if family == "clip" else family
        kw = dict(
            loss_type=loss_type,
            beta=0.1,
            kl_estimator=estimator,
            bias_corrected_kl=corrected,
            epsilon_high=0.28 if i % 3 else None,
            temperature=0.7 if i % 3 == 1 else 1.0,
        )
        if family == "clip":
            kw.update(delta=1.5 if bits[2] else None, dual_clip=3.0 if bits[3] else None)
        name = f"{loss_type}-{estimator}{'-bc' if corrected else ''}-old{bits[0]}-isw{bits[1]}-tokadv{bits[4]}"
        cases.append(pytest.param(kw, bool(bits[0]), bool(bits[1]), bool(bits[4]), id=name))
    for family in ("dapo", "cispo", "sapo"):  # beta = 0: no KL work at all
        cases.append(pytest.param(dict(loss_type=family), True, True, False, id=f"{family}-no-kl"))
    return cases


@pytest.mark.parametrize("kw,use_old,use_isw,token_adv", _variants())
def test_fused_epilogue_every_mode(kw, use_old, use_isw, token_adv, poisoned):
    d = _extreme_ratios(make_batch(3, 6, 13, seed=len(str(kw)) + 7 * use_old + 3 * use_isw), kw.get("temperature", 1.0))
    g = torch.Generator().manual_seed(2)
    if token_adv:
        d["adv"] = torch.randn(d["ids"].shape, generator=g).to(DEVICE)
    extra = dict(
        max_completion_length=8,
        old_logprobs=d["old"] if use_old else None,
        ref_logprobs=d["ref"],
        is_weights=(0.5 + torch.rand(3, generator=g)).to(DEVICE) if use_isw else None,
        **kw,
    )
    z = d["logits"].clone().requires_grad_(True)
    _compare(d, z, d["logits"].double().requires_grad_(True), entropy_weight=0.01, **extra)


# ----------------------------------------------------------------------------------------------------------------
# shapes, dtypes, layouts
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4099])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_loss_vocab_sizes(vocab, level, poisoned):
    d = make_batch(3, 5, vocab, seed=vocab)  # 15 rows: a multiple of no block; the last row is empty
    z = d["logits"].clone().requires_grad_(True)
    _compare(
        d,
        z,
        d["logits"].double().requires_grad_(True),
        old_logprobs=d["old"],
        ref_logprobs=d["ref"],
        beta=0.04,
        loss_type="grpo" if level == "sequence" else "dapo",
        importance_sampling_level=level,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "kw",
    [
        dict(loss_type="sapo", kl_estimator="low_var_kl"),
        dict(loss_type="bnpo", delta=1.5, dual_clip=3.0, kl_estimator="k2"),
    ],
    ids=["sapo", "bnpo-delta-dual"],
)
def test_fused_loss_low_precision(dtype, kw):
    d = make_batch(3, 5, 1000, dtype=dtype, seed=21)
    args = dict(mask=d["mask"], old_logprobs=d["old"], ref_logprobs=d["ref"], beta=0.1, **kw)
    z = d["logits"].clone().requires_grad_(True)
    out = grpo_loss(z, d["ids"], d["adv"], backend="triton", **args)
    z64 = d["logits"].double().requires_grad_(True)
    expect = ref.grpo_loss(z64, d["ids"], d["adv"], **args)
    ze = d["logits"].clone().requires_grad_(True)
    eager = ref.grpo_loss(ze, d["ids"], d["adv"], compute_in=dtype, **args)
    grads = [torch.autograd.grad(o.loss, x)[0] for o, x in ((out, z), (expect, z64), (eager, ze))]
    assert grads[0].dtype == dtype
    for key in ("loss", "logprobs", "per_token_loss"):
        exact = getattr(expect, key)
        assert low_precision_ok(rel_err(getattr(out, key), exact), rel_err(getattr(eager, key), exact)), key
    assert low_precision_ok(rel_err(grads[0], grads[1]), rel_err(grads[2], grads[1]), floor=1e-3)


def test_packed_token_level_with_per_sequence_weights():
    cu = torch.tensor([0, 4, 5, 11], device=DEVICE)
    d = make_batch(1, 11, 17, seed=12, masked_tail=False)
    z = d["logits"][0]
    ids, old, ref_lp = d["ids"][0], d["old"][0], d["ref"][0]
    adv = torch.tensor([0.5, -1.0, 2.0], device=DEVICE)
    w = torch.tensor([0.7, 1.3, 1.0], device=DEVICE)
    kw = dict(old_logprobs=old, ref_logprobs=ref_lp, beta=0.1, is_weights=w, cu_seqlens=cu, loss_type="cispo")
    zt = z.clone().requires_grad_(True)
    out = grpo_loss(zt, ids, adv, backend="triton", **kw)
    z64 = z.double().requires_grad_(True)
    expect = ref.grpo_loss(z64, ids, adv, **kw)
    assert rel_err(out.loss, expect.loss) < 1e-5 and rel_err(out.per_token_loss, expect.per_token_loss) < 1e-5
    assert rel_err(torch.autograd.grad(out.loss, zt)[0], torch.autograd.grad(expect.loss, z64)[0]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy_grad", [False, True])
def test_backward_in_place_matches_out_of_place(dtype, with_entropy_grad):
    d = make_batch(2, 6, 300, dtype=dtype, seed=13)
    buffer = d["logits"]
    z = buffer[:, 1:-1]  # B and T strides do not merge; the first and last positions are not ours
    ids = torch.where(d["mask"][:, 1:-1] > 0, d["ids"][:, 1:-1], -1).reshape(-1)
    _, lse, entropy = BACKEND.token_logprobs_forward(z, ids, 0.9, True)
    g = torch.Generator().manual_seed(3)
    grad_lp = torch.randn(ids.shape, generator=g).to(DEVICE)
    grad_h = torch.randn(ids.shape, generator=g).to(DEVICE) if with_entropy_grad else None
    out = torch.full(z.shape, math.nan, dtype=dtype, device=DEVICE)
    BACKEND.token_logprobs_backward(z, ids, lse, entropy, grad_lp, grad_h, 0.9, out)
    in_place = buffer.clone()
    view = in_place[:, 1:-1]
    BACKEND.token_logprobs_backward(view, ids, lse, entropy, grad_lp, grad_h, 0.9, view)
    assert torch.equal(view, out)  # bitwise: same kernel, same arithmetic
    assert torch.equal(in_place[:, 0], buffer[:, 0]) and torch.equal(in_place[:, -1], buffer[:, -1])
    assert torch.equal(out.reshape(-1, 300)[ids < 0], torch.zeros_like(out.reshape(-1, 300)[ids < 0]))
    # and against the reference's gradient of sum(grad_lp lp + grad_h H)
    z64 = z.detach().double().requires_grad_(True)
    mask = (ids >= 0).view(z.shape[:2])
    lp64, h64 = ref.token_logprobs(z64, ids.clamp(min=0).view(z.shape[:2]), mask=mask, temperature=0.9)
    target = (lp64 * grad_lp.view(mask.shape)).sum()
    if with_entropy_grad:
        target = target + (h64 * grad_h.view(mask.shape)).sum()
    (grad64,) = torch.autograd.grad(target, z64)
    assert rel_err(out, grad64) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_outputs_fully_written():
    d = make_batch(3, 4, 50, seed=14)
    ids = torch.where(d["mask"] > 0, d["ids"], -1).reshape(-1)
    with _alloc.poisoned_outputs():
        for with_entropy in (False, True):
            for t in BACKEND.token_logprobs_forward(d["logits"], ids, 1.0, with_entropy):
                assert not torch.isnan(t).any()
        out = grpo_loss(
            d["logits"].requires_grad_(True),
            d["ids"],
            d["adv"],
            mask=d["mask"],
            old_logprobs=d["old"],
            ref_logprobs=d["ref"],
            beta=0.1,
            return_entropy=True,
            backend="triton",
        )
        out.loss.backward()
        for t in (out.loss, out.logprobs, out.entropy, out.per_token_loss, d["logits"].grad):
            assert not torch.isnan(t).any()
        r = torch.randn(12, 2, device=DEVICE)
        for kw in (dict(scale="group"), dict(scale="batch"), dict(multi_reward="normalize_then_sum")):
            stats = group_advantages(r, group_size=3, backend="triton", return_stats=True, **kw)
            for t in (stats.advantages, stats.group_mean, stats.group_std):
                assert not torch.isnan(t).any()


@pytest.mark.parametrize(
    "scale,mode",
    [
        ("group", "sum_then_normalize"),
        ("batch", "sum_then_normalize"),
        ("none", "sum_then_normalize"),
        ("group", "normalize_then_sum"),
    ],
)
def test_advantages_groups_spanning_many_blocks(scale, mode, poisoned):
    """One group of 1000 rows among 12 small ones (blocks of 128 rows: the statistics merge across blocks), and a
    batch of 1100 rows (the batch statistics merge across blocks of 1024). Rewards sit near 100, where float32
    summation error shows: our error vs float64 must stay within 2x that of eager PyTorch in float32."""
    g = torch.Generator().manual_seed(19)
    ids = torch.cat([torch.zeros(1000, dtype=torch.long), 1 + torch.arange(100) % 12])
    ids = ids[torch.randperm(1100, generator=g)]
    r = torch.randint(0, 5, (1100, 2), generator=g).float() + 0.1 * torch.randn(1100, 2, generator=g) + 100.0
    r[torch.rand(1100, generator=g) < 0.05, 0] = math.nan
    r[:3] = math.nan
    w = torch.tensor([1.0, 0.5])
    out = group_advantages(
        r.to(DEVICE),
        group_ids=ids.to(DEVICE),
        scale=scale,
        multi_reward=mode,
        reward_weights=w,
        backend="triton",
        return_stats=True,
    )
    expect = ref.group_advantages(r.double(), group_ids=ids, scale=scale, multi_reward=mode, reward_weights=w)
    eager = ref.group_advantages(r, group_ids=ids, scale=scale, multi_reward=mode, reward_weights=w)
    for key in ("advantages", "group_mean", "group_std"):
        ours, exact, eager_value = getattr(out, key).cpu().double(), getattr(expect, key), getattr(eager, key).double()
        assert torch.equal(torch.isnan(ours), torch.isnan(exact)), key
        ours_error = float((ours - exact).nan_to_num(0.0).abs().max())
        eager_error = float((eager_value - exact).nan_to_num(0.0).abs().max())
        assert low_precision_ok(ours_error, eager_error), (key, ours_error, eager_error)


# ----------------------------------------------------------------------------------------------------------------
# NaN and -inf
# ----------------------------------------------------------------------------------------------------------------
def test_nan_at_a_valid_row_propagates_and_masked_nan_does_not():
    d = make_batch(2, 4, 20, seed=15, masked_tail=False, empty_row=False)
    z = d["logits"].clone()
    z[0, 1, 3] = math.nan  # valid row
    z[1, 2, :] = math.nan  # masked row
    mask = torch.ones(2, 4, device=DEVICE)
    mask[1, 2] = 0
    z.requires_grad_(True)
    out = grpo_loss(
        z,
        d["ids"],
        d["adv"],
        mask=mask,
        old_logprobs=d["old"],
        ref_logprobs=d["ref"],
        beta=0.1,
        return_entropy=True,
        backend="triton",
    )
    assert math.isnan(out.loss.item())
    assert all(math.isnan(x[0, 1].item()) for x in (out.logprobs, out.entropy.detach(), out.per_token_loss))
    others = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    others[0, 1] = False
    assert torch.isfinite(out.logprobs[others]).all() and torch.isfinite(out.per_token_loss[others]).all()
    (out.loss + out.entropy.sum()).backward()
    assert torch.isnan(z.grad[0, 1]).all()
    assert torch.equal(z.grad[1, 2], torch.zeros_like(z.grad[1, 2]))
    assert torch.isfinite(z.grad[1]).all()


def test_minus_inf_vocabulary_in_the_fused_loss():
    d = make_batch(2, 3, 40, seed=16, masked_tail=False, empty_row=False)
    z = d["logits"].clone()
    z[..., 1::2] = -math.inf
    z[..., :16] = -math.inf  # a whole first block of -inf at small block sizes
    d["ids"] = 16 + (d["ids"] // 2) * 2 % 24
    d["logits"] = z
    zt = z.clone().requires_grad_(True)
    out, grad = _compare(d, zt, z.double().requires_grad_(True), entropy_weight=-0.01, old_logprobs=d["old"])
    assert torch.isfinite(out.entropy).all() and torch.isfinite(grad).all()


# ----------------------------------------------------------------------------------------------------------------
# launch helpers at sizes the interpreter cannot run
# ----------------------------------------------------------------------------------------------------------------
def test_vocab_tiling():
    assert common.vocab_tiling(151936, 2) == (8192, 8)  # 16 KiB per step: 8 warps x 4 x 16-byte vectors
    assert common.vocab_tiling(262144, 4) == (4096, 8)
    assert common.vocab_tiling(1000, 2) == (1024, 4)
    assert common.vocab_tiling(7, 2) == (8, 1) and common.vocab_tiling(1, 4) == (1, 1)


def test_grids_have_no_65535_limit_on_tokens():
    rows = 16 * 65536 + 3  # T >= 65536 (Liger's grid puts tokens on axis y and stops at 65535)
    assert common.row_grid(rows) == (rows,)
    assert common.row_block_grid(rows, 262144, 8192) == (rows, 32)
    with pytest.raises(ValueError, match="grid limit"):
        common.row_grid(2**31)
    with pytest.raises(ValueError, match="axis y"):
        common.row_block_grid(4, 65536 * 16 + 1, 16)


@triton.jit
def _row_offsets_kernel(rows_ptr, out_ptr, n, seq_len, stride_b, stride_t, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    rows = tl.load(rows_ptr + i, mask=i < n)  # int32, as tl.program_id
    tl.store(out_ptr + i, common.row_offset(rows, seq_len, stride_b, stride_t), mask=i < n)


@pytest.mark.parametrize("batch,seq,vocab,pad", [(4, 16384, 151936, 1), (2, 70000, 262144, 0), (1, 300000, 7, 5)])
def test_row_offsets_are_64_bit(batch, seq, vocab, pad):
    """Offsets of rows of a [B, T, V] view with T + pad rows per sequence in memory: N * V > 2^31 for the first two."""
    stride_t, stride_b = vocab, (seq + pad) * vocab
    rows = torch.tensor([0, 1, seq - 1, seq, batch * seq - 1, (batch * seq) // 2 + 7], dtype=torch.int32)
    expect = [(r // seq) * stride_b + (r % seq) * stride_t for r in rows.tolist()]
    out = torch.zeros(len(expect), dtype=torch.int64, device=DEVICE)
    _row_offsets_kernel[(1,)](rows.to(DEVICE), out, len(expect), seq, stride_b, stride_t, BLOCK=8)
    assert out.tolist() == expect


# ----------------------------------------------------------------------------------------------------------------
# compile-time modes vs runtime hyper-parameters; determinism; availability
# ----------------------------------------------------------------------------------------------------------------
HYPER_PARAMETERS = {
    "inv_temperature",
    "beta",
    "clip_low",
    "clip_high",
    "eps_high",
    "delta",
    "dual_clip",
    "sapo_pos",
    "sapo_neg",
    "eps",
}


def _kernels():
    return [
        logprobs._token_logprobs_fwd_kernel,
        logprobs._token_logprobs_bwd_kernel,
        fused._grpo_loss_fwd_kernel,
        advantages._group_advantages_kernel,
        advantages._batch_scale_kernel,
    ]


def _compiled_variants(kernel) -> int:
    return sum(len(entry[0]) for entry in kernel.device_caches.values())


def test_float_hyper_parameters_are_runtime_arguments():
    for kernel in _kernels():
        params = inspect.signature(kernel.fn).parameters
        constexpr = {name for name, p in params.items() if "constexpr" in str(p.annotation)}
        assert not constexpr & HYPER_PARAMETERS, kernel.fn.__name__
        assert all(name.isupper() for name in constexpr), kernel.fn.__name__  # only modes and tile sizes
    assert {n for k in _kernels() for n in inspect.signature(k.fn).parameters} >= HYPER_PARAMETERS
    if DEVICE.type != "cuda":
        return  # the interpreter compiles nothing; on a GPU, count the compiled variants too
    d = make_batch(2, 4, 64, seed=17)
    kernel = fused._grpo_loss_fwd_kernel
    runs = [dict(beta=0.04, epsilon_low=0.2), dict(beta=0.3, epsilon_low=0.1, epsilon_high=0.4, temperature=0.6)]
    counts = []
    for kw in runs:
        grpo_loss(
            d["logits"],
            d["ids"],
            d["adv"],
            mask=d["mask"],
            old_logprobs=d["old"],
            ref_logprobs=d["ref"],
            backend="triton",
            **kw,
        )
        counts.append(_compiled_variants(kernel))
    assert counts[0] == counts[1]


def test_bitwise_deterministic():
    d = make_batch(3, 5, 700, dtype=torch.bfloat16, seed=18)
    runs = []
    for _ in range(2):
        z = d["logits"].clone().requires_grad_(True)
        out = grpo_loss(
            z,
            d["ids"],
            d["adv"],
            mask=d["mask"],
            old_logprobs=d["old"],
            ref_logprobs=d["ref"],
            beta=0.1,
            return_entropy=True,
            backend="triton",
        )
        (out.loss - 0.01 * out.entropy.sum()).backward()
        r = torch.randn(40, 3, generator=torch.Generator().manual_seed(5)).to(DEVICE)
        adv = group_advantages(
            r, group_ids=torch.arange(40, device=DEVICE) % 7, multi_reward="normalize_then_sum", backend="triton"
        )
        runs.append((out.loss, out.logprobs, out.entropy, out.per_token_loss, z.grad, adv))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_unavailable_reason():
    assert BACKEND.unavailable_reason(DEVICE) is None
    assert "CUDA" in BACKEND.unavailable_reason(torch.device("meta"))
