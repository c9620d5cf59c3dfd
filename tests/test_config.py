"""The one configuration: its checks, what is generated from it (signatures, op schemas, CLI flags), torch.compile
with changing float knobs, and backend="auto" reading the verified-backends table."""

import dataclasses
import inspect
import logging

import pytest
import torch
from helpers import make_batch

import grpo_kernels as gk
from grpo_kernels import backends
from grpo_kernels.config import KNOBS, LossConfig


def test_defaults_checks_and_normalisation():
    config = LossConfig()
    assert config.epsilon_high == config.epsilon_low == 0.2  # None resolves to epsilon_low
    assert LossConfig(epsilon_low=0.1).epsilon_high == 0.1 and LossConfig(epsilon_high=0.28).epsilon_high == 0.28
    assert isinstance(LossConfig(beta=0).beta, float) and LossConfig(beta=0).beta == 0.0  # ints become floats
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.beta = 1.0
    with pytest.raises(ValueError, match="beta must be >= 0, got -1"):
        LossConfig(beta=-1)
    with pytest.raises(TypeError, match="bias_corrected_kl must be a bool, got int"):
        LossConfig(bias_corrected_kl=1)
    with pytest.raises(ValueError, match="loss_type='dr_grpo' needs max_completion_length"):
        LossConfig(loss_type="dr_grpo")
    assert LossConfig(loss_type="dr_grpo", max_completion_length=16).max_completion_length == 16
    assert LossConfig(beta=0.04).uses_reference and not LossConfig().uses_reference
    assert LossConfig(importance_sampling_level="sequence").sequence_level


def test_unknown_knob_is_named_by_the_entry_point():
    d = make_batch(1, 2, 5, seed=0)
    with pytest.raises(TypeError, match="grpo_loss\\(\\) got an unexpected keyword argument 'betta'"):
        gk.grpo_loss(d["logits"], d["ids"], d["adv"], betta=0.1)
    with pytest.raises(TypeError, match="GRPOLoss\\(\\) got an unexpected keyword argument 'epsilon'"):
        gk.GRPOLoss(epsilon=0.2)
    with pytest.raises(TypeError, match="either config= or the knobs"):
        gk.GRPOLoss(config=LossConfig(), beta=0.1)


def test_signatures_list_every_knob_with_its_default():
    defaults = {f.name: f.default for f in dataclasses.fields(LossConfig)}
    for function in (gk.grpo_loss, gk.fused_linear_grpo_loss, gk.GRPOLoss.__init__, gk.FusedLinearGRPOLoss.__init__):
        params = inspect.signature(function).parameters
        assert {k: params[k].default for k in KNOBS} == defaults, function


def test_op_schemas_are_generated_from_the_config():
    """Every field of LossConfig and TokenBatch is an argument of the loss ops; a float knob travels as a tensor."""
    from grpo_kernels.loss_math import TokenBatch

    for op in (
        torch.ops.grpo_kernels.grpo_loss,
        torch.ops.grpo_kernels.grpo_loss_with_grad,
        torch.ops.grpo_kernels.fused_linear_grpo_loss,
    ):
        arguments = {a.name: str(a.type) for a in op.default._schema.arguments}
        assert set(KNOBS) | set(TokenBatch._fields) <= set(arguments), op
        assert arguments["beta"] == "Tensor" and arguments["delta"] == "Optional[Tensor]"
        assert arguments["loss_type"] == "str" and arguments["bias_corrected_kl"] == "bool"


def test_module_checks_once_and_calls_with_its_config():
    module = gk.GRPOLoss(beta=0.04, loss_type="grpo", backend="torch")
    assert module.loss_config == LossConfig(beta=0.04, loss_type="grpo")
    assert module.config["beta"] == 0.04 and module.config["backend"] == "torch"
    d = make_batch(2, 3, 7, seed=1)
    out = module(d["logits"], d["ids"], d["adv"], mask=d["mask"], ref_logprobs=d["ref"])
    same = gk.grpo_loss(
        d["logits"],
        d["ids"],
        d["adv"],
        mask=d["mask"],
        ref_logprobs=d["ref"],
        beta=0.04,
        loss_type="grpo",
        backend="torch",
    )
    assert torch.equal(out.loss, same.loss)


# Where our default differs from TRL 1.16's GRPOConfig, on purpose (kept from 0.1 so that no caller's numbers change;
# the TRL drop-in passes TRL's value through TRL_KNOBS): TRL's use_bias_correction_kl defaults to True.
DIFFERS_FROM_TRL = {"bias_corrected_kl"}


