"""Property-based tests (hypothesis) of every backend against reference.py in float64, over random shapes (padded,
strided, packed with empty sequences), masks, ignored ids and every variant of the loss and the advantages.

Examples are derandomized (the same ones on every run and machine, no example database) and few on the backends
other than torch, whose kernels are compiled (GPU) or interpreted (CPU) per shape."""

import math

import pytest
import torch
from conftest import DEVICE
from helpers import assert_advantages_close, low_precision_ok, rel_err, vespo_tolerance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import grad_of

from grpo_kernels import group_advantages, grpo_loss, token_logprobs
from grpo_kernels import reference as ref
from grpo_kernels.config import OWN_RATIO_LOSS_TYPES, LossConfig

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "geo_mean", "gpg", "clip_cov", "kl_cov"]
LEVELS = ["token", "sequence"]


def _settings(backend, torch_examples):
    return settings(
        max_examples=torch_examples if backend == "torch" else 5,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def _generator(seed):
    return torch.Generator().manual_seed(seed)


@st.composite
def token_layouts(draw, max_vocab=64):
    """Shape of the tokens: padded (B, T) - possibly a strided view - or packed (N,) with sequence lengths."""
    packed = draw(st.booleans())
    lengths = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4)) if packed else None
    shape = (sum(lengths),) if packed else (draw(st.integers(1, 4)), draw(st.integers(1, 7)))
    return dict(
        shape=shape,
        lengths=lengths,
        strided=not packed and draw(st.booleans()),
        vocab=draw(st.sampled_from([1, 2, 7, 33, max_vocab])),
        mask_p=draw(st.sampled_from([0.0, 0.5, 0.8, 1.0])),
        ignore_p=draw(st.sampled_from([0.0, 0.2])),
        logit_scale=draw(st.sampled_from([0.5, 2.0, 8.0])),
        temperature=draw(st.sampled_from([0.3, 0.7, 1.0, 1.9])),
        seed=draw(st.integers(0, 2**16)),
    )


def _tokens(layout, dtype=torch.float32):
    """Random logits (a view of a wider tensor when strided), ids with ignored positions, a 0/1 mask."""
    g = _generator(layout["seed"])
    shape, vocab = layout["shape"], layout["vocab"]
    if layout["strided"]:
        full = torch.randn(shape[0], shape[1] + 1, vocab, generator=g) * layout["logit_scale"]
        logits = full.to(dtype).to(DEVICE)[:, 1:]  # B and T strides do not merge
    else:
        logits = (torch.randn(*shape, vocab, generator=g) * layout["logit_scale"]).to(dtype).to(DEVICE)
    ids = torch.randint(0, vocab, shape, generator=g)
    ids[torch.rand(shape, generator=g) < layout["ignore_p"]] = -100
    mask = (torch.rand(shape, generator=g) < layout["mask_p"]).float()
    return logits, ids.to(DEVICE), mask.to(DEVICE)


