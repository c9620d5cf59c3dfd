"""grpo_loss on every backend against reference.py: loss, log-probs, entropy, metrics and the logits gradient,
for every variant of the spec."""

import itertools
import zlib

import pytest
import torch
from conftest import DEVICE
from helpers import low_precision_ok, make_batch, rel_err

from grpo_kernels import GRPOLoss, grpo_loss
from grpo_kernels import reference as ref

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
LEVELS = ["token", "sequence"]
# (beta, kl_estimator, bias_corrected_kl, delta, dual_clip, epsilon_high, temperature, is_weights, per_token_adv)
OPTIONS = {
    "plain": dict(),
    "k3": dict(beta=0.04),
    "k1-bc-delta": dict(beta=0.1, kl_estimator="k1", bias_corrected_kl=True, delta=1.5),
    "k2-dual-eh": dict(beta=0.1, kl_estimator="k2", dual_clip=3.0, epsilon_high=0.28),
    "lowvar-bc-tau-isw": dict(
        beta=0.2, kl_estimator="low_var_kl", bias_corrected_kl=True, temperature=0.8, is_weights=True
    ),
    "on-policy-tokadv": dict(old=False, per_token_adv=True, beta=0.1),
}
METRICS = ["kl_mean", "clip_low", "clip_high", "clip_region", "entropy_mean", "logprob_mean"]


def _run(fn, d, option, loss_type, level, logits, **extra):
    opt = dict(OPTIONS[option])
    use_old = opt.pop("old", True)
    per_token_adv = opt.pop("per_token_adv", False)
    use_w = opt.pop("is_weights", False)
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(d["ids"].shape, generator=g).to(DEVICE) if per_token_adv else d["adv"]
    w = (0.5 + torch.rand(d["ids"].shape, generator=g)).to(DEVICE) if use_w else None
    return fn(
        logits,
        d["ids"],
        adv,
        mask=d["mask"],
        old_logprobs=d["old"] if use_old else None,
        ref_logprobs=d["ref"],
        is_weights=w,
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=7,
        **opt,
        **extra,
    )


@pytest.mark.parametrize("loss_type,level", list(itertools.product(LOSS_TYPES, LEVELS)))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_float32_matches_reference(backend, loss_type, level, option, poisoned):
    d = make_batch(3, 7, 37, seed=zlib.crc32(f"{loss_type}{level}{option}".encode()) % 1000)
    z = d["logits"].clone().requires_grad_(True)
    out = _run(grpo_loss, d, option, loss_type, level, z, return_entropy=True, backend=backend)
    z64 = d["logits"].double().requires_grad_(True)
    expect = _run(ref.grpo_loss, d, option, loss_type, level, z64)
    (grad,) = torch.autograd.grad(out.loss, z)
    (grad64,) = torch.autograd.grad(expect.loss, z64)
    assert out.loss.dtype == torch.float32 and out.logprobs.shape == d["ids"].shape
    assert rel_err(out.loss, expect.loss) < 1e-5
    assert rel_err(out.logprobs, expect.logprobs) < 1e-5
    assert rel_err(out.entropy, expect.entropy) < 1e-5
    assert rel_err(out.per_token_loss, expect.per_token_loss) < 1e-5
    assert rel_err(grad, grad64) < 1e-5
    for key in METRICS:
        assert abs(getattr(out, key).item() - getattr(expect, key).item()) < 1e-5, key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence"), ("cispo", "token")])
