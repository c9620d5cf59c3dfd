"""The advantage estimators (docs/math.md section 10) on every backend against reference.py in float64, and the
reference against the original code: verl 0.9's own estimator functions where verl's source is present, TRL 1.16's
RLOO advantage written out from its source.

verl does not import on a CPU machine without ray, omegaconf and tensordict, so the verl tests do not import it: they
read ``verl/trainer/ppo/core_algos.py`` and ``verl/utils/torch_functional.py`` from an installed or unpacked verl
(``pip install --no-deps --target DIR verl==0.9.1``; ``GRPO_KERNELS_VERL_SRC=DIR`` or an importable ``verl``), take
the estimator functions, ``AdvantageEstimator`` and ``masked_mean``/``masked_var``/``masked_whiten`` out of the files
with ``ast``, and run those function bodies unchanged. They skip when no verl source is found.
"""

import ast
import importlib.util
import math
import os
import types
from collections import defaultdict
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch
from conftest import DEVICE
from helpers import assert_advantages_close
from reliability_helpers import INTERPRETED

from grpo_kernels import group_advantages
from grpo_kernels import reference as ref

ESTIMATORS = list(ref.ADVANTAGE_ESTIMATORS)
NEW = [e for e in ESTIMATORS if e != "grpo"]


def _lengths_kw(estimator, lengths):
    return {"completion_lengths": lengths} if estimator in ref.ESTIMATORS_WITH_LENGTHS else {}


