"""Vocabulary-parallel log-probs, entropy, loss and fused-linear loss against the single-process result.

Groups of 2 and 3 processes (gloo on loopback) are spawned by the test; each rank runs every case and compares, on its
own shard, with the single-process call on the whole logits made in the same process: lp, entropy, the loss, every
metric of :class:`grpo_kernels.GRPOLossOutput` and the shard's gradient (the fused-linear form: the hidden states' full
gradient and the head shard's). float32 within 1e-6 relative (per tensor: ``max |a - b| <= 1e-6 max |b|``, so that
near-zero entries are held to the scale of the tensor), float64 (the torch-ops path) within 1e-12.

Shards are uneven (V = 13 over 2 and 3 ranks) and some target ids are forced into the last shard; one layout puts the
ranks' shards in reverse order through ``vocab_start``. The bad inputs must raise on every rank, naming the argument.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
import zlib
from datetime import timedelta
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import grpo_kernels as gk
from grpo_kernels import vocab_parallel as vp
from grpo_kernels.config import IS_LEVELS, LOSS_TYPES

V = 13
B, T, H = 3, 5, 8
METRICS = (
    "kl_mean",
    "clip_low",
    "clip_high",
    "clip_region",
    "entropy_mean",
    "logprob_mean",
    "phi_mean",
    "cov_selected",
)


# ----------------------------------------------------------------------------------------------------------------
# helpers run inside the ranks
# ----------------------------------------------------------------------------------------------------------------
STRICT = ("logprobs", "entropy")  # held to 1e-6 of the single-process result itself
# The loss, the per-token loss and the metrics are functions of log-prob differences (lp - lp_old, lp_ref - lp), whose
# float32 rounding (~1e-7 at |lp| ~ 5) they amplify by |lp| / |lp - lp_old| ~ 10..100 (k3 KL, kl_cov's |d|, vespo's
# exp(k log w - lambda w) at sequence level): their floor is 1e-5 of the scale (measured: up to 2e-6 of the scale).
LOSS_FLOOR = 1e-5
STATS: dict[str, float] = {}  # the largest relative deviation from the single-process result, per quantity


def _check(got: dict, want: dict, truth: dict | None, tol: float) -> None:
    """``got`` (vocabulary-parallel), ``want`` (single process, same dtype and backend), ``truth`` (single process in
    float64; None when ``want`` is float64 already). Per tensor, with ``scale = max |truth|``::

        lp, entropy:  max |got - want| <= tol * scale
        everything:   max |got - truth| <= 2 max |want - truth| + floor * scale
                      floor = tol for lp, entropy and the gradients, max(tol, LOSS_FLOOR) for the loss and metrics

    (a difference of one float32 rounding of the log-sum-exp, 4.8e-7 at |lse| ~ 5, moves the gradient and the
    KL-type metrics by more than 1e-6 of their scale; the second rule asks that the parallel result be as close to
    the float64 value as the single-process float32 result is, up to 1e-6 of the scale)."""
    for name, w in want.items():
        g = got[name]
        if w is None or g is None:
            assert g is None and w is None, f"{name}: {g} vs {w}"
            continue
        g, w = torch.as_tensor(g).detach().double(), torch.as_tensor(w).detach().double()
        t = w if truth is None else torch.as_tensor(truth[name]).detach().double()
        assert g.shape == w.shape, f"{name}: shape {list(g.shape)} vs {list(w.shape)}"
        if not w.numel():
            continue
        scale = max(t.abs().max().item(), 1e-30)
        direct = (g - w).abs().max().item()
        STATS[name] = max(STATS.get(name, 0.0), direct / scale)
        if truth is None or name in STRICT:
            assert direct <= tol * scale, f"{name}: max |got - single| {direct:.3g} vs scale {scale:.3g}"
        if truth is not None:
            err, own = (g - t).abs().max().item(), (w - t).abs().max().item()
            floor = max(tol, LOSS_FLOOR) if name in ("loss", "per_token_loss", *METRICS) else tol
            assert err <= 2 * own + floor * scale, f"{name}: error {err:.3g}, single {own:.3g}, scale {scale:.3g}"


def _float64(x: dict) -> dict:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}


def _layouts(world: int):
    """``(sizes, starts)`` per rank: uneven shards in rank order (``starts`` None: the default vocab_start), and the
    same kind of split with rank ``r`` holding shard ``world - 1 - r`` (explicit ``vocab_start``)."""
    in_order = [6, 7] if world == 2 else [4, 5, 4]
    split = [7, 6] if world == 2 else [3, 6, 4]
    rev = list(range(world))[::-1]
    return [(in_order, None), ([split[rev[r]] for r in range(world)], [sum(split[: rev[r]]) for r in range(world)])]


def _shard(rank, sizes, starts):
    start = sum(sizes[:rank]) if starts is None else starts[rank]
    return start, start + sizes[rank]


def _inputs(seed: int, dtype, packed: bool):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[:, 0] = V - 1  # owned by the last shard
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[0, -1] = 0.0
    ids[1, 2] = -100  # ignore_index
    old = torch.log_softmax(z.double() + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    old = (
        old.gather(-1, ids.clamp(min=0).unsqueeze(-1))
        .squeeze(-1)
        .to(torch.float32 if dtype != torch.float64 else dtype)
    )
    ref = old + 0.1 * torch.randn(B, T, generator=g).to(old.dtype)
    adv = torch.randn(B, generator=g).to(old.dtype)
    isw = (0.5 + torch.rand(B, T, generator=g)).to(old.dtype)
    if packed:  # [N, V] with three sequences of lengths 4, 6, 5
        cu = torch.tensor([0, 4, 10, 15])
        return dict(
            z=z.reshape(B * T, V),
            ids=ids.reshape(-1),
            mask=mask.reshape(-1),
            old=old.reshape(-1),
            ref=ref.reshape(-1),
            adv=adv,
            isw=isw.reshape(-1),
            cu=cu,
        )
    return dict(z=z, ids=ids, mask=mask, old=old, ref=ref, adv=adv, isw=isw, cu=None)


def _loss_run(z, x, knobs, backend, with_is, sl=slice(None), **shard):
    leaf = z.clone().requires_grad_()
    is_weights = x["isw"] if knobs.get("loss_type") == "vespo" or with_is else None
    out = gk.grpo_loss(
        leaf,
        x["ids"],
        x["adv"],
        mask=x["mask"],
        old_logprobs=x["old"],
        ref_logprobs=x["ref"],
        is_weights=is_weights,
        cu_seqlens=x["cu"],
        backend=backend,
        return_entropy=True,
        **knobs,
        **shard,
    )
    (out.loss + 0.3 * (out.entropy * x["mask"]).sum()).backward()
    result = {name: getattr(out, name) for name in ("loss", "logprobs", "entropy", "per_token_loss", *METRICS)}
    return dict(result, grad=leaf.grad[..., sl])


def _loss_case(rank, group, sizes, starts, backend, dtype, packed, tol, knobs, with_is=False, temperature=1.0):
    x = _inputs(zlib.crc32(f"{knobs} {packed}".encode()) % 1000, dtype, packed)
    s, e = _shard(rank, sizes, starts)
    knobs = dict(knobs, temperature=temperature)
    if knobs.get("loss_type") == "dr_grpo":
        knobs["max_completion_length"] = 6 if packed else T
    try:
        gk.LossConfig(**knobs)
    except ValueError:
        return 0  # a combination the configuration refuses (e.g. geo_mean at sequence level)
    want = _loss_run(x["z"], x, knobs, backend, with_is, slice(s, e))
    truth = (
        None
        if dtype == torch.float64
        else _loss_run(x["z"].double(), _float64(x), knobs, "torch", with_is, slice(s, e))
    )
    vs = None if starts is None else s
    got = _loss_run(x["z"][..., s:e], x, knobs, backend, with_is, vocab_parallel_group=group, vocab_start=vs)
    _check(got, want, truth, tol)
    return 1


def _inplace_case(rank, group, sizes, starts):
    """``inplace_backward=True`` on a shard: the gradient written over the shard's buffer equals the new-buffer one."""
    x = _inputs(9, torch.float32, packed=False)
    s, e = _shard(rank, sizes, starts)
    vs = None if starts is None else s
    kw = dict(mask=x["mask"], old_logprobs=x["old"], ref_logprobs=x["ref"], beta=0.04, return_entropy=True)
    grads = []
    for inplace in (False, True):
        leaf = x["z"][..., s:e].clone().requires_grad_()
        out = gk.grpo_loss(
            leaf * 1.0, x["ids"], x["adv"], inplace_backward=inplace, vocab_parallel_group=group, vocab_start=vs, **kw
        )
        (out.loss + out.entropy.sum()).backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1]), (grads[0] - grads[1]).abs().max()
    return 1


