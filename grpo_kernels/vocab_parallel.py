"""Vocabulary-parallel log-probs, entropy and GRPO loss: the logits (or the LM head) split over the vocabulary.

Each of the ``P`` ranks of ``vocab_parallel_group`` holds the columns ``[start, start + V_local)`` of the logits
(Megatron-style tensor parallelism of the LM head, as verl, NeMo-RL and slime produce them); the token ids are global
and the same on every rank. Per row, each rank's backend computes its shard's partials with the ordinary kernels,
the target's column given as a local id, or as ``V_local`` when another shard owns it (docs: backends/base.py)::

    lse_r = log sum_{v in r} exp(u_v)     lp_r = u_y - lse_r (owner only)     H_r = lse_r - sum_{v in r} p^r_v u_v

and two all-reduces over the group combine them (``M = max_r lse_r``, ``e_r = exp(lse_r - M)``)::

    MAX  [N]        M
    SUM  [2|3, N]   S = sum_r e_r,   t = u_y - M (from the owner; 0 elsewhere),   W = sum_r e_r (lse_r - M - H_r)
    lse = M + log S      lp = t - log S      H = log S - W / S

(``H = lse - sum_r (e_r / S)(lse_r - H_r)``, written relative to ``M`` so that nothing cancels against a large
``lse``). The loss math (:mod:`grpo_kernels.loss_math`) then runs on the global ``[N]`` vectors, identically on every
rank, and the backward has **no collective**: each rank writes its own columns' gradient
``g (1[v = y] - p_v) / tau (+ the entropy term)`` from the global ``lse``, ``H`` and ``g_t`` with the ordinary
backward kernel (``p_v = exp(u_v - lse)`` needs nothing else).

Bytes communicated per forward (payload of each collective)::

    layout   ALL-GATHER  2 int64 per rank (16 B; plain tensors only: a DTensor carries its layout)
    MAX      [N]         4 N   (float32 partials; 8 N for float64 logits)
    SUM      [2|3, N]    8 N (lp only) or 12 N (with the entropy)
    backward             nothing
    N = 16384: 64 KiB + 192 KiB = 256 KiB of all-reduce payload; a ring all-reduce sends (and receives)
               2 (P - 1) / P of it per rank: 448 KiB per rank for P = 8 (all-gathering the bf16 logits instead:
               16384 * 151936 * 2 B = 4.6 GiB). :func:`communication` computes these; :data:`TRAFFIC` counts them.

The fused-linear form (hidden states + an LM-head shard ``[V_local, H]``) adds, when ``hidden`` needs a gradient, one
SUM all-reduce of ``d loss / d hidden`` ``[n, H]`` float32 (``4 n H`` bytes, ``n`` the tokens that take part) in its
forward: the head's input is replicated, each rank's ``G_r W_r`` is one shard's share of it (Megatron's
column-parallel head does the same all-reduce in its backward). Its tiles are visited twice (partials, then the
gradient once the global ``lse`` is known): ``8 n H V_local`` FLOPs per rank.

The shard layout ``(start, V_local)`` of every rank is all-gathered at each call (``2 P`` int64, latency only;
caching it would deadlock the group the day one rank's layout changed and another's did not): the shards must tile
``[0, V)`` without gap or overlap, in any order; uneven shards (``V % P != 0``) are fine. Without ``vocab_start`` a
rank's shard starts after the shards of the lower group ranks (``rank * V_local`` for even shards). A DTensor sharded
on its last dimension needs no all-gather: the mesh dimension's group, the offset and ``V`` are read from it.

The combine is ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), outside any custom op; the per-shard partials and
gradients go through the same ops (:mod:`grpo_kernels.ops.logprobs`) as the single-process path. Backends: torch
(compiled CPU passes and torch-ops path) and Triton; the CUDA backend's kernels read the target logit
unconditionally and it refuses a shard (NotImplementedError).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._inputs import as_3d
from .backends import get_backend, resolve_backend
from .loss_math import LossForward, loss_forward_from_logprobs
from .ops import logprobs as logprobs_op

# The payload of this process's collectives on this path since the last reset (what the tests compare with
# :func:`communication`); reset with ``reset_traffic()``.
TRAFFIC = {"all_gather_calls": 0, "all_gather_bytes": 0, "all_reduce_calls": 0, "all_reduce_bytes": 0}


def reset_traffic() -> None:
    TRAFFIC.update(dict.fromkeys(TRAFFIC, 0))


class VocabShard(NamedTuple):
    """Where this rank's columns are: ``[start, start + local)`` of a vocabulary of ``vocab``, over ``group``."""

    group: dist.ProcessGroup
    start: int
    vocab: int
    local: int