def test_low_precision_within_twice_eager_error(backend, dtype, loss_type, level):
    d = make_batch(4, 8, 300, dtype=dtype, seed=3)
    z = d["logits"].clone().requires_grad_(True)
    out = _run(grpo_loss, d, "k3", loss_type, level, z, backend=backend)
    z64 = d["logits"].double().requires_grad_(True)
    expect = _run(ref.grpo_loss, d, "k3", loss_type, level, z64)
    ze = d["logits"].clone().requires_grad_(True)
    eager = _run(ref.grpo_loss, d, "k3", loss_type, level, ze, compute_in=dtype)
    grads = [torch.autograd.grad(o.loss, x)[0] for o, x in ((out, z), (expect, z64), (eager, ze))]
    assert grads[0].dtype == dtype
    assert low_precision_ok(rel_err(out.loss, expect.loss), rel_err(eager.loss, expect.loss))
    assert low_precision_ok(rel_err(out.logprobs, expect.logprobs), rel_err(eager.logprobs, expect.logprobs))
    assert low_precision_ok(rel_err(grads[0], grads[1]), rel_err(grads[2], grads[1]), floor=1e-3)


def test_gradcheck_float64_torch_backend():
    d = make_batch(2, 4, 5, dtype=torch.float64, seed=2)
    z = d["logits"].requires_grad_(True)
    for loss_type, level in (("grpo", "sequence"), ("dapo", "token"), ("sapo", "sequence"), ("cispo", "token")):

        def f(x):
            out = grpo_loss(
                x,
                d["ids"],
                d["adv"].double(),
                mask=d["mask"],
                old_logprobs=d["old"],
                ref_logprobs=d["ref"],
                beta=0.1,
                bias_corrected_kl=True,
                loss_type=loss_type,  # noqa: B023 - the closure is called inside its iteration
                importance_sampling_level=level,  # noqa: B023
                return_entropy=True,
                backend="torch",
            )
            return out.loss, out.entropy

        assert torch.autograd.gradcheck(f, (z,))


@pytest.mark.parametrize("level", LEVELS)
def test_packed_cu_seqlens_matches_padded(backend, level):
    d = make_batch(3, 6, 29, seed=4, empty_row=False)
    lengths = d["mask"].sum(1).long().tolist()
    rows = [(b, t) for b in range(3) for t in range(lengths[b])]
    pick = lambda x: torch.stack([x[b, t] for b, t in rows])  # noqa: E731
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), device=DEVICE)
    kw = dict(loss_type="grpo", importance_sampling_level=level, beta=0.1, backend=backend)
    z = d["logits"].clone().requires_grad_(True)
    padded = grpo_loss(z, d["ids"], d["adv"], mask=d["mask"], old_logprobs=d["old"], ref_logprobs=d["ref"], **kw)
    zp = pick(d["logits"]).requires_grad_(True)
    packed = grpo_loss(
        zp, pick(d["ids"]), d["adv"], old_logprobs=pick(d["old"]), ref_logprobs=pick(d["ref"]), cu_seqlens=cu, **kw
    )
    assert rel_err(packed.loss, padded.loss) < 1e-6
    (gp,) = torch.autograd.grad(padded.loss, z)
    (gk,) = torch.autograd.grad(packed.loss, zp)
    assert rel_err(gk, pick(gp)) < 1e-6


@pytest.mark.parametrize("level", LEVELS)
def test_inplace_backward_matches_out_of_place(backend, level):
    d = make_batch(3, 5, 23, seed=5)
    w = torch.randn(23, 16, device=DEVICE, requires_grad=True)
    hidden = torch.randn(3, 5, 16, device=DEVICE)
    grads = []
    for inplace in (False, True):
        w.grad = None
        logits = hidden @ w.T  # a non-leaf, as a model's output
        out = grpo_loss(
            logits,
            d["ids"],
            d["adv"],
            mask=d["mask"],
            old_logprobs=d["old"],
            importance_sampling_level=level,
            inplace_backward=inplace,
            backend=backend,
        )
        (out.loss * 3.0).backward()  # grad_output != 1
        grads.append(w.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-7)


def test_inplace_backward_refuses_when_logits_are_needed_again(backend):
    d = make_batch(2, 4, 11, seed=6)
    w = torch.randn(11, 8, device=DEVICE, requires_grad=True)
    logits = torch.randn(2, 4, 8, device=DEVICE) @ w.T
    other = (logits * logits).sum()  # saves the logits for its own backward
    out = grpo_loss(logits, d["ids"], d["adv"], mask=d["mask"], inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.loss + other).backward()
    leaf = d["logits"].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="leaf"):
        grpo_loss(leaf, d["ids"], d["adv"], inplace_backward=True, backend=backend)