def _logprob_run(z, x, backend, temperature, sl=slice(None), **shard):
    leaf = z.clone().requires_grad_()
    lp, h = gk.token_logprobs(
        leaf, x["ids"], temperature=temperature, return_entropy=True, mask=x["mask"], backend=backend, **shard
    )
    w = torch.linspace(-1, 1, B * T).view(B, T).to(lp.dtype)
    (lp * w + h * w.flip(0)).sum().backward()
    alone = gk.token_logprobs(z, x["ids"], temperature=temperature, mask=x["mask"], backend=backend, **shard)
    return {"logprobs": lp, "entropy": h, "grad": leaf.grad[..., sl], "logprobs without entropy": alone}


def _logprob_case(rank, group, sizes, starts, backend, dtype, tol, temperature):
    x = _inputs(7, dtype, packed=False)
    s, e = _shard(rank, sizes, starts)
    want = _logprob_run(x["z"], x, backend, temperature, slice(s, e))
    truth = None if dtype == torch.float64 else _logprob_run(x["z"].double(), x, "torch", temperature, slice(s, e))
    vs = None if starts is None else s
    got = _logprob_run(x["z"][..., s:e], x, backend, temperature, vocab_parallel_group=group, vocab_start=vs)
    _check(got, want, truth, tol)
    return 1