# ----------------------------------------------------------------------------------------------------------------
# the shard: from a DTensor, or from (group, vocab_start) with the layout all-gathered at each call
# ----------------------------------------------------------------------------------------------------------------
def is_dtensor(x) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(x, DTensor)


def wanted(x, group, vocab_start) -> bool:
    """Whether a call takes the vocabulary-parallel path."""
    return group is not None or vocab_start is not None or is_dtensor(x)


def _from_dtensor(x, name: str) -> tuple[Tensor, VocabShard]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    last = x.dim() - 1
    placements = tuple(x.placements)
    sharded = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim % x.dim() == last]
    others = [p for i, p in enumerate(placements) if i not in sharded]
    if len(sharded) != 1 or not all(isinstance(p, Replicate) for p in others):
        raise ValueError(
            f"a DTensor {name} must be sharded on its last (vocabulary) dimension over exactly one mesh dimension and "
            f"replicated over the others, got placements {placements}"
        )
    mesh_dim = sharded[0]
    local_shape, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, placements)
    shard = VocabShard(x.device_mesh.get_group(mesh_dim), int(offset[-1]), int(x.shape[-1]), int(local_shape[-1]))
    if shard.local < 1:
        raise ValueError(
            f"this rank's shard of the DTensor {name} is empty (vocabulary {shard.vocab} over "
            f"{x.device_mesh.size(mesh_dim)} ranks): every rank needs at least one column"
        )
    return x.to_local(), shard


def _layout(group, local: int, vocab_start: int | None, device: torch.device) -> VocabShard:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "vocab_parallel_group needs torch.distributed to be initialised on every rank "
            "(torch.distributed.init_process_group) before the call"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"vocab_parallel_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)):
        raise TypeError(f"vocab_start must be an int or None, got {type(vocab_start).__name__}")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of vocab_parallel_group")
    # one all-gather of (vocab_start or -1, V_local) per rank: every rank sees the same table and raises the same error
    mine = torch.tensor([-1 if vocab_start is None else vocab_start, local], dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(size)]
    TRAFFIC["all_gather_calls"] += 1
    TRAFFIC["all_gather_bytes"] += mine.numel() * mine.element_size()
    dist.all_gather(table, mine, group=group)
    starts, sizes = [int(t[0]) for t in table], [int(t[1]) for t in table]
    layout = ", ".join(
        f"rank {r}: start {'default' if s < 0 else s}, {n} columns" for r, (s, n) in enumerate(zip(starts, sizes))
    )
    if min(sizes) < 1:
        raise ValueError(f"every rank of vocab_parallel_group needs a shard of at least one column ({layout})")
    given = [s >= 0 for s in starts]
    if any(given) and not all(given):
        raise ValueError(f"vocab_start must be given on every rank of vocab_parallel_group or on none ({layout})")
    if not any(given):
        starts = [sum(sizes[:r]) for r in range(size)]
    expected = 0
    for s, n in sorted(zip(starts, sizes)):
        if s != expected:
            raise ValueError(
                f"vocab_start is inconsistent: the shards must tile [0, V) without gap or overlap, but after column "
                f"{expected} the next shard starts at {s} ({layout})"
            )
        expected = s + n
    return VocabShard(group, starts[rank], sum(sizes), local)


