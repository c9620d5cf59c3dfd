"""The executable spec against values derived independently: by hand, and by a float64 numpy oracle written here
with plain per-token loops (no torch, no vectorised shortcut shared with reference.py)."""

import itertools
import math

import numpy as np
import pytest
import torch

from grpo_kernels import reference as ref


# ----------------------------------------------------------------------------------------------------------------
# numpy oracle
# ----------------------------------------------------------------------------------------------------------------
def np_token(z, y, tau):
    u = np.asarray(z, dtype=np.float64) / tau
    mx = u.max()
    lse = mx + math.log(np.exp(u - mx).sum())
    p = np.exp(u - lse)
    h = -sum(pv * math.log(pv) for pv in p if pv > 0)
    return u[y] - lse, h


def np_kl(lp, lp_ref, est):
    k = lp_ref - lp
    if est == "k3":
        return math.exp(k) - k - 1
    if est == "k1":
        return -k
    if est == "k2":
        return 0.5 * k * k
    kc = min(max(k, -20.0), 20.0)
    return min(max(math.exp(kc) - kc - 1, -10.0), 10.0)


def np_policy(rho, a, lp, c):
    if c["loss_type"] == "cispo":
        return -min(rho, c["eh"]) * a * lp
    if c["loss_type"] == "sapo":
        ts = c["sapo_pos"] if a > 0 else c["sapo_neg"]
        return -(4.0 / ts) * (1.0 / (1.0 + math.exp(-ts * (rho - 1)))) * a
    r1 = min(rho, c["delta"]) if c["delta"] is not None else rho
    r2 = min(max(rho, 1 - c["el"]), 1 + c["eh"])
    loss = -min(r1 * a, r2 * a)
    if c["dual"] is not None and a < 0:
        loss = min(loss, -c["dual"] * a)
    return loss


def np_grpo(z, y, adv, m, old, lp_ref, w, c):
    """z [B,T,V]; adv [B] or [B,T]; old/lp_ref/w may be None. Returns (loss, lp [B,T], metrics dict)."""
    B, T, _ = z.shape
    lp = np.zeros((B, T))
    for b, t in itertools.product(range(B), range(T)):
        if m[b, t] != 0:
            lp[b, t] = np_token(z[b, t], y[b, t], c["tau"])[0]
    A = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, (B, T))
    rho = np.ones((B, T))
    for b in range(B):
        d = [(lp[b, t] - old[b, t]) if old is not None else 0.0 for t in range(T)]
        if c["level"] == "sequence":
            n = sum(m[b])
            rho[b, :] = math.exp(sum(m[b, t] * d[t] for t in range(T)) / max(1.0, n))
        else:
            rho[b, :] = [math.exp(x) for x in d]
    L, KL = np.zeros((B, T)), np.zeros((B, T))
    for b, t in itertools.product(range(B), range(T)):
        if m[b, t] == 0:
            continue
        val = np_policy(rho[b, t], A[b, t], lp[b, t], c)
        if w is not None:
            val *= w[b, t]
        if c["beta"] != 0:
            KL[b, t] = np_kl(lp[b, t], lp_ref[b, t], c["est"]) * (rho[b, t] if c["bc"] else 1.0)
            val += c["beta"] * KL[b, t]
        L[b, t] = val
    lt = c["loss_type"]
    if lt in ("grpo", "sapo"):
        loss = np.mean([sum(m[b] * L[b]) / max(1.0, sum(m[b])) for b in range(B)])
    elif lt == "bnpo":
        loss = (m * L).sum() / max(1.0, m.sum())
    elif lt == "dr_grpo":
        loss = (m * L).sum() / (B * c["lmax"])
    else:
        loss = (m * L).sum() / max(1.0, m.sum() if c["items"] is None else c["items"])
    count = max(1.0, m.sum())
    low = ((rho < 1 - c["el"]) & (A < 0)).astype(float)
    high = ((rho > 1 + c["eh"]) & (A > 0)).astype(float)
    metrics = dict(
        kl_mean=(m * KL).sum() / count,
        clip_low=(m * low).sum() / count,
        clip_high=(m * high).sum() / count,
        clip_region=(m * np.maximum(low, high)).sum() / count,
    )
    return loss, lp, metrics


