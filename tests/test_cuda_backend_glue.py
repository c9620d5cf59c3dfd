"""The CUDA backend's Python side (grpo_kernels/backends/cuda.py) against the binding's op schemas, on the CPU.

The schemas are read from csrc/torch_binding.cu itself and registered here with CPU implementations written with the
torch backend's math, so every call cuda.py makes is checked against the real signature (argument order, optional
tensors, mutated outputs) and its results against the torch backend. The kernels themselves are not exercised here
(that needs a GPU: the shared tests run them there). Skipped where CUDA is available: there the real ops exist.
"""

import re

import pytest
import torch
from helpers import make_batch, rel_err

from grpo_kernels import group_advantages, grpo_loss, token_logprobs
from grpo_kernels.backends import cuda as cuda_backend
from grpo_kernels.backends.torch import BACKEND as TORCH
from grpo_kernels.loss_math import LossConfig, TokenBatch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists: the real ops are tested")

BINDING = cuda_backend._cuda_build.CSRC / "torch_binding.cu"


def _schemas() -> list[str]:
    block = BINDING.read_text().split("TORCH_LIBRARY(grpo_kernels_cuda, m) {")[1].split("\n}")[0]
    return ["".join(re.findall(r'"([^"]*)"', d)) for d in re.findall(r"m\.def\((.*?)\);", block, re.DOTALL)]


def _token_logprobs_forward(logits, ids, temperature, lp, lse, entropy):
    outs = TORCH.token_logprobs_forward(logits, ids, temperature, entropy.numel() != 0)
    for dst, src in zip((lp, lse, entropy), outs):
        dst.copy_(src)


def _token_logprobs_backward(logits, ids, lse, entropy, grad_lp, grad_entropy, temperature, out):
    TORCH.token_logprobs_backward(logits, ids, lse, entropy, grad_lp, grad_entropy, temperature, out)


def _grpo_loss_forward(
    logits,
    ids,
    coef,
    adv,
    old,
    ref,
    w,
    loss_type,
    kl_estimator,
    beta,
    eps_low,
    eps_high,
    delta,
    dual_clip,
    temperature,
    tau_pos,
    tau_neg,
    bias_corrected,
    lp,
    lse,
    entropy,
    grad_lp,
    per_token_loss,
    kl,
    flags,
    loss_scale,
    grad_logits,
):
    n = ids.shape[0]  # the op is token level: the sequence fields are not read
    batch = TokenBatch(ids, coef, adv, old, ref, w, torch.tensor([0, n]), torch.zeros(n, dtype=torch.long), coef)
    config = LossConfig(
        loss_type,
        beta,
        eps_low,
        eps_high,
        delta,
        dual_clip,
        temperature,
        "token",
        kl_estimator,
        bias_corrected,
        tau_pos,
        tau_neg,
    )
    fwd = TORCH.grpo_loss_forward(logits, batch, config, entropy.numel() != 0)
    for dst, src in zip((lp, lse, entropy, grad_lp, per_token_loss, kl, flags), fwd[1:]):
        dst.copy_(src)
    if grad_logits is None:
        return 1
    TORCH.token_logprobs_backward(
        logits, ids, fwd.lse, fwd.entropy, fwd.grad_logprobs * loss_scale, None, temperature, grad_logits
    )
    return 3


def _scale_gradient_(grad, grad_loss, loss_scale):
    if float(grad_loss) != loss_scale:
        grad.mul_(grad_loss / loss_scale)


def _group_advantages(rewards, weights, order, cu, index, scale, eps, multi_reward, estimator, lengths, adv, mean, std):
    from grpo_kernels.advantages import AdvantageConfig, GroupLayout

    assert lengths is None or lengths.dtype == torch.float32  # what the binding checks
    config = AdvantageConfig(scale, eps, multi_reward, estimator)
    outs = TORCH.group_advantages(rewards, weights, GroupLayout(order, cu, index, None), config, lengths)
    for dst, src in zip((adv, mean, std), outs):
        dst.copy_(src)


IMPLS = {
    "token_logprobs_forward": _token_logprobs_forward,
    "token_logprobs_backward": _token_logprobs_backward,
    "grpo_loss_forward": _grpo_loss_forward,
    "scale_gradient_": _scale_gradient_,
    "two_pass_cluster_size": lambda logits, grad: 0,
    "group_advantages": _group_advantages,
}


@pytest.fixture(scope="module")
def fake_ops():
    lib = torch.library.Library("grpo_kernels_cuda", "DEF")
    for schema in _schemas():
        lib.define(schema)
        name = schema.split("(")[0]
        lib.impl(name, IMPLS[name], "CPU")
    yield
    lib._destroy()


@pytest.fixture
def cuda_on_cpu(fake_ops, monkeypatch):
    monkeypatch.setattr(cuda_backend.CudaBackend, "unavailable_reason", lambda self, device: None)