def _case(batch, seed, discrete=True):
    """Rewards with a NaN, an unscorable row, ties (a tie at the top of group 0, at second place in group 1) and
    lengths with a 0; discrete rewards are multiples of 1/4 (exact in float32)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(-4, 9, (batch,), generator=g).double() / 4
    if not discrete:
        r = r + torch.randn(batch, generator=g, dtype=torch.float64)
    r[0:4] = torch.tensor([2.0, 2.0, 1.0, -1.0])  # group 0 (of 4): tie at the top
    r[4:8] = torch.tensor([3.0, 1.0, 1.0, 0.5])  # group 1: a unique best, tie for second
    r[9] = math.nan
    r[13] = math.nan
    lengths = torch.randint(0, 40, (batch,), generator=g)
    lengths[2] = 0
    return r.float().double(), lengths  # rounded to float32 once: every backend and the reference see one input


# ----------------------------------------------------------------------------------------------------------------
# every backend against the float64 reference
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("group_size", [1, 4, 8])
@pytest.mark.parametrize("discrete", [True, False], ids=["discrete", "continuous"])
def test_fixed_groups_match_reference(backend, estimator, group_size, discrete, poisoned):
    if backend in INTERPRETED and not discrete and group_size != 4:
        pytest.skip("interpreted backend: continuous rewards with G = 4 only in the default run (all of them on a GPU)")
    r, lengths = _case(16, seed=group_size, discrete=discrete)
    kw = _lengths_kw(estimator, lengths)
    out = group_advantages(
        r.float().to(DEVICE),
        group_size=group_size,
        estimator=estimator,
        backend=backend,
        return_stats=True,
        **{k: v.to(DEVICE) for k, v in kw.items()},
    )
    expect = ref.group_advantages(r, group_size=group_size, estimator=estimator, **kw)
    assert_advantages_close(out.advantages, expect.advantages, estimator, r, torch.arange(16) // group_size, lengths)
    # the statistics are those of the rewards whatever the estimator
    torch.testing.assert_close(out.group_mean.cpu().double(), expect.group_mean, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(out.group_std.cpu().double(), expect.group_std, rtol=1e-5, atol=1e-5, equal_nan=True)
    plain = ref.group_advantages(r, group_size=group_size)
    torch.testing.assert_close(expect.group_std, plain.group_std, equal_nan=True, rtol=0, atol=0)
    assert out.frac_zero_std.item() == pytest.approx(plain.frac_zero_std.item())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_group_ids_in_any_order_match_reference(backend, estimator):
    """Shuffled, sparse ids with a group of one and a group of one valid reward among NaNs."""
    r, lengths = _case(23, seed=5, discrete=False)
    ids = torch.tensor([7, 2, 7, 0, 2, 2, 9, 0, 7, 9, 9, 4, 0, 11, 2, 7, 0, 9, 13, 13, 2, 0, 7])
    r[ids == 13] = torch.tensor([math.nan, 0.5], dtype=torch.float64)  # group 13: one valid reward
    kw = _lengths_kw(estimator, lengths)
    out = group_advantages(
        r.float().to(DEVICE),
        group_ids=ids.to(DEVICE),
        estimator=estimator,
        backend=backend,
        **{k: v.to(DEVICE) for k, v in kw.items()},
    )
    expect = ref.group_advantages(r, group_ids=ids, estimator=estimator, **kw)
    assert_advantages_close(out, expect.advantages, estimator, r, ids, lengths)
    assert out[ids == 4].item() == 0.0 and out[ids == 11].item() == 0.0 and bool((out[ids == 13] == 0).all())
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    shuffled = group_advantages(
        r.float()[perm].to(DEVICE),
        group_ids=ids[perm].to(DEVICE),
        estimator=estimator,
        backend=backend,
        **{k: v[perm].to(DEVICE) for k, v in kw.items()},
    )
    assert_advantages_close(shuffled, expect.advantages[perm], estimator, r[perm], ids[perm], lengths[perm])


@pytest.mark.parametrize("estimator", NEW)
def test_groups_larger_than_one_block(backend, estimator):
    """A group of 1500 rows spans two of the Triton program's 1024-row blocks (the top-2, length sums and
    statistics are merged across blocks), and the batch of 1530 spans two blocks of the batch program."""
    g = torch.Generator().manual_seed(3)
    r = (torch.randint(0, 9, (1530,), generator=g).double() / 8 + 0.1 * torch.randn(1530, generator=g)).float().double()
    r[1200] = 5.0  # the unique best of the big group sits in its second block
    r[::97] = math.nan
    ids = torch.cat([torch.zeros(1500, dtype=torch.long), torch.arange(1, 31) // 3])
    lengths = torch.randint(1, 300, (1530,), generator=g)
    kw = _lengths_kw(estimator, lengths)
    out = group_advantages(
        r.float().to(DEVICE),
        group_ids=ids.to(DEVICE),
        estimator=estimator,
        backend=backend,
        **{k: v.to(DEVICE) for k, v in kw.items()},
    )
    expect = ref.group_advantages(r, group_ids=ids, estimator=estimator, **kw).advantages
    assert_advantages_close(out, expect, estimator, r, ids, lengths)


@pytest.mark.parametrize("estimator", NEW)
def test_float64_on_the_torch_backend(estimator):
    r, lengths = _case(28, seed=11, discrete=False)
    kw = _lengths_kw(estimator, lengths)
    out = group_advantages(r, group_size=4, estimator=estimator, backend="torch", **kw)
    expect = ref.group_advantages(r, group_size=4, estimator=estimator, **kw).advantages
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


def test_passk_ties(backend):
    """Only a unique best gets r_max - r_second (over std + eps); a tie at the top leaves the whole group at 0."""
    r = torch.tensor([2.0, 2.0, 1.0, 0.0, 3.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, math.nan, 4.0, 4.0, 4.0])
    for scale in ("group", "none"):
        out = group_advantages(r.to(DEVICE), group_size=4, estimator="grpo_passk", scale=scale, backend=backend).cpu()
        std = torch.tensor([3.0, 1.0, 1.0, 0.0]).std().item()
        best = 2.0 / (std + 1e-4) if scale == "group" else 2.0
        expect = torch.zeros(16)
        expect[4] = best
        torch.testing.assert_close(out, expect, rtol=1e-6, atol=0)


def test_reinforce_plus_plus_baseline_of_constant_groups_is_zero(backend):
    """Binary rewards, every group constant: the centred rewards are exactly 0, and so is the whitened result."""
    r = torch.tensor([1.0] * 4 + [0.0] * 4 + [1.0] * 4, device=DEVICE)
    out = group_advantages(
        r,
        group_size=4,
        estimator="reinforce_plus_plus_baseline",
        backend=backend,
        completion_lengths=torch.arange(12, device=DEVICE),
    )
    assert bool((out == 0).all())


def test_opo_group_without_tokens_has_no_baseline(backend):
    """opo: a group whose completions all have length 0 has no length-weighted baseline: 0 (verl: 0/0 = NaN)."""
    r = torch.tensor([1.0, 0.0, 0.5, 0.25, 2.0, 1.0], device=DEVICE)
    lengths = torch.tensor([0, 0, 3, 1, 2, 2], device=DEVICE)
    out = group_advantages(r, group_size=2, estimator="opo", completion_lengths=lengths, backend=backend).cpu()
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0625, -0.1875, 0.5, -0.5]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("estimator", NEW)
def test_multi_reward_columns_are_summed_first(backend, estimator):
    """sum_then_normalize: the estimator runs on the weighted NaN-sum of the columns (NaN if all are NaN)."""
    g = torch.Generator().manual_seed(4)
    r = torch.randint(0, 5, (12, 3), generator=g).double() / 4
    r[2, 1] = math.nan
    r[7] = math.nan
    w = torch.tensor([1.0, 0.5, 2.0])
    lengths = torch.randint(1, 9, (12,), generator=g)
    total = (r * w).nansum(dim=1)
    total[7] = math.nan
    kw = _lengths_kw(estimator, lengths)
    out = group_advantages(
        r.float().to(DEVICE),
        group_size=3,
        reward_weights=w,
        estimator=estimator,
        backend=backend,
        **{k: v.to(DEVICE) for k, v in kw.items()},
    )
    expect = ref.group_advantages(total, group_size=3, estimator=estimator, **kw).advantages
    assert_advantages_close(out, expect, estimator, total, torch.arange(12) // 3, lengths)


@pytest.mark.parametrize("estimator", NEW)  # (grpo: tests/test_group_advantages.py)
def test_deterministic(backend, estimator):
    """Bitwise equal on a rerun; meaningful on a GPU (the interpreter runs programs one after another: small there)."""
    g = torch.Generator().manual_seed(0)
    rows, groups = (256, 8) if backend in INTERPRETED else (4096, 300)
    r = torch.randn(rows, generator=g).to(DEVICE)
    ids = torch.randint(0, groups, (rows,), generator=g).to(DEVICE)
    kw = _lengths_kw(estimator, torch.randint(0, 500, (rows,), generator=g).to(DEVICE))
    a = group_advantages(r, group_ids=ids, estimator=estimator, backend=backend, **kw)
    b = group_advantages(r, group_ids=ids, estimator=estimator, backend=backend, **kw)
    assert torch.equal(a, b)


def test_compiles_without_graph_breaks(backend):
    r, lengths = _case(16, seed=2)
    fn = torch.compile(
        lambda r, n: group_advantages(r, group_size=4, estimator="opo", completion_lengths=n, backend=backend),
        fullgraph=True,
        backend="aot_eager",
    )
    out = fn(r.float().to(DEVICE), lengths.to(DEVICE))
    expect = ref.group_advantages(r, group_size=4, estimator="opo", completion_lengths=lengths).advantages
    assert_advantages_close(out, expect, "opo", r, torch.arange(16) // 4, lengths)


# ----------------------------------------------------------------------------------------------------------------
# the reference against TRL 1.16's RLOO (RLOOTrainer._generate_and_score_completions, written out from its source)
# ----------------------------------------------------------------------------------------------------------------
def test_rloo_matches_trl_formula():
    r, _ = _case(24, seed=8, discrete=False)
    r[16:20] = torch.tensor([math.nan, math.nan, math.nan, 1.5], dtype=torch.float64)  # one scorable completion
    grouped = r.view(-1, 4)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)
    trl = torch.nan_to_num(r - baselines.view(-1), nan=0.0)  # normalize_advantages=False (TRL's default)
    expect = ref.group_advantages(r, group_size=4, estimator="rloo").advantages
    torch.testing.assert_close(expect, trl, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# the reference against verl 0.9's own functions
# ----------------------------------------------------------------------------------------------------------------
VERL_FUNCTIONS = {
    "grpo": "compute_grpo_outcome_advantage",
    "rloo": "compute_rloo_outcome_advantage",
    "grpo_passk": "compute_grpo_passk_outcome_advantage",
    "reinforce_plus_plus_baseline": "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "opo": "compute_opo_outcome_advantage",
    "gpg": "compute_gpg_outcome_advantage",
    "rloo_vectorized": "compute_rloo_vectorized_outcome_advantage",
}


def _verl_source() -> Path | None:
    root = os.environ.get("GRPO_KERNELS_VERL_SRC")
    if root:
        return Path(root)
    spec = importlib.util.find_spec("verl")  # finds the package without importing it (its __init__ imports ray)
    return Path(spec.origin).parents[1] if spec is not None and spec.origin else None


def _definitions(path: Path, names) -> ast.Module:
    tree = ast.parse(path.read_text())
    return ast.Module([n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names], [])


@pytest.fixture(scope="module")
def verl():
    """``{registered name: verl's function}`` for the estimators, executed from verl's own source."""
    root = _verl_source()
    if root is None or not (root / "verl/trainer/ppo/core_algos.py").is_file():
        pytest.skip(
            "verl's source not found (pip install --no-deps --target DIR verl==0.9.1; GRPO_KERNELS_VERL_SRC=DIR)"
        )
    functional = {"torch": torch}
    names = ("masked_sum", "masked_mean", "masked_var", "masked_whiten")
    # verl's own source, run unchanged: that is the point of this fixture
    code = compile(_definitions(root / "verl/utils/torch_functional.py", names), "verl_torch_functional", "exec")
    exec(code, functional)  # noqa: S102
    registry = {}

    def register_adv_est(name):
        def record(fn):
            registry[name.value if isinstance(name, Enum) else name] = fn
            return fn

        return record

    scope = {
        "torch": torch,
        "np": np,
        "defaultdict": defaultdict,
        "Enum": Enum,
        "Any": Any,
        "Optional": Optional,
        "AlgoConfig": Any,
        "register_adv_est": register_adv_est,
        "verl_F": types.SimpleNamespace(**functional),
    }
    algos = root / "verl/trainer/ppo/core_algos.py"
    code = compile(_definitions(algos, ("AdvantageEstimator", *VERL_FUNCTIONS.values())), "verl_core_algos", "exec")
    exec(code, scope)  # noqa: S102
    assert {name: fn.__name__ for name, fn in registry.items()} == VERL_FUNCTIONS  # verl registers them so
    return registry


def _run_verl(fn, estimator, rewards, mask, uid, **config):
    """verl's function on outcome rewards (the score on the last response token, as verl's reward manager puts it)."""
    token_rewards = torch.zeros(mask.shape, dtype=rewards.dtype)
    last = mask.shape[1] - 1 - torch.argmax(mask.flip(1), dim=1)
    token_rewards[torch.arange(len(rewards)), last] = rewards
    kwargs = {"config": {"norm_adv_by_std_in_grpo": True, **config}} if estimator != "grpo" else {}
    return fn(token_level_rewards=token_rewards, response_mask=mask.to(rewards.dtype), index=uid, **kwargs)[0]


def _verl_batch(num_groups, size, seed, discrete):
    g = torch.Generator().manual_seed(seed)
    batch = num_groups * size
    r = torch.randint(-2, 5, (batch,), generator=g).double() / 2
    if not discrete:
        r = r + torch.randn(batch, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 12, (batch,), generator=g)
    mask = (torch.arange(12)[None, :] < lengths[:, None]).to(torch.float64)
    order = torch.randperm(batch, generator=g)  # verl's uids: any order
    uid = np.array([f"prompt-{i}" for i in (torch.arange(batch) // size)[order].tolist()], dtype=object)
    return r[order], lengths[order], mask[order], uid


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("discrete", [True, False], ids=["discrete", "continuous"])
def test_reference_matches_verl(verl, estimator, discrete):
    """No NaN rewards and no group of one, where verl and this package agree: verl's [B, T] advantages equal ours
    broadcast over the response mask (eps = verl's 1e-6; the whitening uses verl's 1e-8)."""
    r, lengths, mask, uid = _verl_batch(num_groups=6, size=5, seed=7 if discrete else 8, discrete=discrete)
    ids = torch.as_tensor([int(u.split("-")[1]) for u in uid])
    theirs = _run_verl(verl[estimator], estimator, r, mask, uid)
    ours = ref.group_advantages(r, group_ids=ids, estimator=estimator, eps=1e-6, **_lengths_kw(estimator, lengths))
    # verl's masked_mean divides by (sum(mask) + 1e-8): a relative 1e-8 / tokens in the whitening; its gpg alpha
    # (int / int64 tensor) is computed in float32 even for float64 rewards: a relative 6e-8.
    rtol = 1e-7 if estimator == "gpg" else 1e-9
    atol = 1e-10 if estimator == "reinforce_plus_plus_baseline" else 1e-12
    torch.testing.assert_close(ours.advantages[:, None] * mask, theirs, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_backends_match_verl_in_float32(verl, backend_name, request):
    """Each backend on float32 rewards against verl's functions run on the same float32 rewards."""
    from grpo_kernels.backends import unavailable_reason

    reason = unavailable_reason(backend_name, DEVICE)
    if reason:
        pytest.skip(reason)
    r, lengths, mask, uid = _verl_batch(num_groups=4, size=6, seed=9, discrete=False)
    r, mask = r.float(), mask.float()
    ids = torch.as_tensor([int(u.split("-")[1]) for u in uid])
    for estimator in ESTIMATORS:
        theirs = _run_verl(verl[estimator], estimator, r, mask, uid)
        ours = group_advantages(
            r.to(DEVICE),
            group_ids=ids.to(DEVICE),
            estimator=estimator,
            eps=1e-6,
            backend=backend_name,
            **{k: v.to(DEVICE) for k, v in _lengths_kw(estimator, lengths).items()},
        )
        torch.testing.assert_close(ours.cpu()[:, None] * mask, theirs, rtol=2e-5, atol=2e-5, msg=estimator)


