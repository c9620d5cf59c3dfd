"""grpo_loss(kl_estimator="exact", ref_logits=...) and its fused-linear form: the exact KL(p||q) over the vocabulary
as the KL term, against the float64 reference (reference.grpo_loss with ref_logits) and
torch.distributions.kl_divergence; every loss type and IS level, masks, packed input, several tiles, -inf and
near-one-hot rows, gradcheck, torch.compile, bad inputs.

The Triton backend runs through its interpreter on the CPU (conftest): shapes stay small there."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, backend_params
from helpers import low_precision_ok, make_batch, rel_err

from grpo_kernels import GRPOLoss, LossConfig, grpo_loss
from grpo_kernels import reference as ref
from grpo_kernels.config import LOSS_TYPES, OWN_RATIO_LOSS_TYPES
from grpo_kernels.fused_linear import FusedLinearGRPOLoss, fused_linear_grpo_loss

METRICS = ["kl_mean", "clip_low", "clip_high", "clip_region", "entropy_mean", "logprob_mean"]
CASES = [(t, "token") for t in LOSS_TYPES] + [(t, "sequence") for t in LOSS_TYPES if t not in OWN_RATIO_LOSS_TYPES]


@pytest.fixture(params=backend_params(("torch", "triton")))
def backend(request):
    """The backends with divergence kernels (the CUDA backend raises: test_cuda_backend_raises_not_implemented)."""
    return request.param


def _ref_logits(logits: torch.Tensor, seed: int, dtype=None, spread: float = 1.0) -> torch.Tensor:
    """Reference logits near the policy's (moderate KLs, ratios near the clip range), never equal to them."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(logits.shape, generator=g, dtype=torch.float64) * spread
    return (0.9 * logits.detach().cpu().double() + noise).to(dtype or logits.dtype).to(logits.device)


def _call(fn, d, z, zr, loss_type="dapo", level="token", **kw):
    kw.setdefault("beta", 0.1)
    return fn(
        z,
        d["ids"],
        d["adv"],
        mask=d["mask"],
        old_logprobs=d["old"],
        ref_logits=zr,
        kl_estimator="exact",
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=7,
        **kw,
    )


def _check_against_reference(out, expect, z, z64, tol=1e-5):
    (grad,) = torch.autograd.grad(out.loss, z)
    (grad64,) = torch.autograd.grad(expect.loss, z64)
    # the loss relative to its terms' size: the policy and KL terms may nearly cancel in the sum
    scale = max(abs(expect.loss.item()), expect.per_token_loss.abs().max().item())
    assert abs(out.loss.item() - expect.loss.item()) < tol * scale
    assert rel_err(out.per_token_loss, expect.per_token_loss) < tol
    assert rel_err(out.logprobs, expect.logprobs) < tol
    assert rel_err(grad, grad64) < tol
    for key in METRICS:
        if getattr(out, key) is not None:
            assert abs(getattr(out, key).item() - getattr(expect, key).item()) < tol, key
    return grad


# ----------------------------------------------------------------------------------------------------------------
# values, metrics and gradients against the float64 reference
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,level", CASES, ids=[f"{t}-{lv}" for t, lv in CASES])
def test_matches_reference_every_loss_type_and_level(backend, loss_type, level, poisoned):
    d = make_batch(3, 6, 37, seed=len(loss_type) * 7 + len(level))
    zr = _ref_logits(d["logits"], seed=1)
    z = d["logits"].clone().requires_grad_(True)
    out = _call(grpo_loss, d, z, zr, loss_type, level, temperature=0.8, return_entropy=True, backend=backend)
    z64 = d["logits"].double().requires_grad_(True)
    expect = _call(ref.grpo_loss, d, z64, zr.double(), loss_type, level, temperature=0.8)
    assert out.kl_mean > 0.05  # the KL term is really there
    _check_against_reference(out, expect, z, z64)
    assert rel_err(out.entropy, expect.entropy) < 1e-5


