"""The CUDA backend: thin Python over the csrc/ kernels (``torch.ops.grpo_kernels_cuda``, see csrc/torch_binding.cu).

Outputs are allocated here (through :mod:`grpo_kernels._alloc`, so tests can poison them) and filled by the kernels
on the current stream. The extension is built on first use (or ahead of time, see ``_cuda_build``); where that cannot
happen, :meth:`CudaBackend.unavailable_reason` says why and ``backend="auto"`` moves on to Triton / torch.

What runs where:
    token_logprobs forward / backward      one kernel each (warp or block per row), 1 + 2 passes over [N, V]
    grpo_loss, token-level ratio           fused kernel: log-probs + the per-token epilogue (1 pass)
    grpo_loss, sequence-level ratio (GSPO) log-prob kernel + the [N]-sized epilogue in torch (loss_math.py): g_t needs
      and the other losses of docs/math.md  a per-sequence sum (a batch-level selection for clip_cov / kl_cov) between
      section 9 (vespo, geo_mean, gpg,      the passes; gpg has no fused CUDA epilogue yet (the binding refuses a
      clip_cov, kl_cov)                     loss_type it does not know)
    grpo_loss_forward_with_grad            sm_90: the 2-pass cluster kernel (read z once, write dz once);
                                           elsewhere, or at sequence level: forward + backward kernels (3 passes)
    group_advantages                       warp-per-group statistics (every estimator), float64 accumulation, no atomics
    divergence_forward / _backward         none yet: raise (distill_loss's backend="auto" takes triton on a GPU)

Nothing in this file has run on a GPU yet: see docs/cuda.md.
"""

from __future__ import annotations

import torch

from .. import _alloc
from ..advantages import AdvantageConfig, GroupLayout
from ..loss_math import LossConfig, LossForward, TokenBatch, loss_forward_from_logprobs
from . import _cuda_build
from .base import Backend


def _ops():
    return torch.ops.grpo_kernels_cuda


