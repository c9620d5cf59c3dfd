"""The shapes and paths of the GPU test selection that the rest of the suite cannot run on a CPU: real vocabularies
(V = 151936, 262144) in bf16 / fp16 / fp32, dense logits with N * V > 2^31 and more than 65 535 rows, the sm_90 2-pass
gradient-in-forward kernel at every cluster size and its 3-pass fallbacks, the fused-linear loss at H = 4096,
V = 151936, and torch.compile(fullgraph=True) with inductor.

Every test runs at two sizes. ``gpu``: the real shape on CUDA tensors, for each backend that can run there (marked
``gpu``; skipped without a CUDA device). ``cpu``: a stand-in with the same structure (strided logits, ragged masks,
chunked references, both dtype rules) on the CPU with the torch backend, in the default run, so that the test logic
itself is exercised where no GPU is. Every comparison is against ``grpo_kernels.reference`` in float64 (computed on
the device, in chunks where a float64 copy would not fit); low precision follows the project's rule
(``helpers.low_precision_ok``: within 2x the error of eager PyTorch in the same dtype, plus a floor).

Runtime on an H200 (an estimate from byte counts: none of the ``gpu`` cases has run yet). The data each case moves
is small against 4.3 TB/s: the largest, the dense N * V > 2^31 cases, move about 4.3 GB (bf16 logits) x 3 passes for
our kernel plus ~17 GB (float64 chunks) x ~10 passes for the reference and as much again for the bf16 eager
reference: about 0.4 TB, ~0.1 s each; the fused-linear case is 3 float64 matmuls of 2 x 2048 x 4096 x 151936 FLOPs
(7.6 TFLOP at ~60 TFLOP/s: ~0.13 s) per dtype. Device time for the whole file is therefore a few seconds; what
dominates is Triton's JIT (one compilation per kernel variant and dtype, ~1-2 s each, about 20 here) and inductor's
(one compile per torch.compile case, ~5-15 s, 9 cases): about 1-2 minutes of CPU time, spread over the xdist workers
that benchmarks/gpu_run.sh starts. The large cases share one ``xdist_group`` per test so that at most a few
multi-gigabyte cases are resident at once (each needs < 40 GB).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import low_precision_ok, rel_err

from grpo_kernels import _alloc, grpo_loss, token_logprobs
from grpo_kernels import reference as ref
from grpo_kernels.backends import BACKENDS, unavailable_reason
from grpo_kernels.fused_linear import fused_linear_grpo_loss

CUDA = torch.cuda.is_available()
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GRAD_FLOOR = 1e-3  # gradient floor of the low-precision rule (as in the rest of the suite)
FP32_TOL = 1e-5  # float32 logits against float64: the project's tolerance
TWO_31 = 2**31


def _params(group: str | None = None):
    """(size, backend) params: ``gpu`` x every backend (skipped with the reason where it cannot run), ``cpu`` x
    torch."""
    params = []
    for name in BACKENDS:
        marks = [pytest.mark.gpu] + ([pytest.mark.xdist_group(name=group)] if group else [])
        reason = "needs a CUDA device" if not CUDA else unavailable_reason(name, torch.device("cuda"))
        if reason:
            marks.append(pytest.mark.skip(reason=f"backend {name!r} on cuda: {reason}"))
        params.append(pytest.param("gpu", name, marks=marks, id=f"gpu-{name}"))
    params.append(pytest.param("cpu", "torch", id="cpu-torch"))
    return params


def _device(size: str) -> torch.device:
    return torch.device("cuda" if size == "gpu" else "cpu")


@pytest.fixture(autouse=True)
def _release_cuda_memory():
    yield
    if CUDA:
        torch.cuda.empty_cache()  # the next large case gets the memory back, also in a long-lived xdist worker


def _batch(
    b: int,
    t: int,
    v: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    extra_position: bool = False,
    last_full: bool = False,
):
    """Random logits ``[B, T(+1), V]`` (std 2, drawn on the device), ids, a mask with ragged tails and one empty row
    (when B > 2; with ``last_full`` the last sequence takes part whole instead), advantages ``[B]``, and old / ref
    log-probs near the current policy's (so that ratios straddle the clip range)."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(b, t + int(extra_position), v, generator=g, device=device, dtype=dtype).mul_(2.0)
    ids = torch.randint(0, v, (b, t), generator=g, device=device)
    lengths = torch.randint(1, t + 1, (b,), generator=g, device=device)
    mask = (torch.arange(t, device=device) < lengths[:, None]).float()
    if last_full:
        mask[-1] = 1
    elif b > 2:
        mask[-1] = 0
    adv = torch.randn(b, generator=g, device=device)
    z = logits[:, :t] if extra_position else logits
    lp = _logprobs_by_row(z, ids)
    old = lp + 0.3 * torch.randn(b, t, generator=g, device=device)
    ref_lp = lp + 0.3 * torch.randn(b, t, generator=g, device=device)
    return logits, ids, mask, adv, old, ref_lp