def _fused_linear_run(hidden, weight, bias, x, knobs, entropy_coef, sl=slice(None), **shard):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = gk.fused_linear_grpo_loss(
        leaves[0],
        leaves[1],
        x["ids"],
        x["adv"],
        bias=leaves[2],
        mask=x["mask"],
        old_logprobs=x["old"],
        ref_logprobs=x["ref"],
        return_entropy=True,
        entropy_coef=entropy_coef,
        chunk_tokens=4,
        backend="torch",
        **knobs,
        **shard,
    )
    out.loss.backward()
    result = {name: getattr(out, name) for name in ("loss", "logprobs", "entropy", "per_token_loss", *METRICS)}
    return dict(result, d_hidden=leaves[0].grad, d_weight=leaves[1].grad[sl], d_bias=leaves[2].grad[sl])


def _fused_linear_case(rank, group, sizes, starts, knobs, entropy_coef, tol=1e-6):
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.1
    x = _inputs(5, torch.float32, packed=False)
    s, e = _shard(rank, sizes, starts)
    want = _fused_linear_run(hidden, weight, bias, x, knobs, entropy_coef, slice(s, e))
    truth = _fused_linear_run(
        hidden.double(), weight.double(), bias.double(), _float64(x), knobs, entropy_coef, slice(s, e)
    )
    vs = None if starts is None else s
    got = _fused_linear_run(
        hidden, weight[s:e], bias[s:e], x, knobs, entropy_coef, vocab_parallel_group=group, vocab_start=vs
    )
    _check(got, want, truth, tol)
    return 1


