"""Every validation error at the API boundary: a clear exception that names the argument and what was expected."""

import math

import pytest
import torch
from conftest import DEVICE

from grpo_kernels import GRPOLoss, group_advantages, grpo_loss, token_logprobs

B, T, V = 2, 3, 5


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        logits=torch.randn(B, T, V, generator=g).to(DEVICE),
        token_ids=torch.randint(0, V, (B, T), generator=g).to(DEVICE),
        advantages=torch.randn(B, generator=g).to(DEVICE),
    )


def _with(**changes):
    def build():
        d = _inputs()
        kwargs = {}
        for key, value in changes.items():
            value = value(d) if callable(value) else value
            (d if key in d else kwargs)[key] = value
        return (d["logits"], d["token_ids"], d["advantages"]), kwargs

    return build


# (case id, inputs, exception type, message fragment)
LOSS_CASES = [
    ("logits-1d", _with(logits=lambda d: d["logits"].reshape(-1)), ValueError, "logits must be"),
    ("logits-4d", _with(logits=lambda d: d["logits"][None]), ValueError, "logits must be"),
    ("logits-int", _with(logits=lambda d: d["logits"].long()), TypeError, "logits must be float"),
    ("logits-not-tensor", _with(logits=[[1.0]]), TypeError, "logits must be a torch.Tensor"),
    (
        "logits-strided-vocab",
        _with(logits=lambda d: torch.randn(B, T, 2 * V, device=DEVICE)[..., ::2]),
        ValueError,
        "vocabulary dimension",
    ),
    ("ids-float", _with(token_ids=lambda d: d["token_ids"].float()), TypeError, "token_ids must be an integer"),
    ("ids-shape", _with(token_ids=lambda d: d["token_ids"][:, :-1]), ValueError, "token_ids must have the shape"),
    (
        "ids-too-large",
        _with(token_ids=lambda d: d["token_ids"].fill_(V)),
        ValueError,
        r"token_ids must lie in \[0, 5\)",
    ),
    ("ids-negative", _with(token_ids=lambda d: d["token_ids"].fill_(-3)), ValueError, "token_ids must lie"),
    ("mask-shape", _with(mask=torch.ones(B, T + 1, device=DEVICE)), ValueError, "mask must have the shape"),
    ("adv-shape", _with(advantages=torch.ones(B + 1, device=DEVICE)), ValueError, "advantages must be per sequence"),
    (
        "adv-int",
        _with(advantages=torch.ones(B, dtype=torch.long, device=DEVICE)),
        TypeError,
        "advantages must be a floating",
    ),
    ("old-shape", _with(old_logprobs=torch.zeros(B, device=DEVICE)), ValueError, "old_logprobs must have the shape"),
    (
        "ref-shape",
        _with(ref_logprobs=torch.zeros(B, T, 1, device=DEVICE), beta=0.1),
        ValueError,
        "ref_logprobs must have the shape",
    ),
    ("isw-shape", _with(is_weights=torch.ones(B, T + 2, device=DEVICE)), ValueError, "is_weights must be per sequence"),
    ("temperature-zero", _with(temperature=0.0), ValueError, "temperature must be > 0"),
    ("temperature-negative", _with(temperature=-1.0), ValueError, "temperature must be > 0"),
    ("temperature-nan", _with(temperature=math.nan), ValueError, "temperature must be finite"),
    ("temperature-inf", _with(temperature=math.inf), ValueError, "temperature must be finite"),
    ("epsilon-negative", _with(epsilon_low=-0.1), ValueError, "epsilon_low must be >= 0"),
    ("epsilon-high-negative", _with(epsilon_high=-0.1), ValueError, "epsilon_high must be >= 0"),
    ("delta-le-1", _with(delta=1.0), ValueError, "delta must be > 1"),
    ("dual-clip-le-1", _with(dual_clip=0.5), ValueError, "dual_clip must be > 1"),
    ("loss-type", _with(loss_type="ppo"), ValueError, "loss_type must be one of"),
    (
        "kl-estimator",
        _with(kl_estimator="k4", beta=0.1, ref_logprobs=torch.zeros(B, T, device=DEVICE)),
        ValueError,
        "kl_estimator must be one of",
    ),
    ("is-level", _with(importance_sampling_level="batch"), ValueError, "importance_sampling_level must be one of"),
    ("beta-without-ref", _with(beta=0.04), ValueError, "beta != 0 needs ref_logprobs"),
    ("beta-negative", _with(beta=-0.1, ref_logprobs=torch.zeros(B, T, device=DEVICE)), ValueError, "beta must be >= 0"),
    ("dr-grpo-without-length", _with(loss_type="dr_grpo"), ValueError, "needs max_completion_length"),
    ("num-items-negative", _with(num_items_in_batch=-1), ValueError, "num_items_in_batch must be >= 0"),
    ("backend-unknown", _with(backend="jax"), ValueError, "backend must be one of"),
    (
        "cu-seqlens-with-3d",
        _with(cu_seqlens=torch.tensor([0, 6], device=DEVICE)),
        ValueError,
        "cu_seqlens is for packed",
    ),
    (
        "cu-seqlens-bad-end",
        _with(
            logits=lambda d: d["logits"].reshape(B * T, V),
            token_ids=lambda d: d["token_ids"].reshape(-1),
            advantages=torch.ones(2, device=DEVICE),
            cu_seqlens=torch.tensor([0, 2, 5], device=DEVICE),
        ),
        ValueError,
        "cu_seqlens must start at 0, end at N=6",
    ),
    (
        "inplace-on-leaf",
        _with(logits=lambda d: d["logits"].requires_grad_(True), inplace_backward=True),
        ValueError,
        "leaf",
    ),
]


