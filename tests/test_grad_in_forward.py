"""grpo_loss(grad_in_forward=True): the forward writes loss_scale * d loss / d logits, the backward only checks
(and rescales when the incoming gradient differs). On every backend: the torch backend runs the generic forward +
backward composition, the CUDA backend its own kernels (2 passes on sm_90); a test-only backend checks that the
backend's own methods are the ones called."""

import zlib

import pytest
import torch
from conftest import DEVICE
from helpers import make_batch, rel_err

from grpo_kernels import GRPOLoss, backends, grpo_loss
from grpo_kernels import reference as ref
from grpo_kernels.backends.torch import TorchBackend

CASES = [  # (loss_type, level, extra options)
    ("dapo", "token", dict(beta=0.04)),
    ("grpo", "sequence", dict(beta=0.1, kl_estimator="k2", bias_corrected_kl=True)),
    ("cispo", "token", dict(epsilon_high=3.0, temperature=0.8)),
    ("sapo", "token", dict(dual_clip=None)),
    ("bnpo", "token", dict(delta=1.5, dual_clip=3.0, beta=0.2, kl_estimator="low_var_kl")),
]


def _model_logits(d, seed):
    """Non-leaf logits (as a model's output) and the leaf weight they come from."""
    g = torch.Generator().manual_seed(seed)
    b, t, v = d["logits"].shape
    w = (torch.randn(v, 16, generator=g) * 0.3).to(DEVICE).requires_grad_(True)
    hidden = torch.randn(b, t, 16, generator=g).to(DEVICE)
    return w, hidden


def _loss(logits, d, loss_type, level, opts, **kw):
    return grpo_loss(
        logits,
        d["ids"],
        d["adv"],
        mask=d["mask"],
        old_logprobs=d["old"],
        ref_logprobs=d["ref"],
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=9,
        **opts,
        **kw,
    )


@pytest.mark.parametrize("loss_type,level,opts", CASES)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("loss_scale,grad_output", [(1.0, 1.0), (0.25, 0.25), (1.0, 3.0), (0.5, -2.0)])
def test_matches_reference_gradient(backend, loss_type, level, opts, inplace, loss_scale, grad_output):
    d = make_batch(3, 6, 41, seed=zlib.crc32(f"{loss_type}{level}".encode()) % 1000)
    w, hidden = _model_logits(d, 1)
    logits = hidden @ w.T
    out = _loss(
        logits,
        d,
        loss_type,
        level,
        opts,
        grad_in_forward=True,
        loss_scale=loss_scale,
        inplace_backward=inplace,
        backend=backend,
    )
    (out.loss * grad_output).backward()

    w64 = w.detach().double().requires_grad_(True)
    expect = ref.grpo_loss(
        hidden.double() @ w64.T,
        d["ids"],
        d["adv"],
        mask=d["mask"],
        old_logprobs=d["old"],
        ref_logprobs=d["ref"],
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=9,
        **opts,
    )
    (expect.loss * grad_output).backward()
    assert rel_err(out.loss, expect.loss) < 1e-5
    assert rel_err(out.per_token_loss, expect.per_token_loss) < 1e-5
    assert rel_err(w.grad, w64.grad) < 1e-5


def test_inplace_writes_the_scaled_gradient_in_the_forward(backend):
    d = make_batch(2, 5, 23, seed=3)
    w, hidden = _model_logits(d, 2)
    logits = hidden @ w.T
    z64 = logits.detach().double().requires_grad_(True)
    (grad64,) = torch.autograd.grad(_loss(z64, d, "dapo", "token", {}, backend="torch").loss, z64)
    out = _loss(
        logits, d, "dapo", "token", {}, grad_in_forward=True, loss_scale=0.5, inplace_backward=True, backend=backend
    )
    assert rel_err(logits.detach(), 0.5 * grad64) < 1e-5  # the logits now hold the gradient
    (out.loss * 0.5).backward()
    assert torch.isfinite(w.grad).all()