@pytest.mark.parametrize("beta", [1e-3, 0.5, 4.0])
@pytest.mark.parametrize("aggregation", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_beta_and_aggregation(backend, beta, aggregation):
    d = make_batch(3, 5, 29, seed=int(beta * 100) + len(aggregation))
    zr = _ref_logits(d["logits"], seed=2)
    z = d["logits"].clone().requires_grad_(True)
    out = _call(grpo_loss, d, z, zr, "grpo", beta=beta, aggregation=aggregation, backend=backend)
    z64 = d["logits"].double().requires_grad_(True)
    _check_against_reference(
        out, _call(ref.grpo_loss, d, z64, zr.double(), "grpo", beta=beta, aggregation=aggregation), z, z64
    )


def test_kl_equals_torch_distributions(backend):
    """Zero advantages leave L_t = beta KL_t: per-token loss / beta is torch.distributions' KL at every position."""
    d = make_batch(2, 5, 23, seed=5)
    zr = _ref_logits(d["logits"], seed=6, spread=2.0)
    tau, beta = 0.7, 0.3
    out = grpo_loss(
        d["logits"],
        d["ids"],
        torch.zeros(2, device=DEVICE),
        mask=d["mask"],
        ref_logits=zr,
        kl_estimator="exact",
        beta=beta,
        temperature=tau,
        backend=backend,
    )
    p = torch.distributions.Categorical(logits=d["logits"].double() / tau)
    q = torch.distributions.Categorical(logits=zr.double() / tau)
    kl = torch.distributions.kl_divergence(p, q) * (d["mask"] != 0)
    assert rel_err(out.per_token_loss / beta, kl) < 1e-5
    assert abs(out.kl_mean.item() - float(kl.sum() / d["mask"].sum())) < 1e-5


def test_beta_zero_reads_no_reference(backend):
    """beta = 0: no KL term, ref_logits not needed (and not read: NaN in them changes nothing), kl_mean 0."""
    d = make_batch(2, 4, 19, seed=7)
    base = grpo_loss(d["logits"], d["ids"], d["adv"], mask=d["mask"], old_logprobs=d["old"], backend=backend)
    for zr in (None, torch.full_like(d["logits"], math.nan)):
        out = grpo_loss(
            d["logits"],
            d["ids"],
            d["adv"],
            mask=d["mask"],
            old_logprobs=d["old"],
            ref_logits=zr,
            kl_estimator="exact",
            backend=backend,
        )
        assert torch.equal(out.loss, base.loss) and out.kl_mean == 0


# ----------------------------------------------------------------------------------------------------------------
# dtypes, masks, layouts, tiles
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,ref_dtype",
    [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32)],
    ids=["fp32-bf16ref", "fp32-fp16ref", "bf16-fp32ref"],
)
def test_ref_logits_in_another_dtype(backend, dtype, ref_dtype):
    """The reference rows are read in their own dtype (exact values of the rounded inputs, computed in float32)."""
    d = make_batch(3, 5, 41, dtype=dtype, seed=8)
    zr = _ref_logits(d["logits"], seed=9, dtype=ref_dtype)
    z = d["logits"].clone().requires_grad_(True)
    out = _call(grpo_loss, d, z, zr, "grpo", "sequence", backend=backend)
    z64 = d["logits"].double().requires_grad_(True)
    expect = _call(ref.grpo_loss, d, z64, zr.double(), "grpo", "sequence")
    (grad,) = torch.autograd.grad(out.loss, z)
    (grad64,) = torch.autograd.grad(expect.loss, z64)
    assert grad.dtype == dtype
    assert rel_err(out.loss, expect.loss) < 1e-5 and rel_err(out.per_token_loss, expect.per_token_loss) < 1e-5
    if dtype == torch.float32:
        assert rel_err(grad, grad64) < 1e-5
    else:  # the gradient is stored in bf16: the rule of helpers.low_precision_ok against eager PyTorch in bf16
        ze = d["logits"].clone().requires_grad_(True)
        eager = _call(ref.grpo_loss, d, ze, zr, "grpo", "sequence", compute_in=dtype)
        (grad_e,) = torch.autograd.grad(eager.loss, ze)
        assert low_precision_ok(rel_err(grad, grad64), rel_err(grad_e, grad64), floor=1e-3)


