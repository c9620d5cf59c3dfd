"""Backend registry.

A backend is an instance of a :class:`Backend` subclass. The public API never calls a backend directly: it goes
through the custom ops of :mod:`grpo_kernels.ops`, which look the backend up here by name. This keeps every
backend a plain module of kernels + launchers, and the autograd / ``torch.compile`` plumbing in one place.

Adding a backend = one module that builds a ``Backend`` object + one line in ``_FACTORIES``.
"""

from __future__ import annotations

import importlib
import json
import logging

# Imported under another name: importing the subpackage grpo_kernels.backends.torch binds the name ``torch`` in this
# package's namespace to that subpackage.
import torch as _torch

from .base import Backend

logger = logging.getLogger("grpo_kernels")

BACKENDS = ("torch", "triton", "cuda")

# name -> module whose ``BACKEND`` attribute is the backend object (imported lazily: triton/cuda are optional)
_FACTORIES = {
    "torch": "grpo_kernels.backends.torch",
    "triton": "grpo_kernels.backends.triton",
    "cuda": "grpo_kernels.backends.cuda",
}


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


def unavailable_reason(name: str, device: _torch.device) -> str | None:
    try:
        backend = get_backend(name)
    except RuntimeError as e:
        return str(e)
    return backend.unavailable_reason(device)


# ----------------------------------------------------------------------------------------------------------------
# which (backend, GPU architecture) pairs have passed the test suite on real hardware
# ----------------------------------------------------------------------------------------------------------------
def verified_runs() -> list[dict]:
    """The GPU runs recorded in ``verified.json`` (package data), each ``{"backend", "arch" ("sm_90"), "device",
    "date", "torch", "triton", "cuda", "tests"}``: that backend passed the GPU test selection on that architecture.
    Written from a GPU run's ``verified.json`` (benchmarks/gpu_run.sh), never by hand."""
    if "verified" not in _cache_data:
        from importlib.resources import files

        _cache_data["verified"] = json.loads(files(__name__).joinpath("verified.json").read_text())
    return _cache_data["verified"]


def device_arch(device: _torch.device) -> str | None:
    """``"sm_90"`` for a compute-capability-9.0 CUDA device; None for any other device."""
    if device.type != "cuda" or not _torch.cuda.is_available():
        return None
    major, minor = _torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def is_verified(name: str, device: _torch.device) -> bool:
    arch = device_arch(device)
    return arch is not None and any(r["backend"] == name and r["arch"] == arch for r in verified_runs())


_cache_data: dict[str, object] = {}
_unverified_logged: set[tuple[str, str]] = set()


# Under torch.compile, dynamo calls this at trace time and keeps the answer as a constant: it imports the backend
# modules (and may build the CUDA extension) on first use, which cannot be traced.
@_torch.compiler.assume_constant_result
def resolve_backend(name: str, device: _torch.device, *, float64: bool = False) -> str:
    """Turn the user's ``backend`` argument into a concrete, available backend name.

    ``"auto"`` on a GPU takes the backends verified on its architecture first (``verified.json``: cuda, then
    triton), then triton (the most portable GPU code, tested under the interpreter), then torch; the CUDA backend
    only once it is verified there. On the CPU (and for float64 logits, which only it computes): torch. An explicit
    name that cannot run raises; an explicit GPU backend that is not verified on the device runs, and says so once.
    """
    if name == "auto":
        if float64 or device.type != "cuda":
            candidates = ("torch",)
        else:
            verified = [b for b in ("cuda", "triton") if is_verified(b, device)]
            candidates = tuple(dict.fromkeys([*verified, "triton", "torch"]))
        reasons = {}
        for candidate in candidates:
            reason = unavailable_reason(candidate, device)
            if reason is None:
                key = (candidate, str(device))
                if key not in _auto_logged:
                    _auto_logged.add(key)
                    skipped = "; ".join(f"{k}: {v}" for k, v in reasons.items())
                    logger.debug(
                        "backend='auto' picked %r on %s%s", candidate, device, f" ({skipped})" if skipped else ""
                    )
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
    if device.type == "cuda" and not is_verified(name, device) and (name, str(device)) not in _unverified_logged:
        _unverified_logged.add((name, str(device)))
        logger.warning(
            "grpo_kernels: backend=%r has not passed the test suite on %s (%s) yet: its results are unverified "
            "(grpo_kernels/backends/verified.json lists the verified pairs)",
            name,
            device,
            device_arch(device),
        )
    return name


def available_backends(device: _torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` right now."""
    device = _torch.device(device)
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]
