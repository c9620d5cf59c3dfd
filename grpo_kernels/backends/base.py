"""The base class of every backend: the methods a backend provides, optional ones with their defaults."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..advantages import AdvantageConfig, GroupLayout
    from ..loss_math import LossConfig, TokenBatch


class Backend:
    """What a backend provides; every backend subclasses this. Shapes: ``N`` tokens, ``V`` vocabulary, ``S``
    sequences, ``B`` rows of rewards, ``R`` reward columns.

    ``logits`` always arrives 3-D ``[B, T, V]`` (``N = B * T``) with unit stride along V and any strides along B
    and T (a sliced ``logits[:, :-1]`` is not copied). ``token_ids`` is ``[N]`` int64 with ``-1`` where a
    position does not take part (such rows are never read and produce 0), and ``V`` (the row length) where the
    row's target lies in another vocabulary shard (:mod:`grpo_kernels.vocab_parallel`): the row is read as usual,
    ``lp = -lse`` (the target logit taken as 0) and its gradient has no ``1[v = y]`` term. Outputs are float32
    (float64 where a backend supports float64 logits).

    Required: :meth:`unavailable_reason`, :meth:`token_logprobs_forward`, :meth:`token_logprobs_backward`,
    :meth:`grpo_loss_forward`, :meth:`group_advantages`. Optional (a default here that is correct on every backend,
    which a backend overrides where it has a faster kernel): :meth:`grpo_loss_forward_with_grad`,
    :meth:`scale_gradient_`. Optional without a default (the default raises, naming the op):
    :meth:`divergence_forward`, :meth:`divergence_backward`, :meth:`grpo_loss_exact_kl_forward` (a backend with the
    divergence kernels sets it to :func:`exact_kl_loss_forward`).
    """

    name: str

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when the backend can run on ``device``, else a sentence saying why not."""
        raise NotImplementedError

    def token_logprobs_forward(
        self, logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lp, lse, entropy)``, each ``[N]``; ``entropy`` is empty ``[0]`` unless ``with_entropy``."""
        raise NotImplementedError

    def token_logprobs_backward(
        self,
        logits: torch.Tensor,
        token_ids: torch.Tensor,
        lse: torch.Tensor,
        entropy: torch.Tensor,
        grad_lp: torch.Tensor,
        grad_entropy: torch.Tensor | None,
        temperature: float,
        out: torch.Tensor,
    ) -> None:
        """Write ``d/dz`` into ``out`` (``[B, T, V]``, logits' dtype; may be ``logits`` itself: in place)."""
        raise NotImplementedError

    def grpo_loss_forward(self, logits: torch.Tensor, batch: TokenBatch, config: LossConfig, with_entropy: bool):
        """Forward of the fused loss: a :class:`grpo_kernels.loss_math.LossForward` (see there)."""
        raise NotImplementedError

    def group_advantages(
        self,
        rewards: torch.Tensor,
        weights: torch.Tensor,
        layout: GroupLayout,
        config: AdvantageConfig,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``rewards [B, R]``, ``weights [R]``, ``lengths [B]`` (the estimators that read it) ->
        ``(advantages [B], group_mean [G], group_std [G])``."""
        raise NotImplementedError

    def grpo_loss_forward_with_grad(
        self,
        logits: torch.Tensor,
        batch: TokenBatch,
        config: LossConfig,
        with_entropy: bool,
        loss_scale: float,
        grad_out: torch.Tensor,
    ):
        """The fused forward that also writes ``loss_scale * d loss / d logits`` into ``grad_out`` (may be the
        logits: then their values are gone on return). Default: the forward, then the backward pass (3 passes over
        the logits); the CUDA backend's sm_90 kernel does it in 2."""
        fwd = self.grpo_loss_forward(logits, batch, config, with_entropy)
        g = fwd.grad_logprobs * loss_scale
        self.token_logprobs_backward(
            logits, batch.token_ids, fwd.lse, fwd.entropy, g, None, config.temperature, grad_out
        )
        return fwd

    def scale_gradient_(self, grad: torch.Tensor, grad_loss: torch.Tensor, loss_scale: float) -> None:
        """``grad *= grad_loss / loss_scale`` where ``grad_loss != loss_scale``, else nothing. Default: decided on the
        host (one synchronisation); the CUDA backend decides on the device."""
        if bool(grad_loss != loss_scale):
            grad.mul_(
                grad_loss.detach().to(torch.float64 if grad.dtype == torch.float64 else torch.float32) / loss_scale
            )

    def grpo_loss_exact_kl_forward(self, logits, ref_logits, batch: TokenBatch, config: LossConfig, with_entropy: bool):
        """Forward of the fused loss with ``kl_estimator="exact"``: ``(LossForward, lse_ref)``, where the
        LossForward's ``lse`` and ``lse_ref`` ``[N]`` are float64 and its ``kl`` is the exact KL(p||q) per position
        (what the divergence backward needs)."""
        raise NotImplementedError(
            f"backend {self.name!r} has no kernel for kl_estimator='exact' (the exact KL over the vocabulary): use "
            "backend='triton' or 'torch'"
        )

    def divergence_forward(self, student, teacher, token_ids, kind, beta, temperature, with_logprobs):
        """Exact per-row divergence of two ``[B, T, V]`` logits (see :mod:`grpo_kernels.divergence`):
        ``(div, lp, lse, lse_ref, kl_student, kl_teacher)``, each ``[N]`` (``lp`` ``[0]`` unless asked for)."""
        raise RuntimeError(f"backend {self.name!r} has no kernel for the exact divergences (vocab_divergence)")

    def divergence_backward(
        self,
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
        """Write the gradients of ``sum_t grad_div_t D_t (+ grad_lp_t lp_t)`` into ``out_student`` / ``out_teacher``
        (``[B, T, V]`` each, or None; ``out_student`` may be the student's logits: in place)."""
        raise RuntimeError(f"backend {self.name!r} has no kernel for the exact divergences (vocab_divergence)")


def exact_kl_loss_forward(backend: Backend, logits, ref_logits, batch: TokenBatch, config: LossConfig, with_entropy):
    """:meth:`Backend.grpo_loss_exact_kl_forward` from a backend's divergence kernels (torch, Triton).

    One read of both logits rows (``divergence_forward``, kind ``reverse_kl``: the exact KL(p||q), ``lp``, both
    log-sum-exps), then the ``[N]`` closed form of :mod:`grpo_kernels.loss_math` with the exact KL as the KL term.
    The entropy, when asked for, is one more read of the policy's logits (the divergence kernel does not sum it).
    """
    from ..loss_math import loss_forward_from_logprobs

    ids = batch.token_ids
    kl, lp, lse, lse_ref, _, _ = backend.divergence_forward(
        logits, ref_logits, ids, "reverse_kl", 0.0, config.temperature, True
    )
    entropy = lp.new_empty(0)
    if with_entropy:
        _, _, entropy = backend.token_logprobs_forward(logits, ids, config.temperature, True)
    return loss_forward_from_logprobs(lp, lse, entropy.to(lp.dtype), batch, config, exact_kl=kl), lse_ref