def test_positions_that_do_not_take_part_are_never_read(backend):
    """NaN in the reference (and policy) rows of masked positions and of ignore_index ids changes nothing."""
    d = make_batch(3, 6, 31, seed=10)
    zr = _ref_logits(d["logits"], seed=11)
    ids = d["ids"].clone()
    ids[0, 0] = -100
    keep = (d["mask"] != 0) & (ids != -100)
    z_bad, zr_bad = d["logits"].clone(), zr.clone()
    z_bad[~keep], zr_bad[~keep] = math.nan, math.nan
    runs = []
    for z_in, zr_in in ((d["logits"], zr), (z_bad, zr_bad)):
        z = z_in.clone().requires_grad_(True)
        out = grpo_loss(
            z,
            ids,
            d["adv"],
            mask=d["mask"],
            old_logprobs=d["old"],
            ref_logits=zr_in,
            kl_estimator="exact",
            beta=0.2,
            backend=backend,
        )
        runs.append((out.loss, *torch.autograd.grad(out.loss, z)))
    assert torch.isfinite(runs[1][0]) and torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1][keep], runs[1][1][keep]) and (runs[1][1][~keep] == 0).all()


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_packed_cu_seqlens_matches_padded(backend, level):
    d = make_batch(3, 6, 29, seed=12, empty_row=False)
    zr = _ref_logits(d["logits"], seed=13)
    lengths = d["mask"].sum(1).long().tolist()
    keep = d["mask"] != 0
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    z = d["logits"].clone().requires_grad_(True)
    padded = _call(grpo_loss, d, z, zr, "grpo", level, backend=backend)
    zp = d["logits"][keep].clone().requires_grad_(True)
    packed = grpo_loss(
        zp,
        d["ids"][keep],
        d["adv"],
        old_logprobs=d["old"][keep],
        ref_logits=zr[keep],
        cu_seqlens=cu,
        kl_estimator="exact",
        beta=0.1,
        loss_type="grpo",
        importance_sampling_level=level,
        backend=backend,
    )
    assert rel_err(packed.loss, padded.loss) < 1e-6 and rel_err(packed.kl_mean, padded.kl_mean) < 1e-6
    (g_pad,), (g_pack,) = torch.autograd.grad(padded.loss, z), torch.autograd.grad(packed.loss, zp)
    assert rel_err(g_pack, g_pad[keep]) < 1e-6


def test_vocabulary_of_several_tiles(backend, monkeypatch):
    """Tiles smaller than V, the last one partial (Triton: 16-entry steps over V = 37; torch: blocks of 2 rows), with
    the row maxima in the last and first tiles. Logits of ~12 make the KL's terms cancel in float32, so the rule is
    twice eager PyTorch's float32 error (the reference on float32 inputs) plus 1e-6."""
    from grpo_kernels.backends.torch import divergence as torch_divergence
    from grpo_kernels.backends.triton import divergence as triton_divergence

    monkeypatch.setattr(torch_divergence, "_BUFFER_BYTES", 2 * 4 * 37)
    monkeypatch.setattr(triton_divergence, "_tiling", lambda vocab, forward_jsd=False: (16, 1))
    d = make_batch(2, 5, 37, seed=14, masked_tail=False, empty_row=False)
    d["logits"][0, 0, -2:] += 12  # the policy's maximum in the last, partial tile
    zr = _ref_logits(d["logits"], seed=15)
    zr[0, 1, :3] += 12  # the reference's in the first
    z = d["logits"].clone().requires_grad_(True)
    out = _call(grpo_loss, d, z, zr, "bnpo", temperature=0.9, backend=backend)
    z64, z32 = d["logits"].double().requires_grad_(True), d["logits"].clone().requires_grad_(True)
    expect = _call(ref.grpo_loss, d, z64, zr.double(), "bnpo", temperature=0.9)
    eager = _call(ref.grpo_loss, d, z32, zr, "bnpo", temperature=0.9)
    grads = [torch.autograd.grad(o.loss, x)[0] for o, x in ((out, z), (expect, z64), (eager, z32))]
    for key in ("loss", "per_token_loss", "kl_mean"):
        ours, theirs = getattr(out, key), getattr(eager, key)
        assert low_precision_ok(rel_err(ours, getattr(expect, key)), rel_err(theirs, getattr(expect, key))), key
    assert low_precision_ok(rel_err(grads[0], grads[1]), rel_err(grads[2], grads[1]))


