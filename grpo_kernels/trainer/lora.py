"""LoRA through peft (``--lora-r``): the adapters are added when GRPO starts, and only they train.

- The reference policy (beta > 0) is the base model with the adapters disabled (``disable_adapter()``): it is the
  policy GRPO started from, since a fresh adapter's ``B`` is zero, and no second copy of the weights is kept.
- ``--lora-dropout`` acts on the adapters' input in the loss's forward pass only (:func:`adapter_dropout`); sampling,
  the old and reference log-probs and the evaluation run without it, like the rest of the model (``eval()``).
- The loss is ``grpo_loss`` on the model's logits, so an adapter on the LM head (``--lora-target-modules
  lm_head``) is part of the logits and trains like the others.

Checkpoints hold the adapters (``adapter.safetensors``) when the base is a ``--model`` directory that this run did
not change (no warm-up); otherwise the whole wrapped model, since the base exists nowhere else. ``final/`` is a
peft adapter directory (:func:`save_final`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


def _targets(spec: str | None):
    if spec is None or spec.strip() == "all-linear":
        return None if spec is None else "all-linear"
    return [name.strip() for name in spec.split(",") if name.strip()]


def check_targets(model: nn.Module, target_modules: str | None) -> None:
    """ValueError naming the first target of ``--lora-target-modules`` that matches no module (peft's rule: the full
    name, or its last dotted components), or that matches a module LoRA cannot adapt. Run before training starts."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ValueError("--lora-r needs peft: pip install 'grpo-kernels[train]' (or pip install peft)") from None
    targets = _targets(target_modules)
    if not isinstance(targets, list):
        return
    from transformers.pytorch_utils import Conv1D

    supported = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)
    modules = dict(model.named_modules())
    for target in targets:
        matched = [m for name, m in modules.items() if name == target or name.endswith("." + target)]
        if not matched:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"--lora-target-modules: {target!r} matches no module of the model "
                f"(its linear layers: {', '.join(linear)})"
            )
        unsupported = [m for m in matched if not isinstance(m, supported)]
        if unsupported:
            raise ValueError(
                f"--lora-target-modules: {target!r} is a {type(unsupported[0]).__name__}, which LoRA "
                "does not support (linear, embedding and convolution layers are)"
            )


def add_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: str | None):
    """``model`` wrapped in a ``peft`` LoRA model (the base frozen, adapters trainable, ``B = 0``: same outputs)."""
    check_targets(model, target_modules)
    from peft import LoraConfig, get_peft_model

    targets = _targets(target_modules)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )
    try:
        return get_peft_model(model, config).eval()
    except ValueError as e:  # anything check_targets does not foresee
        raise ValueError(f"--lora-target-modules {target_modules!r}: {e}") from None


@contextmanager
def adapter_dropout(model: nn.Module, active: bool):
    """The adapters' dropout modules in training mode inside the block (the rest of the model stays in ``eval()``)."""
    modules = [m for name, m in model.named_modules() if name.endswith("lora_dropout")] if active else []
    for module in modules:
        module.train()
    try:
        yield
    finally:
        for module in modules:
            module.eval()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (the adapters), by name, on the CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """The inverse of :func:`adapter_state` (the same names exactly, else a ValueError naming the difference)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if params.keys() != tensors.keys():
        diff = sorted(params.keys() ^ tensors.keys())[:3]
        raise ValueError(f"{where}: its adapters do not match this run's LoRA settings (e.g. {', '.join(diff)})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def save_final(model, final: Path, base_dir: str | None) -> None:
    """``final/``: the adapters (``adapter_config.json``, ``adapter_model.safetensors``) for ``PeftModel``.

    ``base_dir``: the ``--model`` directory the adapters apply to, recorded as ``base_model_name_or_path``; None when
    the base exists nowhere else (the built-in model, or a warm-up changed it): it is then saved as ``final/base``.
    """
    if base_dir is None:
        base = model.get_base_model()
        plain = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if ".lora_" not in k}
        base_dir = final / "base"
        base.save_pretrained(base_dir, state_dict=plain)
    model.peft_config["default"].base_model_name_or_path = str(Path(base_dir).resolve())
    model.save_pretrained(final)
