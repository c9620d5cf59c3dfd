"""fused_linear_grpo_loss on every backend against reference.py applied to the materialised logits
``softcap(scale * (hidden @ weight.T + bias))``: loss, per-token outputs, d hidden, d weight, d bias."""

import itertools
import zlib

import pytest
import torch
from conftest import DEVICE
from helpers import low_precision_ok, make_batch, rel_err

from grpo_kernels import reference as ref
from grpo_kernels.fused_linear import (
    FusedLinearGRPOLoss,
    causal_lm_grpo_loss,
    causal_lm_token_logprobs,
    default_chunk_tokens,
    fused_linear_grpo_loss,
    fused_linear_token_logprobs,
)
from grpo_kernels.fused_linear.tiles import plan_tiles as _plan_tiles

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
LEVELS = ["token", "sequence"]
# head options (bias, logit_softcap, logit_scale) x loss options
OPTIONS = {
    "plain": dict(),
    "k3-bias": dict(beta=0.04, bias=True),
    "softcap-scale-k1bc-tau-isw": dict(
        logit_softcap=3.0,
        logit_scale=0.7,
        beta=0.1,
        kl_estimator="k1",
        bias_corrected_kl=True,
        temperature=0.8,
        is_weights=True,
        bias=True,
    ),
    "scale-k2-dual-delta": dict(
        logit_scale=1.3, beta=0.1, kl_estimator="k2", dual_clip=3.0, delta=1.5, epsilon_high=0.28
    ),
}
B, T, H, V = 3, 7, 16, 37  # N = 21 tokens: not a multiple of the tiles below


def _dtype(backend):
    """float64 where the backend computes it (torch), else float32."""
    return torch.float64 if backend == "torch" else torch.float32


