"""FSDP2 (``--fsdp``): ``torchrun --nproc_per_node=2`` on CPU (gloo) against one process accumulating the two ranks'
micro-batches, and a SIGKILL in the middle of a step followed by ``--resume`` against the uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tests.trainer_helpers as helpers
from grpo_kernels.trainer import checkpoint
from grpo_kernels.trainer.loop import train
from grpo_kernels.trainer.metrics import TIMING_KEYS, read_metrics
from tests.trainer_helpers import tiny_cli_args, tiny_config

ROOT = Path(__file__).resolve().parents[1]
# beta > 0: the sharded reference copy; num_iterations 2: old log-probs; 2 micro-batches per rank; kill in step 5.
SETTINGS = dict(
    sft_steps=2,
    steps=4,
    batch_prompts=4,
    sft_batch_size=8,
    beta=0.05,
    ref_sync_every=3,  # the sharded reference mixed shard into shard (optimizer steps 3 and 6: in GRPO steps 2 and 3)
    ref_mixup_alpha=0.5,
    num_iterations=2,
    save_every=3,
    rewards=["tests.trainer_helpers:interrupting_reward"],
    eval_size=9,  # held-out batches of 4: rank 0 runs 2 (5 problems), rank 1 runs 1, so FSDP must not gather per batch
    eval_batch_size=4,
)


def _torchrun(out, *extra, env_extra=None, wait=True, **settings):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args += ["-m", "grpo_kernels.trainer", *tiny_cli_args(out, fsdp=True, **settings), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if wait:
        return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _stable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_two_process_fsdp_matches_one_process_accumulating(tmp_path):
    torch.set_num_threads(1)
    fsdp_out = tmp_path / "fsdp"
    result = _torchrun(fsdp_out, grad_accum=2, **SETTINGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out accuracy" in result.stdout  # printed once, by rank 0

    helpers.reset_calls()
    single_out = tmp_path / "single"
    train(tiny_config(single_out, grad_accum=4, **SETTINGS))

    fsdp_records, single = (read_metrics(d / "metrics.jsonl") for d in (fsdp_out, single_out))
    assert [r["step"] for r in fsdp_records] == [r["step"] for r in single] and len(single) == 8
    worst = {}
    for a, b in zip(fsdp_records, single, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - set(TIMING_KEYS):
            if isinstance(a[key], (int, float)) and not isinstance(a[key], bool):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
            else:
                assert a[key] == b[key], (a["step"], key)
    wa, wb = (load_file(str(d / "final" / "model.safetensors")) for d in (fsdp_out, single_out))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
        worst[k] = (wa[k] - wb[k]).abs().max().item()
    print("max |fsdp - single| per tensor:", max(worst.values()))


@pytest.mark.slow  # three 2-process runs: about 120 s on the shared 2-core machine
def test_fsdp_resumes_exactly_after_sigkill_of_every_process(tmp_path):
    straight = tmp_path / "straight"
    result = _torchrun(straight, grad_accum=2, **SETTINGS)
    assert result.returncode == 0, result.stderr[-3000:]
    fsdp_records = read_metrics(straight / "metrics.jsonl")

    killed, marker = tmp_path / "killed", tmp_path / "marker"
    proc = _torchrun(
        killed,
        grad_accum=2,
        env_extra={"GRPO_TEST_BLOCK_AT": "5", "GRPO_TEST_MARKER": str(marker)},
        wait=False,
        **SETTINGS,
    )  # reward call 5 of a rank: the 1st micro-batch of step 5 (2 per step); checkpoint 3 and step 4 exist
    deadline = time.monotonic() + 300
    while not (marker.exists() and len(marker.read_text().split()) == 2):  # both ranks inside the step
        assert proc.poll() is None, f"the trainer exited early: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the trainer never reached the blocking reward call"
        time.sleep(0.2)
    # a node failure: torchrun and both workers (each in a session of its own) die at once
    for pid in [proc.pid, *map(int, marker.read_text().split())]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert [r["step"] for r in read_metrics(killed / "metrics.jsonl") if "phase" in r] == [1, 2, 3, 4]
    assert [p.name for p in checkpoint.list_checkpoints(killed / "checkpoints")] == ["step_00000003"]

    resumed = _torchrun(killed, "--resume", grad_accum=2, **SETTINGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _stable(read_metrics(killed / "metrics.jsonl")) == _stable(fsdp_records)
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_refuses_one_process_and_lora(tmp_path):
    with pytest.raises(ValueError, match="--fsdp shards the model over torchrun's processes"):
        train(tiny_config(tmp_path, fsdp=True))
    with pytest.raises(ValueError, match="--fsdp cannot be used with --lora-r"):
        tiny_config(tmp_path, fsdp=True, lora_r=4).resolved()
