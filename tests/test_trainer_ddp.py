"""DDP: ``torchrun --nproc_per_node=2 -m grpo_kernels.trainer`` on CPU (gloo) equals one process accumulating the
two ranks' micro-batches: same prompts, same sampled completions, same global token normaliser, same update."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo_kernels.trainer.loop import train
from grpo_kernels.trainer.metrics import TIMING_KEYS, read_metrics
from tests.trainer_helpers import tiny_cli_args, tiny_config

ROOT = Path(__file__).resolve().parents[1]


LORA = dict(lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lora_target_modules="q_proj,v_proj,lm_head")


@pytest.mark.parametrize("extra", [{}, pytest.param(LORA, marks=pytest.mark.slow)], ids=["full", "lora"])
def test_two_process_ddp_matches_gradient_accumulation(tmp_path, extra):
    torch.set_num_threads(1)
    settings = dict(sft_steps=2, steps=2, batch_prompts=4, sft_batch_size=8, beta=0.05, **extra)
    ddp_out = tmp_path / "ddp"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "grpo_kernels.trainer",
            *tiny_cli_args(ddp_out, grad_accum=1, **settings),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out accuracy" in result.stdout  # printed once, by rank 0

    single_out = tmp_path / "single"
    train(tiny_config(single_out, grad_accum=2, **settings))

    ddp, single = (read_metrics(d / "metrics.jsonl") for d in (ddp_out, single_out))
    assert [r["step"] for r in ddp] == [r["step"] for r in single] and len(ddp) == 6  # 4 steps + 2 held-out evals
    for a, b in zip(ddp, single, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - set(TIMING_KEYS):
            if isinstance(a[key], (int, float)) and not isinstance(a[key], bool):
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), (a["step"], key)
            else:  # phase names and the like (pytest >= 9.2 refuses approx of a str)
                assert a[key] == b[key], (a["step"], key)
    # Bitwise: with 2 ranks the all-reduce is one addition, the same one the single process does when it
    # accumulates its 2 micro-batches, and the world-size scaling (x2, then DDP's /2) is exact.
    final = "adapter_model.safetensors" if extra else "model.safetensors"  # LoRA: the DDP wrap is redone at GRPO start
    wa, wb = (load_file(str(d / "final" / final)) for d in (ddp_out, single_out))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