def _optional(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.float().contiguous()


# the loss types of the fused kernel's epilogue (csrc/include/grpo_kernels/row_math.cuh); the others are routed
_EPILOGUE_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")


def _routed(config: LossConfig) -> bool:
    """The log-prob kernel + the [N] closed form of loss_math instead of the fused epilogue."""
    return config.coupling is not None or config.loss_type not in _EPILOGUE_LOSS_TYPES


class CudaBackend(Backend):
    name = "cuda"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"the CUDA kernels run on CUDA devices only, not on {device.type}"
        if torch.version.cuda is None:
            return "this torch build has no CUDA support (torch.version.cuda is None)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the CUDA kernels need compute capability >= 8.0 (sm_80), this device has {major}.{minor}"
        return _cuda_build.load()

    # ------------------------------------------------------------------------------------------------------------
    # log-probs / entropy
    # ------------------------------------------------------------------------------------------------------------
    def token_logprobs_forward(self, logits, token_ids, temperature, with_entropy):
        n, device = token_ids.shape[0], logits.device
        lp = _alloc.empty(n, dtype=torch.float32, device=device)
        lse = _alloc.empty(n, dtype=torch.float32, device=device)
        entropy = _alloc.empty(n if with_entropy else 0, dtype=torch.float32, device=device)
        _ops().token_logprobs_forward(logits, token_ids, float(temperature), lp, lse, entropy)
        return lp, lse, entropy

    def token_logprobs_backward(self, logits, token_ids, lse, entropy, grad_lp, grad_entropy, temperature, out):
        _ops().token_logprobs_backward(
            logits,
            token_ids,
            lse,
            entropy,
            grad_lp.float().contiguous(),
            _optional(grad_entropy),
            float(temperature),
            out,
        )

    # ------------------------------------------------------------------------------------------------------------
    # fused loss
    # ------------------------------------------------------------------------------------------------------------
    def grpo_loss_forward(self, logits, batch: TokenBatch, config: LossConfig, with_entropy: bool) -> LossForward:
        if _routed(config):
            lp, lse, entropy = self.token_logprobs_forward(logits, batch.token_ids, config.temperature, with_entropy)
            return loss_forward_from_logprobs(lp, lse, entropy, batch, config)
        return self._fused(logits, batch, config, with_entropy, 1.0, None)

    def grpo_loss_forward_with_grad(
        self, logits, batch: TokenBatch, config: LossConfig, with_entropy: bool, loss_scale: float, grad_out
    ) -> LossForward:
        """The fused forward that also writes ``loss_scale * d loss / d logits`` into ``grad_out`` (may be the logits).

        Token level: one kernel call (2 passes on sm_90 where the row fits a cluster, else 3). Sequence level and the
        routed loss types: forward, the [N] epilogue, then the backward kernel (3 passes).
        """
        if _routed(config):
            fwd = self.grpo_loss_forward(logits, batch, config, with_entropy)
            g = fwd.grad_logprobs * loss_scale
            self.token_logprobs_backward(
                logits, batch.token_ids, fwd.lse, fwd.entropy, g, None, config.temperature, grad_out
            )
            return fwd
        return self._fused(logits, batch, config, with_entropy, loss_scale, grad_out)

    def scale_gradient_(self, grad: torch.Tensor, grad_loss: torch.Tensor, loss_scale: float) -> None:
        """``grad *= grad_loss / loss_scale`` unless equal; decided on the device (no host synchronisation)."""
        _ops().scale_gradient_(grad, grad_loss.detach().float().reshape(1), float(loss_scale))

    def _fused(self, logits, batch, config, with_entropy, loss_scale, grad_out) -> LossForward:
        n, device = batch.token_ids.shape[0], logits.device
        new = lambda k, dtype=torch.float32: _alloc.empty(k, dtype=dtype, device=device)  # noqa: E731
        lp, lse, g, per_token_loss, kl = new(n), new(n), new(n), new(n), new(n)
        entropy, flags = new(n if with_entropy else 0), new(n, torch.uint8)
        _ops().grpo_loss_forward(
            logits,
            batch.token_ids,
            batch.coef.float().contiguous(),
            batch.advantages.float().contiguous(),
            _optional(batch.old_logprobs),
            _optional(batch.ref_logprobs) if config.beta != 0.0 else None,
            _optional(batch.is_weights),
            config.loss_type,
            "k3" if config.exact_kl else config.kl_estimator,  # "exact" comes here only at beta = 0 (no KL term)
            float(config.beta),
            float(config.epsilon_low),
            float(config.epsilon_high),
            config.delta,
            config.dual_clip,
            float(config.temperature),
            float(config.sapo_temperature_pos),
            float(config.sapo_temperature_neg),
            bool(config.bias_corrected_kl),
            lp,
            lse,
            entropy,
            g,
            per_token_loss,
            kl,
            flags,
            float(loss_scale),
            grad_out,
        )
        loss = (batch.coef.float() * per_token_loss).sum()
        return LossForward(loss, lp, lse, entropy, g, per_token_loss, kl, flags)

    # ------------------------------------------------------------------------------------------------------------
    # grouped advantages
    # ------------------------------------------------------------------------------------------------------------
    def group_advantages(self, rewards, weights, layout: GroupLayout, config: AdvantageConfig, lengths=None):
        batch, device = rewards.shape[0], rewards.device
        adv = _alloc.empty(batch, dtype=torch.float32, device=device)
        mean = _alloc.empty(layout.num_groups, dtype=torch.float32, device=device)
        std = _alloc.empty(layout.num_groups, dtype=torch.float32, device=device)
        _ops().group_advantages(
            rewards.float().contiguous(),
            weights.float().contiguous(),
            layout.order.contiguous(),
            layout.cu_groups.contiguous(),
            layout.group_index.contiguous(),
            config.scale,
            float(config.eps),
            config.multi_reward,
            config.estimator,
            _optional(lengths),
            adv,
            mean,
            std,
        )
        return adv, mean, std

    # ------------------------------------------------------------------------------------------------------------
    # exact divergences (grpo_kernels.divergence): no CUDA kernels yet
    # ------------------------------------------------------------------------------------------------------------
    def divergence_forward(self, *args, **kwargs):
        raise RuntimeError(_NO_DIVERGENCE.format(op="vocab_divergence (distill_loss / exact KL), forward"))

    def divergence_backward(self, *args, **kwargs):
        raise RuntimeError(_NO_DIVERGENCE.format(op="vocab_divergence (distill_loss / exact KL), backward"))


_NO_DIVERGENCE = (
    "the CUDA backend has no kernel for {op}: use backend='triton' (or 'torch'); backend='auto' picks triton"
)

BACKEND = CudaBackend()