def _tolerance(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-5


def _head(seed, dtype, bias=True, batch=B, seq=T, hidden=H, vocab=V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * (2.0 / hidden**0.5)  # logits ~ N(0, 4)
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    return [None if x is None else x.to(dtype).to(DEVICE) for x in (h, w, b)]


def _leaf(x, dtype=None):
    """A fresh leaf that requires grad (a copy: never flags the caller's tensor)."""
    return None if x is None else x.detach().to(dtype or x.dtype, copy=True).requires_grad_(True)


def _logits(h, w, b=None, logit_softcap=None, logit_scale=1.0):
    z = h @ w.T
    z = (z + b) if b is not None else z
    z = z * logit_scale
    return z if logit_softcap is None else logit_softcap * torch.tanh(z / logit_softcap)


def _data(seed, h, w, b, head):
    """ids / mask (ragged tails, one empty row) / advantages, and old / ref log-probs near the current policy's."""
    d = make_batch(h.shape[0], h.shape[1], w.shape[0], seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        z = _logits(h.double(), w.double(), None if b is None else b.double(), **head)
        lp = torch.log_softmax(z, -1).gather(-1, d["ids"].unsqueeze(-1)).squeeze(-1).cpu()
    noise = lambda: 0.3 * torch.randn(lp.shape, generator=g, dtype=torch.float64)  # noqa: E731
    d["old"], d["ref"] = (lp + noise()).float().to(DEVICE), (lp + noise()).float().to(DEVICE)
    d["isw"] = (0.5 + torch.rand(lp.shape, generator=g)).to(DEVICE)
    return d


def _split(option):
    opt = dict(OPTIONS[option])
    use_bias, use_isw = opt.pop("bias", False), opt.pop("is_weights", False)
    head = {k: opt.pop(k) for k in ("logit_softcap", "logit_scale") if k in opt}
    return opt, head, use_bias, use_isw


def _both(h, w, b, d, head, use_isw, loss_kwargs, grad_out=1.0, **fused_kwargs):
    """(fused output, its grads), (reference output on float64 logits, its grads); grads w.r.t. (h, w, b)."""
    kw = dict(
        mask=d["mask"],
        old_logprobs=d["old"],
        ref_logprobs=d["ref"],
        is_weights=d["isw"] if use_isw else None,
        max_completion_length=9,
        **loss_kwargs,
    )
    leaves = [_leaf(x) for x in (h, w, b)]
    out = fused_linear_grpo_loss(*leaves[:2], d["ids"], d["adv"], bias=leaves[2], **head, **kw, **fused_kwargs)
    (out.loss * grad_out).backward()
    leaves64 = [_leaf(x, torch.float64) for x in (h, w, b)]
    expect = ref.grpo_loss(_logits(*leaves64, **head), d["ids"], d["adv"], **kw)
    (expect.loss * grad_out).backward()
    grads = lambda xs: [None if x is None else x.grad for x in xs]  # noqa: E731
    return (out, grads(leaves)), (expect, grads(leaves64))


def _assert_close(ours, expect, tol, entropy=False):
    (out, grads), (ref_out, ref_grads) = ours, expect
    assert rel_err(out.loss, ref_out.loss) < tol
    assert rel_err(out.logprobs, ref_out.logprobs) < tol
    assert rel_err(out.per_token_loss, ref_out.per_token_loss) < tol
    if entropy:
        assert rel_err(out.entropy, ref_out.entropy) < tol
    for key in ("kl_mean", "clip_low", "clip_high", "clip_region", "logprob_mean"):
        assert abs(getattr(out, key).item() - getattr(ref_out, key).item()) < tol, key
    for name, g, g64 in zip(("dhidden", "dweight", "dbias"), grads, ref_grads):
        assert (g is None) == (g64 is None), name
        if g is not None:
            assert rel_err(g, g64) < tol, name


@pytest.mark.parametrize("loss_type,level", list(itertools.product(LOSS_TYPES, LEVELS)))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_reference(backend, loss_type, level, option, poisoned):
    dtype = _dtype(backend)
    seed = zlib.crc32(f"{loss_type}{level}{option}".encode()) % 1000
    opt, head, use_bias, use_isw = _split(option)
    h, w, b = _head(seed, dtype, bias=use_bias)
    d = _data(seed, h, w, b, head)
    # 5-token tiles: 21 positions, tiles straddle sequences (and the sequence level runs two passes)
    ours, expect = _both(
        h,
        w,
        b,
        d,
        head,
        use_isw,
        dict(loss_type=loss_type, importance_sampling_level=level, **opt),
        chunk_tokens=5,
        backend=backend,
        return_entropy=True,
    )
    assert ours[0].loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ours[1][0].dtype == dtype and ours[1][1].dtype == dtype
    _assert_close(ours, expect, _tolerance(dtype), entropy=True)


def test_tile_plans():
    cu = [0, 3, 3, 8, 10, 15]  # lengths 3, 0, 5, 2, 5
    assert _plan_tiles(cu, 4, None) == ([(0, 4), (4, 8), (8, 12), (12, 15)], True)
    assert _plan_tiles(cu, 4, "sequence") == ([(0, 4), (4, 8), (8, 12), (12, 15)], False)  # a sequence of 5 > 4
    assert _plan_tiles(cu, 7, "sequence") == ([(0, 3), (3, 10), (10, 15)], True)  # whole sequences, <= 7 tokens each
    assert _plan_tiles(cu, 100, "sequence") == ([(0, 15)], True)
    assert _plan_tiles([0, 0], 4, "sequence") == ([], True)
    assert _plan_tiles(cu, 7, "batch") == ([(0, 7), (7, 14), (14, 15)], False)  # the batch: one tile, or two passes
    assert _plan_tiles(cu, 15, "batch") == ([(0, 15)], True)
    assert default_chunk_tokens(151936, torch.bfloat16) == 1664  # <= 512 MiB of bf16 logits, a multiple of 128
    assert default_chunk_tokens(151936, torch.bfloat16, softcap=True) == 512  # + the float32 softcapped tile
    assert default_chunk_tokens(37, torch.float32) > 10**6


@pytest.mark.parametrize("chunk_tokens", [1, 6, 7, 8, 13, None])
def test_sequence_level_single_and_two_pass(backend, chunk_tokens):
    """Sequences of at most 7 tokens: tiles of >= 7 tokens hold whole sequences (one pass), smaller ones do not (two
    passes). Both must give the reference's loss and gradients, including at tile boundaries."""
    dtype = _dtype(backend)
    h, w, b = _head(11, dtype)
    d = _data(11, h, w, b, {})
    kw = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1)
    ours, expect = _both(h, w, b, d, {}, False, kw, chunk_tokens=chunk_tokens, backend=backend)
    _assert_close(ours, expect, _tolerance(dtype))


def test_gradient_accumulation(backend):
    """grad_output != 1 (gradient accumulation / loss scaling) scales the stored gradients; a second backward on a
    fresh forward adds to .grad."""
    dtype = _dtype(backend)
    h, w, b = _head(12, dtype)
    d = _data(12, h, w, b, {})
    kw = dict(loss_type="dapo", beta=0.04)
    ours, expect = _both(h, w, b, d, {}, False, kw, grad_out=0.37, chunk_tokens=4, backend=backend)
    _assert_close(ours, expect, _tolerance(dtype))
    wl = _leaf(w)
    for _ in range(2):
        out = fused_linear_grpo_loss(
            h,
            wl,
            d["ids"],
            d["adv"],
            bias=b,
            mask=d["mask"],
            old_logprobs=d["old"],
            ref_logprobs=d["ref"],
            chunk_tokens=4,
            backend=backend,
            **kw,
        )
        (out.loss * 0.5).backward()
    assert rel_err(wl.grad, expect[1][1] / 0.37) < _tolerance(dtype)


def test_tied_embedding_gradients_add_up(backend):
    """The head is the input embedding (tie_word_embeddings): d loss/d E = embedding path + head path."""
    dtype = _dtype(backend)
    g = torch.Generator().manual_seed(13)
    emb = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype).to(DEVICE)
    mix = (torch.randn(H, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype).to(DEVICE)
    d = make_batch(B, T, V, seed=13)
    inputs = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    kw = dict(mask=d["mask"], loss_type="grpo", importance_sampling_level="sequence")  # on-policy: ratio 1

    e = _leaf(emb)
    hidden = torch.tanh(e[inputs] @ mix)  # a (tiny) model whose input is the same embedding
    fused_linear_grpo_loss(hidden, e, d["ids"], d["adv"], chunk_tokens=4, backend=backend, **kw).loss.backward()
    e64 = _leaf(emb, torch.float64)
    hidden64 = torch.tanh(e64[inputs] @ mix.double())
    ref.grpo_loss(hidden64 @ e64.T, d["ids"], d["adv"], **kw).loss.backward()
    assert rel_err(e.grad, e64.grad) < _tolerance(dtype)
    # both paths really contribute
    e_head = _leaf(emb, torch.float64)
    ref.grpo_loss(hidden64.detach() @ e_head.T, d["ids"], d["adv"], **kw).loss.backward()
    assert e64.grad.norm() > 0 and rel_err(e_head.grad, e64.grad) > 1e-2


def test_bf16_weight_float32_accumulation(backend):
    """bf16 hidden and weight over 64 tiles of 4 tokens: dW is accumulated in float32 and rounded to bf16 once, so
    its error vs float64 stays within 2x eager bf16's (one big matmul), while bf16 accumulation across the tiles
    (what a bf16 accumulator would do; about 3x ours here) is much worse."""
    g = torch.Generator().manual_seed(14)
    n, hid, vocab, chunk = 256, 32, 64, 4
    h = torch.randn(n, hid, generator=g).bfloat16().to(DEVICE)
    w = (torch.randn(vocab, hid, generator=g) * 0.3).bfloat16().to(DEVICE)
    ids = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    adv = torch.randn(n, generator=g).to(DEVICE)
    hl, wl = _leaf(h), _leaf(w)
    out = fused_linear_grpo_loss(hl, wl, ids, adv, loss_type="bnpo", chunk_tokens=chunk, backend=backend)
    out.loss.backward()
    assert wl.grad.dtype == torch.bfloat16 and hl.grad.dtype == torch.bfloat16

    z64 = _leaf(h.double() @ w.double().T)
    (gz,) = torch.autograd.grad(ref.grpo_loss(z64, ids, adv, loss_type="bnpo").loss, z64)
    dw64, dh64 = gz.T @ h.double(), gz @ w.double()
    he, we = _leaf(h), _leaf(w)
    ref.grpo_loss(he @ we.T, ids, adv, loss_type="bnpo", compute_in=torch.bfloat16).loss.backward()
    bf16_sum = torch.zeros_like(w)
    for s in range(0, n, chunk):
        bf16_sum += (gz[s : s + chunk].T @ h[s : s + chunk].double()).to(torch.bfloat16)

    ours, eager, bf16_acc = rel_err(wl.grad, dw64), rel_err(we.grad, dw64), rel_err(bf16_sum, dw64)
    assert low_precision_ok(ours, eager, floor=1e-3)
    assert ours < 0.5 * bf16_acc, (ours, bf16_acc)
    assert low_precision_ok(rel_err(hl.grad, dh64), rel_err(he.grad, dh64), floor=1e-3)


def test_autocast_computes_in_its_dtype(backend):
    """float32 parameters under bf16 autocast: the projection runs in bf16 (as the model's lm_head would), the
    gradients come back float32 and are as accurate as eager's under the same autocast."""
    g = torch.Generator().manual_seed(24)
    n, hid, vocab = 128, 32, 64
    h, w = torch.randn(n, hid, generator=g).to(DEVICE), (torch.randn(vocab, hid, generator=g) * 0.3).to(DEVICE)
    ids, adv = torch.randint(0, vocab, (n,), generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    (hl, wl), (he, we) = (_leaf(h), _leaf(w)), (_leaf(h), _leaf(w))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = fused_linear_grpo_loss(hl, wl, ids, adv, chunk_tokens=16, backend=backend)
        eager_logits = he @ we.T
    out.loss.backward()
    ref.grpo_loss(eager_logits, ids, adv, compute_in=torch.bfloat16).loss.backward()
    h64, w64 = _leaf(h, torch.float64), _leaf(w, torch.float64)
    ref.grpo_loss(h64 @ w64.T, ids, adv).loss.backward()
    assert eager_logits.dtype == torch.bfloat16 and hl.grad.dtype == wl.grad.dtype == torch.float32
    assert rel_err(wl.grad, w64.grad) > 1e-4  # it did compute in bf16
    assert low_precision_ok(rel_err(wl.grad, w64.grad), rel_err(we.grad, w64.grad), floor=1e-3)
    assert low_precision_ok(rel_err(hl.grad, h64.grad), rel_err(he.grad, h64.grad), floor=1e-3)


def test_masked_positions_are_never_read(backend):
    """NaN hidden states where mask == 0 (e.g. fully masked attention rows) leave loss and gradients finite, and
    the gradient rows of those positions are zero."""
    dtype = _dtype(backend)
    h, w, b = _head(15, dtype, bias=False)
    d = _data(15, h, w, b, {})
    masked = d["mask"] == 0
    h_nan = h.clone()
    h_nan[masked] = float("nan")
    hl, wl = _leaf(h_nan), _leaf(w)
    out = fused_linear_grpo_loss(
        hl,
        wl,
        d["ids"],
        d["adv"],
        mask=d["mask"],
        old_logprobs=d["old"],
        chunk_tokens=4,
        importance_sampling_level="sequence",
        loss_type="grpo",
        backend=backend,
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(wl.grad).all() and torch.isfinite(hl.grad).all()
    assert (hl.grad[masked] == 0).all() and (out.logprobs[masked] == 0).all()
    ours, expect = _both(
        h,
        w,
        b,
        d,
        {},
        False,
        dict(loss_type="grpo", importance_sampling_level="sequence"),
        chunk_tokens=4,
        backend=backend,
    )
    assert rel_err(out.loss, expect[0].loss) < _tolerance(dtype)
    assert rel_err(wl.grad, expect[1][1]) < _tolerance(dtype)


def test_all_masked_and_empty(backend):
    dtype = _dtype(backend)
    h, w, b = _head(16, dtype)
    ids = torch.randint(0, V, (B, T), device=DEVICE)
    hl, wl, bl = (_leaf(x) for x in (h, w, b))
    nothing = torch.zeros(B, T, device=DEVICE)
    out = fused_linear_grpo_loss(hl, wl, ids, torch.ones(B, device=DEVICE), bias=bl, mask=nothing, backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0 and (out.logprobs == 0).all()
    assert all((x.grad == 0).all() for x in (hl, wl, bl))
    empty = torch.zeros(0, T, H, dtype=dtype, device=DEVICE, requires_grad=True)
    out = fused_linear_grpo_loss(empty, wl, ids[:0], torch.ones(0, device=DEVICE), backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0 and empty.grad.shape == empty.shape


def test_packed_cu_seqlens(backend):
    """Packed [N, H] hidden with cu_seqlens == the padded layout with its masked tail dropped."""
    dtype = _dtype(backend)
    h, w, b = _head(17, dtype)
    d = _data(17, h, w, b, {})
    d["mask"][-1, 0] = 1  # no empty sequence: packed sequences have at least one token here
    lengths = d["mask"].sum(1).long().tolist()
    rows = [(i, t) for i in range(B) for t in range(lengths[i])]
    pick = lambda x: torch.stack([x[i, t] for i, t in rows])  # noqa: E731
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), device=DEVICE)
    kw = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1, chunk_tokens=3, backend=backend)
    padded = fused_linear_grpo_loss(
        h, w, d["ids"], d["adv"], mask=d["mask"], old_logprobs=d["old"], ref_logprobs=d["ref"], **kw
    )
    packed = fused_linear_grpo_loss(
        pick(h),
        w,
        pick(d["ids"]),
        d["adv"],
        old_logprobs=pick(d["old"]),
        ref_logprobs=pick(d["ref"]),
        cu_seqlens=cu,
        **kw,
    )
    assert rel_err(packed.loss, padded.loss) < _tolerance(dtype)
    assert rel_err(packed.logprobs, pick(padded.logprobs)) < _tolerance(dtype)


def test_entropy_output_and_entropy_coef(backend):
    """return_entropy gives H (no gradient of its own: a backward through it raises); entropy_coef subtracts
    entropy_coef * sum_t c_t H_t from the loss, with its gradient, for every aggregation."""
    dtype = _dtype(backend)
    h, w, b = _head(18, dtype)
    d = _data(18, h, w, b, {})
    out = fused_linear_grpo_loss(_leaf(h), w, d["ids"], d["adv"], mask=d["mask"], return_entropy=True, backend=backend)
    with pytest.raises(RuntimeError, match="entropy_coef"):
        (out.loss + out.entropy.sum()).backward()

    m = d["mask"].double()
    for loss_type, aggregate in (
        ("grpo", lambda x: ((x * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()),
        ("dapo", lambda x: (x * m).sum() / m.sum()),
        ("dr_grpo", lambda x: (x * m).sum() / (B * 9)),
    ):
        hl, wl = _leaf(h), _leaf(w)
        out = fused_linear_grpo_loss(
            hl,
            wl,
            d["ids"],
            d["adv"],
            mask=d["mask"],
            loss_type=loss_type,
            max_completion_length=9,
            entropy_coef=0.05,
            chunk_tokens=4,
            backend=backend,
        )
        out.loss.backward()
        h64, w64 = _leaf(h, torch.float64), _leaf(w, torch.float64)
        expect = ref.grpo_loss(
            h64 @ w64.T, d["ids"], d["adv"], mask=d["mask"], loss_type=loss_type, max_completion_length=9
        )
        total = expect.loss - 0.05 * aggregate(expect.entropy)
        total.backward()
        assert rel_err(out.loss, total) < _tolerance(dtype), loss_type
        assert rel_err(hl.grad, h64.grad) < _tolerance(dtype) and rel_err(wl.grad, w64.grad) < _tolerance(dtype)


@pytest.mark.parametrize("level,chunk_tokens", [("token", 4), ("sequence", 4), ("sequence", None)])
def test_entropy_weights(backend, level, chunk_tokens):
    """entropy_weights w subtracts sum_t w_t H_t (with its gradient) on top of entropy_coef's term; weights at
    positions that do not take part are never read (NaN there changes nothing). Sequence level with 4-token tiles
    takes the two-pass plan, with one tile the single pass."""
    dtype = _dtype(backend)
    h, w, b = _head(24, dtype)
    d = _data(24, h, w, b, {"logit_softcap": 3.0})
    g = torch.Generator().manual_seed(25)
    weights = (torch.rand(d["ids"].shape, generator=g) * 0.1).to(DEVICE)
    weights = weights.masked_fill(d["mask"] == 0, float("nan"))
    kw = dict(
        mask=d["mask"],
        old_logprobs=d["old"],
        ref_logprobs=d["ref"],
        beta=0.04,
        loss_type="grpo",
        importance_sampling_level=level,
        temperature=0.9,
    )
    leaves = [_leaf(x) for x in (h, w, b)]
    out = fused_linear_grpo_loss(
        *leaves[:2],
        d["ids"],
        d["adv"],
        bias=leaves[2],
        entropy_coef=0.03,
        entropy_weights=weights,
        logit_softcap=3.0,
        chunk_tokens=chunk_tokens,
        backend=backend,
        **kw,
    )
    out.loss.backward()
    leaves64 = [_leaf(x, torch.float64) for x in (h, w, b)]
    expect = ref.grpo_loss(_logits(*leaves64, logit_softcap=3.0), d["ids"], d["adv"], **kw)
    m = d["mask"].double()
    grpo_weights = m / m.sum(-1, keepdim=True).clamp(min=1) / m.shape[0]  # c_t of loss_type="grpo"
    total = expect.loss - (expect.entropy * (0.03 * grpo_weights + weights.double().nan_to_num())).sum()
    total.backward()
    tol = _tolerance(dtype)
    assert rel_err(out.loss, total) < tol
    assert rel_err(out.per_token_loss, expect.per_token_loss) < tol  # the entropy terms are not per-token loss
    for name, a, e in zip(("dhidden", "dweight", "dbias"), leaves, leaves64):
        assert rel_err(a.grad, e.grad) < tol, name


def test_entropy_weights_rejected():
    h, w = torch.randn(B, T, H), torch.randn(V, H)
    ids, adv = torch.zeros(B, T, dtype=torch.long), torch.ones(B)
    with pytest.raises(ValueError, match="entropy_weights must have the shape"):
        fused_linear_grpo_loss(h, w, ids, adv, entropy_weights=torch.ones(B, T + 1))
    with pytest.raises(TypeError, match="entropy_weights must be a floating-point"):
        fused_linear_grpo_loss(h, w, ids, adv, entropy_weights=torch.ones(B, T, dtype=torch.long))


@pytest.mark.parametrize("head", [{}, dict(logit_softcap=2.5, logit_scale=0.8)], ids=["plain", "softcap"])
def test_token_logprobs(backend, head):
    dtype = _dtype(backend)
    h, w, b = _head(19, dtype)
    d = _data(19, h, w, b, head)
    hl = _leaf(h)
    lp, entropy = fused_linear_token_logprobs(
        hl,
        w,
        d["ids"],
        bias=b,
        mask=d["mask"],
        temperature=0.7,
        return_entropy=True,
        chunk_tokens=4,
        backend=backend,
        **head,
    )
    assert not lp.requires_grad and not entropy.requires_grad and lp.shape == d["ids"].shape
    lp64, entropy64 = ref.token_logprobs(
        _logits(h.double(), w.double(), b.double(), **head), d["ids"], mask=d["mask"], temperature=0.7
    )
    assert rel_err(lp, lp64) < _tolerance(dtype) and rel_err(entropy, entropy64) < _tolerance(dtype)


def test_module_form(backend):
    dtype = _dtype(backend)
    h, w, b = _head(20, dtype)
    d = _data(20, h, w, b, {})
    module = FusedLinearGRPOLoss(beta=0.04, loss_type="grpo", logit_softcap=4.0, chunk_tokens=5, backend=backend)
    out = module(h, w, d["ids"], d["adv"], bias=b, mask=d["mask"], ref_logprobs=d["ref"])
    expect = fused_linear_grpo_loss(
        h,
        w,
        d["ids"],
        d["adv"],
        bias=b,
        mask=d["mask"],
        ref_logprobs=d["ref"],
        beta=0.04,
        loss_type="grpo",
        logit_softcap=4.0,
        chunk_tokens=5,
        backend=backend,
    )
    assert torch.equal(out.loss, expect.loss)
    assert "logit_softcap=4.0" in repr(module)
    with pytest.raises(TypeError, match="inplace_backward"):
        FusedLinearGRPOLoss(inplace_backward=True)


def test_torch_compile_fullgraph(backend):
    dtype = _dtype(backend)
    h, w, b = _head(21, dtype)
    d = _data(21, h, w, b, {})

    def step(hidden, weight, bias):
        out = fused_linear_grpo_loss(
            hidden,
            weight,
            d["ids"],
            d["adv"],
            bias=bias,
            mask=d["mask"],
            old_logprobs=d["old"],
            importance_sampling_level="sequence",
            chunk_tokens=4,
            backend=backend,
        )
        return out.loss * 2, out.clip_region

    leaves = [[_leaf(x) for x in (h, w, b)] for _ in range(2)]
    (loss_c, clip_c), (loss_e, clip_e) = (
        torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves[0]),
        step(*leaves[1]),
    )
    loss_c.backward()
    loss_e.backward()
    assert torch.allclose(loss_c, loss_e, rtol=1e-12) and torch.equal(clip_c, clip_e)
    for a, e in zip(*leaves):
        assert torch.allclose(a.grad, e.grad, rtol=1e-10, atol=1e-12)


VALIDATION = [
    ("hidden-1d", dict(hidden=torch.randn(H)), ValueError, r"hidden must be \[B, T, H\]"),
    ("weight-none", dict(weight=None), TypeError, "weight must be a torch.Tensor"),
    ("weight-wrong-H", dict(weight=torch.randn(V, H + 1)), ValueError, "weight must be the LM head"),
    ("weight-int", dict(weight=torch.ones(V, H, dtype=torch.long)), TypeError, "weight must be float16"),
    ("bias-shape", dict(bias=torch.randn(V + 1)), ValueError, "bias must have the shape"),
    ("ids-shape", dict(token_ids=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, "token_ids must have the shape"),
    ("softcap-zero", dict(logit_softcap=0.0), ValueError, "logit_softcap must be > 0"),
    ("scale-negative", dict(logit_scale=-1.0), ValueError, "logit_scale must be > 0"),
    ("chunk-zero", dict(chunk_tokens=0), ValueError, "chunk_tokens must be a positive int"),
    ("loss-type", dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
    ("inplace", dict(inplace_backward=True), TypeError, "inplace_backward"),
]


@pytest.mark.parametrize("case,change,exc,match", VALIDATION, ids=[c[0] for c in VALIDATION])
def test_rejects(case, change, exc, match):
    args = dict(
        hidden=torch.randn(B, T, H),
        weight=torch.randn(V, H),
        token_ids=torch.zeros(B, T, dtype=torch.long),
        advantages=torch.ones(B),
    )
    kwargs = {}
    for key, value in change.items():
        (args if key in args else kwargs)[key] = value.to(DEVICE) if isinstance(value, torch.Tensor) else value
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(exc, match=match):
        fused_linear_grpo_loss(
            args.pop("hidden"), args.pop("weight"), args.pop("token_ids"), args.pop("advantages"), **kwargs
        )


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face helper on tiny random models (built from configs: no download)
# ----------------------------------------------------------------------------------------------------------------
def _tiny_model(name, dtype):
    transformers = pytest.importorskip("transformers")
    configs = {
        "llama": (transformers.LlamaConfig, {}),  # untied head, no logit transform
        "gemma2": (transformers.Gemma2Config, dict(final_logit_softcapping=2.0)),  # tied head, softcap
        "cohere": (transformers.CohereConfig, dict(logit_scale=0.5)),  # tied head, scale
        "granite": (transformers.GraniteConfig, dict(logits_scaling=4.0)),  # divides the logits
        "hyperclovax": ("hyperclovax", dict(logits_scaling=4.0)),  # multiplies the logits
    }
    cls, extra = configs[name]
    if isinstance(cls, str):  # a model type that older transformers versions do not have
        if cls not in transformers.CONFIG_MAPPING:
            pytest.skip(f"transformers {transformers.__version__} has no {cls} model")
        cls = transformers.CONFIG_MAPPING[cls]
    sizes = dict(
        vocab_size=61,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    config = cls(**sizes, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(22)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype).to(DEVICE)


@pytest.mark.parametrize("name", ["llama", "gemma2", "cohere", "granite", "hyperclovax"])
def test_causal_lm_helper(backend, name):
    """causal_lm_grpo_loss == reference.grpo_loss on model(input_ids, logits_to_keep=C + 1).logits[:, :-1]: loss and
    the gradient of every parameter (head, tied embedding, backbone)."""
    dtype = _dtype(backend)
    model = _tiny_model(name, dtype)
    batch, length, completion = 3, 9, 5
    g = torch.Generator().manual_seed(23)
    input_ids = torch.randint(3, 61, (batch, length), generator=g).to(DEVICE)
    attention_mask = torch.ones(batch, length, dtype=torch.long, device=DEVICE)
    if name == "llama":  # a left-padded prompt (Gemma 2's eager attention gives NaN gradients for those rows)
        attention_mask[0, :2] = 0
    completion_mask = torch.ones(batch, completion, device=DEVICE)
    completion_mask[1, 3:] = 0
    adv = torch.randn(batch, generator=g).to(DEVICE)
    kw = dict(loss_type="grpo", temperature=0.9, beta=0.04)

    old = causal_lm_token_logprobs(
        model,
        input_ids,
        attention_mask,
        completion,
        completion_mask=completion_mask,
        temperature=0.9,
        chunk_tokens=4,
        backend=backend,
    )
    ref_lp = old + 0.1 * torch.randn(old.shape, generator=g).to(DEVICE)
    out = causal_lm_grpo_loss(
        model,
        input_ids,
        attention_mask,
        completion,
        adv,
        completion_mask=completion_mask,
        old_logprobs=old,
        ref_logprobs=ref_lp,
        chunk_tokens=4,
        backend=backend,
        **kw,
    )
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(out.loss, params)

    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=completion + 1).logits[:, :-1]
    targets = input_ids[:, -completion:]
    expect = ref.grpo_loss(
        logits.double(), targets, adv, mask=completion_mask, old_logprobs=old, ref_logprobs=ref_lp, **kw
    )
    expect_grads = torch.autograd.grad(expect.loss, params)
    lp_expect = ref.token_logprobs(logits.double(), targets, mask=completion_mask, temperature=0.9)[0]
    tol = _tolerance(dtype)
    assert rel_err(old, lp_expect) < tol
    assert rel_err(out.loss, expect.loss) < tol
    assert out.logprobs.shape == (batch, completion)
    for pname, a, e in zip(names, grads, expect_grads):
        assert rel_err(a, e) < tol, pname


def test_head_transform_reads_what_trl_reads():
    """The post-processing attributes of TRL 1.16's fused LM head, with its precedence; HyperCLOVA X multiplies by
    logits_scaling where Granite divides."""
    transformers = pytest.importorskip("transformers")
    from grpo_kernels.fused_linear import head_transform

    def config(model_type, **attrs):
        if model_type not in transformers.CONFIG_MAPPING:
            pytest.skip(f"transformers {transformers.__version__} has no {model_type} model")
        return transformers.CONFIG_MAPPING[model_type](**attrs)

    assert head_transform(config("llama")) == (None, 1.0)
    assert head_transform(config("gemma2", final_logit_softcapping=30.0)) == (30.0, 1.0)
    assert head_transform(config("cohere", logit_scale=0.25)) == (None, 0.25)
    assert head_transform(config("granite", logits_scaling=4.0)) == (None, 0.25)
    assert head_transform(config("falcon_h1", lm_head_multiplier=0.5)) == (None, 0.5)
    assert head_transform(config("hyperclovax", logits_scaling=4.0)) == (None, 4.0)
    # Muse: output_multiplier before the softcap (any config object with the attributes will do)
    muse = transformers.PretrainedConfig(output_multiplier=2.0, final_logit_softcapping=30.0)
    assert head_transform(muse) == (30.0, 2.0)


def test_second_backward_through_the_same_graph_is_refused():
    """The stored gradients are scaled in place by the first backward; a second one must not reuse them."""
    from grpo_kernels.fused_linear import fused_linear_grpo_loss

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, requires_grad=True)
    ids = torch.randint(0, 13, (2, 5), generator=g)
    out = fused_linear_grpo_loss(hidden, weight, ids, torch.randn(2, generator=g), backend="torch")
    (out.loss * 2.0).backward(retain_graph=True)
    first = weight.grad.clone()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()
    assert torch.equal(weight.grad, first)
