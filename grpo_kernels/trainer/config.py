"""Every setting of a run, with its default and its ``--flag`` help (the CLI is generated from this dataclass).

The loss's knobs are not listed here: they are :class:`grpo_kernels.LossConfig`'s fields, inherited. A few defaults
depend on whether the run uses the built-in task or ``--data``; they are ``None`` here and filled in
by :meth:`TrainConfig.resolved` (see ``AUTO``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from ..config import KNOBS, LossConfig


def _opt(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


def _knob_fields() -> list[tuple[str, object, object]]:
    """``LossConfig``'s fields as fields of this config: same names, types and defaults, their help as the flag's."""
    hints = typing.get_type_hints(LossConfig)
    out = []
    for f in dataclasses.fields(LossConfig):
        extra = {"choices": f.metadata["choices"]} if f.metadata["choices"] else {}
        out.append((f.name, hints[f.name], _opt(f.default, f.metadata["help"], **extra)))
    return out


# Every knob of the loss, generated: a field added to LossConfig is a grpo-train flag with no edit here.
_LossKnobs = dataclasses.make_dataclass("_LossKnobs", _knob_fields())


# Defaults that differ between the built-in task (tiny model, from scratch) and a real model on --data.
AUTO = {
    "sft_steps": (150, 0),
    "lr": (1e-4, 1e-6),
    "max_new_tokens": (32, 256),
    "rewards": (["accuracy"], ["accuracy"]),
}


@dataclass
class TrainConfig(_LossKnobs):
    # --- model and data ---------------------------------------------------------------------------------------
    model: str | None = _opt(None, "local Hugging Face model directory (default: the built-in tiny model)")
    data: str | None = _opt(
        None,
        "JSONL file with 'prompt', 'answer' (and optionally 'completion' for the warm-up); "
        "default: the built-in addition task",
    )
    eval_data: str | None = _opt(
        None, "JSONL held-out set (default with the built-in task: --eval-size problems never trained on)"
    )
    eval_size: int = _opt(256, "held-out problems of the built-in task (or the first N of --eval-data; 0 = all)")
    task_digits: int = _opt(2, "digits of each operand in the built-in addition task")
    system_prompt: str | None = _opt(None, "system message for the chat template (or a line before the prompt)")
    tiny_hidden_size: int = _opt(128, "hidden size of the built-in tiny model")
    tiny_layers: int = _opt(2, "layers of the built-in tiny model")
    output_dir: str = _opt("grpo-output", "metrics.jsonl, curves.png, checkpoints/ and final/ go here")
    # --- supervised warm-up ------------------------------------------------------------------------------------
    sft_steps: int | None = _opt(
        None,
        "supervised warm-up steps on demonstrations before GRPO (default: 150 on the built-in task, 0 with --data)",
    )
    sft_batch_size: int = _opt(64, "demonstrations per warm-up step (global)")
    sft_lr: float = _opt(1e-3, "warm-up learning rate")
    # --- GRPO ----------------------------------------------------------------------------------------------------
    steps: int = _opt(60, "GRPO steps (one rollout round each)")
    batch_prompts: int = _opt(16, "prompts per GRPO step (global, across ranks)")
    num_generations: int = _opt(8, "completions per prompt (the group size G)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step (per rank)")
    num_iterations: int = _opt(1, "optimizer steps on each rollout batch (mu); > 1 uses old log-probs")
    max_new_tokens: int | None = _opt(None, "completion length limit (default: 32 built-in, 256 with --data)")
    temperature: float = _opt(1.0, "sampling temperature (the loss divides the logits by it too)")
    top_p: float = _opt(1.0, "nucleus sampling threshold")
    mask_truncated: bool = _opt(False, "leave completions without EOS out of the loss (DAPO overlong filtering)")
    rewards: list[str] | None = _opt(
        None,
        "NAME[=WEIGHT], repeatable: accuracy, format, length, learned (a reward "
        "model trained first on the built-in task's preference pairs) or "
        "module:function (default: accuracy)",
        flag="--reward",
    )
    reward_models: list[str] | None = _opt(
        None,
        "DIR[=WEIGHT], repeatable: a local Hugging Face sequence-"
        "classification model (one output) scoring (prompt, completion)",
        flag="--reward-model",
        metavar="DIR[=WEIGHT]",
    )
    reward_model_batch_size: int = _opt(64, "completions per reward-model forward pass")
    learned_reward_steps: int = _opt(300, "Bradley-Terry training steps of the --reward learned model")
    learned_reward_pairs: int = _opt(64, "preference pairs per training step of the --reward learned model")
    learned_reward_lr: float = _opt(1e-3, "learning rate of the --reward learned model")
    multi_reward: str = _opt(
        "sum_then_normalize", "how several rewards combine", choices=("sum_then_normalize", "normalize_then_sum")
    )
    advantage_scale: str = _opt(
        "group", "advantage denominator: group std, batch std or none (Dr. GRPO)", choices=("group", "batch", "none")
    )
    advantage_eps: float = _opt(1e-4, "added to the std of the advantage denominator")
    # --- the reference policy (beta > 0) --------------------------------------------------------------------------
    ref_sync_every: int = _opt(
        0,
        "every N optimizer steps of GRPO, ref <- alpha * policy + (1 - alpha) * ref "
        "(TRL's sync_ref_model; 0 = the reference stays the starting policy)",
    )
    ref_mixup_alpha: float = _opt(0.6, "alpha of --ref-sync-every (TRL's ref_model_mixup_alpha), in [0, 1]")
    # --- LoRA (peft): adapters added when GRPO starts; the reference is the base model, adapters disabled ---------
    lora_r: int = _opt(0, "LoRA rank (0 = full fine-tuning)")
    lora_alpha: float = _opt(32.0, "LoRA scaling numerator (the adapter is scaled by alpha / r)")
    lora_dropout: float = _opt(0.05, "dropout on the adapters' input in the loss's forward pass")
    lora_target_modules: str | None = _opt(
        None, "comma-separated module names to adapt, or all-linear (default: peft's choice for the architecture)"
    )
    # --- the loss: every knob of grpo_kernels.LossConfig is a field (and a flag), inherited from _LossKnobs ---
    entropy: bool = _opt(True, "compute the per-token entropy (logged as a metric)")
    inplace_backward: bool = _opt(False, "write the logits' gradient over the logits (saves one [N, V] buffer)")
    grad_in_forward: bool = _opt(False, "compute the logits' gradient inside the loss forward (2-pass kernels)")
    backend: str = _opt("auto", "grpo_kernels backend", choices=("auto", "torch", "triton", "cuda"))
    # --- optimizer -----------------------------------------------------------------------------------------------
    lr: float | None = _opt(None, "GRPO learning rate (default: 1e-4 built-in, 1e-6 with --data)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping (0 = off)")
    # --- operations ----------------------------------------------------------------------------------------------
    seed: int = _opt(0, "seed of the model init, the data order and the sampling")
    save_every: int = _opt(50, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _opt(2, "checkpoints kept on disk (the newest)")
    eval_every: int = _opt(0, "held-out evaluation every N GRPO steps besides before and after GRPO (0 = off)")
    eval_batch_size: int = _opt(128, "prompts per evaluation generate call")
    resume: str | None = _opt(
        None,
        "continue from the latest checkpoint in output_dir, or from a given checkpoint directory",
        nargs="?",
        const="latest",
    )
    overwrite: bool = _opt(
        False,
        "start afresh in an output_dir that holds a previous run (deletes its checkpoints, "
        "metrics, curves and final model)",
    )
    device: str = _opt("auto", "auto (CUDA when available), cpu or cuda")
    fsdp: bool = _opt(
        False,
        "under torchrun, shard the policy with FSDP2 (fully_shard per decoder layer and the root) instead of DDP; "
        "bf16 mixed precision on CUDA with --bf16",
    )
    bf16: bool = _opt(True, "bf16 autocast on CUDA (ignored on CPU)")
    progress: bool = _opt(True, "progress bar")
    plot: bool = _opt(True, "write curves.png at the end")

    def resolved(self) -> TrainConfig:
        """A copy with the automatic defaults filled in and the settings checked."""
        builtin = self.data is None
        values = {k: (v[0] if builtin else v[1]) for k, v in AUTO.items() if getattr(self, k) is None}
        cfg = dataclasses.replace(self, **values)
        positive = (
            "batch_prompts",
            "num_generations",
            "grad_accum",
            "num_iterations",
            "max_new_tokens",
            "sft_batch_size",
            "eval_batch_size",
            "task_digits",
            "keep_checkpoints",
        )
        for name in positive:
            if getattr(cfg, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
        for name in ("steps", "sft_steps", "save_every", "eval_every", "eval_size"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
        if cfg.batch_prompts % cfg.grad_accum:
            raise ValueError(f"--batch-prompts {cfg.batch_prompts} must be divisible by --grad-accum {cfg.grad_accum}")
        if not 0 < cfg.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {cfg.top_p}")
        _check_options(cfg)
        if cfg.max_completion_length is None:  # dr_grpo's normaliser: the completion length limit
            cfg = dataclasses.replace(cfg, max_completion_length=cfg.max_new_tokens)
        cfg.loss_config()  # checks every knob (ValueError naming it)
        return cfg

    def loss_config(self) -> LossConfig:
        """The loss's configuration: this run's values of :class:`grpo_kernels.LossConfig`'s fields."""
        return LossConfig(**{name: getattr(self, name) for name in KNOBS})


