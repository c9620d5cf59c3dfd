"""The torch backend's exact divergences over the vocabulary: row blocks, hand-written gradients, any device.

Per position, with ``u = z / tau`` (student), ``u_r = z_ref / tau`` (teacher / reference), ``p = softmax(u)``,
``q = softmax(u_r)``, ``lse`` / ``lse_r`` their log-sum-exps (derivations in docs/divergences.md)::

    reverse_kl  D = KL(p||q) = E_p[u - u_r] - lse + lse_r   dD/du = p ((u - u_r) - (lse - lse_r) - D)   dD/du_r = q - p
    forward_kl  D = KL(q||p) = E_q[u_r - u] - lse_r + lse   dD/du = p - q   dD/du_r = q ((u_r - u) - (lse_r - lse) - D)
    jsd         K = KL(p||m) = E_p[u - log m] - lse,  K_r = KL(q||m) = E_q[u_r - log m] - lse_r,  m = b q + (1 - b) p
                D = b K_r + (1 - b) K                          dD/du = (1 - b) p (u - log m - lse - K)
                                                               dD/du_r = b q (u_r - log m - lse_r - K_r)

Rows are processed in blocks of whole rows (no online rescaling needed), each temporary a block of about
``_BUFFER_BYTES``: never an ``[N, V]`` float32 temporary. The block is sized so that its few buffers stay in a
CPU's L2 cache between the element-wise passes, and the passes are the cheap ones (``amax``, ``exp`` of a
difference, ``vecdot``; no ``logsumexp`` / ``logaddexp`` / ``einsum``, each several times slower on a CPU).
Traffic: the forward reads both rows once; the backward reads both rows once and writes each requested gradient
once; ``out_student`` may be the student's logits themselves (in place).

On CPU tensors of float32 / bfloat16 / float16 (the two dtypes may differ) ``reverse_kl`` and ``forward_kl`` run
the compiled passes of ``cpu_kernels.cpp`` instead (``native.py``; same results to float32 rounding, the same
non-finite rows; the forward one read of both rows, the backward one read of both and one write of the student's
gradient); ``jsd``, a requested teacher gradient, float64, other devices, or no compiler / ``GRPO_KERNELS_CPU_NATIVE=0``
take the torch ops below, which are the specification the compiled passes are tested against.

Conventions (as ``reference.vocab_divergence``): a vocabulary entry whose logit is -inf has probability 0 and
contributes 0; KL(a||b) is +inf when b has a -inf logit where a has a finite one. A row whose student or teacher
log-sum-exp is not finite (a NaN or +inf logit, or every logit -inf) gives NaN. Rows with ``token_id < 0`` are
never used: 0 in every output and a zero gradient row.
"""

from __future__ import annotations

import math

import torch

from ... import _alloc
from . import native
from .logprobs import _row_blocks

# Bytes of one block-sized float32 (float64) buffer. Up to four buffers and the two scaled inputs live at once:
# 256 KiB each keeps them together in one core's L2 (2.5 MiB on the CPU measured in docs/divergences.md), where
# every element-wise pass after the first read is cheap; a row longer than this is one block of its own.
_BUFFER_BYTES = 256 * 1024


def _acc_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


