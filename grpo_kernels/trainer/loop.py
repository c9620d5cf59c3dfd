"""The training loop: an optional supervised warm-up, then GRPO steps, with held-out evaluation and checkpoints.

One GRPO step, per rank (prompts are sharded across ranks, each rank owns whole groups)::

    prompts (batch_prompts / world) --split--> grad_accum micro-batches, for each:
        generate G completions per prompt -> rewards [B, R] -> group_advantages [B]
        old log-probs (num_iterations > 1), reference log-probs (beta > 0)
    num_items = completion tokens of the whole step, summed over micro-batches and ranks
    num_iterations times: for each micro-batch grpo_loss(...).backward() (DDP syncs on the last), clip, AdamW step,
        and every --ref-sync-every optimizer steps ref <- alpha * policy + (1 - alpha) * ref

Gradient accumulation and data parallelism give the same update as one big batch: dapo/cispo normalise by the
global token count (``num_items_in_batch``) and multiply by the world size to undo DDP's gradient averaging; the
other loss types are per-batch means, divided by the number of micro-batches. Sampling is seeded per
(seed, step, global micro-batch), so a step draws the same completions however the batch is sharded or resumed.

The reference policy (beta > 0) is a frozen copy of the policy taken when GRPO starts, or with LoRA (:mod:`.lora`)
the base model with the adapters disabled. Rewards come from rule-based functions (:mod:`.rewards`) and reward models
(:mod:`.reward_model`), combined by ``group_advantages``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..api import group_advantages, grpo_loss, token_logprobs
from ..config import KNOBS
from . import fsdp
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    remove_partial_checkpoints,
    repair_metrics,
    resolve_resume,
    save_checkpoint,
    verify_directory,
)
from .config import TrainConfig
from .data import AdditionTask, DataError, PromptStream, format_prompt, heldout_set, read_jsonl
from .lora import adapter_dropout, adapter_state, add_lora, check_targets, load_adapter_state, save_final
from .metrics import MetricsLog, plot_curves
from .model import load_model_and_tokenizer, position_ids
from .reward_model import RewardModel, parse_reward_model_spec, train_learned_reward
from .rewards import RewardSet, answer_score, parse_reward_spec
from .rollout import Rollout, demonstration_batch, generate

HELDOUT_SEED = 0  # the built-in task's held-out problems are the same for every run
# Arguments of grpo_kernels.grpo_loss that TrainConfig holds under the same name: every knob, and three options.
LOSS_KNOBS = (*KNOBS, "inplace_backward", "grad_in_forward", "backend")


class Dist:
    """Rank, world size and device; sums and gathers across ranks (no-ops in a single process)."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.owns_group = self.world > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, x: Tensor) -> Tensor:
        """Concatenation along dim 0 of the equally shaped ``x`` of every rank, in rank order."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def derived_seed(*parts) -> int:
    """A seed from any tuple of values, stable across processes and Python runs (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class GroupBatch:
    """One micro-batch of GRPO: the rollout and everything the loss needs about it."""

    rollout: Rollout
    rewards: Tensor  # [B, R] float32, NaN = no score
    advantages: Tensor  # [B] float32
    group_std: Tensor  # [B / G] within-group std of the combined reward
    frac_zero_std: float
    old_logprobs: Tensor | None  # [B, C]
    ref_logprobs: Tensor | None  # [B, C]
    correct: list[bool]  # [B] the accuracy reward would give 1.0
    generation_time: float


class Trainer:
    def __init__(self, config: TrainConfig):
        self.cfg = cfg = config.resolved()
        self.dist = Dist(cfg.device)
        self.device, self.world, self.rank = self.dist.device, self.dist.world, self.dist.rank
        for name, size in (("batch-prompts", cfg.batch_prompts), ("sft-batch-size", cfg.sft_batch_size)):
            if size % (self.world * cfg.grad_accum):
                raise ValueError(
                    f"--{name} {size} must be divisible by world size x --grad-accum = {self.world} x {cfg.grad_accum}"
                )
        if cfg.fsdp and self.world == 1:
            raise ValueError("--fsdp shards the model over torchrun's processes: run it with --nproc_per_node >= 2")
        self.out = Path(cfg.output_dir)
        self.checkpoints = self.out / "checkpoints"
        seed_everything(cfg.seed)  # the same initial weights on every rank
        model, self.tokenizer = load_model_and_tokenizer(
            cfg.model, tiny_hidden_size=cfg.tiny_hidden_size, tiny_layers=cfg.tiny_layers
        )
        # eval(): no dropout, during training too (as TRL does), so the log-probs of a batch do not depend on noise.
        self.model = model.to(self.device).eval()
        self.policy = self.model
        self.fsdp_bf16 = cfg.fsdp and self.device.type == "cuda" and cfg.bf16  # FSDP2 mixed precision: CUDA only
        if cfg.fsdp:
            fsdp.shard(self.model, bf16=self.fsdp_bf16)  # in place: self.model is the sharded module
        elif self.world > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            self.policy = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.ref_model = None
        self.lora = False  # the adapters are added when GRPO starts; their targets are checked now
        if cfg.lora_r:
            check_targets(self.model, cfg.lora_target_modules)
        self._load_data()
        self.reward_models = self._reward_models()  # before the output directory is touched: errors come first
        self.total_steps = cfg.sft_steps + cfg.steps
        self.step = 0
        self.evals: dict[str, dict] = {}
        self.optimizer = self._optimizer(warm_up=cfg.sft_steps > 0)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.dist.main)
        self.loss_config = {k: getattr(cfg, k) for k in LOSS_KNOBS}
        self.loss_config.update(return_entropy=cfg.entropy)
        self.uses_reference = cfg.loss_config().uses_reference  # beta != 0: a frozen reference model
        # --kl-estimator exact: the loss reads the reference's logits (computed next to the policy's, per micro-batch)
        self.exact_kl = self.uses_reference and cfg.loss_config().exact_kl
        if cfg.resume is not None:
            self.load(resolve_resume(self.checkpoints, cfg.resume))
        else:
            self._fresh_output_dir()
        specs = [*cfg.rewards, *(f"{name}={weight}" for name, (_, weight) in self.reward_models.items())]
        named = {name: fn for name, (fn, _) in self.reward_models.items()}
        if "learned" in [parse_reward_spec(spec)[0] for spec in cfg.rewards]:
            named["learned"] = self._learned_reward()
        self.rewards = RewardSet(specs, named)

    # ------------------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------------------
    def _load_data(self) -> None:
        cfg = self.cfg
        limit = cfg.eval_size or None
        if cfg.data is not None:
            examples = read_jsonl(cfg.data)
            if cfg.sft_steps and any(e.completion is None for e in examples):
                raise DataError(
                    f"--sft-steps {cfg.sft_steps} needs a 'completion' (a demonstration) on every line of {cfg.data}"
                )
            self.eval_examples = read_jsonl(cfg.eval_data)[:limit] if cfg.eval_data else []
            self.stream = PromptStream(cfg.seed, examples=examples)
            return
        task = AdditionTask(cfg.task_digits)
        if cfg.eval_data:
            self.eval_examples = read_jsonl(cfg.eval_data)[:limit]
        else:
            self.eval_examples = heldout_set(task, cfg.eval_size, HELDOUT_SEED) if cfg.eval_size else []
        held_out = frozenset(e.prompt for e in self.eval_examples)
        self.stream = PromptStream(cfg.seed, task=task, exclude=held_out)
        self.task = task

    def _reward_models(self) -> dict[str, tuple[RewardModel, float]]:
        """``--reward-model DIR[=WEIGHT]``: name -> (scorer, weight); the name is ``reward_model:DIR``."""
        out = {}
        for spec in self.cfg.reward_models or []:
            path, weight = parse_reward_model_spec(spec)
            scorer = RewardModel.from_directory(
                path,
                device=self.device,
                batch_size=self.cfg.reward_model_batch_size,
                system_prompt=self.cfg.system_prompt,
                autocast=self._autocast,
            )
            out[f"reward_model:{path}"] = (scorer, weight)
        return out

    def _learned_reward(self) -> RewardModel:
        """``--reward learned``: trained (by rank 0) into OUTPUT/reward_model unless a resumed run has it already."""
        cfg, path = self.cfg, self.out / "reward_model"
        if not (cfg.resume is not None and path.is_dir()):
            if self.dist.main:
                # the policy's held-out problems (an --eval-data file need not hold task problems)
                size = min(256, 10 ** (2 * cfg.task_digits) // 2)
                heldout = (
                    self.eval_examples
                    if self.eval_examples and not cfg.eval_data
                    else heldout_set(self.task, size, HELDOUT_SEED)
                )
                stream = PromptStream(
                    derived_seed(cfg.seed, "reward_model"), task=self.task, exclude=frozenset(e.prompt for e in heldout)
                )
                report = train_learned_reward(
                    task=self.task,
                    stream=stream,
                    heldout=heldout,
                    out_dir=path,
                    seed=derived_seed(cfg.seed, "reward_model"),
                    steps=cfg.learned_reward_steps,
                    pairs_per_step=cfg.learned_reward_pairs,
                    lr=cfg.learned_reward_lr,
                    hidden_size=cfg.tiny_hidden_size,
                    num_layers=cfg.tiny_layers,
                    device=self.device,
                )
                self.metrics.write({"step": 0, "reward_model": "learned", **report})
                accuracy, pairs = 100 * report["heldout_pairwise_accuracy"], report["heldout_pairs"]
                print(
                    f"reward model (--reward learned): held-out pairwise accuracy {accuracy:.1f}% on {pairs} pairs "
                    f"-> {path}"
                )
            self.dist.barrier()
        verify_directory(path, "reward model")
        return RewardModel.from_directory(
            path, device=self.device, batch_size=cfg.reward_model_batch_size, autocast=self._autocast
        )

    def _fresh_output_dir(self) -> None:
        """A new run never mixes with an old one: its checkpoints would be resumed or pruned by mistake."""
        previous = [
            self.checkpoints,
            self.out / "metrics.jsonl",
            self.out / "final",
            self.out / "curves.png",
            self.out / "reward_model",
        ]
        previous = [p for p in previous if p.exists()]
        if previous and not self.cfg.overwrite:
            names = ", ".join(p.name for p in previous)
            raise ValueError(
                f"{str(self.out)!r} holds a previous run ({names}): pass --resume to continue it, "
                "--overwrite to delete it and start afresh, or another --output-dir"
            )
        self.dist.barrier()  # every rank has looked before rank 0 deletes
        if self.dist.main:
            for path in previous:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.dist.barrier()

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _optimizer(self, warm_up: bool) -> torch.optim.Optimizer:
        """AdamW of the warm-up or of GRPO (each phase starts with fresh moments), on the trainable parameters."""
        lr = self.cfg.sft_lr if warm_up else self.cfg.lr
        return torch.optim.AdamW(self._trainable(), lr=lr, weight_decay=self.cfg.weight_decay)

    def _enter_grpo(self) -> None:
        """The models of the GRPO phase: the LoRA adapters (--lora-r), else the reference copy (beta > 0)."""
        cfg = self.cfg
        if cfg.lora_r:
            self.model = add_lora(
                self.model,
                r=cfg.lora_r,
                alpha=cfg.lora_alpha,
                dropout=cfg.lora_dropout,
                target_modules=cfg.lora_target_modules,
            )
            self.lora = True
            self.policy = self.model
            if self.world > 1:
                ids = [self.device] if self.device.type == "cuda" else None
                self.policy = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        elif self.uses_reference and cfg.fsdp:
            self.ref_model = fsdp.reference_copy(self.model, bf16=self.fsdp_bf16)
        elif self.uses_reference:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False)

    def _begin_grpo(self) -> None:
        self._enter_grpo()
        self.optimizer = self._optimizer(warm_up=False)

    @property
    def _base_on_disk(self) -> bool:
        """The LoRA base is the --model directory unchanged (no warm-up): checkpoints need only the adapters."""
        return self.cfg.model is not None and self.cfg.sft_steps == 0

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _prompt_text(self, prompt: str) -> str:
        return format_prompt(self.tokenizer, prompt, self.cfg.system_prompt)

    # ------------------------------------------------------------------------------------------------------------
    # model passes
    # ------------------------------------------------------------------------------------------------------------
    def _completion_logits(self, model, batch: Rollout) -> Tensor:
        """``[B, C, V]`` logits aligned with the completion tokens (a view: no copy of the logits)."""
        c = batch.completion_ids.shape[1]
        keep = {"logits_to_keep": c + 1} if self.logits_to_keep else {}
        with self._autocast():
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=position_ids(batch.attention_mask),
                use_cache=False,
                **keep,
            ).logits
        return logits[:, -(c + 1) : -1]  # position t predicts completion token t

    @torch.no_grad()
    def _logprobs(self, model, batch: Rollout) -> Tensor:
        logits = self._completion_logits(model, batch)
        return token_logprobs(
            logits,
            batch.completion_ids,
            temperature=self.cfg.temperature,
            mask=batch.completion_mask,
            backend=self.cfg.backend,
        )

    @contextlib.contextmanager
    def _reference(self):
        """The reference policy for a pass without gradients: the base model with the adapters disabled (LoRA), or
        the frozen copy (its weights gathered whole under FSDP)."""
        if self.lora:
            with self.model.disable_adapter():
                yield self.model
        else:
            with fsdp.full_weights(self.ref_model):
                yield self.ref_model

    def _ref_logprobs(self, batch: Rollout) -> Tensor:
        """Log-probs under the reference policy."""
        with self._reference() as reference:
            return self._logprobs(reference, batch)

    @torch.no_grad()
    def _ref_logits(self, batch: Rollout) -> Tensor:
        """``[B, C, V]`` logits of the reference policy (``--kl-estimator exact``), aligned as the policy's."""
        with self._reference() as reference:
            return self._completion_logits(reference, batch)

    @torch.no_grad()
    def _sync_reference(self, optimizer_step: int) -> bool:
        """TRL's SyncRefModelCallback: after GRPO optimizer step k with k % N == 0,
        ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter (in place, in the parameters' dtype)."""
        every, alpha = self.cfg.ref_sync_every, self.cfg.ref_mixup_alpha
        if not every or optimizer_step % every:
            return False
        for ref, param in zip(self.ref_model.parameters(), self.model.parameters(), strict=True):
            ref.mul_(1.0 - alpha).add_(param, alpha=alpha)
        return True

    def _loss_scale(self, micro_batches: int, *, token_normalised: bool) -> float:
        """The factor each micro-batch's loss is multiplied by before its backward (accumulation and DDP)."""
        return float(self.world) if token_normalised else 1.0 / micro_batches

    def _backward(self, loss: Tensor, scale: float) -> float:
        """Scale for accumulation and DDP (module docstring), backward; returns the scaled loss for logging."""
        scaled = loss * scale
        scaled.backward()
        return float(scaled.detach())

    def _sync(self, last_micro_batch: bool):
        """DDP all-reduces the gradients only on the last micro-batch of an optimizer step; FSDP reduce-scatters
        on every one (its gradients stay sharded: see fsdp.py)."""
        if last_micro_batch or self.world == 1 or self.cfg.fsdp:
            return nullcontext()
        return self.policy.no_sync()

    def _optimizer_step(self) -> float:
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self._trainable(), limit)
        if fsdp.is_sharded(norm):  # a replicated DTensor: every rank holds the global norm
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _local_share(self, size: int) -> list:
        per_rank = size // self.world
        return self.stream.batch(self.step, size)[self.rank * per_rank : (self.rank + 1) * per_rank]

    # ------------------------------------------------------------------------------------------------------------
    # steps
    # ------------------------------------------------------------------------------------------------------------
    def sft_step(self) -> dict:
        """Maximum likelihood of the demonstrations' completion tokens (EOS included), token-mean over the batch."""
        start = time.perf_counter()
        cfg = self.cfg
        examples = self._local_share(cfg.sft_batch_size)
        size = len(examples) // cfg.grad_accum
        batches = [
            demonstration_batch(
                self.tokenizer, [self._prompt_text(e.prompt) for e in part], [e.completion for e in part], self.device
            )
            for part in (examples[i * size : (i + 1) * size] for i in range(cfg.grad_accum))
        ]
        (num_items,) = self.dist.sum([sum(float(b.completion_mask.sum()) for b in batches)])
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            with self._sync(i == len(batches) - 1):
                logits = self._completion_logits(self.policy, batch)
                lp = token_logprobs(logits, batch.completion_ids, mask=batch.completion_mask, backend=cfg.backend)
                loss = -(lp * batch.completion_mask).sum() / max(num_items, 1.0)
                loss_sum += self._backward(loss, self._loss_scale(len(batches), token_normalised=True))
        grad_norm = self._optimizer_step()
        (loss_sum,) = self.dist.sum([loss_sum / self.world])
        return {
            "phase": "sft",
            "loss": loss_sum,
            "grad_norm": grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "step_time": time.perf_counter() - start,
        }

    def _group_batch(self, examples: list, micro_index: int) -> GroupBatch:
        cfg, g = self.cfg, self.cfg.num_generations
        torch.manual_seed(derived_seed(cfg.seed, self.step, micro_index))
        prompts = [self._prompt_text(e.prompt) for e in examples]
        start = time.perf_counter()
        with self._autocast(), fsdp.full_weights(self.model):
            rollout = generate(
                self.model,
                self.tokenizer,
                prompts,
                num_generations=g,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                mask_truncated=cfg.mask_truncated,
            )
        generation_time = time.perf_counter() - start
        answers = [e.answer for e in examples for _ in range(g)]
        scores = self.rewards(
            prompts=[p for p in prompts for _ in range(g)],
            completions=rollout.completions,
            answers=answers,
            completion_lengths=rollout.completion_lengths,
            truncated=rollout.truncated,
            max_completion_length=cfg.max_new_tokens,
            raw_prompts=[e.prompt for e in examples for _ in range(g)],
        )
        rewards = torch.tensor(scores, dtype=torch.float32, device=self.device)  # [B, R]
        adv = group_advantages(
            rewards,
            group_size=g,
            scale=cfg.advantage_scale,
            eps=cfg.advantage_eps,
            reward_weights=self.rewards.weights,
            multi_reward=cfg.multi_reward,
            backend=cfg.backend,
            return_stats=True,
        )
        with fsdp.full_weights(self.model if cfg.num_iterations > 1 else None):
            old_logprobs = self._logprobs(self.model, rollout) if cfg.num_iterations > 1 else None
        return GroupBatch(
            rollout=rollout,
            rewards=rewards,
            advantages=adv.advantages.float(),
            group_std=adv.group_std,
            frac_zero_std=float(adv.frac_zero_std),
            old_logprobs=old_logprobs,
            ref_logprobs=self._ref_logprobs(rollout) if self.uses_reference and not self.exact_kl else None,
            correct=[answer_score(c, a) == 1.0 for c, a in zip(rollout.completions, answers, strict=True)],
            generation_time=generation_time,
        )

    def policy_loss(self, batch: GroupBatch, num_items_in_batch: float, loss_scale: float = 1.0):
        """``grpo_loss`` of the current policy on one micro-batch (a :class:`grpo_kernels.GRPOLossOutput`).

        ``loss_scale`` is the factor the loss will be multiplied by before its backward; with ``--grad-in-forward``
        the op bakes it into the gradient it computes in the forward. With LoRA, the adapters' dropout is on here.
        """
        # exact KL: the reference's logits now, not stored with the batch (one [B, C, V] tensor at a time)
        ref_logits = self._ref_logits(batch.rollout) if self.exact_kl else None
        with adapter_dropout(self.model, active=self.lora and self.cfg.lora_dropout > 0):
            logits = self._completion_logits(self.policy, batch.rollout)
        return grpo_loss(
            logits,
            batch.rollout.completion_ids,
            batch.advantages,
            mask=batch.rollout.completion_mask,
            old_logprobs=batch.old_logprobs,
            ref_logprobs=batch.ref_logprobs,
            ref_logits=ref_logits,
            num_items_in_batch=num_items_in_batch,
            loss_scale=loss_scale,
            **self.loss_config,
        )

    def rollout_step_batches(self) -> list[GroupBatch]:
        """This rank's micro-batches of the current step (sampling seeded by the global micro-batch index)."""
        examples = self._local_share(self.cfg.batch_prompts)
        size = len(examples) // self.cfg.grad_accum
        first = self.rank * self.cfg.grad_accum
        return [self._group_batch(examples[i * size : (i + 1) * size], first + i) for i in range(self.cfg.grad_accum)]

    def grpo_step(self) -> dict:
        start = time.perf_counter()
        cfg = self.cfg
        batches = self.rollout_step_batches()
        masks = [b.rollout.completion_mask for b in batches]
        (num_items,) = self.dist.sum([sum(float(m.sum()) for m in masks)])
        token_normalised = cfg.loss_config().normalised_by_items
        token_metrics = ("kl_mean", "clip_low", "clip_high", "clip_region", "entropy_mean")
        sums = dict.fromkeys(("loss", "tokens", *token_metrics), 0.0)  # local sums, token-weighted
        grad_norms, ref_syncs = [], 0
        for iteration in range(cfg.num_iterations):
            for i, batch in enumerate(batches):
                with self._sync(i == len(batches) - 1):
                    scale = self._loss_scale(len(batches), token_normalised=token_normalised)
                    out = self.policy_loss(batch, num_items, scale)
                    sums["loss"] += self._backward(out.loss, scale)
                tokens = float(masks[i].sum())
                sums["tokens"] += tokens
                for key in token_metrics:
                    if getattr(out, key) is not None:
                        sums[key] += float(getattr(out, key)) * tokens
            grad_norms.append(self._optimizer_step())
            ref_syncs += self._sync_reference((self.step - cfg.sft_steps) * cfg.num_iterations + iteration + 1)

        # --- metrics over the global batch ---------------------------------------------------------------------
        rewards = self.dist.gather(torch.cat([b.rewards for b in batches]))  # [B_global, R]
        combined = (rewards.nan_to_num() * torch.tensor(self.rewards.weights, device=rewards.device)).sum(dim=1)
        lengths = [n for b in batches for n in b.rollout.completion_lengths]
        sums.update(
            completions=len(lengths),
            length=sum(lengths),
            correct=sum(sum(b.correct) for b in batches),
            truncated=sum(sum(b.rollout.truncated) for b in batches),
            groups=sum(b.group_std.numel() for b in batches),
            zero_std=sum(b.frac_zero_std * b.group_std.numel() for b in batches),
            group_std=sum(float(b.group_std.nan_to_num().sum()) for b in batches),
        )
        total = dict(zip(sums, self.dist.sum(list(sums.values())), strict=True))
        tokens, count, step_time = max(total["tokens"], 1.0), total["completions"], time.perf_counter() - start
        record = {
            "phase": "grpo",
            "loss": total["loss"] / self.world / cfg.num_iterations,  # the objective DDP's averaged gradient follows
            "reward_mean": float(combined.mean()),
            "reward_std": float(combined.std()) if combined.numel() > 1 else 0.0,
            "reward_group_std": total["group_std"] / total["groups"],
            "frac_zero_std": total["zero_std"] / total["groups"],
            **{f"reward/{name}": float(rewards[:, k].nanmean()) for k, name in enumerate(self.rewards.names)},
            "accuracy": total["correct"] / count,
            "clip_low": total["clip_low"] / tokens,
            "clip_high": total["clip_high"] / tokens,
            "clip_region": total["clip_region"] / tokens,
            "completion_length": total["length"] / count,
            "completion_tokens": int(total["length"]),
            "truncated": total["truncated"] / count,
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "lr": self.optimizer.param_groups[0]["lr"],
            "step_time": step_time,
            "generation_time": sum(b.generation_time for b in batches),
            "tokens_per_s": total["length"] / step_time,
        }
        if self.uses_reference:  # without a reference model there is no KL to report
            record["kl"] = total["kl_mean"] / tokens
        if cfg.ref_sync_every:
            record["ref_syncs"] = ref_syncs
        if cfg.entropy:
            record["entropy"] = total["entropy_mean"] / tokens
        return record

    # ------------------------------------------------------------------------------------------------------------
    # evaluation, checkpoints, the run
    # ------------------------------------------------------------------------------------------------------------
    def evaluate(self, name: str) -> None:
        """Greedy held-out accuracy (the ``accuracy`` reward's 1.0), sharded over ranks; recorded as ``name``."""
        if not self.eval_examples:
            return
        cfg = self.cfg
        local = self.eval_examples[self.rank :: self.world]
        correct = 0
        with fsdp.full_weights(self.model):  # gathered once: ranks may run different numbers of batches
            for i in range(0, len(local), cfg.eval_batch_size):
                part = local[i : i + cfg.eval_batch_size]
                with self._autocast():
                    rollout = generate(
                        self.model,
                        self.tokenizer,
                        [self._prompt_text(e.prompt) for e in part],
                        num_generations=1,
                        max_new_tokens=cfg.max_new_tokens,
                        greedy=True,
                    )
                correct += sum(answer_score(c, e.answer) == 1.0 for c, e in zip(rollout.completions, part, strict=True))
        correct, total = self.dist.sum([correct, len(local)])
        record = {
            "step": self.step,
            "eval": name,
            "accuracy": correct / total,
            "correct": int(correct),
            "total": int(total),
        }
        self.evals[name] = record
        self.metrics.write(record)

    def save(self) -> None:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        states = self.dist.gather_objects(rng)
        gathered = {}  # --fsdp: every rank gathers the shards (collectives), rank 0 writes the full tensors
        if self.cfg.fsdp:
            gathered["model"] = fsdp.unique_tensors(fsdp.full_state_dict(self.model))
            if self.ref_model is not None:
                gathered["ref_model"] = fsdp.unique_tensors(fsdp.full_state_dict(self.ref_model))
            gathered["optimizer"] = fsdp.full_optimizer_state(self.optimizer)
        if self.dist.main:
            optimizer_tensors, optimizer_meta = optimizer_to_tensors(gathered.pop("optimizer", self.optimizer))
            rng_tensors = {f"rank{r}.{k}": s[k] for r, s in enumerate(states) for k in ("torch", "cuda") if k in s}
            state = {
                "step": self.step,
                "world_size": self.world,
                "evals": self.evals,
                "config": dataclasses.asdict(self.cfg),
                "optimizer": optimizer_meta,
                "rng_python": [[s["python"][0], list(s["python"][1]), s["python"][2]] for s in states],
                "rng_numpy": [[s["numpy"][0], s["numpy"][1].tolist(), *s["numpy"][2:]] for s in states],
            }
            models = {"ref_model": self.ref_model} if self.ref_model is not None else {}
            tensors = {"optimizer": optimizer_tensors, "rng": rng_tensors}
            if gathered:  # the sharded model and reference, gathered
                models, tensors = {}, {**tensors, **gathered}
            elif self.lora and self._base_on_disk:
                tensors["adapter"] = adapter_state(self.model)
            else:
                models["model"] = self.model
            save_checkpoint(
                self.checkpoints, self.step, models=models, state=state, keep=self.cfg.keep_checkpoints, tensors=tensors
            )
        self.dist.barrier()

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file, load_model

        state, files = load_checkpoint(path)
        if state["world_size"] != self.world:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written by {state['world_size']} processes; "
                f"resume it with the same number (got {self.world})"
            )
        changed = sorted(k for k, v in state["config"].items() if k != "resume" and getattr(self.cfg, k, v) != v)
        if changed and self.dist.main:
            print(f"grpo-train: resuming {path} with changed settings: {', '.join(changed)}")
        if state["config"].get("fsdp", False) != self.cfg.fsdp:
            written = "with" if state["config"].get("fsdp", False) else "without"
            raise CheckpointError(f"checkpoint {str(path)!r} was written {written} --fsdp; resume it the same way")
        self.step, self.evals = state["step"], state["evals"]
        if self.step < self.total_steps:  # a finished run resumed with more --steps: it ends somewhere else now
            self.evals.pop("after_grpo", None)
        where = f"checkpoint {str(path)!r}"
        if self.step > self.cfg.sft_steps:  # a GRPO checkpoint: the adapters or the reference copy exist
            if state["config"].get("lora_r", 0) != self.cfg.lora_r:
                raise CheckpointError(
                    f"{where} was written with --lora-r {state['config'].get('lora_r', 0)}; "
                    f"resume it with the same (got {self.cfg.lora_r})"
                )
            self._enter_grpo()
        if "model" in files and self.cfg.fsdp:
            fsdp.load_full_state_dict(self.model, load_file(str(files["model"])), where)
        elif "model" in files:
            load_model(self.model, str(files["model"]), device=str(self.device))
        else:
            load_adapter_state(self.model, load_file(str(files["adapter"]), device=str(self.device)), where)
        if self.ref_model is not None:
            if "ref_model" not in files:
                raise CheckpointError(f"{where} has no ref_model.safetensors but --beta > 0")
            if self.cfg.fsdp:
                fsdp.load_full_state_dict(self.ref_model, load_file(str(files["ref_model"])), where)
            else:
                load_model(self.ref_model, str(files["ref_model"]), device=str(self.device))
        # The optimizer of the last completed step's phase; at the warm-up/GRPO boundary _begin_grpo replaces it.
        self.optimizer = self._optimizer(warm_up=self.step <= self.cfg.sft_steps)
        optimizer_state = optimizer_from_tensors(load_file(str(files["optimizer"])), state["optimizer"])
        if self.cfg.fsdp:
            optimizer_state = fsdp.shard_optimizer_state(self.optimizer, optimizer_state)
        self.optimizer.load_state_dict(optimizer_state)
        rng = load_file(str(files["rng"]))
        torch.set_rng_state(rng[f"rank{self.rank}.torch"])
        if self.device.type == "cuda" and f"rank{self.rank}.cuda" in rng:
            torch.cuda.set_rng_state(rng[f"rank{self.rank}.cuda"], self.device)
        version, internal, gauss = state["rng_python"][self.rank]
        random.setstate((version, tuple(internal), gauss))
        name, keys, *rest = state["rng_numpy"][self.rank]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
        if self.dist.main:
            remove_partial_checkpoints(self.checkpoints)
            repair_metrics(self.out / "metrics.jsonl", self.step)
        self.dist.barrier()

    def _after_step(self) -> None:
        cfg = self.cfg
        if self.step == cfg.sft_steps and "before_grpo" not in self.evals:
            self.evaluate("before_grpo")
        if self.step == self.total_steps and "after_grpo" not in self.evals:
            self.evaluate("after_grpo")
        elif cfg.eval_every and self.step > cfg.sft_steps and (self.step - cfg.sft_steps) % cfg.eval_every == 0:
            self.evaluate(f"step_{self.step}")

    def run(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._after_step()  # the held-out baseline when there is no warm-up
        show = self.dist.main and cfg.progress
        bar = tqdm(total=self.total_steps, initial=self.step, desc="grpo-train", disable=not show)
        while self.step < self.total_steps:
            if self.step == cfg.sft_steps:
                self._begin_grpo()
            record = self.sft_step() if self.step < cfg.sft_steps else self.grpo_step()
            self.step += 1
            self.metrics.write({"step": self.step, **record})
            self._after_step()  # every record of this step is written before its checkpoint (see metrics.py)
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == self.total_steps:
                self.save()
            bar.update(1)
            shown = ("loss",) if record["phase"] == "sft" else ("reward_mean", "accuracy")
            bar.set_postfix({"phase": record["phase"], **{k: f"{record[k]:.3f}" for k in shown}})
        bar.close()
        return self._finish()

    def _finish(self) -> dict:
        trainable = sum(p.numel() for p in self._trainable())
        total = sum(p.numel() for p in self.model.parameters())
        summary = {
            "step": self.step,
            "output_dir": str(self.out),
            "evals": self.evals,
            "trainable_parameters": trainable,
            "parameters": total,
        }
        full = fsdp.full_state_dict(self.model) if self.cfg.fsdp else None  # collective: before rank 0 alone
        if self.dist.main:
            final = self.out / "final"
            if self.lora:
                save_final(self.model, final, self.cfg.model if self._base_on_disk else None)
            else:
                self.model.save_pretrained(final, state_dict=full)
            self.tokenizer.save_pretrained(final)
            metrics = self.out / "metrics.jsonl"
            if self.cfg.plot and metrics.exists():
                plot_curves(metrics, self.out / "curves.png")
            before, after = self.evals.get("before_grpo"), self.evals.get("after_grpo")
            if before and after:
                print(
                    f"held-out accuracy (greedy, {before['total']} problems):\n"
                    f"  before GRPO (step {before['step']}): {100 * before['accuracy']:5.1f}%\n"
                    f"  after GRPO  (step {after['step']}): {100 * after['accuracy']:5.1f}%   "
                    f"({100 * (after['accuracy'] - before['accuracy']):+.1f} points)"
                )
            print(f"parameters: {trainable:,} trainable of {total:,}")
            print(f"metrics: {metrics}   model: {final}")
        self.dist.barrier()
        return summary


def train(config: TrainConfig) -> dict:
    """Build a :class:`Trainer` and run it (``grpo-train``)."""
    trainer = Trainer(config)
    try:
        return trainer.run()
    finally:
        trainer.dist.close()