def test_entropy_is_a_metric_without_gradient(backend):
    d = make_batch(2, 4, 19, seed=4)
    z = d["logits"].clone().requires_grad_(True)
    out = _loss(z, d, "dapo", "token", {}, grad_in_forward=True, return_entropy=True, backend=backend)
    assert not out.entropy.requires_grad
    _, h64 = ref.token_logprobs(d["logits"].double(), d["ids"], mask=d["mask"])
    assert rel_err(out.entropy, h64) < 1e-5
    out.loss.backward()
    assert torch.isfinite(z.grad).all()


def test_no_grad_and_unused_loss(backend):
    d = make_batch(2, 4, 19, seed=5)
    z = d["logits"].clone().requires_grad_(True)
    with torch.no_grad():
        plain = _loss(z, d, "dapo", "token", {}, grad_in_forward=True, inplace_backward=False, backend=backend)
    assert torch.equal(z, d["logits"])
    out = _loss(z, d, "dapo", "token", {}, grad_in_forward=True, backend=backend)
    assert rel_err(out.loss, plain.loss) < 1e-6
    out.logprob_mean.sum()  # metrics carry no gradient
    assert out.logprobs.grad_fn is None and out.per_token_loss.grad_fn is None


class _RecordingBackend(TorchBackend):
    """A backend with its own 2-pass methods (here: the torch math), recording how the backward used them."""

    def __init__(self):
        self.calls = []

    def grpo_loss_forward_with_grad(self, logits, batch, config, with_entropy, loss_scale, grad_out):
        self.calls.append(("forward_with_grad", loss_scale, grad_out is logits))
        fwd = self.grpo_loss_forward(logits, batch, config, with_entropy)
        self.token_logprobs_backward(
            logits,
            batch.token_ids,
            fwd.lse,
            fwd.entropy,
            fwd.grad_logprobs * loss_scale,
            None,
            config.temperature,
            grad_out,
        )
        return fwd

    def scale_gradient_(self, grad, grad_loss, loss_scale):
        self.calls.append(("scale", float(grad_loss), loss_scale))
        if float(grad_loss) != loss_scale:
            grad.mul_(grad_loss.float() / loss_scale)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the recording backend replaces the torch backend on the CPU")
@pytest.mark.parametrize("inplace", [False, True])
def test_backend_methods_are_used(monkeypatch, inplace):
    recorder = _RecordingBackend()
    monkeypatch.setitem(backends._cache, "torch", recorder)
    d = make_batch(2, 5, 17, seed=6)
    w, hidden = _model_logits(d, 3)
    out = _loss(
        hidden @ w.T,
        d,
        "grpo",
        "token",
        {},
        grad_in_forward=True,
        loss_scale=0.125,
        inplace_backward=inplace,
        backend="torch",
    )
    (out.loss * 0.125).backward()
    assert recorder.calls == [("forward_with_grad", 0.125, inplace), ("scale", 0.125, 0.125)]


def test_torch_compile_fullgraph(backend):
    d = make_batch(2, 6, 31, seed=7)

    def step(z, ids, adv, mask, old):
        out = grpo_loss(z, ids, adv, mask=mask, old_logprobs=old, grad_in_forward=True, loss_scale=2.0, backend=backend)
        return out.loss * 2.0, out.clip_region

    args = (d["ids"], d["adv"], d["mask"], d["old"])
    z1 = d["logits"].clone().requires_grad_(True)
    z2 = d["logits"].clone().requires_grad_(True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (loss_c, clip_c), (loss_e, clip_e) = compiled(z1, *args), step(z2, *args)
    loss_c.backward()
    loss_e.backward()
    assert torch.allclose(loss_c, loss_e, rtol=1e-6) and torch.equal(clip_c, clip_e)
    assert torch.allclose(z1.grad, z2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_loss_scale_is_validated(bad):
    d = make_batch(2, 3, 5, seed=8)
    with pytest.raises(ValueError, match="loss_scale"):
        grpo_loss(d["logits"], d["ids"], d["adv"], grad_in_forward=True, loss_scale=bad, backend="torch")


def test_module_form_carries_the_options():
    module = GRPOLoss(grad_in_forward=True, loss_scale=0.5, backend="torch")
    assert module.config["grad_in_forward"] is True and module.config["loss_scale"] == 0.5