def test_schemas_cover_every_op():
    assert sorted(s.split("(")[0] for s in _schemas()) == sorted(IMPLS)


def test_token_logprobs(cuda_on_cpu):
    d = make_batch(3, 5, 37, seed=1)
    grads = []
    for backend in ("cuda", "torch"):
        z = d["logits"].clone().requires_grad_(True)
        lp, h = token_logprobs(z, d["ids"], mask=d["mask"], temperature=0.7, return_entropy=True, backend=backend)
        (lp.sum() + 0.3 * h.sum()).backward()
        grads.append((lp, h, z.grad))
    for ours, theirs in zip(*grads):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_grpo_loss(cuda_on_cpu, level, grad_in_forward):
    d = make_batch(3, 6, 29, seed=2)
    w = 0.5 + torch.rand(3, 6)
    results = []
    for backend in ("cuda", "torch"):
        z = d["logits"].clone().requires_grad_(True)
        out = grpo_loss(
            z,
            d["ids"],
            d["adv"],
            mask=d["mask"],
            old_logprobs=d["old"],
            ref_logprobs=d["ref"],
            beta=0.1,
            kl_estimator="low_var_kl",
            delta=1.5,
            dual_clip=2.5,
            is_weights=w,
            loss_type="grpo",
            epsilon_high=0.28,
            importance_sampling_level=level,
            return_entropy=True,
            grad_in_forward=grad_in_forward,
            loss_scale=0.5,
            backend=backend,
        )
        (out.loss * 0.5).backward()
        results.append((out.loss, out.logprobs, out.entropy, out.per_token_loss, out.kl_mean, out.clip_region, z.grad))
    for ours, theirs in zip(*results):
        assert rel_err(ours, theirs) < 1e-6


def test_routed_loss_types_are_those_the_binding_refuses():
    """The loss types with a fused epilogue are exactly the binding's (csrc/torch_binding.cu: loss_params)."""
    source = BINDING.read_text().split("gk::LossParams loss_params(")[1].split("int kl = ")[0]
    assert set(re.findall(r'loss_type == "(\w+)"', source)) == set(cuda_backend._EPILOGUE_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", ["vespo", "geo_mean", "gpg", "clip_cov", "kl_cov"])
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_routed_loss_types(cuda_on_cpu, monkeypatch, loss_type, grad_in_forward):
    """The losses of docs/math.md section 9: the log-prob kernel + loss_math, never the fused op; as the torch
    backend."""

    def fused(*args, **kwargs):
        raise AssertionError(f"loss_type={loss_type!r} reached the fused CUDA op")

    monkeypatch.setattr(cuda_backend.CudaBackend, "_fused", fused)
    d = make_batch(3, 6, 29, seed=3)
    w = 0.5 + torch.rand(3, 6)
    results = []
    for backend in ("cuda", "torch"):
        z = d["logits"].clone().requires_grad_(True)
        out = grpo_loss(
            z,
            d["ids"],
            d["adv"],
            mask=d["mask"],
            old_logprobs=d["old"],
            ref_logprobs=d["ref"],
            beta=0.1,
            is_weights=w,
            loss_type=loss_type,
            clip_cov_ratio=0.3,
            clip_cov_lb=-1.0,
            kl_cov_ratio=0.3,
            return_entropy=True,
            grad_in_forward=grad_in_forward,
            loss_scale=0.5,
            backend=backend,
        )
        (out.loss * 0.5).backward()
        results.append((out.loss, out.logprobs, out.entropy, out.per_token_loss, out.kl_mean, out.clip_region, z.grad))
    for ours, theirs in zip(*results):
        assert rel_err(ours, theirs) < 1e-6


@pytest.mark.parametrize("mode", ["sum_then_normalize", "normalize_then_sum"])
def test_group_advantages(cuda_on_cpu, mode):
    r = torch.randn(12, 2)
    r[3, 1] = float("nan")
    ours = group_advantages(r, group_size=4, multi_reward=mode, backend="cuda", return_stats=True)
    theirs = group_advantages(r, group_size=4, multi_reward=mode, backend="torch", return_stats=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("estimator", ["rloo", "grpo_passk", "reinforce_plus_plus_baseline", "opo", "gpg"])
def test_group_advantages_estimators(cuda_on_cpu, estimator):
    r = torch.randn(12)
    r[3] = float("nan")
    kw = {"completion_lengths": torch.arange(12)} if estimator in ("opo", "reinforce_plus_plus_baseline") else {}
    ours = group_advantages(r, group_size=4, estimator=estimator, backend="cuda", return_stats=True, **kw)
    theirs = group_advantages(r, group_size=4, estimator=estimator, backend="torch", return_stats=True, **kw)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, equal_nan=True)