def resolve(x, group, vocab_start, name: str = "logits") -> tuple[Tensor, VocabShard]:
    """``(local tensor, shard)`` of a vocabulary-sharded ``x`` (logits ``[..., V_local]`` or a head ``[V_local, H]``
    when ``name`` is ``"weight"``; a DTensor for logits)."""
    if is_dtensor(x):
        if name != "logits":
            raise TypeError(f"a DTensor {name} is not supported: pass its local shard and vocab_parallel_group")
        if group is not None or vocab_start is not None:
            raise ValueError(
                "a DTensor logits carries its group and offset: pass neither vocab_parallel_group nor vocab_start"
            )
        return _from_dtensor(x, name)
    if group is None:
        raise ValueError(
            f"vocab_start={vocab_start!r} needs vocab_parallel_group (the group the vocabulary is split over)"
        )
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    local = int(x.shape[0] if name == "weight" else x.shape[-1])
    return x, _layout(group, local, vocab_start, x.device)


def shard_backend(backend: str, device: torch.device, float64: bool) -> str:
    """The backend that runs the per-shard passes: any but CUDA, whose kernels read the target unconditionally."""
    if backend == "cuda":
        raise NotImplementedError(
            "backend='cuda' has no vocabulary-parallel kernels (its kernels read the target logit of every row); "
            "use backend='triton' or 'torch' with vocab_parallel_group"
        )
    name = resolve_backend(backend, device, float64=float64)
    if name == "cuda":  # "auto" on a device where CUDA is verified: the next one
        name = resolve_backend("triton", device) if not float64 else "torch"
    return name


def local_token_ids(ids: Tensor, shard: VocabShard) -> Tensor:
    """Global kernel ids ``[N]`` (-1 = not taking part) -> this shard's: ``id - start`` where the shard owns it,
    ``V_local`` where another shard does, -1 kept."""
    local = ids - shard.start
    owned = (local >= 0) & (local < shard.local)
    return torch.where(ids < 0, -1, torch.where(owned, local, shard.local))


# ----------------------------------------------------------------------------------------------------------------
# what crosses the group: every collective of the path goes through _all_reduce, which counts it
# ----------------------------------------------------------------------------------------------------------------


def _all_reduce(x: Tensor, op, group) -> None:
    TRAFFIC["all_reduce_calls"] += 1
    TRAFFIC["all_reduce_bytes"] += x.numel() * x.element_size()
    dist.all_reduce(x, op=op, group=group)


def communication(n: int, world: int, *, with_entropy: bool = True, itemsize: int = 4, hidden_size: int = 0) -> dict:
    """The bytes one forward of the vocabulary-parallel path sends, from the shapes above: ``n`` tokens, ``world``
    ranks, ``itemsize`` 4 (8 for float64 logits); ``hidden_size`` > 0 for the fused-linear form whose hidden states
    need a gradient (``n`` = the tokens that take part there). ``payload`` is what each all-reduce carries; a ring
    all-reduce sends (and receives) ``2 (world - 1) / world`` of it per rank. The backward sends nothing."""
    payloads = [n * itemsize, (3 if with_entropy else 2) * n * itemsize]  # MAX, SUM
    if hidden_size:
        payloads.append(n * hidden_size * 4)  # d loss / d hidden, float32
    payload = sum(payloads)
    return {
        "all_reduces": len(payloads),
        "payload_bytes": payload,
        "ring_bytes_sent_per_rank": payload * 2 * (world - 1) // world,
        "backward_bytes": 0,
    }