def _logprobs_by_row(z: torch.Tensor, ids: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """float32 log-probs of ``ids`` under ``z`` ``[B, T, V]``, a few rows at a time (bounded temporary memory)."""
    flat, flat_ids = z.reshape(-1, z.shape[-1]), ids.reshape(-1)
    parts = [
        flat[i : i + rows].float().log_softmax(-1).gather(-1, flat_ids[i : i + rows, None])[:, 0]
        for i in range(0, flat.shape[0], rows)
    ]
    return torch.cat(parts).view(ids.shape)


def _check(
    ours: torch.Tensor,
    exact: torch.Tensor,
    eager: torch.Tensor | None,
    dtype: torch.dtype,
    what: str,
    floor: float = 1e-6,
) -> None:
    """A tensor of per-token values or a gradient. float32 inputs: within 1e-5 of float64; bf16/fp16: within 2x
    eager's error in that dtype (+ ``floor``)."""
    err = rel_err(ours, exact)
    if dtype == torch.float32:
        assert err < FP32_TOL, (what, err)
    else:
        eager_err = rel_err(eager, exact)
        assert low_precision_ok(err, eager_err, floor), (what, err, eager_err)


def _loss_weights(mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """``c`` with loss = sum(c * per_token_loss): dapo / bnpo a token mean, grpo the mean of per-sequence means."""
    m = mask.double()
    if loss_type == "grpo":
        return m / m.sum(-1, keepdim=True).clamp(min=1.0) / m.shape[0]
    return m / m.sum().clamp(min=1.0)


def _check_loss(ours, exact, eager, mask: torch.Tensor, loss_type: str, *, computed_in_fp32: bool) -> None:
    """The scalar loss, a weighted sum of per-token losses that can cancel to near 0, so its error is measured
    against the size of its terms, ``scale = sum(c |per_token_loss|)``. Computed in float32 from exact inputs: within
    1e-5 of that scale. Else (logits rounded to bf16/fp16 before the loss, as the fused-linear tiles are): within 2x
    the bound on eager's own error, ``sum(c |eager's per-token error|)`` (a scalar's error ratio to eager's is a
    ratio of two random numbers, too noisy to test; the per-token vectors are tested with the 2x rule directly)."""
    exact_tokens = exact.per_token_loss.detach().double()
    c = _loss_weights(mask, loss_type).to(exact_tokens.device)
    scale = float((c * exact_tokens.abs()).sum())
    err = abs(float(ours.loss.detach()) - float(exact.loss.detach()))
    if computed_in_fp32:
        assert err <= FP32_TOL * scale, ("loss", err, scale)
    else:
        eager_bound = float((c * (eager.per_token_loss.detach().double() - exact_tokens).abs()).sum())
        assert err <= 2 * eager_bound + 1e-6 * scale, ("loss", err, eager_bound, scale)


# ----------------------------------------------------------------------------------------------------------------
# real vocabularies, every dtype: log-probs + entropy, the fused loss at both IS levels
# ----------------------------------------------------------------------------------------------------------------
REAL_VOCABS = {151936: 160, 262144: 256}  # real V -> the CPU stand-in (both multiples of 16, as the real ones)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("vocab", list(REAL_VOCABS), ids=[f"V{v}" for v in REAL_VOCABS])
@pytest.mark.parametrize("size,backend", _params())
def test_real_vocab_logprobs_and_loss(size, backend, vocab, dtype):
    """[4, 64] tokens of logits[:, :-1] (strided, not copied) at V = 151936 / 262144: log-probs, entropy and the
    gradient of a random mix of both; dapo at token level with KL; grpo at sequence level. Outputs poisoned."""
    device, dtype = _device(size), DTYPES[dtype]
    b, t, v = (4, 64, vocab) if size == "gpu" else (3, 4, REAL_VOCABS[vocab])
    full, ids, mask, adv, old, ref_lp = _batch(b, t, v, dtype, device, seed=v % 1000 + t, extra_position=True)
    g = torch.Generator(device=device).manual_seed(1)
    w_lp, w_h = torch.randn(b, t, generator=g, device=device), torch.randn(b, t, generator=g, device=device)
    leaves = [full.detach().clone().requires_grad_(True) for _ in range(3)]  # ours, float64, eager in dtype
    leaves[1] = full.detach().double().requires_grad_(True)

    with _alloc.poisoned_outputs():
        lp, h = token_logprobs(leaves[0][:, :-1], ids, mask=mask, return_entropy=True, backend=backend)
    lp64, h64 = ref.token_logprobs(leaves[1][:, :-1], ids, mask=mask)
    lpe, he = ref.token_logprobs(leaves[2][:, :-1], ids, mask=mask, compute_in=dtype)
    grads = [
        torch.autograd.grad((a * w_lp).sum() + (c * w_h).sum(), x)[0]
        for (a, c), x in zip(((lp, h), (lp64, h64), (lpe, he)), leaves)
    ]
    assert grads[0].dtype == dtype and torch.equal(grads[0][:, -1], torch.zeros_like(grads[0][:, -1]))
    _check(lp, lp64, lpe, dtype, "logprobs")
    _check(h, h64, he, dtype, "entropy")
    _check(grads[0], grads[1], grads[2], dtype, "logprobs/entropy gradient", floor=GRAD_FLOOR)

    for kw in (
        {"loss_type": "dapo", "beta": 0.04, "ref_logprobs": ref_lp},
        {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    ):
        kw.update(mask=mask, old_logprobs=old)
        leaves = [
            full.detach().clone().requires_grad_(True),
            full.detach().double().requires_grad_(True),
            full.detach().clone().requires_grad_(True),
        ]
        with _alloc.poisoned_outputs():
            out = grpo_loss(leaves[0][:, :-1], ids, adv, backend=backend, **kw)
        exact = ref.grpo_loss(leaves[1][:, :-1], ids, adv, **kw)
        eager = ref.grpo_loss(leaves[2][:, :-1], ids, adv, compute_in=dtype, **kw)
        grads = [torch.autograd.grad(o.loss, x)[0] for o, x in zip((out, exact, eager), leaves)]
        _check_loss(out, exact, eager, mask, kw["loss_type"], computed_in_fp32=True)  # the kernels compute in fp32
        for key in ("logprobs", "per_token_loss"):
            _check(getattr(out, key), getattr(exact, key), getattr(eager, key), dtype, f"{kw['loss_type']} {key}")
        _check(grads[0], grads[1], grads[2], dtype, f"{kw['loss_type']} gradient", floor=GRAD_FLOOR)


# ----------------------------------------------------------------------------------------------------------------
# dense logits with N * V > 2^31 (and > 65 535 rows)
# ----------------------------------------------------------------------------------------------------------------
DENSE = {  # name -> (B, T, V) on the GPU, (B, T, V) on the CPU, reference rows per chunk on the CPU
    "rows66625-V32768": ((65, 1025, 32768), (3, 7, 64), 4),  # N = 66 625 > 65 535 rows, N * V = 2.18e9
    "rows8200-V262144": ((4, 2050, 262144), (2, 9, 96), 5),  # N * V = 2.15e9; rows 8192.. start beyond 2^31
}


@pytest.mark.parametrize("layout", list(DENSE))
@pytest.mark.parametrize("size,backend", _params(group="dense"))
def test_dense_beyond_2_31_elements(size, backend, layout):
    """One contiguous bf16 tensor of > 2^31 elements (4.3 GB), every row taking part but ragged tails: dapo with KL,
    loss / log-probs / gradient against float64, computed in chunks of rows (token level: each row's gradient depends
    on its own row and the global token count, passed as ``num_items_in_batch``), and the rows whose first element
    lies beyond 2^31 checked on their own."""
    device, dtype = _device(size), torch.bfloat16
    gpu_shape, cpu_shape, cpu_rows = DENSE[layout]
    b, t, v = gpu_shape if size == "gpu" else cpu_shape
    chunk_rows = max(1, 2**27 // v) if size == "gpu" else cpu_rows  # float64 chunks of <= 1 GiB
    if size == "gpu":
        assert b * t * v > TWO_31
    logits, ids, mask, adv, old, ref_lp = _batch(b, t, v, dtype, device, seed=b + t, last_full=True)
    z = logits.requires_grad_(True)
    out = grpo_loss(z, ids, adv, mask=mask, old_logprobs=old, ref_logprobs=ref_lp, beta=0.04, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, z)
    assert grad.dtype == dtype and grad.shape == z.shape

    n = b * t
    total = mask.sum()
    rows = lambda x: x.reshape(n, *x.shape[2:])
    zf, gf = rows(z.detach()), rows(grad)
    per_token = {
        "ids": rows(ids),
        "mask": rows(mask),
        "adv": adv[:, None].expand(b, t).reshape(n),
        "old": rows(old),
        "ref": rows(ref_lp),
    }
    far = torch.arange(n, device=device) * v >= (TWO_31 if size == "gpu" else (n - 2) * v)  # rows beyond 2^31
    sq = {"ours": 0.0, "eager": 0.0, "exact": 0.0, "ours_far": 0.0, "eager_far": 0.0, "exact_far": 0.0}
    loss64, lp64_parts, scale = 0.0, [], 0.0
    for r0 in range(0, n, chunk_rows):
        r1 = min(n, r0 + chunk_rows)
        kw = {
            "mask": per_token["mask"][None, r0:r1],
            "old_logprobs": per_token["old"][None, r0:r1],
            "ref_logprobs": per_token["ref"][None, r0:r1],
            "beta": 0.04,
            "num_items_in_batch": total,
        }
        args = (per_token["ids"][None, r0:r1], per_token["adv"][None, r0:r1])
        z64 = zf[None, r0:r1].double().requires_grad_(True)
        exact = ref.grpo_loss(z64, *args, **kw)
        (g64,) = torch.autograd.grad(exact.loss, z64)
        ze = zf[None, r0:r1].clone().requires_grad_(True)
        (ge,) = torch.autograd.grad(ref.grpo_loss(ze, *args, compute_in=dtype, **kw).loss, ze)
        loss64 += float(exact.loss.detach())
        scale += float((exact.per_token_loss.detach().abs() * kw["mask"]).sum() / total)  # sum(c |per-token loss|)
        lp64_parts.append(exact.logprobs[0])
        g64, ge, go, sel = g64[0], ge[0].double(), gf[r0:r1].double(), far[r0:r1]
        for key, x in (("ours", go - g64), ("eager", ge - g64), ("exact", g64)):
            sq[key] += float(x.square().sum())
            sq[f"{key}_far"] += float(x[sel].square().sum())
        del z64, g64, ze, ge, go, exact
    loss = float(out.loss.detach())
    assert abs(loss - loss64) <= FP32_TOL * scale, (loss, loss64, scale)  # see _check_loss
    lp64 = torch.cat(lp64_parts)
    assert rel_err(rows(out.logprobs), lp64) < FP32_TOL  # float32 log-probs of the (exact) bf16 values
    assert rel_err(rows(out.logprobs)[far], lp64[far]) < FP32_TOL
    for suffix in ("", "_far"):
        ours, eager = (math.sqrt(sq[k + suffix] / sq["exact" + suffix]) for k in ("ours", "eager"))
        assert low_precision_ok(ours, eager, GRAD_FLOOR), (f"gradient{suffix}", ours, eager)


# ----------------------------------------------------------------------------------------------------------------
# grad_in_forward: the sm_90 2-pass kernel at every cluster size, and its 3-pass fallbacks
# ----------------------------------------------------------------------------------------------------------------
# The rule the CUDA launcher follows (csrc/grpo_loss.cu: two_pass_cluster_size; constants of grpo_loss_sm90.cuh):
# the smallest cluster C in 1, 2, 4, 8 whose slice of ceil(V / C) elements, rounded up to 16-byte vectors, fits
# 76288 bytes; 0 (3 passes) when none does or when a row is not a multiple of 16 bytes.
SLICE_BUDGET, MAX_CLUSTER = 76288, 8


def expected_cluster(vocab: int, element_size: int, capability: tuple[int, int] = (9, 0)) -> int:
    if capability[0] < 9 or (vocab * element_size) % 16:
        return 0
    per_vector = 16 // element_size
    c = 1
    while c <= MAX_CLUSTER:
        slice_elems = math.ceil(math.ceil(vocab / c) / per_vector) * per_vector
        if slice_elems * element_size <= SLICE_BUDGET:
            return c
        c *= 2
    return 0


GIF_CASES = [  # (V, dtype): the cluster size on sm_90 in the id
    (4096, "bfloat16"),
    (65536, "bfloat16"),
    (32000, "float32"),
    (151936, "bfloat16"),
    (151936, "float16"),
    (151936, "float32"),
    (262144, "bfloat16"),
    (262144, "float32"),
    (151943, "bfloat16"),
]


def test_expected_cluster_rule():
    got = {(v, d): expected_cluster(v, DTYPES[d].itemsize) for v, d in GIF_CASES}
    assert got == {
        (4096, "bfloat16"): 1,
        (65536, "bfloat16"): 2,
        (32000, "float32"): 2,
        (151936, "bfloat16"): 4,
        (151936, "float16"): 4,
        (151936, "float32"): 8,
        (262144, "bfloat16"): 8,
        (262144, "float32"): 0,
        (151943, "bfloat16"): 0,
    }
    assert expected_cluster(151936, 2, capability=(8, 0)) == 0


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize(
    "vocab,dtype",
    GIF_CASES,
    ids=[f"V{v}-{d}-c{expected_cluster(v, DTYPES[d].itemsize)}" for v, d in GIF_CASES],
)
@pytest.mark.parametrize("size,backend", _params())
def test_grad_in_forward_cluster_sizes(size, backend, vocab, dtype, inplace):
    """grpo_loss(grad_in_forward=True, loss_scale=0.25) over 512 rows (more rows than resident clusters: each
    cluster walks several rows), against the float64 gradient: in place (backward with grad_output = loss_scale:
    the forward's gradient is used as it is) and out of place (grad_output = 1: the backward rescales by 4). On CUDA
    the binding must report the cluster size of the rule above (0 = the 3-pass fallback)."""
    device, dtype = _device(size), DTYPES[dtype]
    b, t, v = (4, 128, vocab) if size == "gpu" else (2, 5, min(vocab, 515))
    logits, ids, mask, adv, old, ref_lp = _batch(b, t, v, dtype, device, seed=v % 997)
    kw = {"mask": mask, "old_logprobs": old, "ref_logprobs": ref_lp, "beta": 0.04, "loss_type": "dapo"}
    if size == "gpu" and backend == "cuda":
        cluster = torch.ops.grpo_kernels_cuda.two_pass_cluster_size(logits, torch.empty_like(logits))
        assert cluster == expected_cluster(v, dtype.itemsize, torch.cuda.get_device_capability()), cluster
    x = logits.clone().requires_grad_(True)
    z = x.clone()  # a model's output: a non-leaf (in place, its memory takes the gradient)
    scale, grad_output = 0.25, (0.25 if inplace else 1.0)
    with _alloc.poisoned_outputs():
        out = grpo_loss(
            z, ids, adv, grad_in_forward=True, loss_scale=scale, inplace_backward=inplace, backend=backend, **kw
        )
    (out.loss * grad_output).backward()
    x64, xe = logits.double().requires_grad_(True), logits.clone().requires_grad_(True)
    exact, eager = ref.grpo_loss(x64, ids, adv, **kw), ref.grpo_loss(xe, ids, adv, compute_in=dtype, **kw)
    (exact.loss * grad_output).backward()
    (eager.loss * grad_output).backward()
    _check_loss(out, exact, eager, mask, "dapo", computed_in_fp32=True)
    assert rel_err(out.per_token_loss, exact.per_token_loss) < FP32_TOL  # float32 math on the exact inputs
    assert x.grad.dtype == dtype
    _check(x.grad, x64.grad, xe.grad, dtype, "gradient", floor=GRAD_FLOOR)


# ----------------------------------------------------------------------------------------------------------------
# the fused-linear loss at a real head
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("size,backend", _params(group="fused-linear"))
def test_fused_linear_real_head(size, backend, dtype):
    """fused_linear_grpo_loss over [2, 1024] tokens, H = 4096, V = 151936 (two or three tiles at the default tile
    size, the last one short), dapo with KL at token level, against float64 on the materialised logits: loss,
    log-probs, d hidden, d weight, within 2x the error of eager PyTorch in the same dtype (the logits materialised
    by a matmul in that dtype)."""
    device, dtype = _device(size), DTYPES[dtype]
    b, t, hid, v, chunk = (2, 1024, 4096, 151936, None) if size == "gpu" else (2, 12, 16, 152, 10)
    g = torch.Generator(device=device).manual_seed(5)
    h = torch.randn(b, t, hid, generator=g, device=device).to(dtype)
    w = (torch.randn(v, hid, generator=g, device=device) * (2.0 / hid**0.5)).to(dtype)  # logits ~ N(0, 4)
    ids = torch.randint(0, v, (b, t), generator=g, device=device)
    mask = (torch.arange(t, device=device) < torch.tensor([t, t * 3 // 4], device=device)[:, None]).float()
    adv = torch.randn(b, generator=g, device=device)
    with torch.no_grad():
        lp = _logprobs_by_row(h.float() @ w.float().T, ids)
    old, ref_lp = lp + 0.3 * torch.randn(b, t, generator=g, device=device), lp - 0.2
    kw = {"mask": mask, "old_logprobs": old, "ref_logprobs": ref_lp, "beta": 0.04}

    hl, wl = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fused_linear_grpo_loss(hl, wl, ids, adv, backend=backend, chunk_tokens=chunk, **kw)
    out.loss.backward()
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    exact = ref.grpo_loss(h64 @ w64.T, ids, adv, **kw)
    exact.loss.backward()
    he, we = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    eager = ref.grpo_loss(he @ we.T, ids, adv, compute_in=dtype, **kw)
    eager.loss.backward()
    assert hl.grad.dtype == wl.grad.dtype == dtype
    # float32: the matmuls' rounding over H = 4096 terms also enters, so the same 2x-eager rule holds there, with the
    # project's float32 tolerance as its floor
    floors = (FP32_TOL, FP32_TOL) if dtype == torch.float32 else (1e-6, GRAD_FLOOR)
    for name, ours, e64, ee, floor in (
        ("logprobs", out.logprobs, exact.logprobs, eager.logprobs, floors[0]),
        ("per_token_loss", out.per_token_loss, exact.per_token_loss, eager.per_token_loss, floors[0]),
        ("d hidden", hl.grad, h64.grad, he.grad, floors[1]),
        ("d weight", wl.grad, w64.grad, we.grad, floors[1]),
    ):
        err, eager_err = rel_err(ours, e64), rel_err(ee, e64)
        assert low_precision_ok(err, eager_err, floor), (name, err, eager_err)
    _check_loss(out, exact, eager, mask, "dapo", computed_in_fp32=False)  # the tiles' logits are rounded to dtype


# ----------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): inductor on the GPU. The CPU stand-in uses dynamo's "eager" backend (the whole-graph
# capture without a compiler, a second or so): aot_eager on the CPU is in test_grpo_loss / test_grad_in_forward /
# test_fused_linear already, and inductor's C++ build here would take longer than the rest of this file.
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["logits", "grad_in_forward", "fused_linear"])
@pytest.mark.parametrize("size,backend", _params())
def test_torch_compile_fullgraph(size, backend, path):
    """A training step (LM head matmul, the loss, its backward) compiled with fullgraph=True equals the same step
    uncompiled, and both match float64."""
    device = _device(size)
    b, t, hid, v = (2, 256, 256, 32000) if size == "gpu" else (2, 6, 8, 40)
    g = torch.Generator(device=device).manual_seed(9)
    h = torch.randn(b, t, hid, generator=g, device=device)
    w = torch.randn(v, hid, generator=g, device=device) * (2.0 / hid**0.5)
    ids = torch.randint(0, v, (b, t), generator=g, device=device)
    mask = torch.ones(b, t, device=device)
    mask[1, t // 2 :] = 0
    adv = torch.randn(b, generator=g, device=device)
    old = _logprobs_by_row(h @ w.T, ids) + 0.3 * torch.randn(b, t, generator=g, device=device)

    def step(hidden, weight):
        kw = {"mask": mask, "old_logprobs": old, "backend": backend}
        if path == "fused_linear":
            out = fused_linear_grpo_loss(hidden, weight, ids, adv, **kw)
        else:
            extra = {"grad_in_forward": True, "loss_scale": 2.0} if path == "grad_in_forward" else {}
            out = grpo_loss(hidden @ weight.T, ids, adv, **kw, **extra)
        return out.loss * 2.0, out.clip_region

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if size == "gpu" else "eager")
    results = []
    for fn in (compiled, step):
        hl, wl = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, clip = fn(hl, wl)
        loss.backward()
        results.append((loss.detach(), clip, hl.grad, wl.grad))
    (loss_c, clip_c, dh_c, dw_c), (loss_e, clip_e, dh_e, dw_e) = results
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    exact = ref.grpo_loss(h64 @ w64.T, ids, adv, mask=mask, old_logprobs=old)
    (exact.loss * 2.0).backward()
    scale = 2.0 * float((_loss_weights(mask, "dapo") * exact.per_token_loss.detach().double().abs()).sum())
    assert abs(float(loss_c) - float(loss_e)) <= 1e-6 * scale and torch.equal(clip_c, clip_e)
    assert rel_err(dh_c, dh_e) < 1e-6 and rel_err(dw_c, dw_e) < 1e-6
    assert abs(float(loss_c) - 2.0 * float(exact.loss.detach())) <= FP32_TOL * scale
    assert rel_err(dh_c, h64.grad) < FP32_TOL and rel_err(dw_c, w64.grad) < FP32_TOL