# ----------------------------------------------------------------------------------------------------------------
# -inf and near-one-hot rows
# ----------------------------------------------------------------------------------------------------------------
def test_zero_reference_mass_under_positive_policy_mass_is_inf_not_nan(backend):
    """q_v = 0 (a -inf reference logit) where p_v > 0: KL = +inf at that position, so the loss and kl_mean are +inf
    (not NaN); that row's gradient is NaN (the infinite term moves with the logits), every other row's is exact.
    Masked, the same row changes nothing."""
    d = make_batch(2, 3, 20, seed=16, masked_tail=False, empty_row=False)
    zr = _ref_logits(d["logits"], seed=17)
    zr[..., ::5] = -math.inf
    d["logits"][..., ::5] = -math.inf  # both -inf: a masked-out vocabulary entry, contributes 0
    d["ids"] = d["ids"] // 5 * 5 + 1
    zr[0, 1, 3] = -math.inf  # the one row with q = 0 where p > 0
    z = d["logits"].clone().requires_grad_(True)
    out = _call(grpo_loss, d, z, zr, "dapo", backend=backend)
    assert out.loss == math.inf and out.kl_mean == math.inf and out.per_token_loss[0, 1] == math.inf
    assert torch.isfinite(out.per_token_loss[d["mask"] != 0].flatten()[[0, 2, 3, 4, 5]]).all()
    (grad,) = torch.autograd.grad(out.loss, z)
    assert torch.isnan(grad[0, 1]).all()
    others = torch.ones(2, 3, dtype=torch.bool)
    others[0, 1] = False
    mask = d["mask"].clone()
    mask[0, 1] = 0
    z64 = d["logits"].double().requires_grad_(True)
    expect = ref.grpo_loss(
        z64,
        d["ids"],
        d["adv"],
        mask=mask,
        old_logprobs=d["old"],
        ref_logits=zr.double(),
        beta=0.1,
        kl_estimator="exact",
        num_items_in_batch=6,
    )
    (g64,) = torch.autograd.grad(expect.loss, z64)
    assert rel_err(grad[others], g64[others]) < 1e-5  # the loss divides by all 6 tokens: the same scale
    d["mask"] = mask
    z2 = d["logits"].clone().requires_grad_(True)
    masked = _call(grpo_loss, d, z2, zr, "dapo", backend=backend)
    assert torch.isfinite(masked.loss) and torch.isfinite(torch.autograd.grad(masked.loss, z2)[0]).all()


def test_near_one_hot_rows(backend):
    """One distribution nearly one-hot (log-probs down to -1e4, finite in float32): KLs up to ~1e4, finite, within
    twice the error of eager PyTorch in float32."""
    g = torch.Generator().manual_seed(18)
    z = torch.randn(1, 4, 300, generator=g) * 2
    zr = torch.randn(1, 4, 300, generator=g) * 2
    zr[0, 0, 7] += 40  # q ~ one-hot
    z[0, 1, 9] += 40  # p ~ one-hot
    zr[0, 2] = -1e4
    zr[0, 2, 0] = 0.0  # q one-hot to float32 precision
    z[0, 3] = -1e4
    z[0, 3, 1] = 0.0
    d = dict(
        ids=torch.tensor([[7, 9, 3, 1]], device=DEVICE),
        adv=torch.tensor([0.5], device=DEVICE),
        mask=torch.ones(1, 4, device=DEVICE),
        old=torch.full((1, 4), -1.0, device=DEVICE),
    )
    z, zr = z.to(DEVICE), zr.to(DEVICE)
    zz = z.clone().requires_grad_(True)
    out = _call(grpo_loss, d, zz, zr, "grpo", beta=0.05, backend=backend)
    assert torch.isfinite(out.per_token_loss).all() and out.kl_mean > 1e3
    z64, z32 = z.double().requires_grad_(True), z.clone().requires_grad_(True)
    expect = _call(ref.grpo_loss, d, z64, zr.double(), "grpo", beta=0.05)
    eager = _call(ref.grpo_loss, d, z32, zr, "grpo", beta=0.05)
    grads = [torch.autograd.grad(o.loss, x)[0] for o, x in ((out, zz), (expect, z64), (eager, z32))]
    assert low_precision_ok(
        rel_err(out.per_token_loss, expect.per_token_loss), rel_err(eager.per_token_loss, expect.per_token_loss)
    )
    assert low_precision_ok(rel_err(grads[0], grads[1]), rel_err(grads[2], grads[1]))