# ----------------------------------------------------------------------------------------------------------------
# token_logprobs
# ----------------------------------------------------------------------------------------------------------------
def test_token_logprobs_property(backend):
    @_settings(backend, torch_examples=60)
    @given(layout=token_layouts(max_vocab=300), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    def check(layout, dtype):
        logits, ids, mask = _tokens(layout, dtype)
        kw = dict(mask=mask, temperature=layout["temperature"])
        w_lp, w_h = torch.randn(ids.shape, generator=_generator(1)), torch.randn(ids.shape, generator=_generator(2))
        runs = []
        for fn, z, extra in (
            (token_logprobs, logits, dict(return_entropy=True, backend=backend)),
            (ref.token_logprobs, logits.double(), {}),
            (ref.token_logprobs, logits, dict(compute_in=dtype)),
        ):
            z = z.detach().clone().requires_grad_(True)
            lp, h = fn(z, ids, **kw, **extra)
            mix = (lp * w_lp.to(DEVICE, lp.dtype)).sum() + (h * w_h.to(DEVICE, h.dtype)).sum()
            runs.append((lp, h, grad_of(mix, z)))
        (ours, exact, eager) = runs
        assert ours[0].dtype == torch.float32 and ours[0].shape == ids.shape and ours[2].dtype == dtype
        for i, floor in ((0, 1e-6), (1, 1e-6), (2, 1e-3)):
            if dtype == torch.float32 and i == 2 and rel_err(ours[i], exact[i]) >= 1e-5:
                # A near-one-hot row: the target's entry g (1 - p_y) - ... is a difference of terms of size |g| in
                # every float32 implementation (eager's too), so its absolute error is a few ulps of the row's
                # scalars, (|g| + |gH| (1 + |lse| + H)) / tau, which can be most of an entry of size g (1 - p_y).
                lse = torch.logsumexp(logits.double() / layout["temperature"], dim=-1)
                scale = (w_lp.abs() + w_h.abs() * (1 + lse.abs() + exact[1].abs())) / layout["temperature"]
                bound = 16 * torch.finfo(torch.float32).eps * scale.unsqueeze(-1) + 1e-5 * exact[2].abs()
                assert ((ours[2].double() - exact[2]).abs() <= bound).all(), i
            elif dtype == torch.float32:
                assert rel_err(ours[i], exact[i]) < 1e-5, i
            else:
                assert low_precision_ok(rel_err(ours[i], exact[i]), rel_err(eager[i], exact[i]), floor), i

    check()


# ----------------------------------------------------------------------------------------------------------------
# grpo_loss
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def loss_configs(draw):
    loss_type = draw(st.sampled_from(LOSS_TYPES))
    new = loss_type in OWN_RATIO_LOSS_TYPES + ("vespo",)  # no delta / dual clip; token level but for vespo
    config = dict(
        loss_type=loss_type,
        importance_sampling_level=draw(st.sampled_from(["token"] if loss_type in OWN_RATIO_LOSS_TYPES else LEVELS)),
        beta=draw(st.sampled_from([0.0, 0.04, 0.5])),
        kl_estimator=draw(st.sampled_from(["k1", "k2", "k3", "low_var_kl"])),
        bias_corrected_kl=draw(st.booleans()),
        delta=None if new else draw(st.sampled_from([None, 1.5, 3.0])),
        dual_clip=None if new else draw(st.sampled_from([None, 2.0, 5.0])),
        epsilon_low=draw(st.sampled_from([0.1, 0.2, 0.3])),
        epsilon_high=draw(st.sampled_from([None, 0.28, 5.0])),
        num_items_in_batch=draw(st.sampled_from([None, 1, 5.5])),
        sapo_temperature_pos=draw(st.sampled_from([1.0, 0.5])),
        sapo_temperature_neg=draw(st.sampled_from([1.05, 2.0])),
        aggregation=draw(st.sampled_from([None, None, "grpo", "bnpo", "dr_grpo", "dapo"])),
    )
    if loss_type == "vespo":
        config["vespo_k_pos"] = draw(st.sampled_from([2.0, 0.5, -1.0]))
        config["vespo_lambda_neg"] = draw(st.sampled_from([2.0, 0.3]))
    if loss_type == "clip_cov":
        config["clip_cov_ratio"] = draw(st.sampled_from([2e-4, 0.1, 1.0]))
        config["clip_cov_lb"] = draw(st.sampled_from([-1.0, 0.0, 1.0]))
        config["clip_cov_ub"] = draw(st.sampled_from([1.5, 5.0]))
    if loss_type == "kl_cov":
        config["kl_cov_ratio"] = draw(st.sampled_from([2e-4, 0.2, 1.0]))
        config["ppo_kl_coef"] = draw(st.sampled_from([1.0, 0.1]))
    return config


@st.composite
def loss_inputs(draw):
    return dict(
        advantages=draw(st.sampled_from(["sequence", "sequence-column", "token"])),
        is_weights=draw(st.sampled_from([None, "sequence", "token"])),
        old=draw(st.booleans()),
        drift=draw(st.sampled_from([0.05, 0.3, 2.0])),  # |lp_old - lp|, |lp_ref - lp| scale
        entropy=draw(st.booleans()),
    )


def _loss_tensors(layout, inputs, logits, ids):
    g = _generator(layout["seed"] + 1)
    shape = ids.shape
    num_seqs = len(layout["lengths"]) if layout["lengths"] else shape[0]
    lp = torch.log_softmax(logits.detach().double().cpu() / layout["temperature"], -1)
    lp = lp.gather(-1, ids.cpu().clamp(min=0).unsqueeze(-1)).squeeze(-1)
    near = lambda: (lp + inputs["drift"] * torch.randn(shape, generator=g, dtype=torch.float64)).float().to(DEVICE)  # noqa: E731
    per = {"sequence": (num_seqs,), "sequence-column": (num_seqs, 1), "token": shape}
    out = dict(
        advantages=torch.randn(per[inputs["advantages"]], generator=g).to(DEVICE),
        old_logprobs=near() if inputs["old"] else None,
        ref_logprobs=near(),
    )
    kind = inputs["is_weights"]
    out["is_weights"] = None if kind is None else (0.5 + torch.rand(per[kind], generator=g)).to(DEVICE)
    if layout["lengths"]:
        out["cu_seqlens"] = torch.tensor([0, *torch.tensor(layout["lengths"]).cumsum(0).tolist()], device=DEVICE)
    return out


def test_grpo_loss_property(backend):
    @_settings(backend, torch_examples=150)
    @given(layout=token_layouts(), config=loss_configs(), inputs=loss_inputs())
    def check(layout, config, inputs):
        logits, ids, mask = _tokens(layout)
        if config["loss_type"] == "vespo" and inputs["is_weights"] == "sequence":
            inputs = dict(inputs, is_weights="token")  # vespo takes token-level IS ratios (their logs join phi)
        tensors = _loss_tensors(layout, inputs, logits, ids)
        adv = tensors.pop("advantages")
        kw = dict(mask=mask, temperature=layout["temperature"], max_completion_length=8, **config, **tensors)
        z = logits.detach().clone().requires_grad_(True)
        out = grpo_loss(z, ids, adv, return_entropy=inputs["entropy"], backend=backend, **kw)
        z64 = logits.detach().double().requires_grad_(True)
        exact = ref.grpo_loss(z64, ids, adv, **kw)
        tol = _vespo_tolerance(exact, ids, mask, adv, tensors, kw) if config["loss_type"] == "vespo" else 1e-5
        # the loss is a weighted sum of per-token losses: its float32 error is relative to the size of those terms
        count = float((mask * (ids != -100)).sum())
        weight = max(1.0, count / max(1.0, config["num_items_in_batch"] or count))
        terms = exact.per_token_loss.abs().max().item() * weight if exact.per_token_loss.numel() else 0.0
        assert abs(out.loss.item() - exact.loss.item()) <= tol * (abs(exact.loss.item()) + terms)
        for key in ("logprobs", "per_token_loss") + (("entropy",) if inputs["entropy"] else ()):
            assert rel_err(getattr(out, key), getattr(exact, key)) < tol, key
        for key in ("kl_mean", "clip_low", "clip_high", "clip_region", "logprob_mean", "phi_mean", "cov_selected"):
            if getattr(exact, key) is None:
                assert getattr(out, key) is None, key
                continue
            expect = getattr(exact, key).item()
            assert abs(getattr(out, key).item() - expect) <= tol * (1 + abs(expect)), key
        assert rel_err(grad_of(out.loss, z), grad_of(exact.loss, z64)) < tol

    check()


def _vespo_tolerance(exact, ids, mask, adv, tensors, kw):
    """vespo's float32 conditioning (tests/helpers.py), on the padded or packed layout of the example."""
    packed = ids.dim() == 1
    cu = tensors.get("cu_seqlens")
    lengths = (cu[1:] - cu[:-1]).tolist() if cu is not None else ([ids.shape[0]] if packed else None)
    valid = ((mask != 0) & (ids != -100)).double()

    def rows(x):  # [N] / [B, T] -> [S, T_max]
        if x is None:
            return None
        x = x.detach().double().cpu()
        if not packed:
            return x
        out = torch.zeros(len(lengths), max(lengths, default=0), dtype=torch.float64)
        for s, (start, n) in enumerate(zip([0, *torch.tensor(lengths).cumsum(0).tolist()[:-1]], lengths, strict=True)):
            out[s, :n] = x[start : start + n]
        return out

    lp, m = rows(exact.logprobs), rows(valid)
    a = adv.detach().double().cpu()
    a = rows(a) if a.shape == ids.shape else a.reshape(-1, 1)  # per token ([N] wins when packed), or per sequence
    old = tensors.get("old_logprobs")
    is_w = tensors.get("is_weights")
    config = LossConfig(**{k: v for k, v in kw.items() if k in LossConfig.__dataclass_fields__})
    return vespo_tolerance(lp, rows(old), a, m, rows(is_w), config)


# ----------------------------------------------------------------------------------------------------------------
# group_advantages
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def reward_cases(draw):
    num_groups = draw(st.integers(1, 6))
    by_ids = draw(st.booleans())
    multi = draw(st.sampled_from(["sum_then_normalize", "normalize_then_sum"]))
    return dict(
        num_groups=num_groups,
        group_size=draw(st.integers(1, 8)),
        by_ids=by_ids,
        columns=draw(st.integers(1, 3)),
        nan_p=draw(st.sampled_from([0.0, 0.2, 0.6])),
        discrete=draw(st.booleans()),
        scale="group" if multi == "normalize_then_sum" else draw(st.sampled_from(["group", "batch", "none"])),
        multi_reward=multi,
        eps=draw(st.sampled_from([1e-4, 1e-6, 0.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def test_group_advantages_property(backend):
    """Rewards are multiples of 1/8 (discrete, as most verifiable rewards are) or 1/8 + gaussian noise of size 1:
    well away from groups whose std is a rounding error, where float32 and float64 legitimately disagree."""

    @_settings(backend, torch_examples=100)
    @given(case=reward_cases())
    def check(case):
        g = _generator(case["seed"])
        batch = case["num_groups"] * case["group_size"]
        rewards = torch.randint(-16, 17, (batch, case["columns"]), generator=g).double() / 8
        if not case["discrete"]:
            rewards = rewards + torch.randn(rewards.shape, generator=g, dtype=torch.float64)
        rewards[torch.rand(rewards.shape, generator=g) < case["nan_p"]] = math.nan
        weights = (0.5 + torch.rand(case["columns"], generator=g, dtype=torch.float64)).tolist()
        if case["by_ids"]:
            group_ids = torch.arange(batch) // case["group_size"] * 3 - 5  # sparse, negative, shuffled
            groups = dict(group_ids=group_ids[torch.randperm(batch, generator=g)])
        else:
            groups = dict(group_size=case["group_size"])
        kw = dict(scale=case["scale"], eps=case["eps"], multi_reward=case["multi_reward"])
        expect = ref.group_advantages(rewards, reward_weights=torch.tensor(weights), **groups, **kw)
        out = group_advantages(
            rewards.float().to(DEVICE),
            reward_weights=weights,
            return_stats=True,
            backend=backend,
            **{k: v.to(DEVICE) for k, v in groups.items() if torch.is_tensor(v)},
            **{k: v for k, v in groups.items() if not torch.is_tensor(v)},
            **kw,
        )
        assert not torch.isnan(out.advantages).any()
        torch.testing.assert_close(out.advantages.cpu().double(), expect.advantages, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            out.group_mean.cpu().double(), expect.group_mean, rtol=1e-5, atol=1e-5, equal_nan=True
        )
        torch.testing.assert_close(out.group_std.cpu().double(), expect.group_std, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert out.frac_zero_std.item() == pytest.approx(expect.frac_zero_std.item())

    check()


@st.composite
def estimator_cases(draw):
    estimator = draw(st.sampled_from([e for e in ref.ADVANTAGE_ESTIMATORS if e != "grpo"]))
    return dict(
        estimator=estimator,
        scale=draw(st.sampled_from(ref.ADVANTAGE_ESTIMATORS[estimator])),
        num_groups=draw(st.integers(1, 6)),
        group_size=draw(st.integers(1, 8)),
        by_ids=draw(st.booleans()),
        columns=draw(st.integers(1, 3)),
        nan_p=draw(st.sampled_from([0.0, 0.2, 0.6])),
        discrete=draw(st.booleans()),
        float_lengths=draw(st.booleans()),
        zero_length_p=draw(st.sampled_from([0.0, 0.3])),
        eps=draw(st.sampled_from([1e-4, 1e-6])),
        seed=draw(st.integers(0, 2**16)),
    )


def test_group_advantage_estimators_property(backend):
    """The estimators other than grpo, with multi-reward columns (summed first), NaN rewards, groups of one, any
    group order and completion lengths (integer or float, some 0), against the reference in float64. Rewards are
    rounded to float32 once so both sides see the same values; the tolerance is the one of
    tests/test_advantage_estimators.py (a few ulps of the rewards times what the estimator multiplies them by)."""

    @_settings(backend, torch_examples=100)
    @given(case=estimator_cases())
    def check(case):
        g = _generator(case["seed"])
        batch = case["num_groups"] * case["group_size"]
        rewards = torch.randint(-16, 17, (batch, case["columns"]), generator=g).double() / 8
        if not case["discrete"]:
            rewards = rewards + torch.randn(rewards.shape, generator=g, dtype=torch.float64)
        rewards[torch.rand(rewards.shape, generator=g) < case["nan_p"]] = math.nan
        rewards = rewards.float().double()
        weights = torch.tensor([1.0, 0.5, 0.25])[: case["columns"]].double()  # exact: the totals are exact too
        if case["float_lengths"]:
            lengths = torch.rand(batch, generator=g, dtype=torch.float64).float().double() * 30
        else:
            lengths = torch.randint(1, 64, (batch,), generator=g)
        lengths = torch.where(torch.rand(batch, generator=g) < case["zero_length_p"], 0, lengths)
        group = torch.arange(batch) // case["group_size"]
        if case["by_ids"]:
            group = (group * 3 - 5)[torch.randperm(batch, generator=g)]  # sparse, negative, shuffled
            groups = dict(group_ids=group)
        else:
            groups = dict(group_size=case["group_size"])
        kw = dict(scale=case["scale"], eps=case["eps"], estimator=case["estimator"])
        if case["estimator"] in ref.ESTIMATORS_WITH_LENGTHS:
            kw["completion_lengths"] = lengths
        expect = ref.group_advantages(rewards, reward_weights=weights, **groups, **kw)
        out = group_advantages(
            rewards.float().to(DEVICE),
            reward_weights=weights.tolist(),
            return_stats=True,
            backend=backend,
            **{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in groups.items()},
            **{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in kw.items()},
        )
        total = torch.where(torch.isnan(rewards), 0.0, rewards * weights).sum(dim=1)
        total[torch.isnan(rewards).all(dim=1)] = math.nan
        assert_advantages_close(
            out.advantages, expect.advantages, case["estimator"], total, group, lengths, case["eps"]
        )
        torch.testing.assert_close(out.group_std.cpu().double(), expect.group_std, rtol=1e-5, atol=1e-5, equal_nan=True)

    check()