def _dtensor_case(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    x = _inputs(3, torch.float32, packed=False)
    knobs = dict(loss_type="grpo", beta=0.04)
    chunk = -(-V // world)  # torch.chunk's split of Shard(-1)
    sl = slice(rank * chunk, min((rank + 1) * chunk, V))
    want = _loss_run(x["z"], x, knobs, "torch", False, sl)
    truth = _loss_run(x["z"].double(), _float64(x), knobs, "torch", False, sl)
    dz = distribute_tensor(x["z"].clone(), mesh, [Shard(2)])
    got = _loss_run(dz, x, knobs, "torch", False)
    got["grad"] = got["grad"].to_local()
    _check(got, want, truth, 1e-6)
    lp = gk.token_logprobs(dz, x["ids"], mask=x["mask"])
    _check({"logprobs": lp}, {"logprobs": want["logprobs"]}, {"logprobs": truth["logprobs"]}, 1e-6)
    bad = distribute_tensor(x["z"].clone(), mesh, [Replicate()])
    _expect(ValueError, "sharded on its last", lambda: gk.token_logprobs(bad, x["ids"]))
    _expect(ValueError, "carries its group", lambda: gk.token_logprobs(dz, x["ids"], vocab_start=0))
    return 1


def _expect(kind, words, fn):
    try:
        fn()
    except kind as e:
        assert words in str(e), f"expected {words!r} in {kind.__name__}: {e}"
        return
    raise AssertionError(f"expected {kind.__name__} ({words!r}), nothing raised")


def _bad_inputs(rank, world, group):
    x = _inputs(1, torch.float32, packed=False)
    sizes, _ = _layouts(world)[0]
    s, e = _shard(rank, sizes, None)
    part = x["z"][..., s:e]
    bad_ids = x["ids"].clone()
    bad_ids[0, 1] = V  # outside the global vocabulary (but a valid local index on no rank)
    _expect(
        ValueError,
        f"token_ids must lie in [0, {V})",
        lambda: gk.token_logprobs(part, bad_ids, vocab_parallel_group=group),
    )
    # every rank claims column 0: an overlap
    _expect(
        ValueError,
        "vocab_start is inconsistent",
        lambda: gk.token_logprobs(part, x["ids"], vocab_parallel_group=group, vocab_start=0),
    )
    # a gap: the shards leave column 0 uncovered
    _expect(
        ValueError,
        "vocab_start is inconsistent",
        lambda: gk.token_logprobs(part, x["ids"], vocab_parallel_group=group, vocab_start=s + 1),
    )
    some = 0 if rank == 0 else None
    _expect(
        ValueError,
        "on every rank",
        lambda: gk.token_logprobs(part, x["ids"], vocab_parallel_group=group, vocab_start=some),
    )
    _expect(
        NotImplementedError,
        "backend='cuda'",
        lambda: gk.token_logprobs(part, x["ids"], vocab_parallel_group=group, backend="cuda"),
    )
    _expect(
        ValueError,
        "grad_in_forward",
        lambda: gk.grpo_loss(
            part.clone().requires_grad_(), x["ids"], x["adv"], vocab_parallel_group=group, grad_in_forward=True
        ),
    )
    _expect(
        TypeError, "vocab_parallel_group must be", lambda: gk.token_logprobs(part, x["ids"], vocab_parallel_group="tp")
    )
    return 1


def _traffic_case(rank, world, group):
    """What crosses the group is what ``communication`` says: the layout all-gather and 2 all-reduces in the
    forward, nothing in the backward; the fused-linear form adds the all-reduce of the hidden states' gradient."""
    sizes, _ = _layouts(world)[0]
    s, e = _shard(rank, sizes, None)
    x = _inputs(2, torch.float32, packed=False)
    part = x["z"][..., s:e].clone().requires_grad_()
    kw = dict(mask=x["mask"], old_logprobs=x["old"], vocab_parallel_group=group, backend="torch")
    for with_entropy in (True, False):
        vp.reset_traffic()
        out = gk.grpo_loss(part, x["ids"], x["adv"], return_entropy=with_entropy, **kw)
        want = vp.communication(B * T, world, with_entropy=with_entropy)
        forward = dict(vp.TRAFFIC)
        expected = dict(all_gather_calls=1, all_gather_bytes=16, all_reduce_calls=2)
        expected["all_reduce_bytes"] = want["payload_bytes"]
        assert forward == expected, (forward, want)
        (out.loss + (out.entropy.sum() if with_entropy else 0)).backward()
        assert forward == vp.TRAFFIC, "the backward ran a collective"
    vp.reset_traffic()
    hidden, weight = torch.randn(B, T, H, requires_grad=True), torch.randn(e - s, H, requires_grad=True)
    gk.fused_linear_grpo_loss(hidden, weight, x["ids"], x["adv"], **kw)
    n = int(((x["ids"] != -100) & (x["mask"] != 0)).sum())  # the tokens that take part
    want = vp.communication(n, world, with_entropy=False, hidden_size=H)
    traffic = dict(vp.TRAFFIC)
    expected = dict(all_gather_calls=1, all_gather_bytes=16, all_reduce_calls=3)
    expected["all_reduce_bytes"] = want["payload_bytes"]
    assert traffic == expected, (traffic, want)
    return 1


def _cases(rank, world, group):
    """``(name, thunk)``: every case, in the same order on every rank."""
    out = []
    f32 = torch.float32
    for sizes, starts in _layouts(world):
        tag = f"{sizes}{'' if starts is None else ' reversed'}"
        shard = (rank, group, sizes, starts)
        for loss_type in LOSS_TYPES:
            for level in IS_LEVELS:
                for beta in (0.0, 0.04):
                    knobs = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta)
                    for packed in (False, True) if beta else (False,):
                        name = f"loss {tag} {loss_type} {level} beta={beta} packed={packed}"
                        out.append((name, partial(_loss_case, *shard, "torch", f32, packed, 1e-6, knobs)))
        knobs = dict(loss_type="dapo", beta=0.04, bias_corrected_kl=True)
        case = partial(_loss_case, *shard, "torch", f32, False, 1e-6, knobs, with_is=True, temperature=0.7)
        out.append((f"loss {tag} is_weights temperature", case))
        out.append((f"loss {tag} inplace_backward", partial(_inplace_case, *shard)))
        for tau in (1.0, 0.6):
            out.append((f"logprobs {tag} tau={tau}", partial(_logprob_case, *shard, "torch", f32, 1e-6, tau)))
        for knobs, coef in (
            (dict(loss_type="dapo", beta=0.04), 0.0),
            (dict(importance_sampling_level="sequence"), 0.01),
        ):
            case = partial(_fused_linear_case, *shard, dict(knobs, loss_type="grpo" if coef else "dapo"), coef)
            out.append((f"fused-linear {tag} {knobs} entropy_coef={coef}", case))
    shard = (rank, group, *_layouts(world)[0])
    # the torch-ops path (float64 never takes the compiled CPU passes)
    out.append(("logprobs float64", partial(_logprob_case, *shard, "torch", torch.float64, 1e-12, 0.8)))
    for level in IS_LEVELS:
        knobs = dict(loss_type="grpo", importance_sampling_level=level, beta=0.04)
        out.append((f"loss float64 {level}", partial(_loss_case, *shard, "torch", torch.float64, True, 1e-12, knobs)))
    # the Triton backend (its interpreter on the CPU): the per-shard partial and gradient kernels
    out.append(("logprobs triton", partial(_logprob_case, *shard, "triton", f32, 1e-6, 0.8)))
    knobs = dict(loss_type="dapo", beta=0.04)
    out.append(("loss triton", partial(_loss_case, *shard, "triton", f32, False, 1e-6, knobs)))
    if world == dist.get_world_size():  # a device mesh over every process
        out.append(("dtensor", partial(_dtensor_case, rank, world)))
    out.append(("bad inputs", partial(_bad_inputs, rank, world, group)))
    out.append(("traffic", partial(_traffic_case, rank, world, group)))
    return out


WORLDS = (2, 3)  # one spawn of 3 processes runs the 2-rank group (ranks 0, 1) and then the 3-rank group


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=max(WORLDS), timeout=timedelta(seconds=60))
    groups = {world: dist.new_group(list(range(world))) for world in WORLDS}  # every process creates every group
    report = {}
    for world, group in groups.items():
        if rank >= world:
            continue
        STATS.clear()
        failures, checked = [], 0
        for name, case in _cases(rank, world, group):
            try:
                checked += case()
            except Exception as e:  # noqa: BLE001 - reported to the parent with the case's name
                failures.append(f"{name}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
        report[world] = {"failures": failures, "checked": checked, "stats": dict(STATS)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vocab_parallel_matches_single_process(tmp_path):
    nprocs = max(WORLDS)
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=nprocs, join=False, start_method="spawn"
    )
    for _ in range(300):  # at most 5 minutes; a hang in a collective fails the test instead of the run
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("the vocabulary-parallel ranks did not finish within 300 s")
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nprocs)]
    for world in WORLDS:
        results = [reports[r][str(world)] for r in range(world)]
        failures = [f"{world} ranks, rank {r}: {msg}" for r, res in enumerate(results) for msg in res["failures"]]
        assert not failures, "\n".join(failures)
        stats = {k: max(res["stats"].get(k, 0.0) for res in results) for k in results[0]["stats"]}
        # every case ran on every rank (the combinations LossConfig refuses are skipped identically)
        counts = {res["checked"] for res in results}
        assert len(counts) == 1 and min(counts) >= 70, [res["checked"] for res in results]
        print(f"{world} ranks, {min(counts)} cases; largest relative deviation from the single-process result:", stats)


def test_vocab_parallel_bad_arguments_without_a_process_group():
    z, ids = torch.randn(2, 5), torch.tensor([1, 2])
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            gk.token_logprobs(z, ids, vocab_parallel_group=object())
    with pytest.raises(ValueError, match="vocab_start=3 needs vocab_parallel_group"):
        gk.token_logprobs(z, ids, vocab_start=3)
    with pytest.raises(ValueError, match="needs vocab_parallel_group"):
        gk.grpo_loss(z, ids, torch.ones(1), vocab_start=0)
