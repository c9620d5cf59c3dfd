"""The CUDA kernels' per-row math (csrc/include/grpo_kernels/row_math.cuh), compiled for the host with g++.

tests/cuda/host_math.cpp drives the ``__host__ __device__`` helpers (online log-sum-exp + merge, entropy, the
logit gradient, and the per-token epilogue of every loss variant); this file feeds it random inputs and compares
its answers with grpo_kernels.reference (float64) and grpo_kernels.loss_math (the float32 blueprint of every
epilogue). No GPU needed: this is the part of the CUDA backend that CI can check numerically.
"""

from __future__ import annotations

import itertools
import math
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
from helpers import rel_err

from grpo_kernels import reference as ref
from grpo_kernels.loss_math import LossConfig, TokenBatch, kl_and_grad, loss_forward_from_logprobs, policy_and_grads

ROOT = Path(__file__).resolve().parents[1]
KL_CODES = {"k3": 0, "k1": 1, "k2": 2, "low_var_kl": 3}
POLICY_CODES = {"clip": 0, "cispo": 1, "sapo": 2}


@pytest.fixture(scope="session")
def host_math(tmp_path_factory) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/c++) on PATH")
    exe = tmp_path_factory.mktemp("cuda_host_math") / "host_math"
    cmd = [
        cxx,
        "-std=c++17",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        f"-I{ROOT / 'csrc' / 'include'}",
        str(ROOT / "tests" / "cuda" / "host_math.cpp"),
        "-o",
        str(exe),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def _hex(x: float) -> str:
    x = float(x)
    return "nan" if math.isnan(x) else float(x).hex()


def _run(exe: Path, lines: list[str]) -> list[list[float]]:
    out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
    return [[float.fromhex(tok) for tok in row.split()] for row in out.stdout.splitlines()]


def _f32(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# online log-sum-exp, entropy, logit gradient
# ----------------------------------------------------------------------------------------------------------------
def _rows(seed: int):
    """(name, u [V] float32, target) rows: plain, wide range, -inf entries, cut-heavy, NaN, +inf."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for vocab in (1, 7, 37, 1000):
        u = torch.randn(vocab, generator=g) * 3
        rows.append((f"plain-{vocab}", u, int(torch.randint(vocab, (1,), generator=g))))
    rows.append(("offset", torch.randn(300, generator=g) * 0.5 + 1000.0, 17))  # far from 0: lse - E[u] cancels
    rows.append(("wide", torch.randn(300, generator=g) * 40.0, 5))  # most p_v underflow to 0
    u = torch.randn(64, generator=g) * 2
    u[::3] = -math.inf  # a masked-out vocabulary
    rows.append(("minus-inf", u, 4))
    u = torch.full((40,), -math.inf)
    u[23] = 0.5  # only the target is finite: lp = 0, H = 0
    rows.append(("only-target", u, 23))
    u = torch.randn(50, generator=g)
    u[:20] = -math.inf  # the first parts hold -inf only: merges of empty states
    rows.append(("leading-minus-inf", u, 30))
    for name, bad in (("nan", math.nan), ("plus-inf", math.inf)):
        u = torch.randn(33, generator=g)
        u[11] = bad
        rows.append((name, u, 2))
    u = torch.full((20,), -math.inf)
    u[7] = math.nan  # NaN among -inf only (the running max stays -inf)
    rows.append(("nan-among-minus-inf", u, 7))
    return rows


def _lse_case(u: torch.Tensor, target: int, a: float, b: float, g: torch.Generator) -> str:
    vocab = u.numel()
    parts = int(torch.randint(1, 6, (1,), generator=g))
    cuts = sorted(int(c) for c in torch.randint(0, vocab + 1, (parts - 1,), generator=g))  # empty parts allowed
    fields = ["LSE", str(vocab), str(target), _hex(a), _hex(b), str(parts), *map(str, cuts)]
    fields += [_hex(x) if math.isfinite(x) or math.isnan(x) else ("inf" if x > 0 else "-inf") for x in u.tolist()]
    return " ".join(fields)


def test_online_lse_merge_entropy_and_logit_grad_match_reference(host_math):
    g = torch.Generator().manual_seed(0)
    rows = _rows(1)
    coefs = [(float(_f32(torch.randn(1, generator=g))), float(_f32(torch.randn(1, generator=g)))) for _ in rows]
    results = _run(host_math, [_lse_case(u, y, a, b, g) for (_, u, y), (a, b) in zip(rows, coefs)])
    for (name, u, y), (a, b), res in zip(rows, coefs, results):
        lse_seq, h_seq, lse, h, lp, *grad = res
        assert len(grad) == u.numel(), name
        if name in ("nan", "plus-inf", "nan-among-minus-inf"):  # NaN in a row that takes part reaches everything
            assert all(math.isnan(x) for x in res), name
            continue
        u64 = u.double().requires_grad_(True)
        lp64, h64 = ref.token_logprobs(u64[None], torch.tensor([y]))
        (grad64,) = torch.autograd.grad(a * lp64.sum() + b * h64.sum(), u64)
        lse64 = torch.logsumexp(u.double(), 0).item()
        for ours in (lse_seq, lse):
            assert abs(ours - lse64) <= 1e-6 * max(1.0, abs(lse64)), name
        for ours in (h_seq, h):
            assert abs(ours - h64.item()) <= 1e-5 * max(1.0, abs(h64.item())), name
        assert abs(lp - lp64.item()) <= 1e-5 * max(1.0, abs(lp64.item())), name
        assert all(math.isfinite(x) for x in grad), name
        assert rel_err(torch.tensor(grad), grad64) < 1e-5, name
    only = results[[n for n, _, _ in rows].index("only-target")]
    assert only[2:5] == [0.5, 0.0, 0.0]  # lse, H, lp exact


# ----------------------------------------------------------------------------------------------------------------
# per-token epilogue
# ----------------------------------------------------------------------------------------------------------------
POLICIES = {  # name -> LossConfig fields of the policy term
    "clip": dict(loss_type="dapo"),
    "clip-asym": dict(loss_type="grpo", epsilon_high=0.28),
    "clip-delta": dict(loss_type="bnpo", delta=1.5),
    "clip-dual": dict(loss_type="dapo", dual_clip=3.0),
    "clip-delta-dual": dict(
        loss_type="dr_grpo", delta=1.4, dual_clip=2.0, epsilon_low=0.1, epsilon_high=0.3, max_completion_length=8
    ),  # (dr_grpo needs it: a LossConfig field since 0.2)
    "cispo": dict(loss_type="cispo", epsilon_high=4.0),
    "sapo": dict(loss_type="sapo", sapo_temperature_pos=1.3, sapo_temperature_neg=0.7),
}


def _params(config: LossConfig) -> list[str]:
    form = "cispo" if config.loss_type == "cispo" else "sapo" if config.loss_type == "sapo" else "clip"
    return [
        str(POLICY_CODES[form]),
        str(KL_CODES[config.kl_estimator]),
        _hex(config.beta),
        _hex(config.epsilon_low),
        _hex(config.epsilon_high),
        str(int(config.delta is not None)),
        _hex(config.delta or 0.0),
        str(int(config.dual_clip is not None)),
        _hex(config.dual_clip or 0.0),
        _hex(config.sapo_temperature_pos),
        _hex(config.sapo_temperature_neg),
        str(int(config.bias_corrected_kl)),
    ]


def _special_ratios(config: LossConfig) -> list[float]:
    """Ratios on every boundary of the clip family (ties of min), as float32 values."""
    lo, hi = float(_f32(1 - config.epsilon_low)), float(_f32(1 + config.epsilon_high))
    out = [lo, hi, 1.0, math.nan]
    if config.delta is not None:
        out.append(float(_f32(config.delta)))
    if config.dual_clip is not None:
        out.append(float(_f32(config.dual_clip)))
    return out


@pytest.mark.parametrize("policy", list(POLICIES))
def test_policy_terms_match_loss_math(host_math, policy):
    config = LossConfig(**{"epsilon_high": 0.2, **POLICIES[policy]})
    g = torch.Generator().manual_seed(len(policy))
    rho = torch.exp(0.6 * torch.randn(200, generator=g))
    adv = torch.randn(200, generator=g)
    adv[::17] = 0.0
    lp = -torch.rand(200, generator=g) * 5
    specials = _special_ratios(config)
    extra_rho = torch.tensor([r for r in specials for _ in range(3)])
    extra_adv = torch.tensor([-1.5, 0.7, 0.0] * len(specials))
    rho, adv = (
        torch.cat([rho, extra_rho]),
        torch.cat(
            [
                adv,
                extra_adv,
            ]
        ),
    )
    lp = torch.cat([lp, -torch.rand(extra_rho.numel(), generator=g)])
    adv[5], lp[6] = math.nan, math.nan  # NaN at a token that takes part propagates
    lines = [" ".join(["POLICY", *_params(config), _hex(r), _hex(a), _hex(x)]) for r, a, x in zip(rho, adv, lp)]
    ours = torch.tensor(_run(host_math, lines), dtype=torch.float32)
    value, d_ratio, d_logprob = policy_and_grads(rho, adv, lp, config)
    expect = torch.stack([value, d_ratio, d_logprob], dim=1)
    torch.testing.assert_close(ours, expect, rtol=2e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("estimator", list(KL_CODES))
def test_kl_terms_match_loss_math(host_math, estimator):
    g = torch.Generator().manual_seed(KL_CODES[estimator])
    lp = -torch.rand(300, generator=g) * 6
    ref_lp = lp + torch.randn(300, generator=g)
    ref_lp[:20] = lp[:20] + torch.linspace(-30, 30, 20)  # beyond low_var_kl's clamps (|k| > 20, raw > 10)
    ref_lp[20], lp[21] = math.nan, math.nan
    lines = [f"KL {KL_CODES[estimator]} {_hex(a)} {_hex(b)}" for a, b in zip(lp, ref_lp)]
    ours = torch.tensor(_run(host_math, lines), dtype=torch.float32)
    expect = torch.stack(kl_and_grad(lp, ref_lp, estimator), dim=1)
    torch.testing.assert_close(ours, expect, rtol=2e-6, atol=1e-6, equal_nan=True)


KL_VARIANTS = [(0.0, "k3", False)] + [(b, e, bc) for b, e, bc in itertools.product([0.07], KL_CODES, [False, True])]


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("beta,estimator,bias_corrected", KL_VARIANTS)
def test_token_epilogue_matches_loss_forward(host_math, policy, beta, estimator, bias_corrected):
    """token_terms + g_t = coef (dL/dr + dL/dlp) against loss_math's token-level forward, with and without
    old log-probs and IS weights."""
    base = {"epsilon_high": 0.2, **POLICIES[policy]}
    config = LossConfig(**base, beta=beta, kl_estimator=estimator, bias_corrected_kl=bias_corrected)
    n = 48
    g = torch.Generator().manual_seed(zlib.crc32(repr((policy, beta, estimator, bias_corrected)).encode()))
    lp = -torch.rand(n, generator=g) * 4
    for use_old, use_w in itertools.product([True, False], [True, False]):
        old = (lp + 0.4 * torch.randn(n, generator=g)) if use_old else None
        w = (0.5 + torch.rand(n, generator=g)) if use_w else None
        batch = TokenBatch(
            token_ids=torch.zeros(n, dtype=torch.long),
            coef=torch.rand(n, generator=g) / n,
            advantages=torch.randn(n, generator=g),
            old_logprobs=old,
            ref_logprobs=lp + torch.randn(n, generator=g) if beta else None,
            is_weights=w,
            cu_seqlens=torch.tensor([0, n]),
            seq_ids=torch.zeros(n, dtype=torch.long),
            seq_weights=torch.full((n,), 1 / n),
        )
        expect = loss_forward_from_logprobs(lp, lp, lp[:0], batch, config)
        log_ratio = lp - old if use_old else torch.zeros(n)
        ref_lp = batch.ref_logprobs if beta else torch.zeros(n)
        weights = w if use_w else torch.ones(n)
        lines = [
            " ".join(
                [
                    "TOKEN",
                    *_params(config),
                    *map(_hex, (lp[i], log_ratio[i], batch.advantages[i], ref_lp[i], weights[i])),
                    str(int(use_w)),
                    _hex(batch.coef[i]),
                ]
            )
            for i in range(n)
        ]
        ours = torch.tensor(_run(host_math, lines), dtype=torch.float64)
        loss, kl, flags, grad = ours.T
        # exp(k) - k - 1 cancels near k = 0: a 1-ulp difference between two libms' exp(k) ~ 1 is 1.2e-7 absolute.
        torch.testing.assert_close(loss.float(), expect.per_token_loss, rtol=2e-6, atol=2.5e-7)
        torch.testing.assert_close(kl.float(), expect.kl, rtol=2e-6, atol=2.5e-7)
        torch.testing.assert_close(grad.float(), expect.grad_logprobs, rtol=1e-5, atol=1e-9)
        assert torch.equal(flags.to(torch.uint8), expect.clip_flags)


# ----------------------------------------------------------------------------------------------------------------
# grouped advantages (csrc/include/grpo_kernels/advantage_math.cuh, driven by tests/cuda/advantage_math.cpp)
# ----------------------------------------------------------------------------------------------------------------
ESTIMATOR_CODES = {"grpo": 0, "rloo": 1, "grpo_passk": 2, "reinforce_plus_plus_baseline": 3, "opo": 4, "gpg": 5}
SCALE_CODES = {"group": 0, "batch": 1, "none": 2}


@pytest.fixture(scope="session")
def advantage_math(tmp_path_factory) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/c++) on PATH")
    exe = tmp_path_factory.mktemp("cuda_advantage_math") / "advantage_math"
    cmd = [
        cxx,
        "-std=c++17",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        f"-I{ROOT / 'csrc' / 'include'}",
        str(ROOT / "tests" / "cuda" / "advantage_math.cpp"),
        "-o",
        str(exe),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


ADVANTAGE_CASES = [(e, s) for e, scales in ref.ADVANTAGE_ESTIMATORS.items() for s in scales if s != "batch"]


@pytest.mark.parametrize("estimator,scale", ADVANTAGE_CASES)
def test_advantage_math_matches_reference(advantage_math, estimator, scale):
    """Groups of 1 to 70 rows (more than one per lane), NaN totals, ties at the top and at second place, integer and
    fractional lengths with zeros, a group without tokens; the helpers run in the warp's order."""
    from helpers import assert_advantages_close

    g = torch.Generator().manual_seed(ESTIMATOR_CODES[estimator] * 3 + SCALE_CODES[scale])
    sizes = [1, 2, 3, 5, 8, 33, 70, 4, 4, 2]
    batch = sum(sizes)
    t = (torch.randint(-8, 9, (batch,), generator=g).double() / 4 + 0.3 * torch.randn(batch, generator=g)).float()
    t[torch.rand(batch, generator=g) < 0.15] = math.nan
    t[-10:-6] = torch.tensor([2.0, 2.0, 1.0, 0.5])  # a tie at the top
    t[-6:-2] = torch.tensor([3.0, 1.0, 1.0, 0.5])  # a unique best, tie for second
    lengths = torch.where(torch.rand(batch, generator=g) < 0.2, 0.0, torch.rand(batch, generator=g) * 50).float()
    lengths[-2:] = 0.0  # the last group has no tokens
    cu = torch.cumsum(torch.tensor(sizes), 0).tolist()
    fields = [
        "ADV",
        str(ESTIMATOR_CODES[estimator]),
        str(SCALE_CODES[scale]),
        _hex(_f32(1e-4)),
        str(batch),
        str(len(sizes)),
        *map(str, cu),
        *map(_hex, t.tolist()),
        *map(_hex, lengths.tolist()),
    ]
    (ours,) = _run(advantage_math, [" ".join(fields)])
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    kw = {"completion_lengths": lengths.double()} if estimator in ref.ESTIMATORS_WITH_LENGTHS else {}
    expect = ref.group_advantages(t.double(), group_ids=group, estimator=estimator, scale=scale, **kw).advantages
    assert_advantages_close(torch.tensor(ours, dtype=torch.float32), expect, estimator, t.double(), group, lengths)