# ----------------------------------------------------------------------------------------------------------------
# autograd modes, compile, module
# ----------------------------------------------------------------------------------------------------------------
def test_gradcheck_float64_torch_backend():
    d = make_batch(2, 4, 6, dtype=torch.float64, seed=19)
    zr = _ref_logits(d["logits"], seed=20)
    # (not vespo / geo_mean: their weights are detached as TRL's / verl's are, so the gradient is not the derivative)
    for loss_type, level in (("grpo", "sequence"), ("dapo", "token"), ("sapo", "token"), ("cispo", "token")):

        def f(x):
            out = grpo_loss(
                x,
                d["ids"],
                d["adv"].double(),
                mask=d["mask"],
                old_logprobs=d["old"],
                ref_logits=zr,
                kl_estimator="exact",
                beta=0.3,
                temperature=0.9,
                loss_type=loss_type,  # noqa: B023
                importance_sampling_level=level,  # noqa: B023
                return_entropy=True,
                backend="torch",
            )  # noqa: B023
            return out.loss, out.entropy

        assert torch.autograd.gradcheck(f, (d["logits"].clone().requires_grad_(True),))


def test_entropy_gradient_and_inplace_backward(backend):
    """A loss through the returned entropy (its own term in the backward) and inplace_backward (the gradient over
    the logits' buffer): the reference's gradient, and the in-place one equal to the out-of-place one."""
    d = make_batch(2, 5, 27, seed=21)
    zr = _ref_logits(d["logits"], seed=22)
    z64 = d["logits"].double().requires_grad_(True)
    expect = _call(ref.grpo_loss, d, z64, zr.double(), "grpo")
    (g64,) = torch.autograd.grad(expect.loss + 0.3 * expect.entropy.sum(), z64)
    grads = {}
    for inplace, with_entropy in ((False, True), (True, True), (False, False), (True, False)):
        leaf = d["logits"].clone().requires_grad_(True)
        z = leaf * 1.0  # a non-leaf, as a model's output
        out = _call(grpo_loss, d, z, zr, "grpo", return_entropy=True, inplace_backward=inplace, backend=backend)
        loss = out.loss + 0.3 * out.entropy.sum() if with_entropy else out.loss
        loss.backward()
        grads[inplace, with_entropy] = leaf.grad
    assert rel_err(grads[False, True], g64) < 1e-5
    assert torch.equal(grads[True, True], grads[False, True]) and torch.equal(grads[True, False], grads[False, False])


def test_torch_compile_fullgraph(backend):
    d = make_batch(2, 5, 40, seed=23)
    zr = _ref_logits(d["logits"], seed=24, dtype=torch.bfloat16)

    def step(z, zr, ids, adv, mask, old):
        out = grpo_loss(
            z,
            ids,
            adv,
            mask=mask,
            old_logprobs=old,
            ref_logits=zr,
            kl_estimator="exact",
            beta=0.1,
            temperature=0.8,
            loss_type="grpo",
            backend=backend,
        )
        return out.loss, out.kl_mean

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z1, z2 = (d["logits"].clone().requires_grad_(True) for _ in range(2))
    args = (d["ids"], d["adv"], d["mask"], d["old"])
    (loss_c, kl_c), (loss_e, kl_e) = compiled(z1, zr, *args), step(z2, zr, *args)
    assert torch.equal(loss_c, loss_e) and torch.equal(kl_c, kl_e)
    loss_c.backward()
    loss_e.backward()
    assert torch.equal(z1.grad, z2.grad)


