"""What is benchmarked: the cases (op, shapes, variant), their byte and FLOP counts, and their random inputs.

Ops (``Case.op``):

* ``token_logprobs``: log-probs only, no gradient (old / reference log-probs of a batch).
* ``token_logprobs_entropy_forward``: log-probs and entropy, forward only (what a rollout's logging asks for).
* ``token_logprobs_entropy``: log-probs and entropy, forward + backward of both (an entropy-regularised loss).
* ``grpo_loss``: the fused GRPO loss, forward + backward, ``loss_type="dapo"`` (TRL's default), clip 0.2, old
  log-probs given (ratios straddle the clip range), importance sampling per token or per sequence, beta 0 or 0.04.
* ``group_advantages``: grouped z-score of ``B`` rewards in groups of ``G``.
* ``fused_linear_grpo_loss``: the GRPO loss from hidden states and the LM head (logits never materialised),
  forward + backward w.r.t. hidden and weight.
* ``distill_loss``: an exact divergence (jsd / reverse_kl / forward_kl) between the student's logits and a teacher's
  over the whole vocabulary at every position, labels given (log-probs from the same pass), forward + backward
  w.r.t. the student's logits.
* ``grpo_loss_exact_kl``: ``grpo_loss(kl_estimator="exact", ref_logits=...)``, dapo, token level, beta 0.04: the
  exact KL(p||q) over the vocabulary to a reference's logits as the KL term, forward + backward w.r.t. the logits.

Every case states its traffic next to it (:func:`traffic`): the bytes it must move through memory, term by term,
``bytes`` as the 3-pass kernels move them (forward read, backward read, gradient write) and ``bytes_min`` as the
fewest any implementation must move (each input read once, each output written once: 2 passes over the logits).
Per-token vectors are counted at their dtype (ids int64, masks / advantages / log-probs float32).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

OPS = (
    "token_logprobs",
    "token_logprobs_entropy_forward",
    "token_logprobs_entropy",
    "grpo_loss",
    "group_advantages",
    "fused_linear_grpo_loss",
    "distill_loss",
    "grpo_loss_exact_kl",
)
LOGITS_OPS = ("token_logprobs", "token_logprobs_entropy_forward", "token_logprobs_entropy", "grpo_loss")
BACKWARD_OPS = ("token_logprobs_entropy", "grpo_loss", "fused_linear_grpo_loss", "distill_loss", "grpo_loss_exact_kl")


@dataclass(frozen=True)
class Case:
    op: str
    dtype: str  # "bfloat16", "float32", ...
    tokens: int = 0  # N = batch * seq_len (logits and fused-linear ops)
    seq_len: int = 0  # T
    vocab: int = 0  # V
    hidden: int = 0  # H (fused-linear)
    importance_sampling_level: str = "token"
    beta: float = 0.0
    rewards: int = 0  # B (group_advantages)
    group_size: int = 0  # G (group_advantages)
    divergence: str = ""  # distill_loss: jsd / reverse_kl / forward_kl (beta: the jsd's)

    @property
    def id(self) -> str:
        if self.op == "group_advantages":
            return f"{self.op}-B{self.rewards}-G{self.group_size}"
        parts = [self.op, f"N{self.tokens}", f"V{self.vocab}"] + ([f"H{self.hidden}"] if self.hidden else [])
        if self.op in ("grpo_loss", "fused_linear_grpo_loss", "grpo_loss_exact_kl"):
            parts += [f"is-{self.importance_sampling_level}", f"beta{self.beta:g}"]
        if self.op == "distill_loss":
            parts += [self.divergence] + ([f"beta{self.beta:g}"] if self.divergence == "jsd" else [])
        return "-".join(parts + [self.dtype])

    @property
    def batch(self) -> int:
        return self.tokens // self.seq_len

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# the grids: GPU sizes from the issues; CPU sizes of issue 20 (the torch backend against torch.compile); a smoke
# size for CI. ``dtypes`` are the logits ops' dtypes (default: ``dtype``, which the other ops and the matmul ceiling
# use); ``ops`` the ops a report runs by default (default: all).
# ----------------------------------------------------------------------------------------------------------------
PRESETS = {
    "gpu": dict(
        dtype="bfloat16",
        tokens=(4096, 16384),
        vocab=(32000, 128256, 151936),
        seq_len=1024,
        rewards=(4096, 1 << 20),
        group_size=16,
        fused_linear=((4096, 4096, 151936), (16384, 4096, 151936)),  # (N, H, V)
        distill=((4096, 151936), (16384, 151936)),  # (N, V)
        divergences=(("jsd", 0.5), ("reverse_kl", 0.0), ("forward_kl", 0.0)),
        exact_kl=((16384, 151936),),  # (N, V)
        ops=tuple(op for op in OPS if op != "token_logprobs_entropy_forward"),
    ),
    "cpu": dict(
        dtype="float32",
        dtypes=("float32", "bfloat16"),
        tokens=(1024, 4096),
        vocab=(32000, 128256, 151936),
        seq_len=128,
        rewards=(4096, 1 << 20),
        group_size=16,
        fused_linear=((256, 256, 32000), (1024, 256, 32000)),
        distill=((1024, 32000), (256, 128256)),
        divergences=(("jsd", 0.5), ("reverse_kl", 0.0)),
        exact_kl=((256, 32000), (1024, 32000)),
        ops=("token_logprobs", "token_logprobs_entropy_forward", "grpo_loss", "distill_loss", "grpo_loss_exact_kl"),
    ),
    "smoke": dict(
        dtype="float32",
        tokens=(32,),
        vocab=(500,),
        seq_len=8,
        rewards=(64,),
        group_size=8,
        fused_linear=((32, 16, 500),),
        distill=((32, 500),),
        divergences=(("jsd", 0.5),),
        exact_kl=((32, 500),),
    ),
}
VARIANTS = (("token", 0.0), ("token", 0.04), ("sequence", 0.0), ("sequence", 0.04))  # (IS level, beta)


def default_preset(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def preset_ops(preset: str) -> tuple[str, ...]:
    """The ops a report of this preset runs by default."""
    return PRESETS[preset].get("ops", OPS)


def build_cases(preset: str, ops: tuple[str, ...] | None = None) -> list[Case]:
    """Every case of a preset, in report order. The smoke preset keeps one variant per op."""
    p = PRESETS[preset]
    ops = preset_ops(preset) if ops is None else ops
    variants = VARIANTS[1:2] if preset == "smoke" else VARIANTS
    cases = []
    for op in ops:
        if op in LOGITS_OPS:
            for dtype in p.get("dtypes", (p["dtype"],)):
                for n in p["tokens"]:
                    for v in p["vocab"]:
                        common = dict(op=op, dtype=dtype, tokens=n, seq_len=min(p["seq_len"], n), vocab=v)
                        if op == "grpo_loss":
                            cases += [Case(**common, importance_sampling_level=lvl, beta=b) for lvl, b in variants]
                        else:
                            cases.append(Case(**common))
        elif op == "group_advantages":
            cases += [Case(op=op, dtype="float32", rewards=b, group_size=p["group_size"]) for b in p["rewards"]]
        elif op == "fused_linear_grpo_loss":
            for n, h, v in p["fused_linear"]:
                for lvl, b in variants[:2]:  # token level: the sequence-level cost is the fused-linear helper's choice
                    cases.append(
                        Case(
                            op=op,
                            dtype=p["dtype"],
                            tokens=n,
                            seq_len=min(p["seq_len"], n),
                            vocab=v,
                            hidden=h,
                            importance_sampling_level=lvl,
                            beta=b,
                        )
                    )
        elif op == "distill_loss":
            for n, v in p["distill"]:
                cases += [
                    Case(op=op, dtype=p["dtype"], tokens=n, seq_len=min(p["seq_len"], n), vocab=v, divergence=d, beta=b)
                    for d, b in p["divergences"]
                ]
        elif op == "grpo_loss_exact_kl":
            for n, v in p["exact_kl"]:
                cases.append(Case(op=op, dtype=p["dtype"], tokens=n, seq_len=min(p["seq_len"], n), vocab=v, beta=0.04))
        else:
            raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    return cases


# ----------------------------------------------------------------------------------------------------------------
# traffic and work
# ----------------------------------------------------------------------------------------------------------------
def traffic(case: Case) -> dict:
    """Bytes the case must move: ``terms`` [(what, bytes)], ``bytes`` (3-pass count), ``bytes_min`` (fewest)."""
    s = case.torch_dtype.itemsize
    n, v, h = case.tokens, case.vocab, case.hidden
    if case.op in ("token_logprobs", "token_logprobs_entropy_forward"):
        out = ("write lp N·4", n * 4) if case.op == "token_logprobs" else ("write lp, H N·8", n * 8)
        terms = [("read logits N·V·s", n * v * s), ("read token ids N·8", n * 8), out]
        return dict(terms=terms, bytes=sum(b for _, b in terms), bytes_min=sum(b for _, b in terms))
    if case.op in ("token_logprobs_entropy", "grpo_loss"):
        if case.op == "token_logprobs_entropy":
            # ids 8 in; lp 4, H 4 out; upstream gradients of lp 4 and H 4 in
            small = [("per-token vectors N·24: ids; lp, H; dlp, dH", n * 24)]
        else:
            ref = 4 if case.beta else 0
            # ids 8, mask 4, old lp 4 (+ ref lp 4) in; lp 4, per-token loss 4 out
            label = "per-token vectors N·24 (+ N·4 ref lp when β ≠ 0): ids, mask, old lp in; lp, loss out"
            small = [(label, n * (24 + ref)), ("advantages B·4", case.batch * 4)]
        logits_pass = n * v * s
        terms = [
            ("read logits (forward) N·V·s", logits_pass),
            ("read logits (backward) N·V·s", logits_pass),
            ("write grad logits N·V·s", logits_pass),
        ] + small
        total = sum(b for _, b in terms)
        return dict(terms=terms, bytes=total, bytes_min=total - logits_pass)
    if case.op == "group_advantages":
        terms = [("read rewards B·4", case.rewards * 4), ("write advantages B·4", case.rewards * 4)]
        return dict(terms=terms, bytes=sum(b for _, b in terms), bytes_min=sum(b for _, b in terms))
    if case.op == "fused_linear_grpo_loss":
        ref = 4 if case.beta else 0
        terms = [
            ("read hidden N·H·s", n * h * s),
            ("read weight V·H·s", v * h * s),
            ("write grad hidden N·H·s", n * h * s),
            ("write grad weight V·H·s", v * h * s),
            ("per-token vectors N·24 (+ N·4 ref lp when β ≠ 0)", n * (24 + ref)),
        ]
        return dict(terms=terms, bytes=sum(b for _, b in terms), bytes_min=sum(b for _, b in terms))
    if case.op == "distill_loss":
        # Our design: the forward reads both rows once (the KLs, online) or twice (jsd: log m needs both final
        # log-sum-exps); the backward reads both once and writes the student's gradient. Per-row vectors: ids 8 in;
        # divergence 4, lp 4, lse 8 + 8, two KLs 4 + 4 out and back in; upstream gradients 4 + 4.
        rows = n * v * s  # student; the teacher has the student's dtype in these cases
        reads = 2 if case.divergence == "jsd" else 1
        terms = [
            (f"read student + teacher (forward) {reads}·2·N·V·s", reads * 2 * rows),
            ("read student + teacher (backward) 2·N·V·s", 2 * rows),
            ("write grad student N·V·s", rows),
            ("per-row vectors N·76", n * 76),
        ]
        # fewest: each row of both read once, the gradient written once (a design keeping rows on chip)
        return dict(terms=terms, bytes=sum(b for _, b in terms), bytes_min=3 * rows + n * 76)
    if case.op == "grpo_loss_exact_kl":
        # Our design (grpo_kernels/ops/grpo_loss.py::grpo_loss_exact_kl): the forward reads the policy's and the
        # reference's rows once (KL(p||q), lp and both log-sum-exps, online); the backward reads both once and writes
        # the policy's gradient. Per-token vectors: ids 8, mask 4, old lp 4, advantage 4 in; lp 4, loss 4, KL 4 out;
        # lse 8 + lse_ref 8, g 4, c 4 kept for the backward and read there.
        rows = n * v * s  # policy; the reference has the policy's dtype in these cases
        terms = [
            ("read logits + ref logits (forward) 2·N·V·s", 2 * rows),
            ("read logits + ref logits (backward) 2·N·V·s", 2 * rows),
            ("write grad logits N·V·s", rows),
            ("per-token vectors N·56", n * 56),
        ]
        return dict(terms=terms, bytes=sum(b for _, b in terms), bytes_min=3 * rows + n * 56)
    raise ValueError(f"unknown op {case.op!r}")


def flops(case: Case) -> int:
    """Matmul FLOPs the fused-linear loss must do: logits, grad hidden, grad weight = 3 x 2·N·H·V (0 otherwise)."""
    return 6 * case.tokens * case.hidden * case.vocab if case.op == "fused_linear_grpo_loss" else 0


# ----------------------------------------------------------------------------------------------------------------
# inputs: random, never zeros; the same seed gives the same inputs in every process on one device
# ----------------------------------------------------------------------------------------------------------------
def inputs_key(case: Case) -> tuple:
    """Cases with equal keys get equal inputs from :func:`make_inputs` (every logits op of one shape and dtype)."""
    kind = "logits" if case.op in LOGITS_OPS else case.op
    return (kind, case.dtype, case.tokens, case.seq_len, case.vocab, case.hidden, case.rewards, case.group_size)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """Random inputs of a case. Logits cases get ``logits_full`` ``[B, T+1, V]`` (the model's output; Liger wants
    it) and ``logits`` = ``logits_full[:, :-1]`` as a leaf that shares its storage (what everyone else takes, not
    copied); fused-linear cases get ``hidden`` ``[B, T, H]`` and ``weight`` ``[V, H]`` (logits of std ~2)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, dtype=torch.float32, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).mul_(scale)

    if case.op == "group_advantages":
        return dict(rewards=randn(case.rewards))
    b, t, v, dtype = case.batch, case.seq_len, case.vocab, case.torch_dtype
    out = dict(
        token_ids=torch.randint(0, v, (b, t), generator=g, device=device),
        mask=torch.ones(b, t, device=device),  # every position takes part: the byte counts assume it
        advantages=randn(b),
    )
    if case.op == "fused_linear_grpo_loss":
        out["hidden"] = randn(b, t, case.hidden, dtype=dtype).requires_grad_()
        out["weight"] = randn(v, case.hidden, dtype=dtype, scale=2.0 / case.hidden**0.5).requires_grad_()
        with torch.no_grad():
            lp = _logprobs_by_row(lambda i: out["hidden"][i] @ out["weight"].T, out["token_ids"])
    else:
        full = randn(b, t + 1, v, dtype=dtype, scale=2.0)
        out["logits_full"] = full.requires_grad_()
        out["logits"] = full.detach()[:, :-1].requires_grad_()
        with torch.no_grad():
            lp = _logprobs_by_row(lambda i: full[i, :-1], out["token_ids"])
            if case.op in ("distill_loss", "grpo_loss_exact_kl"):  # a teacher / reference near the policy
                teacher = torch.empty(b, t, v, dtype=dtype, device=device)
                for i in range(b):  # (moderate divergences), one sequence at a time
                    teacher[i] = full[i, :-1] * 0.8 + randn(t, v, dtype=dtype)
                out["teacher_logits" if case.op == "distill_loss" else "ref_logits"] = teacher
    # old / reference policies near the current one, so that ratios straddle the clip range
    out["old_logprobs"] = lp + 0.3 * randn(b, t)
    out["ref_logprobs"] = lp + 0.3 * randn(b, t)
    out["grad_lp"], out["grad_entropy"] = randn(b, t), randn(b, t)  # upstream gradients (token_logprobs_entropy)
    return out


def _logprobs_by_row(logits_of, token_ids: torch.Tensor) -> torch.Tensor:
    """float32 log-probs of ``token_ids`` [B, T], one sequence's logits at a time (bounded temporary memory)."""
    rows = [
        logits_of(i).float().log_softmax(-1).gather(-1, token_ids[i].unsqueeze(-1)).squeeze(-1)
        for i in range(token_ids.shape[0])
    ]
    return torch.stack(rows)