def memory_per_rank(n: int, vocab: int, world: int, *, itemsize: int = 2, inplace_backward: bool = False) -> dict:
    """Bytes a rank holds for the logits path (the largest shard of an uneven split ``ceil(V / world)``): its logits
    shard, its gradient (0 with ``inplace_backward``), and one ``[N]`` float32 vector (the combine and the loss math
    hold a few tens of them, float64 ones counting twice), against the single-process logits."""
    local = -(-vocab // world)
    shard = n * local * itemsize
    return {
        "vocab_local": local,
        "logits_shard_bytes": shard,
        "grad_shard_bytes": 0 if inplace_backward else shard,
        "vector_bytes": n * 4,
        "single_process_logits_bytes": n * vocab * itemsize,
    }


# ----------------------------------------------------------------------------------------------------------------
# the combine: two all-reduces of [N]-sized vectors
# ----------------------------------------------------------------------------------------------------------------
def combine(lp_r: Tensor, lse_r: Tensor, h_r: Tensor, ids: Tensor, shard: VocabShard, with_entropy: bool):
    """Global ``(lp, lse, H)`` ``[N]`` from this shard's partials (``ids`` local; ``H`` ``[0]`` unless
    ``with_entropy``). Collectives: MAX of ``[N]``, SUM of ``[2, N]`` (``[3, N]`` with the entropy), both in the
    partials' dtype (float32; float64 for float64 logits). The arithmetic around them is float64 (``[N]`` vectors,
    free); a float64 SUM on the wire was measured to change nothing (the difference from the single-process result is
    the float32 rounding of each shard's ``lse_r``, about one ulp of the log-sum-exp), so it is not paid for."""
    valid = ids >= 0
    owner = valid & (ids < shard.local)
    top = lse_r.clone()
    _all_reduce(top, dist.ReduceOp.MAX, shard.group)  # 4 N bytes (float32 partials)
    shifted = lse_r.double() - top.double()  # <= 0; -inf for a shard whose logits are all -inf
    e = torch.exp(shifted)
    pieces = [e, torch.where(owner, lp_r.double() + shifted, 0.0)]  # t = u_y - M, from the owner
    if with_entropy:
        pieces.append(torch.where(e > 0, e * (shifted - h_r.double()), 0.0))  # e_r (lse_r - M - H_r)
    packed = torch.stack(pieces).to(lse_r.dtype)
    _all_reduce(packed, dist.ReduceOp.SUM, shard.group)  # 8 N or 12 N bytes (float32 partials)
    packed = packed.double()
    log_s = torch.log(packed[0])
    acc = lse_r.dtype
    zero = torch.zeros((), dtype=acc, device=lse_r.device)
    lse = torch.where(valid, (top.double() + log_s).to(acc), zero)
    lp = torch.where(valid, (packed[1] - log_s).to(acc), zero)
    entropy = torch.where(valid, (log_s - packed[2] / packed[0]).to(acc), zero) if with_entropy else h_r
    return lp, lse, entropy


def _global_logprobs(logits3: Tensor, ids: Tensor, temperature: float, with_entropy: bool, backend, shard):
    lp_r, lse_r, h_r = logprobs_op.token_logprobs(
        logits3, ids, temperature=temperature, with_entropy=with_entropy, backend=backend
    )
    return combine(lp_r, lse_r, h_r, ids, shard, with_entropy)


def _grad_shape(grad: Tensor, logits: Tensor) -> Tensor:
    return grad if logits.dim() == 3 else grad[0]


# ----------------------------------------------------------------------------------------------------------------
# token log-probs (+ entropy) of a shard
# ----------------------------------------------------------------------------------------------------------------
class _ShardLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, temperature, with_entropy, backend, shard):
        logits3 = as_3d(logits)
        lp, lse, entropy = _global_logprobs(logits3, ids, temperature, with_entropy, backend, shard)
        ctx.save_for_backward(logits, ids, lse, entropy)
        ctx.temperature, ctx.backend = temperature, backend
        ctx.set_materialize_grads(False)
        return lp, entropy

    @staticmethod
    def backward(ctx, grad_lp, grad_entropy):  # no collective: each rank writes its own columns
        logits, ids, lse, entropy = ctx.saved_tensors
        grad = logprobs_op.logits_grad(
            as_3d(logits),
            ids,
            lse,
            entropy,
            grad_lp if grad_lp is not None else torch.zeros_like(lse),
            grad_entropy,
            temperature=ctx.temperature,
            backend=ctx.backend,
            inplace=False,
        )
        return _grad_shape(grad, logits), None, None, None, None, None


