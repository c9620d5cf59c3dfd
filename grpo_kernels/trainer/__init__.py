"""A minimal reference GRPO trainer built on grpo_kernels' public API (``grpo-train``; see docs/trainer.md).

Modules, in the order a step uses them: :mod:`.data` (prompts), :mod:`.model` (policy and tokenizer),
:mod:`.rollout` (sampling and the completion mask), :mod:`.rewards`, :mod:`.loop` (advantages, loss, optimizer),
:mod:`.checkpoint` (atomic safetensors checkpoints, resume), :mod:`.cli`.
"""

from .config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(config: TrainConfig) -> dict:
    """Run a training as ``grpo-train`` would; returns the summary (held-out accuracies, final step, paths)."""
    from .loop import train as _train

    return _train(config)