class _Buffers:
    """Block-sized scratch buffers, allocated once per call and reused by every block."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.vocab, self.dtype, self.device = rows, vocab, dtype, device
        self._free: dict[str, torch.Tensor] = {}

    def get(self, name: str, r: int) -> torch.Tensor:
        if name not in self._free:
            self._free[name] = torch.empty(self.rows, self.vocab, dtype=self.dtype, device=self.device)
        return self._free[name][:r]


def _scaled(block: torch.Tensor, temperature: float, acc: torch.dtype, buf: torch.Tensor) -> torch.Tensor:
    """``block / temperature`` in ``acc``: the block itself when nothing is to be done (it is only read), else in
    ``buf`` (upcast first, then divide: in bf16 the division would round)."""
    if block.dtype == acc and temperature == 1.0:
        return block
    buf.copy_(block)
    return buf.div_(temperature) if temperature != 1.0 else buf


def _plan(student: torch.Tensor, teacher: torch.Tensor, n: int) -> tuple[torch.dtype, int, _Buffers]:
    acc = _acc_dtype(student, teacher)
    vocab = student.shape[-1]
    rows = max(1, min(n, _BUFFER_BYTES // (acc.itemsize * max(vocab, 1))))
    return acc, rows, _Buffers(rows, vocab, acc, student.device)


def _vecdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b, dim=1)


def _mixture_log(p: torch.Tensor, q: torch.Tensor, beta: float, out: torch.Tensor) -> torch.Tensor:
    """``log(beta q + (1 - beta) p)`` in ``out`` (-inf where both underflow or are 0)."""
    return torch.mul(q, beta, out=out).add_(p, alpha=1.0 - beta).log_()


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------
def divergence_forward(student, teacher, token_ids, kind, beta, temperature, with_logprobs):
    """``student``, ``teacher`` ``[B, T, V]`` -> ``(div, lp, lse, lse_ref, kl_student, kl_teacher)``, each ``[N]``
    (``lp`` ``[0]`` unless ``with_logprobs``), float32 (float64 when either input is float64); the log-sum-exps
    are always float64 (see :func:`_split`)."""
    if kind in native.DIVERGENCE_KINDS and native.usable_pair(student, teacher):
        out = native.divergence_forward(student, teacher, token_ids, kind, temperature, with_logprobs)
        if out is not None:
            return out
    n = token_ids.shape[0]
    acc, rows, buf = _plan(student, teacher, n)
    device = student.device
    kl_student, kl_teacher = (_alloc.empty(n, dtype=acc, device=device) for _ in range(2))
    lse, lse_ref = (_alloc.empty(n, dtype=torch.float64, device=device) for _ in range(2))  # see _split
    lp = _alloc.empty(n if with_logprobs else 0, dtype=acc, device=device)
    safe_ids = token_ids.clamp(min=0).unsqueeze(1)
    for start, end, (zs, zt) in _row_blocks([student, teacher], rows):
        r, sl = end - start, slice(start, end)
        u = _scaled(zs, temperature, acc, buf.get("u", r))
        u_r = _scaled(zt, temperature, acc, buf.get("u_r", r))
        m, m_r = u.amax(1, keepdim=True), u_r.amax(1, keepdim=True)
        # Differences are taken relative to the row maxima (never u - u_r of the raw logits): the errors then scale
        # with the logits' spread, not with their offset.
        t = torch.sub(u, m, out=buf.get("log_p", r))  # u - max, then log p
        t_r = torch.sub(u_r, m_r, out=buf.get("log_q", r))
        e, e_r = torch.exp(t, out=buf.get("p", r)), torch.exp(t_r, out=buf.get("q", r))
        s, s_r = e.sum(1), e_r.sum(1)
        log_s, log_s_r = s.log(), s_r.log()
        lse[sl], lse_ref[sl] = m.squeeze(1).double() + log_s.double(), m_r.squeeze(1).double() + log_s_r.double()
        if with_logprobs:
            lp[sl] = t.gather(1, safe_ids[sl]).squeeze(1) - log_s
        if kind in ("reverse_kl", "forward_kl"):
            # KL(p||q) = E_p[(u - M) - (u_r - M_r)] - log S + log S_r, and the mirror image. Where the weighting
            # distribution's logit is -inf the difference is -inf or NaN and its weight 0: zeroed. +inf (the other
            # one's logit is -inf) is kept: the mean is then +inf, or NaN where that weight underflowed to 0, which
            # is +inf too by the conventions.
            if kind == "reverse_kl":
                d, weight, total, log_ratio = torch.sub(t, t_r, out=t_r), e, s, log_s_r - log_s
            else:
                d, weight, total, log_ratio = torch.sub(t_r, t, out=t), e_r, s_r, log_s - log_s_r
            mean = _vecdot(weight, d.nan_to_num_(nan=0.0, posinf=math.inf, neginf=0.0)) / total
            kl = torch.where(torch.isnan(mean), math.inf, mean) + log_ratio
            kl_student[sl], kl_teacher[sl] = (kl, 0.0) if kind == "reverse_kl" else (0.0, kl)
        else:  # jsd, 0 < beta < 1: m > 0 wherever p > 0 or q > 0, so both KLs are finite
            log_p, log_q = t.sub_(log_s.unsqueeze(1)), t_r.sub_(log_s_r.unsqueeze(1))
            p, q = e.mul_((1.0 / s).unsqueeze(1)), e_r.mul_((1.0 / s_r).unsqueeze(1))
            log_m = _mixture_log(p, q, beta, buf.get("log_m", r))
            # log p - log m is -inf / NaN where p = 0 (u = -inf), +inf where m underflowed (then p ~ 0): zeroed
            kl_student[sl] = _vecdot(p, log_p.sub_(log_m).nan_to_num_(0.0, 0.0, 0.0))
            kl_teacher[sl] = _vecdot(q, log_q.sub_(log_m).nan_to_num_(0.0, 0.0, 0.0))
    if kind == "reverse_kl":
        div = kl_student
    elif kind == "forward_kl":
        div = kl_teacher
    else:
        div = beta * kl_teacher + (1.0 - beta) * kl_student
    valid = token_ids >= 0
    zero = torch.zeros((), dtype=acc, device=device)
    div = torch.where(torch.isfinite(lse) & torch.isfinite(lse_ref), div, math.nan)
    div, lse, lse_ref, kl_student, kl_teacher = (
        torch.where(valid, x, zero.to(x.dtype)) for x in (div, lse, lse_ref, kl_student, kl_teacher)
    )
    if with_logprobs:
        lp = torch.where(valid, lp, zero)
    return div, lp, lse, lse_ref, kl_student, kl_teacher


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------
def divergence_backward(
    student,
    teacher,
    token_ids,
    lse,
    lse_ref,
    kl_student,
    kl_teacher,
    grad_div,
    grad_lp,
    kind,
    beta,
    temperature,
    out_student,
    out_teacher,
) -> None:
    """Write ``d/dz`` of ``sum_t (grad_div_t D_t + grad_lp_t lp_t)`` into ``out_student`` (student's dtype) and
    ``d/dz_ref`` of ``sum_t grad_div_t D_t`` into ``out_teacher`` (teacher's dtype); either may be None, and
    ``out_student`` may be ``student`` itself (in place: each block is read before it is written).

    A row whose divergence is +inf has no finite gradient where its infinite term moves with the logits (the
    student's for reverse_kl, the teacher's for forward_kl): with ``grad_div != 0`` that row is NaN. A row with
    ``grad_div = 0`` gets no divergence term, whatever its divergence.
    """
    n = token_ids.shape[0]
    if n == 0:
        return
    acc, rows, buf = _plan(student, teacher, n)
    device = student.device
    valid = token_ids >= 0
    zero = torch.zeros((), dtype=acc, device=device)
    c = torch.where(valid, grad_div.to(acc), zero) / temperature  # 1/tau folded into the row scalars
    c_lp = None if grad_lp is None else torch.where(valid, grad_lp.to(acc), zero) / temperature
    if (
        kind in native.DIVERGENCE_KINDS
        and out_teacher is None
        and out_student is not None
        and native.usable_pair(student, teacher, out_student)
        and native.divergence_backward(
            student, teacher, token_ids, lse, lse_ref, kl_student, c, c_lp, kind, temperature, out_student
        )
    ):
        return
    (lse_hi, lse_lo), (lse_r_hi, lse_r_lo) = _split(lse, acc), _split(lse_ref, acc)
    k_s, k_t = kl_student.to(acc), kl_teacher.to(acc)
    # Row fixes, decided once per call (one host synchronisation each): rows that do not take part are zeroed;
    # an infinite KL in a gradient gives NaN where grad_div != 0 and no divergence term where grad_div = 0.
    all_valid = bool(valid.all())
    inf_s = torch.isinf(k_s) if kind == "reverse_kl" else None
    inf_t = torch.isinf(k_t) if kind == "forward_kl" else None
    inf_s = inf_s if inf_s is not None and bool(inf_s.any()) else None
    inf_t = inf_t if inf_t is not None and bool(inf_t.any()) else None
    k_s, k_t = torch.where(valid, k_s, zero).unsqueeze(1), torch.where(valid, k_t, zero).unsqueeze(1)
    safe_ids = token_ids.clamp(min=0).unsqueeze(1)
    outs = [t for t in (out_student, out_teacher) if t is not None]
    for start, end, blocks in _row_blocks([student, teacher, *outs], rows):
        r, sl = end - start, slice(start, end)
        o_s = blocks[2] if out_student is not None else None
        o_t = blocks[-1] if out_teacher is not None else None
        u = _scaled(blocks[0], temperature, acc, buf.get("u", r))
        u_r = _scaled(blocks[1], temperature, acc, buf.get("u_r", r))
        log_p = torch.sub(u, lse_hi[sl], out=buf.get("log_p", r))
        log_q = torch.sub(u_r, lse_r_hi[sl], out=buf.get("log_q", r))
        if lse_lo is not None:
            log_p.sub_(lse_lo[sl])
            log_q.sub_(lse_r_lo[sl])
        p = torch.exp(log_p, out=buf.get("p", r))
        # q is needed by every gradient but the student's of the reverse KL (which takes log q)
        q = torch.exp(log_q, out=buf.get("q", r)) if kind != "reverse_kl" or o_t is not None else None
        cr = c[sl].unsqueeze(1)
        log_m = _mixture_log(p, q, beta, buf.get("log_m", r)) if kind == "jsd" else None
        # the teacher's first: the student's gradient may be written over the student's logits
        if o_t is not None:
            g_t = _work(o_t, acc, buf.get("g_t", r))
            if kind == "reverse_kl":  # c (q - p)
                torch.sub(q, p, out=g_t).mul_(cr)
            else:  # c q (log q - log p - K_r)  /  c b q (log q - log m - K_r)
                forward = kind == "forward_kl"
                torch.sub(log_q, log_p if forward else log_m, out=g_t)
                g_t.nan_to_num_(nan=0.0, neginf=0.0, posinf=math.inf if forward else 0.0)
                g_t.sub_(k_t[sl])  # an infinite K_r makes its row -inf / NaN here: fixed below
                g_t.mul_(q).mul_(cr if forward else cr * beta)
            _fix_rows(g_t, c[sl], None if inf_t is None else inf_t[sl], valid[sl], all_valid)
            if g_t is not o_t:
                o_t.copy_(g_t)
        if o_s is not None:
            g_s = _work(o_s, acc, buf.get("g_s", r))
            if kind == "forward_kl":  # c (p - q)
                torch.sub(p, q, out=g_s).mul_(cr)
            else:  # c p (log p - log q - K)  /  c (1 - b) p (log p - log m - K)
                reverse = kind == "reverse_kl"
                torch.sub(log_p, log_q if reverse else log_m, out=g_s)
                g_s.nan_to_num_(nan=0.0, neginf=0.0, posinf=math.inf if reverse else 0.0)
                g_s.sub_(k_s[sl])  # an infinite K makes its row -inf / NaN here: fixed below
                g_s.mul_(p).mul_(cr if reverse else cr * (1.0 - beta))
            if inf_s is not None:
                _fix_rows(g_s, c[sl], inf_s[sl], valid[sl], True)
            if c_lp is not None:  # + g_lp (1[v = y] - p) / tau
                g_s.addcmul_(p, c_lp[sl].unsqueeze(1), value=-1.0)
                g_s.scatter_add_(1, safe_ids[sl], c_lp[sl].unsqueeze(1))
            if not all_valid:
                g_s.masked_fill_(~valid[sl].unsqueeze(1), 0.0)
            if g_s is not o_s:
                o_s.copy_(g_s)


def _split(lse: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float64 log-sum-exp ``[N]`` as ``hi + lo`` in ``acc`` (``[N, 1]`` each; no ``lo`` in float64), so that
    ``(u - hi) - lo`` is log p to ``acc`` precision: ``u - hi`` is exact near the maximum, where p is large.

    A float32 log-sum-exp of ~40 is off by up to 2e-6 (half an ulp); the gradients ``p (log p - log r - K)`` of the
    jsd and the reverse KL nearly cancel on rows where the student is confident and the teacher disagrees, and such
    an offset of log p is a large relative error there (docs/divergences.md).
    """
    hi = lse.to(acc)
    if acc == torch.float64:
        return hi.unsqueeze(1), None
    return hi.unsqueeze(1), (lse - hi.double()).to(acc).unsqueeze(1)


def _work(out: torch.Tensor, acc: torch.dtype, buf: torch.Tensor) -> torch.Tensor:
    """Where a gradient block is computed: the output block itself when it has the accumulation dtype."""
    return out if out.dtype == acc else buf


def _fix_rows(grad, c, infinite, valid, all_valid) -> None:
    """Rows of an infinite KL: NaN where ``c != 0``, 0 where ``c = 0``; rows that do not take part: 0."""
    if infinite is not None:
        grad.masked_fill_((infinite & (c == 0)).unsqueeze(1), 0.0)
        grad.masked_fill_((infinite & (c != 0)).unsqueeze(1), math.nan)
    if not all_valid:
        grad.masked_fill_(~valid.unsqueeze(1), 0.0)