# ----------------------------------------------------------------------------------------------------------------
# by hand
# ----------------------------------------------------------------------------------------------------------------
def test_logprob_and_entropy_by_hand():
    # exp(u) = [1, 2, 3] -> p = [1/6, 1/3, 1/2]
    z = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]], dtype=torch.float64)
    lp, h = ref.token_logprobs(z, torch.tensor([2]))
    assert lp.item() == pytest.approx(math.log(0.5), abs=1e-15)
    expected_h = -(1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3) + 1 / 2 * math.log(1 / 2))
    assert h.item() == pytest.approx(expected_h, abs=1e-15)
    # temperature 2: exp(u) = [1, sqrt 2, sqrt 3]
    lp, _ = ref.token_logprobs(z, torch.tensor([0]), temperature=2.0)
    assert lp.item() == pytest.approx(-math.log(1 + math.sqrt(2) + math.sqrt(3)), abs=1e-15)


def test_masked_vocabulary_and_single_finite_entry_by_hand():
    z = torch.tensor([[-math.inf, 1.0, -math.inf]], dtype=torch.float64, requires_grad=True)
    lp, h = ref.token_logprobs(z, torch.tensor([1]))
    assert lp.item() == 0.0 and h.item() == 0.0
    (g,) = torch.autograd.grad(lp.sum() + h.sum(), z)
    assert torch.equal(g, torch.zeros_like(g))


def test_clip_loss_and_gradient_by_hand():
    # one token, lp = log(1/2) (uniform over 2), old chosen so that rho = 1.5; eps = 0.2 -> clipped ratio 1.2
    z = torch.zeros(1, 1, 2, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0]])
    old = torch.tensor([[math.log(0.5) - math.log(1.5)]], dtype=torch.float64)
    out = ref.grpo_loss(z, y, torch.tensor([1.0], dtype=torch.float64), old_logprobs=old)
    assert out.loss.item() == pytest.approx(-1.2, abs=1e-12)  # -min(1.5 * 1, 1.2 * 1): clipped, no gradient
    assert out.clip_high.item() == 1.0 and out.clip_low.item() == 0.0
    (g,) = torch.autograd.grad(out.loss, z)
    assert torch.equal(g, torch.zeros_like(g))
    # A = -1: -min(-1.5, -1.2) = 1.5, unclipped; dL/dlp = -A rho = 1.5; dlp/dz = onehot - p = [1/2, -1/2]
    out = ref.grpo_loss(z, y, torch.tensor([-1.0], dtype=torch.float64), old_logprobs=old)
    assert out.loss.item() == pytest.approx(1.5, abs=1e-12)
    (g,) = torch.autograd.grad(out.loss, z)
    assert g.flatten().tolist() == pytest.approx([0.75, -0.75], abs=1e-12)
    # dual clip c = 1.25 caps it at -c A = 1.25, with no gradient
    out = ref.grpo_loss(z, y, torch.tensor([-1.0], dtype=torch.float64), old_logprobs=old, dual_clip=1.25)
    assert out.loss.item() == pytest.approx(1.25, abs=1e-12)


def test_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    out = ref.group_advantages(r, group_size=3)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # Bessel, group 0 = [1, 0, 0]
    assert out.advantages[:3].tolist() == pytest.approx(
        [(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4)] + [(-1 / 3) / (std + 1e-4)]
    )
    assert out.group_mean.tolist() == pytest.approx([1 / 3, 5 / 3])
    out = ref.group_advantages(torch.tensor([1.0, 1.0, 3.0, 3.0]), group_size=2)
    assert out.advantages.tolist() == [0.0] * 4 and out.frac_zero_std.item() == 1.0


