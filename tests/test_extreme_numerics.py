"""Extreme but finite numerics on every backend, against reference.py in float64: huge logits in bf16/fp16, masked
vocabularies, one-hot / flat rows, extreme temperatures, log-ratios far beyond the clip range, equal rewards and
all-masked batches. Tolerances are the project's (tests/helpers.py): float32 within 1e-5 of float64, low precision
within 2x the error of eager PyTorch in the same dtype; where a value is NaN/inf by definition, that is asserted."""

import math

import pytest
import torch
from conftest import DEVICE
from helpers import low_precision_ok, make_batch, rel_err
from reliability_helpers import INTERPRETED, assert_matches, grad_of

from grpo_kernels import group_advantages, grpo_loss, token_logprobs
from grpo_kernels import reference as ref

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
LOW = [torch.bfloat16, torch.float16]
ULP32 = 2.0**-23  # float32 spacing relative to the value


def _randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _logprobs_three_ways(backend, z, ids, **kw):
    """(ours, float64 reference, eager reference in z's dtype): each (lp, H, gradient of a random mix of lp and H)."""
    w_lp, w_h = _randn(*ids.shape, seed=1).to(DEVICE), _randn(*ids.shape, seed=2).to(DEVICE)
    runs = []
    for fn, x, extra in (
        (token_logprobs, z.clone(), dict(return_entropy=True, backend=backend)),
        (ref.token_logprobs, z.double(), {}),
        (ref.token_logprobs, z.clone(), dict(compute_in=z.dtype)),
    ):
        x.requires_grad_(True)
        lp, h = fn(x, ids, **kw, **extra)
        runs.append((lp, h, grad_of((lp * w_lp.to(lp.dtype)).sum() + (h * w_h.to(h.dtype)).sum(), x)))
    return runs


def _assert_within_eager(runs, value_floor=1e-6, grad_floor=1e-3):
    """The low-precision rule for lp, H and the gradient; NaN anywhere fails (rel_err is inf then)."""
    ours, exact, eager = runs
    for i, name in enumerate(("lp", "entropy", "grad")):
        floor = grad_floor if name == "grad" else value_floor
        err, eager_err = rel_err(ours[i], exact[i]), rel_err(eager[i], exact[i])
        assert low_precision_ok(err, eager_err, floor), f"{name}: ours {err:.2e} vs eager {eager_err:.2e}"


# ----------------------------------------------------------------------------------------------------------------
# huge logits
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [1e4, -1e4])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_logits_around_1e4_low_precision(backend, dtype, offset):
    z = (offset + 3 * _randn(3, 5, 300, seed=3)).to(dtype).to(DEVICE)
    ids = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    _assert_within_eager(_logprobs_three_ways(backend, z, ids))
    # and through the fused loss
    d = make_batch(3, 5, 300, seed=5)
    zz = z.clone().requires_grad_(True)
    out = grpo_loss(
        zz, ids, d["adv"], mask=d["mask"], old_logprobs=d["old"], ref_logprobs=d["ref"], beta=0.04, backend=backend
    )
    z64 = z.double().requires_grad_(True)
    ze = z.clone().requires_grad_(True)
    kw = dict(mask=d["mask"], old_logprobs=d["old"], ref_logprobs=d["ref"], beta=0.04)
    exact, eager = ref.grpo_loss(z64, ids, d["adv"], **kw), ref.grpo_loss(ze, ids, d["adv"], compute_in=dtype, **kw)
    assert low_precision_ok(rel_err(out.loss, exact.loss), rel_err(eager.loss, exact.loss))
    g, g64, ge = grad_of(out.loss, zz), grad_of(exact.loss, z64), grad_of(eager.loss, ze)
    assert low_precision_ok(rel_err(g, g64), rel_err(ge, g64), floor=1e-3)


