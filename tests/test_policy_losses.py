"""The policy losses of docs/math.md section 9: vespo (TRL 1.16), geo_mean, gpg, clip_cov and kl_cov (verl).

Three kinds of ground truth:

* the original code: TRL's own ``GRPOTrainer.get_gamma_weights`` (TRL 1.16 is installed) and transcriptions of
  verl's ``compute_policy_loss_geo_mean`` / ``_gpg`` / ``_clip_cov`` / ``_kl_cov`` and ``agg_loss`` (verl is not
  installed; the transcriptions keep verl's ``+ 1e-8`` denominators, so the comparisons allow for them), in float64
  on the torch backend: values and gradients w.r.t. the logits;
* ``reference.py`` (float64, autograd) on every backend in float32, with IS weights, KL, per-token advantages,
  aggregation overrides, packed input, the fused-linear loss, ``grad_in_forward`` and ``torch.compile``;
* TRL's NaN / inf handling of vespo, input by input.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import DEVICE
from helpers import rel_err, vespo_tolerance
from reliability_helpers import INTERPRETED, grad_of

from grpo_kernels import fused_linear_grpo_loss, grpo_loss
from grpo_kernels import reference as ref
from grpo_kernels.config import LossConfig
from grpo_kernels.integrations.adapter import VERL_LOSS_AGG_MODES, grpo_loss_from_batch

NEW_TYPES = ["vespo", "geo_mean", "gpg", "clip_cov", "kl_cov"]
B, T, V = 4, 6, 13


def make_inputs(seed, batch=B, seq=T, vocab=V, drift=0.3, lengths=(6, 4, 5, 3), dtype=torch.float64):
    """float64 logits, ids, a ragged 0/1 mask (no empty row: verl's per-sequence means are 0/0 there), advantages of
    both signs, old / ref log-probs near the policy's, with rows 0 and 1 drifting against their advantage so that
    some tokens clip, and IS weights."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.float64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    adv[0], adv[1] = abs(adv[0]) + 0.1, -abs(adv[1]) - 0.1
    lp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    push = torch.zeros(batch, 1, dtype=torch.float64)
    push[0], push[1] = 0.4, -0.4
    old = lp + drift * torch.randn(batch, seq, generator=g, dtype=torch.float64) - push
    refl = lp + drift * torch.randn(batch, seq, generator=g, dtype=torch.float64)
    isw = 0.5 + torch.rand(batch, seq, generator=g, dtype=torch.float64)
    to = lambda x: x.to(dtype).to(DEVICE) if x.is_floating_point() else x.to(DEVICE)  # noqa: E731
    return {k: to(v) for k, v in dict(logits=logits, ids=ids, mask=mask, adv=adv, old=old, ref=refl, isw=isw).items()}


def logprobs_of(z, ids):
    return torch.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def leaf(x, dtype=None):
    return x.detach().to(dtype or x.dtype, copy=True).requires_grad_(True)


# ----------------------------------------------------------------------------------------------------------------
# verl's code, transcribed (verl/trainer/ppo/core_algos.py); advantages [B, T] as verl has them
# ----------------------------------------------------------------------------------------------------------------
def verl_masked_mean(x, mask):
    return (x * mask).sum() / (mask.sum() + 1e-8)


def verl_agg(loss_mat, mask, mode):
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    if mode == "seq-mean-token-mean":
        return ((loss_mat * mask).sum(-1) / (mask.sum(-1) + 1e-8)).mean()
    if mode == "seq-mean-token-sum":
        return (loss_mat * mask).sum(-1).mean()
    return (loss_mat * mask).sum() / mask.shape[-1]  # seq-mean-token-sum-norm


def verl_gpg(lp, old, adv, mask, mode, is_w=None, **_):
    losses = -lp * adv
    return verl_agg(losses if is_w is None else losses * is_w, mask, mode)


def verl_geo_mean(lp, old, adv, mask, mode=None, is_w=None, *, eps_low, eps_high):
    d = lp - old
    sgn = torch.sign(adv)
    d_clamp = torch.clamp(d, -eps_low, eps_high)
    d_min = sgn * torch.min(sgn * d, sgn * d_clamp)
    n = mask.sum(-1)
    ratio = torch.exp((d_min * mask).sum(-1) / (n + 1e-8))
    losses = -((adv * mask).sum(-1) / (n + 1e-8)) * ratio
    if is_w is not None:
        losses = losses * torch.exp((torch.log(is_w + 1e-10) * mask).sum(-1) / (n + 1e-8))
    return losses.mean()  # loss_agg_mode is not used


def verl_clip_cov(lp, old, adv, mask, mode, is_w=None, *, eps_low, eps_high, ratio_of_tokens, lb, ub, pick):
    """``pick(candidates [K, 2], clip_num)`` stands for verl's ``torch.randperm`` subset; returns the loss and the
    [B, T] bool of dropped tokens."""
    ratio = torch.exp(lp - old)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    clip_by_origin = (pg2 > pg1) & (mask > 0)
    cov = (adv - verl_masked_mean(adv, mask)) * (lp - verl_masked_mean(lp.detach(), mask))
    cov = cov.detach().clone()
    cov[mask == 0] = -torch.inf
    cov[clip_by_origin] = -torch.inf
    clip_num = max(int(ratio_of_tokens * mask.sum().item()), 1)
    candidates = torch.nonzero((cov < ub) & (cov > lb) & (mask > 0))
    chosen = pick(candidates, clip_num)
    corr = torch.ones_like(adv)
    corr[chosen[:, 0], chosen[:, 1]] = 0
    losses = torch.maximum(pg1, pg2) * corr
    return verl_agg(losses if is_w is None else losses * is_w, mask, mode), corr == 0


def verl_kl_cov(lp, old, adv, mask, mode, is_w=None, *, ratio_of_tokens, coef):
    d = lp - old
    ratio = torch.exp(d)
    losses = -adv * ratio
    losses_kl = -adv * ratio + coef * d.abs()
    valid = mask > 0
    valid_idx = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
    a, x = adv[valid].detach().reshape(-1), lp[valid].detach().reshape(-1)
    cov = (a - a.mean()) * (x - x.mean())
    top = torch.topk(cov, max(1, int(len(cov) * ratio_of_tokens)), largest=True).indices
    flat = valid_idx[top]
    rows, cols = flat // adv.shape[1], flat % adv.shape[1]
    losses = losses.clone()
    losses[rows, cols] = losses_kl[rows, cols]
    return verl_agg(losses if is_w is None else losses * is_w, mask, mode)


# ----------------------------------------------------------------------------------------------------------------
# against the original code, float64, torch backend
# ----------------------------------------------------------------------------------------------------------------
def _ours(d, z, **kw):
    return grpo_loss(z, d["ids"], d["adv"], mask=d["mask"], old_logprobs=d["old"], backend="torch", **kw)


def trl_vespo_loss(d, z, *, is_ratio=None, per_token_adv=None, **knobs):
    """TRL 1.16's vespo objective: its own ``get_gamma_weights``, ``-phi A lp``, dapo's ``sum m L / sum m``."""
    trl = pytest.importorskip("trl")
    lp = logprobs_of(z, d["ids"])
    adv = d["adv"].unsqueeze(1) if per_token_adv is None else per_token_adv
    phi = trl.GRPOTrainer.get_gamma_weights(adv, lp - d["old"], d["mask"], is_ratio, **knobs)
    return (-phi * adv * lp * d["mask"]).sum() / d["mask"].sum().clamp(min=1.0), phi


# knob values exact in float32: TRL builds (k, lambda) with torch.where on Python floats, a float32 tensor
VESPO_CASES = {
    "defaults": dict(),
    "knobs": dict(k_pos=1.5, lambda_pos=0.75, k_neg=4.0, lambda_neg=5.0),
    "is-ratio": dict(is_ratio=True),
    "is-ratio-knobs-token-adv": dict(is_ratio=True, per_token_adv=True, k_pos=3.0, lambda_neg=1.0),
}


@pytest.mark.parametrize("case", list(VESPO_CASES))
def test_vespo_matches_trls_gamma_weights(case):
    spec = dict(VESPO_CASES[case])
    d = make_inputs(1, drift=0.1)
    d["isw"] = torch.where(d["mask"] > 0, d["isw"], 1.0)  # TRL's pipeline: ratio 1 where the mask is 0
    knobs = {k: spec.pop(k) for k in ("k_pos", "lambda_pos", "k_neg", "lambda_neg") if k in spec}
    per_token = torch.randn(B, T, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    per_token_adv = per_token if spec.get("per_token_adv") else None
    is_ratio = d["isw"] if spec.get("is_ratio") else None
    z_trl, z = leaf(d["logits"]), leaf(d["logits"])
    expect, phi = trl_vespo_loss(d, z_trl, is_ratio=is_ratio, per_token_adv=per_token_adv, **knobs)
    ours = grpo_loss(
        z,
        d["ids"],
        d["adv"] if per_token_adv is None else per_token_adv,
        mask=d["mask"],
        old_logprobs=d["old"],
        is_weights=is_ratio,
        loss_type="vespo",
        backend="torch",
        **{f"vespo_{k}": v for k, v in knobs.items()},
    )
    torch.testing.assert_close(ours.loss, expect, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_of(ours.loss, z), grad_of(expect, z_trl), rtol=1e-10, atol=1e-14)
    m = d["mask"]
    torch.testing.assert_close(ours.phi_mean, (phi.expand_as(m) * m).sum() / m.sum(), rtol=1e-12, atol=0)
    assert (phi > 0.1).sum() >= 2 and phi.std() > 0.1  # the weights are not 0, and not a constant


@pytest.mark.parametrize("loss_agg_mode", VERL_LOSS_AGG_MODES)
@pytest.mark.parametrize("with_is", [False, True], ids=["no-is", "is-weights"])
def test_gpg_and_kl_cov_match_verl(loss_agg_mode, with_is):
    d = make_inputs(3)
    a = d["adv"].unsqueeze(1) * d["mask"]
    is_w = d["isw"] if with_is else None
    for loss_type, verl, knobs, verl_knobs in (
        ("gpg", verl_gpg, {}, {}),
        ("kl_cov", verl_kl_cov, dict(kl_cov_ratio=0.25, ppo_kl_coef=0.7), dict(ratio_of_tokens=0.25, coef=0.7)),
    ):
        z_v, z = leaf(d["logits"]), leaf(d["logits"])
        expect = verl(logprobs_of(z_v, d["ids"]), d["old"], a, d["mask"], loss_agg_mode, is_w, **verl_knobs)
        batch = dict(
            completion_ids=d["ids"],
            completion_mask=d["mask"],
            advantages=d["adv"],
            old_logprobs=d["old"],
            is_weights=is_w,
        )
        ours = grpo_loss_from_batch(
            z, batch, loss_mode=loss_type, loss_agg_mode=loss_agg_mode, backend="torch", **knobs
        )
        torch.testing.assert_close(ours.loss, expect, rtol=1e-7, atol=1e-12)  # verl's + 1e-8 denominators
        torch.testing.assert_close(grad_of(ours.loss, z), grad_of(expect, z_v), rtol=1e-7, atol=1e-12)
        if loss_type == "kl_cov":
            assert 0 < ours.cov_selected < 0.5


@pytest.mark.parametrize("with_is", [False, True], ids=["no-is", "is-weights"])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.1, 0.4)])
def test_geo_mean_matches_verl(with_is, eps):
    d = make_inputs(4)
    a = d["adv"].unsqueeze(1) * d["mask"]
    z_v, z = leaf(d["logits"]), leaf(d["logits"])
    is_w = d["isw"] if with_is else None
    expect = verl_geo_mean(
        logprobs_of(z_v, d["ids"]), d["old"], a, d["mask"], is_w=is_w, eps_low=eps[0], eps_high=eps[1]
    )
    batch = dict(
        completion_ids=d["ids"], completion_mask=d["mask"], advantages=d["adv"], old_logprobs=d["old"], is_weights=is_w
    )
    ours = grpo_loss_from_batch(
        z,
        batch,
        loss_mode="geo_mean",
        loss_agg_mode="token-mean",
        epsilon_low=eps[0],
        epsilon_high=eps[1],
        backend="torch",
    )  # verl's geo_mean ignores loss_agg_mode, and so does the adapter
    torch.testing.assert_close(ours.loss, expect, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(grad_of(ours.loss, z), grad_of(expect, z_v), rtol=1e-7, atol=1e-12)
    assert ours.clip_region > 0  # some tokens' log-space clip binds


def _take_all(candidates, clip_num):
    assert len(candidates) <= clip_num  # every candidate is dropped: verl's random subset is then all of them
    return candidates


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_clip_cov_matches_verl_where_its_draw_takes_every_candidate(loss_agg_mode):
    d = make_inputs(5)
    a = d["adv"].unsqueeze(1) * d["mask"]
    knobs = dict(epsilon_low=0.2, epsilon_high=0.28, clip_cov_ratio=1.0, clip_cov_lb=0.2, clip_cov_ub=1.5)
    z_v, z = leaf(d["logits"]), leaf(d["logits"])
    expect, dropped = verl_clip_cov(
        logprobs_of(z_v, d["ids"]),
        d["old"],
        a,
        d["mask"],
        loss_agg_mode,
        eps_low=0.2,
        eps_high=0.28,
        ratio_of_tokens=1.0,
        lb=0.2,
        ub=1.5,
        pick=_take_all,
    )
    batch = dict(completion_ids=d["ids"], completion_mask=d["mask"], advantages=d["adv"], old_logprobs=d["old"])
    ours = grpo_loss_from_batch(z, batch, loss_mode="clip_cov", loss_agg_mode=loss_agg_mode, backend="torch", **knobs)
    torch.testing.assert_close(ours.loss, expect, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(grad_of(ours.loss, z), grad_of(expect, z_v), rtol=1e-7, atol=1e-12)
    assert dropped.sum() >= 2 and ours.clip_region > 0  # tokens are dropped, and others were clipped already
    torch.testing.assert_close(ours.cov_selected, dropped.double().sum() / d["mask"].sum())


def test_clip_cov_subset_is_deterministic_and_of_verls_size():
    """Fewer slots than candidates: the dropped tokens are ``clip_num`` of verl's candidates, chosen by the
    documented key (reference.py), the same on every call and for the packed layout."""
    d = make_inputs(6)
    knobs = dict(loss_type="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-0.5, clip_cov_ub=2.0)
    a = d["adv"].unsqueeze(1) * d["mask"]
    _, candidates = verl_clip_cov(
        logprobs_of(d["logits"], d["ids"]),
        d["old"],
        a,
        d["mask"],
        "token-mean",
        eps_low=0.2,
        eps_high=0.2,
        ratio_of_tokens=1.0,
        lb=-0.5,
        ub=2.0,
        pick=lambda c, k: c,
    )
    clip_num = max(int(0.2 * d["mask"].sum().item()), 1)
    assert candidates.sum() > clip_num >= 2
    runs = [_ours(d, leaf(d["logits"]), **knobs) for _ in range(2)]
    expect = ref.grpo_loss(d["logits"], d["ids"], d["adv"], mask=d["mask"], old_logprobs=d["old"], **knobs)
    dropped = (runs[0].per_token_loss == 0) & (d["mask"] > 0)
    assert dropped.sum() == clip_num and not (dropped & ~candidates).any()
    assert torch.equal(runs[0].per_token_loss, runs[1].per_token_loss) and torch.equal(runs[0].loss, runs[1].loss)
    torch.testing.assert_close(runs[0].loss, expect.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(runs[0].per_token_loss, expect.per_token_loss, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# every backend against reference.py
# ----------------------------------------------------------------------------------------------------------------
# loss knobs, plus: "is_" (None / "token" / "sequence" IS weights), "token_adv", "old" (False: on-policy)
CASES = {
    "vespo": dict(loss_type="vespo"),
    "vespo-is-tokadv-knobs": dict(
        loss_type="vespo", is_="token", token_adv=True, vespo_k_pos=1.5, vespo_lambda_neg=0.5
    ),
    "vespo-seq-bc-kl": dict(loss_type="vespo", importance_sampling_level="sequence", beta=0.1, bias_corrected_kl=True),
    "vespo-on-policy-grpo": dict(loss_type="vespo", old=False, beta=0.04, aggregation="grpo"),
    "geo_mean": dict(loss_type="geo_mean", epsilon_high=0.28),
    "geo_mean-is-kl-tokadv": dict(loss_type="geo_mean", is_="token", beta=0.04, token_adv=True),
    "geo_mean-bnpo-bc": dict(loss_type="geo_mean", aggregation="bnpo", beta=0.1, bias_corrected_kl=True),
    "gpg": dict(loss_type="gpg"),
    "gpg-is-k2-grpo": dict(loss_type="gpg", is_="sequence", beta=0.1, kl_estimator="k2", aggregation="grpo"),
    "clip_cov": dict(loss_type="clip_cov", clip_cov_ratio=0.15, clip_cov_lb=-0.5, clip_cov_ub=2.0),
    "clip_cov-is-dapo-kl": dict(
        loss_type="clip_cov",
        clip_cov_ratio=0.3,
        clip_cov_lb=0.0,
        clip_cov_ub=3.0,
        is_="token",
        aggregation="dapo",
        beta=0.04,
    ),
    "kl_cov": dict(loss_type="kl_cov", kl_cov_ratio=0.2),
    "kl_cov-drgrpo-tokadv": dict(
        loss_type="kl_cov",
        kl_cov_ratio=0.5,
        ppo_kl_coef=0.5,
        token_adv=True,
        aggregation="dr_grpo",
        max_completion_length=9,
    ),
}


def _case_kwargs(name, d):
    spec = dict(CASES[name])
    kind, token_adv, use_old = spec.pop("is_", None), spec.pop("token_adv", False), spec.pop("old", True)
    g = torch.Generator().manual_seed(7)
    adv = torch.randn(d["ids"].shape, generator=g).to(DEVICE) if token_adv else d["adv"]
    is_w = {None: None, "token": d["isw"], "sequence": d["isw"][:, 0]}[kind]
    return adv, dict(
        mask=d["mask"], old_logprobs=d["old"] if use_old else None, ref_logprobs=d["ref"], is_weights=is_w, **spec
    )


def _tolerance(name, d, adv, kwargs):
    if CASES[name]["loss_type"] != "vespo":
        return 1e-5
    config = LossConfig(**{k: v for k, v in CASES[name].items() if k in LossConfig.__dataclass_fields__})
    old, is_w = kwargs["old_logprobs"], kwargs["is_weights"]
    lp = logprobs_of(d["logits"].double(), d["ids"])
    adv = adv.double() if adv.dim() == 2 else adv.double().unsqueeze(1)
    return vespo_tolerance(
        lp,
        None if old is None else old.double(),
        adv,
        d["mask"].double(),
        None if is_w is None else is_w.double(),
        config,
    )


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_reference(backend, name, poisoned):
    d = make_inputs(10 + list(CASES).index(name), seq=7, vocab=37, lengths=(7, 4, 6, 0), dtype=torch.float32)
    adv, kwargs = _case_kwargs(name, d)
    z = leaf(d["logits"])
    out = grpo_loss(z, d["ids"], adv, return_entropy=True, backend=backend, **kwargs)
    z64 = leaf(d["logits"], torch.float64)
    expect = ref.grpo_loss(z64, d["ids"], adv, **kwargs)
    tol = _tolerance(name, d, adv, kwargs)
    assert out.loss.dtype == torch.float32
    for key in ("loss", "logprobs", "entropy", "per_token_loss"):
        assert rel_err(getattr(out, key), getattr(expect, key)) < tol, key
    assert rel_err(grad_of(out.loss, z), grad_of(expect.loss, z64)) < tol
    for key in ("kl_mean", "clip_low", "clip_high", "clip_region", "logprob_mean", "phi_mean", "cov_selected"):
        ours, exact = getattr(out, key), getattr(expect, key)
        assert (ours is None) == (exact is None), key
        if exact is not None:
            assert abs(ours.item() - exact.item()) < tol * (1 + abs(exact.item())), key
    if CASES[name]["loss_type"] in ("clip_cov", "kl_cov"):
        assert 0 < expect.cov_selected < 1  # the selection is exercised


@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_packed_matches_padded(backend, loss_type):
    d = make_inputs(20, seq=6, vocab=23, lengths=(6, 2, 5, 4), dtype=torch.float32)
    kw = dict(loss_type=loss_type, beta=0.04, clip_cov_ratio=0.2, clip_cov_lb=-0.5, clip_cov_ub=2.0, kl_cov_ratio=0.2)
    lengths = d["mask"].sum(1).long().tolist()
    rows = [(b, t) for b in range(B) for t in range(lengths[b])]
    pick = lambda x: torch.stack([x[b, t] for b, t in rows])  # noqa: E731
    cu = torch.tensor([0, *itertools.accumulate(lengths)], device=DEVICE)
    z = leaf(d["logits"])
    padded = grpo_loss(
        z,
        d["ids"],
        d["adv"],
        mask=d["mask"],
        old_logprobs=d["old"],
        ref_logprobs=d["ref"],
        is_weights=d["isw"],
        backend=backend,
        **kw,
    )
    zp = leaf(pick(d["logits"]))
    packed = grpo_loss(
        zp,
        pick(d["ids"]),
        d["adv"],
        old_logprobs=pick(d["old"]),
        ref_logprobs=pick(d["ref"]),
        is_weights=pick(d["isw"]),
        cu_seqlens=cu,
        backend=backend,
        **kw,
    )
    assert rel_err(packed.loss, padded.loss) < 1e-6
    assert torch.equal(packed.per_token_loss == 0, pick(padded.per_token_loss) == 0)  # the same tokens selected
    assert rel_err(grad_of(packed.loss, zp), pick(grad_of(padded.loss, z))) < 1e-6


@pytest.mark.parametrize("loss_type", ["geo_mean", "gpg", "clip_cov", "kl_cov"])
def test_gradcheck_float64(loss_type):
    """Finite differences of the loss (vespo's weight is a stop-gradient, so finite differences see what its gradient
    leaves out by definition: it is checked against TRL's autograd above instead)."""
    d = make_inputs(21, batch=2, seq=4, vocab=5, lengths=(4, 3))
    kw = dict(
        loss_type=loss_type,
        beta=0.1,
        bias_corrected_kl=True,
        clip_cov_ratio=0.3,
        clip_cov_lb=-1.0,
        clip_cov_ub=1.0,
        kl_cov_ratio=0.3,
    )

    def f(x):
        out = grpo_loss(
            x,
            d["ids"],
            d["adv"],
            mask=d["mask"],
            old_logprobs=d["old"],
            ref_logprobs=d["ref"],
            is_weights=d["isw"],
            return_entropy=True,
            backend="torch",
            **kw,
        )
        return out.loss, out.entropy

    assert torch.autograd.gradcheck(f, (leaf(d["logits"]),))


@pytest.mark.parametrize("loss_type", NEW_TYPES)
@pytest.mark.parametrize("chunk_tokens", [5, None], ids=["two-pass", "one-pass"])
def test_fused_linear_matches_reference(backend, loss_type, chunk_tokens):
    """5-token tiles: vespo / geo_mean sequences of 6 do not fit (two passes), clip_cov / kl_cov need the batch."""
    if backend in INTERPRETED and chunk_tokens is None:
        pytest.skip("interpreted backend: the two-pass plan in the default run")
    g = torch.Generator().manual_seed(22)
    d = make_inputs(22, seq=6, vocab=17, lengths=(6, 4, 5, 0), dtype=torch.float32)
    hidden = torch.randn(B, T, 8, generator=g).to(DEVICE)
    weight = (torch.randn(17, 8, generator=g) * 0.7).to(DEVICE)
    kw = dict(
        mask=d["mask"],
        old_logprobs=d["old"],
        ref_logprobs=d["ref"],
        is_weights=d["isw"],
        beta=0.04,
        loss_type=loss_type,
        clip_cov_ratio=0.2,
        clip_cov_lb=-0.5,
        clip_cov_ub=2.0,
        kl_cov_ratio=0.2,
    )
    h, w = leaf(hidden), leaf(weight)
    out = fused_linear_grpo_loss(h, w, d["ids"], d["adv"], chunk_tokens=chunk_tokens, backend=backend, **kw)
    out.loss.backward()
    h64, w64 = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    expect = ref.grpo_loss(h64 @ w64.T, d["ids"], d["adv"], **kw)
    expect.loss.backward()
    assert rel_err(out.loss, expect.loss) < 1e-5 and rel_err(out.per_token_loss, expect.per_token_loss) < 1e-5
    assert rel_err(h.grad, h64.grad) < 1e-5 and rel_err(w.grad, w64.grad) < 1e-5


@pytest.mark.parametrize("loss_type", ["vespo", "clip_cov"])
def test_grad_in_forward_matches_backward(backend, loss_type):
    d = make_inputs(23, seq=5, vocab=19, lengths=(5, 3, 4, 2), dtype=torch.float32)
    kw = dict(
        mask=d["mask"],
        old_logprobs=d["old"],
        loss_type=loss_type,
        clip_cov_ratio=0.3,
        clip_cov_lb=-0.5,
        backend=backend,
    )
    grads = []
    for grad_in_forward in (False, True):
        z = leaf(d["logits"])
        (grpo_loss(z, d["ids"], d["adv"], grad_in_forward=grad_in_forward, loss_scale=0.5, **kw).loss * 0.5).backward()
        grads.append(z.grad)
    assert rel_err(grads[1], grads[0]) < 1e-6


def test_new_float_knobs_do_not_recompile():
    """vespo's k / lambda, clip_cov's ratio and band, kl_cov's ratio and coefficient reach the op as tensors."""
    import torch._dynamo.utils

    d = make_inputs(24, dtype=torch.float32)
    values = [(2.0, 2.0), (1.5, 3.0), (2.5, 0.7), (3.0, 1.2)]  # new values of two knobs at each call
    for loss_type, knobs_of in (
        ("vespo", lambda x, y: dict(vespo_k_pos=x, vespo_lambda_neg=y)),
        ("clip_cov", lambda x, y: dict(clip_cov_ub=x, clip_cov_lb=y - 3.0, clip_cov_ratio=y / 10)),
        ("kl_cov", lambda x, y: dict(ppo_kl_coef=x, kl_cov_ratio=y / 10)),
    ):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()

        def step(z, knobs, loss_type=loss_type):
            return grpo_loss(
                z,
                d["ids"],
                d["adv"],
                mask=d["mask"],
                old_logprobs=d["old"],
                loss_type=loss_type,
                backend="torch",
                **knobs,
            ).loss

        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        for knobs in (knobs_of(*v) for v in values):
            z1, z2 = leaf(d["logits"]), leaf(d["logits"])
            loss_c, loss_e = compiled(z1, knobs), step(z2, knobs)
            assert torch.allclose(loss_c, loss_e, rtol=1e-6)
            assert torch.allclose(grad_of(loss_c, z1), grad_of(loss_e, z2), rtol=1e-5, atol=1e-7)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2, loss_type


# ----------------------------------------------------------------------------------------------------------------
# vespo's non-finite inputs: TRL's clamps and nan_to_num, input by input
# ----------------------------------------------------------------------------------------------------------------
NON_FINITE = {
    "old-nan": ("old", math.nan),
    "old-+inf": ("old", math.inf),
    "old--inf": ("old", -math.inf),
    "old-far": ("old", -40.0),  # a log-ratio beyond the +-20 clamp
    "is-zero": ("isw", 0.0),  # token_mask mode: log 0 = -inf, clamped to log 1e-8
    "is-nan": ("isw", math.nan),
    "is-+inf": ("isw", math.inf),
    "is-negative": ("isw", -1.0),
}


@pytest.mark.parametrize("what", list(NON_FINITE))
def test_vespo_non_finite_as_trl(what):
    key, value = NON_FINITE[what]
    d = make_inputs(25, drift=0.1)
    d["isw"] = torch.where(d["mask"] > 0, d["isw"], 1.0)
    d[key][1, 1] = value
    z_trl, z = leaf(d["logits"]), leaf(d["logits"])
    expect, phi = trl_vespo_loss(d, z_trl, is_ratio=d["isw"])
    ours = grpo_loss(
        z,
        d["ids"],
        d["adv"],
        mask=d["mask"],
        old_logprobs=d["old"],
        is_weights=d["isw"],
        loss_type="vespo",
        backend="torch",
    )
    assert torch.isfinite(expect) and torch.isfinite(ours.loss)
    torch.testing.assert_close(ours.loss, expect, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_of(ours.loss, z), grad_of(expect, z_trl), rtol=1e-10, atol=1e-14)
    if what in ("old-nan", "is-nan", "is-negative"):
        assert phi[1].item() == 0.0  # NaN -> 0 (nan_to_num)
    if what in ("old-+inf", "is-zero"):
        assert 0 < phi[1].item() < 1e-12  # the log-weight clamped at log 1e-8


def test_vespo_ignores_what_does_not_take_part():
    """A NaN old log-prob or IS weight where the mask is 0 has no effect (TRL's masked sum would turn the NaN into
    phi = 0 for that sequence, and sums the IS logs of every position; TRL's own ratio there is 1)."""
    d = make_inputs(26)
    clean = grpo_loss(
        d["logits"],
        d["ids"],
        d["adv"],
        mask=d["mask"],
        old_logprobs=d["old"],
        is_weights=d["isw"],
        loss_type="vespo",
        backend="torch",
    )
    old, isw = d["old"].clone(), d["isw"].clone()
    old[3, 5], isw[2, 5] = math.nan, math.nan  # both outside the mask
    dirty = grpo_loss(
        d["logits"],
        d["ids"],
        d["adv"],
        mask=d["mask"],
        old_logprobs=old,
        is_weights=isw,
        loss_type="vespo",
        backend="torch",
    )
    assert torch.equal(clean.loss, dirty.loss) and torch.equal(clean.phi_mean, dirty.phi_mean)
