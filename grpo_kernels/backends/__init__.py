"""Backend registry.

A backend is an object with the methods of :class:`Backend`. The public API never calls a backend directly: it goes
through the custom ops of :mod:`grpo_kernels._ops`, which look the backend up here by name. This keeps every
backend a plain module of kernels + launchers, and the autograd / ``torch.compile`` plumbing in one place.

Adding a backend = one module that builds a ``Backend`` object + one line in ``_FACTORIES``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Protocol

import torch

logger = logging.getLogger("grpo_kernels")

BACKENDS = ("torch", "triton", "cuda")

# name -> module whose ``BACKEND`` attribute is the backend object (imported lazily: triton/cuda are optional)
_FACTORIES = {
    "torch": "grpo_kernels.backends.torch",
    "triton": "grpo_kernels.backends.triton",
    "cuda": "grpo_kernels.backends.cuda",
}


class Backend(Protocol):
    """What a backend provides. Shapes: ``N`` tokens, ``V`` vocabulary, ``S`` sequences.

    ``logits`` always arrives 3-D ``[B, T, V]`` (``N = B * T``) with unit stride along V and any strides along B
    and T (a sliced ``logits[:, :-1]`` is not copied). ``token_ids`` is ``[N]`` int64 with ``-1`` where a
    position does not take part (such rows are never read and produce 0). Outputs are float32 (float64 where a
    backend supports float64 logits).
    """

    name: str

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when the backend can run on ``device``, else a sentence saying why not."""

    def token_logprobs_forward(
        self, logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lp, lse, entropy)``, each ``[N]``; ``entropy`` is empty ``[0]`` unless ``with_entropy``."""

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

    def grpo_loss_forward(self, logits: torch.Tensor, batch, config, with_entropy: bool):
        """Forward of the fused loss: a :class:`grpo_kernels.loss_math.LossForward` (see there)."""

    def group_advantages(self, rewards: torch.Tensor, groups, config):
        """A :class:`grpo_kernels.advantages.AdvantageResult` (see there)."""

    def divergence_forward(self, student, teacher, token_ids, kind, beta, temperature, with_logprobs):
        """Exact per-row divergence of two ``[B, T, V]`` logits (see :mod:`grpo_kernels.divergence`):
        ``(div, lp, lse, lse_ref, kl_student, kl_teacher)``, each ``[N]`` (``lp`` ``[0]`` unless asked for)."""

    def divergence_backward(self, student, teacher, token_ids, lse, lse_ref, kl_student, kl_teacher, grad_div,
                            grad_lp, kind, beta, temperature, out_student, out_teacher) -> None:  # fmt: skip
        """Write the gradients of ``sum_t grad_div_t D_t (+ grad_lp_t lp_t)`` into ``out_student`` / ``out_teacher``
        (``[B, T, V]`` each, or None; ``out_student`` may be the student's logits: in place)."""


_cache: dict[str, Backend] = {}
_auto_logged: set[tuple[str, str]] = set()


def get_backend(name: str) -> Backend:
    """The backend object for ``name`` (imports its module on first use)."""
    if name not in _cache:
        if name not in _FACTORIES:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
        try:
            module = importlib.import_module(_FACTORIES[name])
        except ImportError as e:
            raise RuntimeError(f"backend={name!r} is not available: {e}") from e
        _cache[name] = module.BACKEND
    return _cache[name]


def unavailable_reason(name: str, device: torch.device) -> str | None:
    try:
        backend = get_backend(name)
    except RuntimeError as e:
        return str(e)
    return backend.unavailable_reason(device)


# Under torch.compile, dynamo calls this at trace time and keeps the answer as a constant: it imports the backend
# modules (and may build the CUDA extension) on first use, which cannot be traced.
@torch.compiler.assume_constant_result
def resolve_backend(name: str, device: torch.device, *, float64: bool = False) -> str:
    """Turn the user's ``backend`` argument into a concrete, available backend name.

    ``"auto"`` picks the fastest backend that can run on ``device``: cuda, then triton, on a GPU; torch on the CPU
    (and for float64 logits, which only the torch backend computes). An explicit name that cannot run raises.
    """
    if name == "auto":
        candidates = ("torch",) if float64 or device.type != "cuda" else ("cuda", "triton", "torch")
        reasons = {}
        for candidate in candidates:
            reason = unavailable_reason(candidate, device)
            if reason is None:
                key = (candidate, str(device))
                if key not in _auto_logged:
                    _auto_logged.add(key)
                    skipped = "; ".join(f"{k}: {v}" for k, v in reasons.items())
                    logger.debug("backend='auto' picked %r on %s%s", candidate, device, f" ({skipped})" if skipped else "")
                return candidate
            reasons[candidate] = reason
        raise RuntimeError(f"no backend can run on {device}: {reasons}")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run on {device}: {reason}")
    if float64 and name != "torch":
        raise TypeError(f"float64 logits are only supported by backend='torch', not {name!r}")
    return name


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` right now."""
    device = torch.device(device)
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]