def token_logprobs(logits: Tensor, ids: Tensor, shard: VocabShard, *, temperature, with_entropy, backend):
    """Global ``(lp, H)`` ``[N]`` of a logits shard (``ids``: global kernel ids), differentiable w.r.t. the shard."""
    return _ShardLogprobs.apply(logits, local_token_ids(ids, shard), float(temperature), with_entropy, backend, shard)


# ----------------------------------------------------------------------------------------------------------------
# the fused loss of a shard
# ----------------------------------------------------------------------------------------------------------------
class _ShardLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, batch, config, shard, with_entropy, inplace, backend):
        logits3 = as_3d(logits)
        lp, lse, entropy = _global_logprobs(logits3, batch.token_ids, config.temperature, with_entropy, backend, shard)
        out: LossForward = loss_forward_from_logprobs(lp, lse, entropy, batch, config)
        ctx.save_for_backward(logits, batch.token_ids, lse, entropy, out.grad_logprobs)
        ctx.temperature, ctx.backend, ctx.inplace = config.temperature, backend, inplace
        ctx.set_materialize_grads(False)
        return out.loss, out.logprobs, entropy, out.per_token_loss, out.kl, out.clip_flags

    @staticmethod
    def backward(ctx, grad_loss, grad_lp, grad_entropy, *unused):  # no collective
        logits, ids, lse, entropy, grad_logprobs = ctx.saved_tensors
        g = grad_logprobs * grad_loss if grad_loss is not None else torch.zeros_like(grad_logprobs)
        grad = logprobs_op.logits_grad(
            as_3d(logits),
            ids,
            lse,
            entropy,
            g,
            grad_entropy,
            temperature=ctx.temperature,
            backend=ctx.backend,
            inplace=ctx.inplace,
        )
        return _grad_shape(grad, logits), None, None, None, None, None, None


def grpo_loss(logits: Tensor, batch, config, shard: VocabShard, *, with_entropy, inplace, backend):
    """``(loss, lp, H, per-token loss, kl, flags)`` of a logits shard; ``batch.token_ids`` are global kernel ids."""
    batch = batch._replace(token_ids=local_token_ids(batch.token_ids, shard))
    return _ShardLoss.apply(logits, batch, config, shard, with_entropy, inplace, backend)