def test_trl_defaults():
    """The knobs' defaults are TRL 1.16's GRPOConfig defaults (where TRL has the knob), but for DIFFERS_FROM_TRL."""
    trl = pytest.importorskip("trl")
    from grpo_kernels.integrations.trl import TRL_KNOBS

    args = trl.GRPOConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False)
    trainer = type(
        "T",
        (),
        {
            "args": args,
            "loss_type": args.loss_type,
            "beta": args.beta,
            "epsilon_low": args.epsilon,
            "epsilon_high": args.epsilon_high if args.epsilon_high is not None else args.epsilon,
            "temperature": args.temperature,
            "max_completion_length": None,
            "importance_sampling_level": args.importance_sampling_level,
        },
    )()
    from_trl = {knob: read(trainer) for knob, read in TRL_KNOBS.items()}
    ours = dataclasses.asdict(LossConfig())
    assert {k: v for k, v in from_trl.items() if k not in DIFFERS_FROM_TRL} == {
        k: ours[k] for k in from_trl if k not in DIFFERS_FROM_TRL
    }
    assert all(from_trl[k] != ours[k] for k in DIFFERS_FROM_TRL)  # the list is exact: remove a name once it agrees


def test_float_knobs_do_not_recompile():
    """A float knob reaches the ops as a tensor: after dynamo's one automatic-dynamic recompile (the first change
    of a Python float argument), new values of beta / epsilon / temperature reuse the compiled graph."""
    import torch._dynamo.utils

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    d = make_batch(2, 4, 13, seed=2)

    def step(z, beta, eps, tau):
        out = gk.grpo_loss(
            z,
            d["ids"],
            d["adv"],
            mask=d["mask"],
            old_logprobs=d["old"],
            ref_logprobs=d["ref"],
            beta=beta,
            epsilon_low=eps,
            temperature=tau,
            backend="torch",
        )
        return out.loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for beta, eps, tau in [(0.04, 0.2, 1.0), (0.05, 0.25, 0.9), (0.06, 0.3, 0.8), (0.1, 0.15, 1.1), (0.2, 0.1, 0.7)]:
        z1 = d["logits"].clone().requires_grad_(True)
        z2 = d["logits"].clone().requires_grad_(True)
        loss_c, loss_e = compiled(z1, beta, eps, tau), step(z2, beta, eps, tau)
        loss_c.backward()
        loss_e.backward()
        assert torch.allclose(loss_c, loss_e, rtol=1e-6) and torch.allclose(z1.grad, z2.grad, rtol=1e-5, atol=1e-7)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_bad_float_knob_under_compile_raises_when_the_op_runs():
    torch._dynamo.reset()
    d = make_batch(1, 3, 7, seed=3)
    step = lambda z, beta: gk.grpo_loss(z, d["ids"], d["adv"], ref_logprobs=d["ref"], beta=beta).loss  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(d["logits"], 0.1)
    compiled(d["logits"], 0.2)  # dynamic from here on
    with pytest.raises(ValueError, match="beta must be >= 0"):
        compiled(d["logits"], -0.5)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Every backend available on a pretend sm_90 device, and a verified table the test fills in."""
    runs = []
    monkeypatch.setitem(backends._cache_data, "verified", runs)
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None)
    monkeypatch.setattr(backends, "device_arch", lambda device: "sm_90")
    monkeypatch.setattr(backends, "_unverified_logged", set())
    return runs


def _run(backend):
    return {
        "backend": backend,
        "arch": "sm_90",
        "device": "H200",
        "date": "2026-12-01",
        "torch": "2.11",
        "triton": "3.6",
        "cuda": "13.0",
        "tests": "tests/test_gpu.py",
    }


def test_auto_prefers_verified_backends(fake_gpu):
    gpu = torch.device("cuda", 0)
    assert backends.resolve_backend("auto", gpu) == "triton"  # nothing verified: never the CUDA backend
    fake_gpu.append(_run("triton"))
    assert backends.resolve_backend("auto", gpu) == "triton"
    fake_gpu.append(_run("cuda"))
    assert backends.resolve_backend("auto", gpu) == "cuda"
    fake_gpu[:] = [dict(_run("cuda"), arch="sm_80")]  # verified elsewhere only
    assert backends.resolve_backend("auto", gpu) == "triton"
    assert backends.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_explicit_unverified_backend_runs_and_says_so_once(fake_gpu, caplog):
    gpu = torch.device("cuda", 0)
    with caplog.at_level(logging.WARNING, logger="grpo_kernels"):
        assert backends.resolve_backend("cuda", gpu) == "cuda"
        assert backends.resolve_backend("cuda", gpu) == "cuda"
    warnings = [r for r in caplog.records if "has not passed the test suite" in r.getMessage()]
    assert len(warnings) == 1 and "sm_90" in warnings[0].getMessage()


def test_shipped_verified_table_is_well_formed():
    keys = {"backend", "arch", "device", "date", "torch", "triton", "cuda", "tests"}
    for run in backends.verified_runs():
        assert set(run) == keys and run["backend"] in backends.BACKENDS and run["arch"].startswith("sm_")