def test_module_and_no_gradient_to_ref_logits(backend):
    d = make_batch(2, 4, 17, seed=25)
    zr = _ref_logits(d["logits"], seed=26).requires_grad_(True)
    z = d["logits"].clone().requires_grad_(True)
    module = GRPOLoss(kl_estimator="exact", beta=0.1, loss_type="grpo", backend=backend)
    out = module(z, d["ids"], d["adv"], mask=d["mask"], old_logprobs=d["old"], ref_logits=zr)
    expect = _call(grpo_loss, d, d["logits"].clone().requires_grad_(True), zr, "grpo", backend=backend)
    assert torch.equal(out.loss, expect.loss)
    out.loss.backward()
    assert zr.grad is None and z.grad is not None


# ----------------------------------------------------------------------------------------------------------------
# fused-linear: equal to the logits path on the materialised logits
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loss_type,level,chunk", [("dapo", "token", 4), ("grpo", "sequence", 3), ("vespo", "token", 64)]
)
def test_fused_linear_equals_logits_path(backend, loss_type, level, chunk):
    """Hidden states + heads (the reference's hidden size differs), tiles of `chunk` tokens (sequence level with
    sequences longer than a tile: the two-pass path); the gradients of hidden and weight equal the logits path's
    (float64 here, so that the comparison is exact up to rounding), none reaches ref_hidden / ref_weight."""
    if backend != "torch":
        pytest.skip("float64 hidden states run on the torch backend; the triton variant is the float32 test below")
    g = torch.Generator().manual_seed(27)
    b, t, h, h_ref, v = 3, 5, 8, 6, 23
    hidden, weight = (
        torch.randn(b, t, h, generator=g, dtype=torch.float64),
        torch.randn(v, h, generator=g, dtype=torch.float64),
    )
    ref_hidden = torch.randn(b, t, h_ref, generator=g, dtype=torch.float64).requires_grad_(True)
    ref_weight = torch.randn(v, h_ref, generator=g, dtype=torch.float64).requires_grad_(True)
    d = make_batch(b, t, v, seed=28)
    kw = dict(
        mask=d["mask"],
        old_logprobs=d["old"].double(),
        kl_estimator="exact",
        beta=0.2,
        loss_type=loss_type,
        importance_sampling_level=level,
        temperature=0.9,
        backend=backend,
    )
    h1, w1, h2, w2 = (x.clone().requires_grad_(True) for x in (hidden, weight, hidden, weight))
    fused = fused_linear_grpo_loss(
        h1,
        w1,
        d["ids"],
        d["adv"],
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        chunk_tokens=chunk,
        return_entropy=True,
        **kw,
    )
    logits = grpo_loss(h2 @ w2.T, d["ids"], d["adv"], ref_logits=ref_hidden @ ref_weight.T, return_entropy=True, **kw)
    fused.loss.backward()
    logits.loss.backward()
    for key in ("loss", "per_token_loss", "logprobs", "entropy", "kl_mean", "clip_region"):
        assert rel_err(getattr(fused, key), getattr(logits, key)) < 1e-12, key
    assert rel_err(h1.grad, h2.grad) < 1e-12 and rel_err(w1.grad, w2.grad) < 1e-12
    assert ref_hidden.grad is None and ref_weight.grad is None