# ----------------------------------------------------------------------------------------------------------------
# the fused-linear loss of an LM-head shard
# ----------------------------------------------------------------------------------------------------------------
class _ShardFusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, batch, config, shard, opts):
        from .fused_linear.tiles import acc_dtype, addmm_acc, gather, logprob_pass, make_head, plan_tiles

        be = get_backend(opts["backend"])
        dtype, softcap, scale = opts["dtype"], opts["logit_softcap"], opts["logit_scale"]
        temperature = config.temperature / scale if softcap is None else config.temperature  # scale folded in
        with_entropy, entropy_coef, entropy_weights = (
            opts["with_entropy"],
            opts["entropy_coef"],
            opts["entropy_weights"],
        )
        needs = ctx.needs_input_grad[:3]
        device, acc = hidden.device, acc_dtype(dtype)
        with torch.autocast(device.type, enabled=False):
            tokens = gather(hidden, batch, dtype)
            part, n = tokens.batch, tokens.hidden.shape[0]
            tiles, _ = plan_tiles(tokens.cu, opts["chunk_tokens"], None)
            head = make_head(weight, bias, dtype, softcap, scale, min(opts["chunk_tokens"], n))
            # pass 1: the shard's partials, tile by tile; then the two all-reduces and the [n] loss math
            lp_r, lse_r, h_r = logprob_pass(head, tokens, tiles, be, temperature, with_entropy)
            lp, lse, entropy = combine(lp_r, lse_r, h_r, part.token_ids, shard, with_entropy)
            out = loss_forward_from_logprobs(lp, lse, entropy, part, config)
            g_entropy = None  # d loss / d H_t of the entropy terms
            if entropy_coef != 0.0:
                g_entropy = part.coef.to(acc) * -entropy_coef
            if entropy_weights is not None:
                w = tokens.pick(entropy_weights).to(acc)
                g_entropy = -w if g_entropy is None else g_entropy - w
            # pass 2: each tile's logits again, their gradient from the global lse / H, folded into dH, dW, db
            d_h = torch.zeros(n, hidden.shape[1], dtype=acc, device=device) if needs[0] else None
            d_w = torch.zeros(weight.shape, dtype=acc, device=device) if needs[1] else None
            d_b = torch.zeros(bias.shape, dtype=acc, device=device) if needs[2] and bias is not None else None
            if any(x is not None for x in (d_h, d_w, d_b)):
                for start, end in tiles:
                    z3 = head.logits(tokens.hidden[start:end]).unsqueeze(0)
                    g_h = None if g_entropy is None else g_entropy[start:end]
                    h_part = entropy[start:end] if with_entropy else entropy
                    g_lp = out.grad_logprobs[start:end]
                    be.token_logprobs_backward(
                        z3, part.token_ids[start:end], lse[start:end], h_part, g_lp, g_h, temperature, z3
                    )
                    grad = head.projection_grad(z3[0])
                    if d_h is not None:
                        addmm_acc(d_h[start:end], grad, head.weight)
                    if d_w is not None:
                        addmm_acc(d_w, grad.T, tokens.hidden[start:end])
                    if d_b is not None:
                        d_b.add_(grad.sum(0, dtype=acc))
            if d_h is not None:  # the replicated input's gradient: the sum of every shard's share, 4 n H bytes
                _all_reduce(d_h, dist.ReduceOp.SUM, shard.group)
            loss = out.loss if g_entropy is None else out.loss + (g_entropy * entropy).sum()
        none = lambda dt: torch.empty(0, dtype=dt, device=device)  # noqa: E731
        ctx.save_for_backward(
            tokens.spread(d_h).to(hidden.dtype) if d_h is not None else None,
            d_w.to(weight.dtype) if d_w is not None else None,
            d_b.to(bias.dtype) if d_b is not None else None,
        )
        ctx.set_materialize_grads(False)
        return (
            loss,
            tokens.spread(lp),
            tokens.spread(entropy) if with_entropy else none(acc),
            tokens.spread(out.per_token_loss),
            tokens.spread(out.kl),
            tokens.spread(out.clip_flags),
        )

    @staticmethod
    def backward(ctx, grad_loss, grad_lp, grad_entropy, *unused):
        if grad_entropy is not None:
            raise RuntimeError(
                "fused_linear_grpo_loss computes its gradients during the forward, so the returned entropy has no "
                "gradient of its own: use entropy_coef or entropy_weights for an entropy bonus"
            )
        grads = [None if g is None or grad_loss is None else g.mul_(grad_loss) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None)


def fused_linear_grpo_loss(hidden: Tensor, weight: Tensor, bias, batch, config, shard: VocabShard, **opts):
    """``(loss, lp, H, per-token loss, kl, flags)`` ``[N]`` of an LM-head shard ``weight [V_local, H]``
    (``bias [V_local]``); ``batch.token_ids`` are global kernel ids."""
    batch = batch._replace(token_ids=local_token_ids(batch.token_ids, shard))
    return _ShardFusedLinear.apply(hidden, weight, bias, batch, config, shard, opts)