# ----------------------------------------------------------------------------------------------------------------
# against the numpy oracle
# ----------------------------------------------------------------------------------------------------------------
def _case(seed, B=3, T=5, V=7, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    m = torch.ones(B, T, dtype=torch.float64)
    m[0, 3:] = 0
    m[-1, 1:] = 0
    adv = (
        torch.randn(B, T, generator=g, dtype=torch.float64)
        if per_token_adv
        else torch.randn(B, generator=g, dtype=torch.float64)
    )
    lp, _ = ref.token_logprobs(z, y)
    old = lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lref = lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    w = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)
    return z, y, m, adv, old, lref, w


VARIANTS = [
    dict(loss_type=lt, importance_sampling_level=lvl)
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
    for lvl in ("token", "sequence")
]
EXTRAS = [
    dict(),
    dict(beta=0.1, kl_estimator="k3"),
    dict(beta=0.2, kl_estimator="k1", bias_corrected_kl=True),
    dict(beta=0.05, kl_estimator="k2", delta=1.4),
    dict(beta=0.3, kl_estimator="low_var_kl", dual_clip=2.0, epsilon_high=0.28),
    dict(temperature=0.7, is_weights=True, num_items_in_batch=11),
    dict(old_logprobs=None, beta=0.1),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['loss_type']}-{v['importance_sampling_level']}")
@pytest.mark.parametrize("extra", range(len(EXTRAS)))
def test_loss_matches_numpy_oracle(variant, extra):
    kw = dict(EXTRAS[extra])
    z, y, m, adv, old, lref, w = _case(extra, per_token_adv=extra % 2 == 1)
    use_old = kw.pop("old_logprobs", True) is not None
    use_w = kw.pop("is_weights", False)
    kw = dict(variant, max_completion_length=6, **kw)
    out = ref.grpo_loss(
        z,
        y,
        adv,
        mask=m,
        old_logprobs=old if use_old else None,
        ref_logprobs=lref,
        is_weights=w if use_w else None,
        **kw,
    )
    el = kw.get("epsilon_low", 0.2)
    cfg = dict(
        loss_type=kw["loss_type"],
        level=kw["importance_sampling_level"],
        tau=kw.get("temperature", 1.0),
        el=el,
        eh=kw.get("epsilon_high", el),
        delta=kw.get("delta"),
        dual=kw.get("dual_clip"),
        beta=kw.get("beta", 0.0),
        est=kw.get("kl_estimator", "k3"),
        bc=kw.get("bias_corrected_kl", False),
        sapo_pos=1.0,
        sapo_neg=1.05,
        lmax=6,
        items=kw.get("num_items_in_batch"),
    )
    loss, lp, metrics = np_grpo(
        z.numpy(),
        y.numpy(),
        adv.numpy(),
        m.numpy(),
        old.numpy() if use_old else None,
        lref.numpy(),
        w.numpy() if use_w else None,
        cfg,
    )
    assert out.loss.item() == pytest.approx(loss, rel=1e-12, abs=1e-13)
    np.testing.assert_allclose(out.logprobs.detach().numpy(), lp, rtol=1e-12, atol=1e-13)
    for key, value in metrics.items():
        assert getattr(out, key).item() == pytest.approx(value, rel=1e-12, abs=1e-13), key


def test_packed_matches_padded():
    z, y, m, adv, old, lref, _ = _case(3)
    lengths = [int(x) for x in m.sum(1).tolist()]
    rows = [(b, t) for b in range(3) for t in range(lengths[b])]
    zp = torch.stack([z[b, t] for b, t in rows])
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)))
    pick = lambda x: torch.stack([x[b, t] for b, t in rows])  # noqa: E731
    for lt in ("grpo", "dapo", "dr_grpo"):
        for lvl in ("token", "sequence"):
            kw = dict(loss_type=lt, importance_sampling_level=lvl, beta=0.1, max_completion_length=5)
            padded = ref.grpo_loss(z, y, adv, mask=m, old_logprobs=old, ref_logprobs=lref, **kw)
            packed = ref.grpo_loss(
                zp, pick(y), adv, old_logprobs=pick(old), ref_logprobs=pick(lref), cu_seqlens=cu, **kw
            )
            assert packed.loss.item() == pytest.approx(padded.loss.item(), rel=1e-12)