def test_fused_linear_float32_against_reference(backend):
    g = torch.Generator().manual_seed(29)
    b, t, h, v = 2, 4, 8, 30
    hidden, weight = torch.randn(b, t, h, generator=g), torch.randn(v, h, generator=g)
    ref_hidden, ref_weight = torch.randn(b, t, h, generator=g), torch.randn(v, h, generator=g) * 0.5
    d = make_batch(b, t, v, seed=30)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    module = FusedLinearGRPOLoss(
        kl_estimator="exact", beta=0.1, loss_type="grpo", chunk_tokens=3, backend=backend, entropy_coef=0.01
    )
    out = module(
        h1, w1, d["ids"], d["adv"], mask=d["mask"], old_logprobs=d["old"], ref_hidden=ref_hidden, ref_weight=ref_weight
    )
    out.loss.backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    zr = (ref_hidden.double() @ ref_weight.double().T).detach()
    expect = ref.grpo_loss(
        h64 @ w64.T,
        d["ids"],
        d["adv"],
        mask=d["mask"],
        old_logprobs=d["old"],
        ref_logits=zr,
        kl_estimator="exact",
        beta=0.1,
        loss_type="grpo",
    )
    m = d["mask"].double()
    per_seq = (expect.entropy * m).sum(1) / m.sum(1).clamp(min=1)
    (expect.loss - 0.01 * per_seq.mean()).backward()
    assert rel_err(out.loss, expect.loss - 0.01 * per_seq.mean()) < 1e-5
    assert rel_err(out.per_token_loss, expect.per_token_loss) < 1e-5
    assert rel_err(h1.grad, h64.grad) < 1e-4 and rel_err(w1.grad, w64.grad) < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------