def _check_options(cfg: TrainConfig) -> None:
    """The reward-model, reference-sync and LoRA settings (ValueError naming the flag)."""
    for name in ("reward_model_batch_size", "learned_reward_steps", "learned_reward_pairs"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if "learned" in [spec.rpartition("=")[0] or spec for spec in cfg.rewards] and cfg.data is not None:
        raise ValueError(
            "--reward learned trains its reward model on the built-in task's preference pairs; with "
            "--data give a trained one with --reward-model DIR"
        )
    if cfg.ref_sync_every < 0:
        raise ValueError(f"--ref-sync-every must be >= 0, got {cfg.ref_sync_every}")
    if not 0.0 <= cfg.ref_mixup_alpha <= 1.0:
        raise ValueError(f"--ref-mixup-alpha must be in [0, 1], got {cfg.ref_mixup_alpha}")
    if cfg.ref_sync_every and cfg.beta == 0:
        raise ValueError("--ref-sync-every needs --beta > 0: with beta = 0 no reference model is kept")
    if cfg.lora_r < 0:
        raise ValueError(f"--lora-r must be >= 0 (0 = no LoRA), got {cfg.lora_r}")
    if cfg.lora_r == 0 and cfg.lora_target_modules is not None:
        raise ValueError("--lora-target-modules needs --lora-r > 0")
    if not cfg.lora_alpha > 0:
        raise ValueError(f"--lora-alpha must be > 0, got {cfg.lora_alpha}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.fsdp and cfg.lora_r:
        raise ValueError("--fsdp cannot be used with --lora-r (the adapters are not sharded); use DDP for LoRA")
    if cfg.lora_r and cfg.ref_sync_every:
        raise ValueError(
            "--ref-sync-every cannot be used with --lora-r: the reference is the base model with the "
            "adapters disabled (no copy of the weights to mix into); TRL refuses it too"
        )