def test_gradcheck_reference():
    z, y, m, adv, old, lref, w = _case(5, B=2, T=3, V=4)
    z.requires_grad_(True)
    for lt, lvl in (("grpo", "sequence"), ("dapo", "token"), ("sapo", "token"), ("cispo", "sequence")):

        def f(x):
            out = ref.grpo_loss(
                x,
                y,
                adv,
                mask=m,
                old_logprobs=old,
                ref_logprobs=lref,
                beta=0.1,
                loss_type=lt,  # noqa: B023 - the closure is called inside its iteration
                importance_sampling_level=lvl,  # noqa: B023
                bias_corrected_kl=True,
                is_weights=w,
            )
            return out.loss, out.entropy

        assert torch.autograd.gradcheck(f, (z,))


# ----------------------------------------------------------------------------------------------------------------
# advantages against a numpy oracle
# ----------------------------------------------------------------------------------------------------------------
def np_stats(x):
    v = [a for a in x if not math.isnan(a)]
    mean = sum(v) / len(v) if v else math.nan
    std = math.sqrt(sum((a - mean) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return mean, std


def np_advantages(r, groups, scale, eps, w, mode):
    B, R = r.shape
    unscorable = [all(math.isnan(a) for a in r[i]) for i in range(B)]
    members = {g: [i for i in range(B) if groups[i] == g] for g in sorted(set(groups))}
    if mode == "sum_then_normalize":
        total = [
            math.nan if unscorable[i] else sum(w[k] * r[i, k] for k in range(R) if not math.isnan(r[i, k]))
            for i in range(B)
        ]
        stats = {g: np_stats([total[i] for i in idx]) for g, idx in members.items()}
        batch_std = np_stats(total)[1]
        adv = []
        for i in range(B):
            mean, std = stats[groups[i]]
            a = total[i] - mean
            a = a / (std + eps) if scale == "group" else a / (batch_std + eps) if scale == "batch" else a
            adv.append(0.0 if math.isnan(a) else a)
        return adv
    norm = np.zeros((B, R))
    for k in range(R):
        stats = {g: np_stats([r[i, k] for i in idx]) for g, idx in members.items()}
        for i in range(B):
            mean, std = stats[groups[i]]
            norm[i, k] = (r[i, k] - mean) / (std + eps)
    total = [
        math.nan if unscorable[i] else sum(w[k] * norm[i, k] for k in range(R) if not math.isnan(norm[i, k]))
        for i in range(B)
    ]
    mean, std = np_stats(total)
    return [0.0 if math.isnan(t) else (t - mean) / (std + eps) for t in total]


ADVANTAGE_MODES = [
    ("group", "sum_then_normalize"),
    ("batch", "sum_then_normalize"),
    ("none", "sum_then_normalize"),
    ("group", "normalize_then_sum"),
]


@pytest.mark.parametrize("scale,mode", ADVANTAGE_MODES)
@pytest.mark.parametrize("by_ids", [False, True])
def test_advantages_match_numpy_oracle(scale, mode, by_ids):
    g = torch.Generator().manual_seed(7)
    r = torch.randint(0, 3, (12, 2), generator=g).double()
    r[1, 0] = math.nan
    r[4] = math.nan  # unscorable row
    r[6:9, 1] = 1.0  # a constant column within a group
    r[9:12] = math.nan
    r[10, 0] = 2.0  # a group with a single valid reward
    w = [1.0, 0.5]
    groups = [3, 1, 2, 1, 3, 2, 0, 0, 0, 5, 5, 5] if by_ids else [i // 3 for i in range(12)]
    kw = dict(group_ids=torch.tensor(groups)) if by_ids else dict(group_size=3)
    out = ref.group_advantages(r, scale=scale, reward_weights=torch.tensor(w), multi_reward=mode, **kw)
    expected = np_advantages(r.numpy(), groups, scale, 1e-4, w, mode)
    np.testing.assert_allclose(out.advantages.numpy(), expected, rtol=1e-12, atol=1e-12)