def _bad_calls():
    z, zr = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    ids, adv, lp = torch.randint(0, 5, (2, 3)), torch.randn(2), torch.randn(2, 3)
    exact = dict(kl_estimator="exact", beta=0.1)
    hid, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    return [
        ("ref_logits", ValueError, lambda: grpo_loss(z, ids, adv, **exact)),
        ("ref_logits", ValueError, lambda: grpo_loss(z, ids, adv, ref_logits=zr[:, :2], **exact)),
        ("ref_logits", ValueError, lambda: grpo_loss(z, ids, adv, ref_logits=zr.to("meta"), **exact)),
        ("ref_logits", TypeError, lambda: grpo_loss(z, ids, adv, ref_logits=zr.long(), **exact)),
        ("ref_logits", TypeError, lambda: grpo_loss(z, ids, adv, ref_logits=zr.double(), **exact)),
        (
            "ref_logits",
            ValueError,
            lambda: grpo_loss(z, ids, adv, ref_logits=zr.transpose(1, 2).contiguous().transpose(1, 2), **exact),
        ),
        ("ref_logits", ValueError, lambda: grpo_loss(z, ids, adv, ref_logits=zr, ref_logprobs=lp, beta=0.1)),
        ("ref_logprobs", ValueError, lambda: grpo_loss(z, ids, adv, ref_logits=zr, ref_logprobs=lp, **exact)),
        (
            "grad_in_forward",
            ValueError,
            lambda: grpo_loss(z.requires_grad_(True), ids, adv, ref_logits=zr, grad_in_forward=True, **exact),
        ),
        (
            "bias_corrected_kl",
            ValueError,
            lambda: grpo_loss(z, ids, adv, ref_logits=zr, bias_corrected_kl=True, **exact),
        ),
        ("bias_corrected_kl", ValueError, lambda: LossConfig(kl_estimator="exact", bias_corrected_kl=True)),
        ("kl_estimator", ValueError, lambda: grpo_loss(z, ids, adv, kl_estimator="full")),
        ("ref_hidden", ValueError, lambda: fused_linear_grpo_loss(hid, w, ids, adv, **exact)),
        ("ref_hidden", ValueError, lambda: fused_linear_grpo_loss(hid, w, ids, adv, ref_hidden=hid, beta=0.1)),
        ("ref_weight", ValueError, lambda: fused_linear_grpo_loss(hid, w, ids, adv, ref_hidden=hid, **exact)),
        (
            "ref_weight",
            ValueError,
            lambda: fused_linear_grpo_loss(hid, w, ids, adv, ref_hidden=hid, ref_weight=w[:4], **exact),
        ),
        (
            "ref_hidden",
            ValueError,
            lambda: fused_linear_grpo_loss(hid, w, ids, adv, ref_hidden=hid[:, :2], ref_weight=w, **exact),
        ),
        (
            "ref_logprobs",
            ValueError,
            lambda: fused_linear_grpo_loss(hid, w, ids, adv, ref_hidden=hid, ref_weight=w, ref_logprobs=lp, **exact),
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    name, error, call = _bad_calls()[case]
    with pytest.raises(error, match=name):
        call()


def test_cuda_backend_raises_not_implemented():
    from grpo_kernels.backends.cuda import BACKEND

    with pytest.raises(NotImplementedError, match="kl_estimator='exact'"):
        BACKEND.grpo_loss_exact_kl_forward(None, None, None, LossConfig(kl_estimator="exact", beta=0.1), False)


# ----------------------------------------------------------------------------------------------------------------
# the trainer: grpo-train --kl-estimator exact
# ----------------------------------------------------------------------------------------------------------------
def test_trainer_step_with_exact_kl_matches_reference(tmp_path):
    """The trainer passes the frozen reference's logits (no ref log-probs); its loss and gradient equal the float64
    reference's on the same logits (the reference copy perturbed first: at GRPO's start it equals the policy)."""
    from grpo_kernels.trainer.loop import Trainer
    from tests.trainer_helpers import tiny_config

    trainer = Trainer(tiny_config(tmp_path, sft_steps=0, beta=0.2, kl_estimator="exact", loss_type="grpo"))
    trainer._begin_grpo()
    g = torch.Generator().manual_seed(31)
    with torch.no_grad():
        for p in trainer.ref_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    (batch,) = trainer.rollout_step_batches()
    assert batch.ref_logprobs is None
    items = float(batch.rollout.completion_mask.sum())
    out = trainer.policy_loss(batch, items)
    out.loss.backward()
    ours = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad(set_to_none=True)
    logits = trainer._completion_logits(trainer.model, batch.rollout).double()
    expect = ref.grpo_loss(
        logits,
        batch.rollout.completion_ids,
        batch.advantages.double(),
        mask=batch.rollout.completion_mask,
        ref_logits=trainer._ref_logits(batch.rollout).double(),
        beta=0.2,
        kl_estimator="exact",
        loss_type="grpo",
        temperature=trainer.cfg.temperature,
    )
    expect.loss.backward()
    assert out.kl_mean > 1e-3 and abs(out.kl_mean.item() - expect.kl_mean.item()) < 1e-5
    assert rel_err(out.loss, expect.loss) < 1e-5
    for ours_g, p in zip(ours, trainer.model.parameters()):
        assert rel_err(ours_g, p.grad) < 1e-4


def test_grpo_train_cli_kl_estimator_exact_logs_the_kl(tmp_path):
    """grpo-train --kl-estimator exact --beta 0.1: runs, and the metrics log the (exact) KL of every GRPO step: 0 at
    the first (the reference is the policy then), positive once the policy has moved."""
    from grpo_kernels.trainer.cli import main
    from grpo_kernels.trainer.metrics import read_metrics
    from tests.trainer_helpers import tiny_cli_args

    out = tmp_path / "run"
    args = tiny_cli_args(out, sft_steps=0, steps=3, beta=0.1, kl_estimator="exact", lr=1e-2)
    assert main(args) == 0
    kls = [r["kl"] for r in read_metrics(out / "metrics.jsonl") if "kl" in r]
    assert len(kls) == 3 and abs(kls[0]) < 1e-6 and kls[-1] > 0


def test_exact_kl_on_a_vocabulary_shard_is_refused(tmp_path):
    """The exact KL is not implemented over a vocabulary shard: both entry points say so (a one-rank gloo group)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        b, t, v, h = 2, 3, 11, 4
        logits = torch.randn(b, t, v)
        ids = torch.randint(0, v, (b, t))
        adv = torch.randn(b)
        with pytest.raises(NotImplementedError, match="ref_logits.*vocab_parallel_group"):
            grpo_loss(
                logits, ids, adv, kl_estimator="exact", beta=0.04, ref_logits=logits.clone(), vocab_parallel_group=group
            )
        hidden, weight = torch.randn(b, t, h), torch.randn(v, h)
        with pytest.raises(NotImplementedError, match="ref_hidden.*vocab_parallel_group"):
            fused_linear_grpo_loss(
                hidden,
                weight,
                ids,
                adv,
                kl_estimator="exact",
                beta=0.04,
                ref_hidden=hidden.clone(),
                ref_weight=weight.clone(),
                vocab_parallel_group=group,
            )
    finally:
        dist.destroy_process_group()