def test_verl_divergences_are_the_documented_ones(verl):
    """Where verl and this package differ, exactly as docs/math.md section 10 says."""
    r = torch.tensor([1.5, 0.5, 2.0, -1.0, 3.0], dtype=torch.float64)  # groups: {0, 1, 2, 3} and the single {4}
    uid = np.array(["a", "a", "a", "a", "b"], dtype=object)
    ids = torch.tensor([0, 0, 0, 0, 1])
    lengths = torch.tensor([3, 5, 2, 4, 6])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).to(torch.float64)
    ours = {
        e: ref.group_advantages(r, group_ids=ids, estimator=e, eps=1e-6, **_lengths_kw(e, lengths)).advantages
        for e in ESTIMATORS
    }
    verl_row = {e: _run_verl(verl[e], e, r, mask, uid)[4, 0].item() for e in ESTIMATORS if e != "grpo_passk"}
    # A group of one: here every member gets 0; verl passes the raw score through (grpo: over 1 + eps; gpg: times
    # alpha = B / #nonzero), and for reinforce_plus_plus_baseline whitens it with the rest.
    assert all(ours[e][4].item() == 0.0 for e in ESTIMATORS)
    assert verl_row["grpo"] == pytest.approx(3.0 / (1 + 1e-6), rel=1e-6)  # (its std of 1 is a float32 tensor)
    assert verl_row["rloo"] == verl_row["opo"] == 3.0
    assert verl_row["gpg"] == pytest.approx(3.0 * 5 / 5, rel=1e-12)
    assert verl_row["reinforce_plus_plus_baseline"] != 0.0
    # ... while its vectorized RLOO gives the group of one 0, as here
    assert _run_verl(verl["rloo_vectorized"], "rloo", r, mask, uid)[4, 0].item() == 0.0
    with pytest.raises(ValueError, match="Pass@k requires at least 2 samples per group"):
        _run_verl(verl["grpo_passk"], "grpo_passk", r, mask, uid)
    # A NaN reward: here it is left out of its group's statistics; in verl it makes the whole group NaN.
    r_nan = r.clone()
    r_nan[1] = math.nan
    theirs = _run_verl(verl["rloo"], "rloo", r_nan, mask, uid)
    assert torch.isnan(theirs[:4, 0]).all()
    ours_nan = ref.group_advantages(r_nan, group_ids=ids, estimator="rloo").advantages
    assert torch.isfinite(ours_nan).all() and ours_nan[1].item() == 0.0
    # opo: a group whose completions have no tokens: verl divides 0 by 0
    no_tokens = torch.zeros_like(mask)
    no_tokens[4] = mask[4]
    assert torch.isnan(_run_verl(verl["opo"], "opo", r, no_tokens, uid)[:4]).all()