def test_entropy_is_differentiable(backend):
    d = make_batch(2, 5, 19, seed=7)
    z = d["logits"].clone().requires_grad_(True)
    out = grpo_loss(z, d["ids"], d["adv"], mask=d["mask"], return_entropy=True, backend=backend)
    (grad,) = torch.autograd.grad(out.loss - 0.01 * out.entropy.sum(), z)
    z64 = d["logits"].double().requires_grad_(True)
    expect = ref.grpo_loss(z64, d["ids"], d["adv"], mask=d["mask"])
    (grad64,) = torch.autograd.grad(expect.loss - 0.01 * expect.entropy.sum(), z64)
    assert rel_err(grad, grad64) < 1e-5


def test_module_form(backend):
    d = make_batch(2, 5, 19, seed=8)
    module = GRPOLoss(beta=0.04, loss_type="grpo", backend=backend)
    out = module(d["logits"], d["ids"], d["adv"], mask=d["mask"], ref_logprobs=d["ref"])
    expect = grpo_loss(
        d["logits"],
        d["ids"],
        d["adv"],
        mask=d["mask"],
        ref_logprobs=d["ref"],
        beta=0.04,
        loss_type="grpo",
        backend=backend,
    )
    assert torch.equal(out.loss, expect.loss)
    assert "beta=0.04" in repr(module)


def test_empty_batch(backend):
    z = torch.randn(0, 5, 7, device=DEVICE, requires_grad=True)
    out = grpo_loss(
        z, torch.zeros(0, 5, dtype=torch.long, device=DEVICE), torch.zeros(0, device=DEVICE), backend=backend
    )
    assert out.loss.item() == 0.0 and out.logprobs.shape == (0, 5)
    out.loss.backward()
    assert z.grad.shape == z.shape


def test_deterministic(backend):
    d = make_batch(4, 9, 301, seed=10)
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
            importance_sampling_level="sequence",
            loss_type="grpo",
            backend=backend,
        )
        out.loss.backward()
        runs.append((out.loss, out.logprobs, out.kl_mean, z.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph(backend):
    d = make_batch(2, 6, 31, seed=11)

    def step(z, ids, adv, mask, old, lref):
        out = grpo_loss(
            z,
            ids,
            adv,
            mask=mask,
            old_logprobs=old,
            ref_logprobs=lref,
            beta=0.04,
            importance_sampling_level="sequence",
            return_entropy=True,
            backend=backend,
        )
        return out.loss - 0.001 * out.entropy.sum(), out.clip_region

    args = (d["ids"], d["adv"], d["mask"], d["old"], d["ref"])
    z1 = d["logits"].clone().requires_grad_(True)
    z2 = d["logits"].clone().requires_grad_(True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (loss_c, clip_c), (loss_e, clip_e) = compiled(z1, *args), step(z2, *args)
    loss_c.backward()
    loss_e.backward()
    assert torch.allclose(loss_c, loss_e, rtol=1e-6) and torch.equal(clip_c, clip_e)
    assert torch.allclose(z1.grad, z2.grad, rtol=1e-5, atol=1e-7)


def test_torch_compile_fullgraph_in_a_fresh_process():
    """The first call of a fresh process resolves the backend (importing its module) inside the traced region."""
    import subprocess
    import sys

    code = (
        "import torch, grpo_kernels as gk\n"
        "f = lambda z, y, a: gk.grpo_loss(z, y, a, return_entropy=True).loss\n"
        "z = torch.randn(2, 3, 11, requires_grad=True); y = torch.randint(0, 11, (2, 3)); a = torch.randn(2)\n"
        "loss = torch.compile(f, fullgraph=True, backend='aot_eager')(z, y, a); loss.backward()\n"
        "assert torch.allclose(loss, f(z, y, a)); print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
