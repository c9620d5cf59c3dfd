"""One optimizer step of grpo_kernels' GRPOTrainer and of stock ``trl.GRPOTrainer`` under a multi-process engine.

Run by tests/test_integration_trl_distributed.py through ``torchrun --nproc_per_node=2``::

    python -m torch.distributed.run --nproc_per_node=2 tests/trl_distributed_worker.py MODEL_DIR OUT ENGINE

ENGINE: ``ddp``; ``fsdp2`` and ``fsdp2_tied`` (accelerate's FSDP2: a group per decoder layer, the embedding its
own group and [final norm, LM head] one more; with tied embeddings [final norm, embedding, LM head] is one group;
the test gives ``fsdp2_tied`` a model with tied embeddings); ``zero2``, ``zero3`` (DeepSpeed). Rank 0 writes ``OUT``
(torch.save): per trainer the loss path taken, where the engine put the head, the first log record and every
parameter, gathered.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_integration_trl import B, C, make_tokenizer, reward_len_e  # noqa: E402

_DS_BATCH = dict(train_micro_batch_size_per_gpu=B // 2, gradient_accumulation_steps=2, train_batch_size=2 * B)
ENGINES = {
    "ddp": {},
    "fsdp2": dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]}),
    "fsdp2_tied": dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]}),
    # explicit sizes: 2 per process x 2 accumulation steps x 2 processes ("auto" resolves world size 1 on CPU)
    "zero2": dict(deepspeed=dict(zero_optimization={"stage": 2}, **_DS_BATCH)),
    "zero3": dict(deepspeed=dict(zero_optimization={"stage": 3}, **_DS_BATCH)),
}


def allow_fsdp_on_cpu() -> None:
    """accelerate 1.15 turns its FSDP plugin on only for accelerator devices (``AcceleratorState`` checks
    ``distributed_type in [MULTI_GPU, MULTI_XPU, ...]``; on CPU the plugin is dropped without a word and the run is
    plain DDP). FSDP2 itself runs on CPU with gloo, so for the CPU test the gate is lifted: the state becomes
    ``DistributedType.FSDP`` with the plugin, and accelerate's own FSDP2 preparation (``fully_shard`` per layer and
    on the root) wraps the model, for stock TRL and ours alike."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = patched


def full_parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter whole, on CPU (collective under FSDP2 and ZeRO-3: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            out[name] = p.full_tensor().detach().cpu().clone()
        elif hasattr(p, "ds_id"):  # a ZeRO-3 partition
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().cpu().clone()
        else:
            out[name] = p.detach().cpu().clone()
    return {n.removeprefix("module."): t for n, t in out.items()}


def run(cls, model_dir, output_dir, engine, **extra):
    from datasets import Dataset
    from trl import GRPOConfig

    args = GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=B // 2,  # 2 processes: the global batch of the single-process tests
        num_generations=2,
        max_completion_length=C,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        bf16=False,
        # accelerate enables no DeepSpeed with cpu=True; without CUDA it runs on the CPU all the same
        use_cpu=not torch.cuda.is_available() and not engine.startswith("zero"),
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        beta=0.04,
        loss_type="grpo",
        **ENGINES[engine],
    )
    dataset = Dataset.from_dict({"prompt": ["hello", "the sky", "abc", "one two", "why", "a, b", "go!", "it is"]})
    trainer = cls(
        model=model_dir,
        reward_funcs=reward_len_e,
        args=args,
        train_dataset=dataset,
        processing_class=make_tokenizer(),
        **extra,
    )
    trainer.train()
    from torch.distributed.tensor import DTensor

    model = trainer.model_wrapped if engine.startswith("zero") else trainer.model
    return {
        "loss_path": getattr(trainer, "loss_path", None),
        "in_head_forward": getattr(trainer, "_loss_in_head_forward", None),
        "sharded": any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters()),
        "head_group": type(trainer.model.get_output_embeddings()).__name__.startswith("FSDP"),
        "log": trainer.state.log_history[0],
        "parameters": full_parameters(model),
    }


def main(model_dir: str, out: str, engine: str) -> None:
    from trl import GRPOTrainer as StockTrainer

    from grpo_kernels.integrations.trl import GRPOTrainer

    torch.set_num_threads(1)
    if engine.startswith("fsdp") and not torch.cuda.is_available():
        allow_fsdp_on_cpu()
    results = {
        "ours": run(GRPOTrainer, model_dir, Path(out).parent / "ours", engine, loss_path="fused_linear"),
        "stock": run(StockTrainer, model_dir, Path(out).parent / "stock", engine),
    }
    if dist.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