def test_logits_around_1e4_float32_error_is_an_ulp_of_lse(backend):
    """The log-sum-exp is kept as one float32 per row (it is what the backward reads), so lp = u_y - lse carries
    the rounding of lse: about one float32 ulp of |lse| (5e-4 at 1e4; eager log_softmax, which subtracts the row max
    first, gets 3e-8). This bounds that error, per element, at 2 ulp; and the gradient's relative error likewise."""
    z = (1e4 + 3 * _randn(3, 5, 300, seed=6)).float().to(DEVICE)
    ids = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    ours, exact, _ = _logprobs_three_ways(backend, z, ids)
    lse = torch.logsumexp(z.double(), dim=-1)
    assert ((ours[0].double() - exact[0]).abs() <= 2 * ULP32 * lse.abs()).all()
    assert rel_err(ours[1], exact[1]) < 1e-5
    assert rel_err(ours[2], exact[2]) < 2 * ULP32 * lse.abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# masked vocabulary, one-hot and flat rows
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
def test_masked_vocabulary_and_single_finite_entry(backend, dtype):
    """-inf logits (a masked vocabulary) contribute p = 0 and a zero gradient; a row whose only finite entry is the
    target has lp = 0, H = 0 and a gradient row of exact zeros, in every dtype."""
    vocab = 64
    z = 2 * _randn(3, 5, vocab, seed=8)
    z[..., 1::4] = -math.inf
    ids = torch.randint(0, vocab // 4, (3, 5), generator=torch.Generator().manual_seed(9)) * 4
    z[2, 3] = -math.inf
    z[2, 3, ids[2, 3]] = 0.25
    z, ids = z.to(dtype).to(DEVICE), ids.to(DEVICE)
    runs = _logprobs_three_ways(backend, z, ids)
    ours = runs[0]
    assert ours[0][2, 3].item() == 0.0 and ours[1][2, 3].item() == 0.0
    assert torch.equal(ours[2][2, 3], torch.zeros_like(ours[2][2, 3]))
    assert torch.equal(ours[2][..., 1::4], torch.zeros_like(ours[2][..., 1::4]))
    if dtype == torch.float32:
        for i in range(3):
            assert rel_err(ours[i], runs[1][i]) < 1e-5
    else:
        _assert_within_eager(runs)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
def test_peaked_and_flat_rows(backend, dtype):
    """Rows 0: one entry 60 above the rest (target = the peak, or not); 1: one entry 1e4 above (fp16: 6e4) so every
    other p underflows to 0; 2: perfectly flat, lp = -log V and H = log V; 3: ordinary."""
    vocab = 50
    gap = 6e4 if dtype == torch.float16 else 1e4
    z = _randn(4, 6, vocab, seed=10)
    ids = torch.randint(0, vocab, (4, 6), generator=torch.Generator().manual_seed(11))
    z[0, :3].scatter_(1, ids[0, :3, None], 60.0)
    z[0, 3:, 7] = 60.0
    z[1, :, 5] = gap
    z[2] = 0.75
    z, ids = z.to(dtype).to(DEVICE), ids.to(DEVICE)
    runs = _logprobs_three_ways(backend, z, ids)
    ours = runs[0]
    torch.testing.assert_close(
        ours[0][2].cpu().double(), torch.full((6,), -math.log(vocab), dtype=torch.float64), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        ours[1][2].cpu().double(), torch.full((6,), math.log(vocab), dtype=torch.float64), rtol=1e-6, atol=0
    )
    assert ours[1][1].abs().max().item() == 0.0  # every p but the peak's underflows: H is exactly 0
    _assert_within_eager(runs)


@pytest.mark.parametrize("temperature", [1e-3, 0.7, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
def test_extreme_temperatures(backend, dtype, temperature):
    """Regression (torch backend): the backward divided bf16/fp16 logits by the temperature in bf16/fp16, so at
    tau = 1e-3 the target's p came out up to e^ulp(z / tau) = 2x too large (gradient entries off by 100%)."""
    d = make_batch(3, 6, 200, dtype=dtype, seed=12)
    _assert_within_eager(_logprobs_three_ways(backend, d["logits"], d["ids"], mask=d["mask"], temperature=temperature))
    z = d["logits"].clone().requires_grad_(True)
    kw = dict(mask=d["mask"], old_logprobs=d["old"], temperature=temperature, loss_type="grpo")
    out = grpo_loss(z, d["ids"], d["adv"], backend=backend, **kw)
    z64, ze = d["logits"].double().requires_grad_(True), d["logits"].clone().requires_grad_(True)
    exact, eager = (
        ref.grpo_loss(z64, d["ids"], d["adv"], **kw),
        ref.grpo_loss(ze, d["ids"], d["adv"], compute_in=dtype, **kw),
    )
    assert low_precision_ok(rel_err(out.loss, exact.loss), rel_err(eager.loss, exact.loss))
    g, g64, ge = grad_of(out.loss, z), grad_of(exact.loss, z64), grad_of(eager.loss, ze)
    assert low_precision_ok(rel_err(g, g64), rel_err(ge, g64), floor=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# log-ratios far outside the clip range
# ----------------------------------------------------------------------------------------------------------------
RATIO_OPTIONS = {
    "plain": dict(),
    "k3": dict(beta=0.04),
    "lowvar-bc": dict(beta=0.1, kl_estimator="low_var_kl", bias_corrected_kl=True),
    "dual-delta": dict(dual_clip=3.0, delta=2.0),
}


def _far_logprobs(d, magnitude, seed):
    """old / ref log-probs at lp -/+ magnitude, with a random sign per token: log-ratios and k of +-magnitude."""
    lp = ref.token_logprobs(d["logits"].double(), d["ids"])[0]
    sign = torch.where(torch.rand(lp.shape, generator=torch.Generator().manual_seed(seed)) < 0.5, -1.0, 1.0).to(lp)
    return (lp - sign * magnitude).float(), (lp + sign * magnitude).float()


def _far_run(backend, loss_type, level, magnitude, option):
    d = make_batch(3, 6, 40, seed=13)
    old, lref = _far_logprobs(d, magnitude, seed=14)
    kw = dict(
        mask=d["mask"],
        old_logprobs=old,
        ref_logprobs=lref,
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=6,
        **RATIO_OPTIONS[option],
    )
    z, z64 = d["logits"].clone().requires_grad_(True), d["logits"].double().requires_grad_(True)
    out, exact = grpo_loss(z, d["ids"], d["adv"], backend=backend, **kw), ref.grpo_loss(z64, d["ids"], d["adv"], **kw)
    return out, exact, grad_of(out.loss, z), grad_of(exact.loss, z64)


@pytest.mark.parametrize("option", list(RATIO_OPTIONS))
@pytest.mark.parametrize("magnitude", [25.0, 60.0])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_log_ratios_beyond_20(backend, loss_type, level, magnitude, option):
    """|log rho| and |k| of 25 and 60 (rho up to 1e26, within float32): every output as float64 gives it."""
    if backend in INTERPRETED and (option not in ("plain", "k3") or loss_type not in ("grpo", "sapo")):
        pytest.skip("interpreted backend: a subset in the default run (all of it on a GPU)")
    out, exact, grad, grad64 = _far_run(backend, loss_type, level, magnitude, option)
    for key in ("loss", "logprobs", "per_token_loss", "kl_mean", "clip_region"):
        assert rel_err(getattr(out, key), getattr(exact, key)) < 1e-5, key
    assert rel_err(grad, grad64) < 1e-5


@pytest.mark.parametrize("option", ["plain", "dual-delta"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_log_ratios_beyond_float32_range(backend, loss_type, level, option):
    """|log rho| = 100: rho = e^100 overflows float32. A per-token loss whose float64 value exceeds float32's range
    is +inf (as in eager float32); where float64 stays in range, the loss matches it, and a finite loss comes with a
    finite gradient equal to float64's. Regression (sapo): s (1 - s) rho was 0 * inf = NaN under a finite loss."""
    if backend in INTERPRETED and loss_type not in ("grpo", "sapo"):
        pytest.skip("interpreted backend: a subset in the default run (all of it on a GPU)")
    out, exact, grad, grad64 = _far_run(backend, loss_type, level, 100.0, option)
    f32_max = torch.finfo(torch.float32).max
    beyond = exact.per_token_loss.abs() > f32_max
    assert torch.equal(out.per_token_loss[beyond].cpu().double(), exact.per_token_loss[beyond].sign().cpu() * math.inf)
    assert rel_err(out.per_token_loss[~beyond], exact.per_token_loss[~beyond]) < 1e-5
    if abs(exact.loss.item()) > f32_max:
        assert out.loss.item() == math.copysign(math.inf, exact.loss.item())
    else:
        assert rel_err(out.loss, exact.loss) < 1e-5
        assert torch.isfinite(grad).all() and rel_err(grad, grad64) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# equal rewards, all-masked batches
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_exactly_zero_advantages(backend, scale):
    """A group whose rewards are all equal has std 0 and advantages exactly 0 (not eps-sized noise), for any group
    size and reward value; frac_zero_std counts it. Other groups are untouched."""
    g = torch.Generator().manual_seed(15)
    for size in range(1, 8):
        values = torch.randn(4, generator=g) * 10 ** torch.randint(-3, 4, (4,), generator=g)
        rewards = values.repeat_interleave(size)  # 4 groups, each constant
        out = group_advantages(rewards.to(DEVICE), group_size=size, scale=scale, return_stats=True, backend=backend)
        assert torch.equal(out.advantages.cpu(), torch.zeros(4 * size)), size
        if size > 1:
            assert torch.equal(out.group_std.cpu(), torch.zeros(4)) and out.frac_zero_std.item() == 1.0
    rewards = torch.cat([torch.full((4,), 0.1), torch.randn(4, generator=g)])
    ids = torch.tensor([3, 3, 3, 3, 1, 1, 1, 1])
    out = group_advantages(
        rewards.to(DEVICE), group_ids=ids.to(DEVICE), scale=scale, return_stats=True, backend=backend
    )
    expect = ref.group_advantages(rewards.double(), group_ids=ids, scale=scale)
    assert torch.equal(out.advantages[:4].cpu(), torch.zeros(4)) and out.frac_zero_std.item() == 0.5
    torch.testing.assert_close(out.advantages.cpu().double(), expect.advantages, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_masked_batch(backend, loss_type, level):
    """No position takes part: loss 0, every output and metric 0, a gradient of exact zeros (even with NaN in the
    masked logits)."""
    d = make_batch(3, 5, 17, seed=16)
    z = d["logits"].clone()
    z[1, 2] = math.nan
    z.requires_grad_(True)
    out = grpo_loss(
        z,
        d["ids"],
        d["adv"],
        mask=torch.zeros_like(d["mask"]),
        old_logprobs=d["old"],
        ref_logprobs=d["ref"],
        beta=0.04,
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=5,
        return_entropy=True,
        backend=backend,
    )
    assert out.loss.item() == 0.0
    for key in ("logprobs", "entropy", "per_token_loss"):
        assert torch.equal(getattr(out, key), torch.zeros_like(getattr(out, key))), key
    for key in ("kl_mean", "clip_low", "clip_high", "clip_region", "entropy_mean", "logprob_mean"):
        assert getattr(out, key).item() == 0.0, key
    assert torch.equal(grad_of(out.loss + out.entropy.sum(), z), torch.zeros_like(z))


def test_nan_patterns_helper_rejects_a_mismatch():
    """assert_matches (used throughout) must fail on NaN-vs-number and inf-vs-number, not only on value errors."""
    expect = torch.tensor([1.0, math.nan, math.inf], dtype=torch.float64)
    assert_matches(torch.tensor([1.0, math.nan, math.inf]), expect)
    for wrong in ([1.0, 0.0, math.inf], [1.0, math.nan, 3e38], [1.0, math.nan, -math.inf], [1.1, math.nan, math.inf]):
        with pytest.raises(AssertionError):
            assert_matches(torch.tensor(wrong), expect)