@pytest.mark.parametrize("case,build,exc,match", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_grpo_loss_rejects(backend, case, build, exc, match):
    args, kwargs = build()
    with pytest.raises(exc, match=match):
        grpo_loss(*args, **{"backend": backend, **kwargs})


def test_float64_logits_only_on_torch_backend(backend):
    z = torch.randn(B, T, V, dtype=torch.float64, device=DEVICE)
    ids = torch.randint(0, V, (B, T), device=DEVICE)
    if backend == "torch":
        assert token_logprobs(z, ids, backend=backend).dtype == torch.float64
    else:
        with pytest.raises(TypeError, match="float64 logits are only supported by backend='torch'"):
            token_logprobs(z, ids, backend=backend)


def test_token_logprobs_rejects():
    d = _inputs()
    with pytest.raises(ValueError, match="mask must have the shape"):
        token_logprobs(d["logits"], d["token_ids"], mask=torch.ones(B, device=DEVICE))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(d["logits"], d["token_ids"], temperature=0)
    with pytest.raises(TypeError, match="temperature must be a number"):
        token_logprobs(d["logits"], d["token_ids"], temperature=torch.tensor(1.0))


def test_ids_out_of_range_where_masked_are_accepted():
    d = _inputs()
    ids = d["token_ids"].clone()
    ids[0, -1] = 10**6  # e.g. a pad id outside the vocabulary, under mask 0
    mask = torch.ones(B, T, device=DEVICE)
    mask[0, -1] = 0
    lp = token_logprobs(d["logits"], ids, mask=mask)
    assert lp[0, -1] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_tensors_on_different_devices():
    d = _inputs()
    with pytest.raises(ValueError, match="all tensors must share one device"):
        grpo_loss(d["logits"], d["token_ids"].cpu(), d["advantages"])


def test_tensors_on_different_devices_meta():
    d = _inputs()
    with pytest.raises(ValueError, match="token_ids is on meta"):
        grpo_loss(d["logits"], d["token_ids"].to("meta"), d["advantages"])


ADV_CASES = [
    ("rewards-3d", dict(rewards=torch.zeros(2, 2, 2), group_size=2), ValueError, r"rewards must be \[B\] or \[B, R\]"),
    (
        "rewards-int",
        dict(rewards=torch.zeros(4, dtype=torch.long), group_size=2),
        TypeError,
        "rewards must be a floating",
    ),
    ("no-groups", dict(rewards=torch.zeros(4)), ValueError, "exactly one of group_size and group_ids"),
    (
        "both-groups",
        dict(rewards=torch.zeros(4), group_size=2, group_ids=torch.zeros(4, dtype=torch.long)),
        ValueError,
        "exactly one",
    ),
    ("group-size-zero", dict(rewards=torch.zeros(4), group_size=0), ValueError, "group_size must be a positive int"),
    (
        "group-size-negative",
        dict(rewards=torch.zeros(4), group_size=-2),
        ValueError,
        "group_size must be a positive int",
    ),
    (
        "group-size-not-dividing",
        dict(rewards=torch.zeros(6), group_size=4),
        ValueError,
        "must divide the batch size B=6",
    ),
    (
        "group-ids-length",
        dict(rewards=torch.zeros(4), group_ids=torch.zeros(3, dtype=torch.long)),
        ValueError,
        r"group_ids must have shape \[B\]",
    ),
    (
        "group-ids-float",
        dict(rewards=torch.zeros(4), group_ids=torch.zeros(4)),
        TypeError,
        "group_ids must be an integer",
    ),
    (
        "weights-length",
        dict(rewards=torch.zeros(4, 2), group_size=2, reward_weights=[1.0]),
        ValueError,
        r"reward_weights must have shape \[R\]=\[2\]",
    ),
    ("scale", dict(rewards=torch.zeros(4), group_size=2, scale="global"), ValueError, "scale must be one of"),
    (
        "multi-reward",
        dict(rewards=torch.zeros(4), group_size=2, multi_reward="max"),
        ValueError,
        "multi_reward must be one of",
    ),
    (
        "normalize-then-sum-scale",
        dict(rewards=torch.zeros(4), group_size=2, multi_reward="normalize_then_sum", scale="batch"),
        ValueError,
        "scale must be 'group'",
    ),
    ("eps-negative", dict(rewards=torch.zeros(4), group_size=2, eps=-1.0), ValueError, "eps must be >= 0"),
]


@pytest.mark.parametrize("case,kwargs,exc,match", ADV_CASES, ids=[c[0] for c in ADV_CASES])
def test_group_advantages_rejects(backend, case, kwargs, exc, match):
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    rewards = kwargs.pop("rewards")
    with pytest.raises(exc, match=match):
        group_advantages(rewards, backend=backend, **kwargs)


def test_module_rejects_bad_config_at_construction():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        GRPOLoss(loss_type="ppo")
    with pytest.raises(ValueError, match="backend must be one of"):
        GRPOLoss(backend="jax")


def test_unavailable_backend_is_a_clear_error():
    from grpo_kernels.backends import unavailable_reason

    if unavailable_reason("cuda", DEVICE) is None:
        pytest.skip("cuda backend is available here")
    d = _inputs()
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        grpo_loss(d["logits"], d["token_ids"], d["advantages"], backend="cuda")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(delta=1.0), "delta must be > 1"),
        (dict(dual_clip=1.0), "dual_clip must be > 1"),
        (dict(epsilon_high=-0.5), "epsilon_high must be >= 0"),
        (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg must be > 0"),
        (dict(loss_type="dr_grpo"), "needs max_completion_length"),
        (dict(temperature=math.nan), "temperature must be finite"),
    ],
)
def test_module_checks_every_scalar_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOLoss(**kwargs)
