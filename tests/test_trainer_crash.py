"""Crash-safe training: SIGKILL in the middle of a step, then --resume; atomic and verified checkpoints."""

import json
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
from grpo_kernels.trainer.checkpoint import CheckpointError, repair_metrics, save_checkpoint, verify_checkpoint
from grpo_kernels.trainer.cli import main
from grpo_kernels.trainer.loop import train
from grpo_kernels.trainer.metrics import TIMING_KEYS, read_metrics
from tests.trainer_helpers import tiny_cli_args, tiny_config

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(sft_steps=2, steps=4, save_every=3, rewards=["tests.trainer_helpers:interrupting_reward"])


def _stable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _run_cli(out, env_extra, *extra_args, wait, settings=COMMON):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env_extra}
    args = [sys.executable, "-m", "grpo_kernels.trainer", *tiny_cli_args(out, **settings), *extra_args]
    if wait:
        return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_step_then_resume_loses_and_repeats_nothing(tmp_path):
    torch.set_num_threads(1)  # the same float reductions as the subprocesses (OMP_NUM_THREADS=1)
    helpers.reset_calls()
    straight = tmp_path / "straight"
    train(tiny_config(straight, **COMMON))

    out, marker = tmp_path / "killed", tmp_path / "marker"
    # The 3rd GRPO reward call is in step 5: checkpoint 3 exists, step 4 is logged, step 5 is half done.
    proc = _run_cli(out, {"GRPO_TEST_BLOCK_AT": "3", "GRPO_TEST_MARKER": str(marker)}, wait=False)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, f"the trainer exited early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the trainer never reached the blocking reward call"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "phase" in r] == [1, 2, 3, 4]
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["step_00000003"]
    with (out / "metrics.jsonl").open("a") as f:  # and a record torn by a kill during its write
        f.write('{"step": 5, "phase": "grp')

    resumed = _run_cli(out, {}, "--resume", wait=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _stable(read_metrics(out / "metrics.jsonl")) == _stable(read_metrics(straight / "metrics.jsonl"))
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (straight, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _kill_mid_step(out, marker, block_at, settings):
    """Start grpo-train, SIGKILL it inside reward call number ``block_at`` (in the middle of a step)."""
    proc = _run_cli(
        out, {"GRPO_TEST_BLOCK_AT": str(block_at), "GRPO_TEST_MARKER": str(marker)}, wait=False, settings=settings
    )
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, f"the trainer exited early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the trainer never reached the blocking reward call"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _tiny_model_dir(path):
    from grpo_kernels.trainer.model import builtin_tokenizer, tiny_model

    torch.manual_seed(0)
    tokenizer = builtin_tokenizer()
    tiny_model(tokenizer, hidden_size=32, num_layers=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "variant", ["lora-reward-models", pytest.param("ref-sync", marks=pytest.mark.slow)]
)  # the ref-sync case is resumed after an in-process interrupt by default (test_trainer_ref_sync.py)
def test_sigkill_then_resume_with_the_new_options(tmp_path, variant):
    """SIGKILL mid-step and --resume with (a) LoRA on a --model directory (adapter-only checkpoints, the reference
    through disabled adapters), a --reward-model and --reward learned (its model trained once, before the kill, and
    reused); (b) --ref-sync-every. Same metrics and final weights as an uninterrupted run."""
    torch.set_num_threads(1)
    interrupting = "tests.trainer_helpers:interrupting_reward"
    if variant == "lora-reward-models":
        reward_model = helpers.tiny_reward_model_dir(tmp_path / "rm")
        settings = dict(
            model=str(_tiny_model_dir(tmp_path / "base")),
            sft_steps=0,
            steps=6,
            save_every=3,
            beta=0.05,
            lora_r=4,
            lora_alpha=8.0,
            lora_target_modules="q_proj,v_proj,lm_head",
            rewards=[interrupting, "learned=0.5"],
            learned_reward_steps=10,
            reward_models=[f"{reward_model}=0.5"],
        )
        block_at, final = 5, "adapter_model.safetensors"  # GRPO step 5: checkpoint 3, step 4 logged
    else:
        settings = dict(
            sft_steps=2, steps=4, save_every=3, beta=0.05, ref_sync_every=2, ref_mixup_alpha=0.5, rewards=[interrupting]
        )
        block_at, final = 3, "model.safetensors"  # step 5 (the 3rd GRPO step): checkpoint 3, step 4 logged
    helpers.reset_calls()
    straight = tmp_path / "straight"
    train(tiny_config(straight, **settings))

    out = tmp_path / "killed"
    _kill_mid_step(out, tmp_path / "marker", block_at, settings)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "phase" in r][-1] == 4
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["step_00000003"]
    if variant == "lora-reward-models":
        assert (out / "checkpoints" / "step_00000003" / "adapter.safetensors").is_file()
        trained = (out / "reward_model" / "model.safetensors").stat().st_mtime_ns

    helpers.reset_calls()
    train(tiny_config(out, resume="latest", **settings))
    if variant == "lora-reward-models":
        assert (out / "reward_model" / "model.safetensors").stat().st_mtime_ns == trained  # not trained again
    assert _stable(read_metrics(out / "metrics.jsonl")) == _stable(read_metrics(straight / "metrics.jsonl"))
    a, b = (load_file(str(d / "final" / final)) for d in (straight, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupted_or_partial_checkpoint_is_a_clear_error(tmp_path, capsys):
    train(tiny_config(tmp_path, sft_steps=1, steps=1, save_every=1, eval_size=0))
    latest = checkpoint.list_checkpoints(tmp_path / "checkpoints")[-1]
    verify_checkpoint(latest)

    model_file = latest / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle of the weights
    model_file.write_bytes(bytes(data))
    assert main(tiny_cli_args(tmp_path, sft_steps=1, steps=1, eval_size=0) + ["--resume"]) == 2
    assert "is corrupted: the sha256 of model.safetensors does not match" in capsys.readouterr().err

    model_file.write_bytes(bytes(data[:-100]))  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors has .* bytes, expected"):
        verify_checkpoint(latest)
    (latest / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="is partial: it has no manifest.json"):
        verify_checkpoint(latest)
    with pytest.raises(CheckpointError, match="does not exist"):
        verify_checkpoint(tmp_path / "checkpoints" / "step_99999999")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, models={"model": model}, tensors={}, state={"step": 1}, keep=2)

    def crash(path):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, "_sha256", crash)  # dies after the files are written, before the manifest
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(root, 2, models={"model": model}, tensors={}, state={"step": 2}, keep=2)
    monkeypatch.undo()
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step_00000001"]  # step 2 never appeared
    assert (root / ".step_00000002.tmp").is_dir()
    checkpoint.remove_partial_checkpoints(root)
    assert not (root / ".step_00000002.tmp").exists()

    for step in (2, 3, 4):
        save_checkpoint(root, step, models={"model": model}, tensors={}, state={"step": step}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step_00000003", "step_00000004"]


def test_repair_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "phase": "grpo"} for s in range(1, 6)] + [{"step": 3, "eval": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "ph')
    assert repair_metrics(path, 3) == 4
    assert read_metrics(path) == records[:3] + [records[-1]]

    path.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(CheckpointError, match=r"metrics.jsonl:2: malformed metrics record"):
        repair_metrics(path, 3)
