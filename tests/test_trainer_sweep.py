"""grpo-train sweep: the grid, the budget, one directory per run, the table and the plot, resume, bad commands."""

import json
import statistics

import pytest

import tests.trainer_helpers as helpers
from grpo_kernels.trainer.checkpoint import list_checkpoints
from grpo_kernels.trainer.cli import main
from grpo_kernels.trainer.metrics import read_metrics
from grpo_kernels.trainer.sweep import DONE, SweepError, split_axes, sweep
from tests.trainer_helpers import tiny_cli_args


def _args(tmp_path, **overrides):
    """Tiny runs (1 warm-up + 1 GRPO step) as grpo-train flags; --num-generations and the seed come from the grid."""
    flags = tiny_cli_args(tmp_path / "unused", sft_steps=1, steps=1, eval_size=4, save_every=1, **overrides)
    return flags[2:]  # without --output-dir: the sweep sets it


def test_split_axes():
    axes, rest = split_axes(
        [
            "--num-generations",
            "2,4",
            "--beta=0,0.1",
            "--steps",
            "3",
            "--lora-target-modules",
            "q_proj,v_proj",
            "--loss-type",
            "grpo,dapo",
        ]
    )
    assert axes == {"num_generations": [2, 4], "beta": [0.0, 0.1], "loss_type": ["grpo", "dapo"]}
    assert rest == ["--steps", "3", "--lora-target-modules", "q_proj,v_proj"]  # a free-text flag is never an axis


def test_sweep_runs_the_grid_resumes_and_summarises(tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    reward = ["tests.trainer_helpers:interrupting_reward"]
    argv = [
        "--num-generations",
        "2,4",
        "--seeds",
        "0,1",
        "--budget",
        "completions",
        "--completions-per-step",
        "8",
        "--sweep-dir",
        str(root),
        *_args(tmp_path, rewards=reward),
    ]

    # Interrupted inside the 3rd run's GRPO step (the reward's 3rd call: one GRPO step per run), after its warm-up
    # step's checkpoint: two runs finished, the third resumes from its checkpoint, the fourth starts.
    helpers.reset_calls()
    monkeypatch.setenv("GRPO_TEST_INTERRUPT_AT", "3")
    with pytest.raises(KeyboardInterrupt):
        sweep(argv)
    monkeypatch.delenv("GRPO_TEST_INTERRUPT_AT")
    names = [
        "num_generations=2_seed=0",
        "num_generations=2_seed=1",
        "num_generations=4_seed=0",
        "num_generations=4_seed=1",
    ]
    runs = root / "runs"
    assert [(runs / n / DONE).is_file() for n in names] == [True, True, False, False]
    finished = {n: (runs / n / "metrics.jsonl").read_bytes() for n in names[:2]}
    done_marks = {n: (runs / n / DONE).stat().st_mtime_ns for n in names[:2]}

    out = sweep(argv)  # the same command resumes: finished runs skipped
    assert all((runs / n / DONE).is_file() for n in names)
    assert all((runs / n / "metrics.jsonl").read_bytes() == finished[n] for n in names[:2])
    assert all((runs / n / DONE).stat().st_mtime_ns == done_marks[n] for n in names[:2])
    assert [json.loads((runs / n / DONE).read_text())["resumed"] for n in names[2:]] == [True, False]

    # The budget: 8 completions per step = 8 / G prompts of G completions (read back from each run's checkpoint).
    for name, group in zip(names, (2, 2, 4, 4), strict=True):
        ckpt = list_checkpoints(runs / name / "checkpoints")[-1]
        config = json.loads((ckpt / "state.json").read_text())["config"]
        assert (config["num_generations"], config["batch_prompts"], config["seed"]) == (
            group,
            8 // group,
            int(name[-1]),
        )

    # The table against the runs' own metrics.
    after = {
        n: [r for r in read_metrics(runs / n / "metrics.jsonl") if r.get("eval") == "after_grpo"][0] for n in names
    }
    tokens = {
        n: sum(
            r["completion_tokens"]
            for r in read_metrics(runs / n / "metrics.jsonl")
            if "phase" in r and r["phase"] == "grpo"
        )
        for n in names
    }
    for row, pair in zip(out["rows"], (names[:2], names[2:]), strict=True):
        accuracies = [after[n]["accuracy"] for n in pair]
        assert row["after"] == pytest.approx(statistics.fmean(accuracies))
        assert row["after_std"] == pytest.approx(statistics.stdev(accuracies))
        assert row["completion_tokens"] == pytest.approx(statistics.fmean(tokens[n] for n in pair))
        assert row["completions_per_step"] == 8 and row["runs"] == 2
    table = out["table"].read_text()
    assert "completions per step held at 8" in table and "| 2 | 4 | 8 | 2 |" in table and "| 4 | 2 | 8 | 2 |" in table
    assert out["png"].stat().st_size > 0

    with pytest.raises(SweepError, match="holds another sweep"):
        sweep(["2,8" if a == "2,4" else a for a in argv])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "2"], "needs one or two settings"),
        (["--num-generations", "2,4", "--beta", "0,1", "--lr", "1,2"], "got 3"),
        (["--num-generations", "2,4"], "--budget prompts"),
        (["--num-generations", "2,3", "--budget", "completions", "--completions-per-step", "8"], "not divisible"),
        (["--beta", "0,0.1", "--seed", "3"], "--seed is set by the sweep"),
        (["--beta", "0,0.1", "--output-dir", "x"], "--output-dir is set by the sweep"),
        (["--beta", "0,x"], "every value must be a float"),
        (["--beta", "0.1,0.1"], "a value is repeated"),
        (["--ref-mixup-alpha", "0.5,2", "--beta", "0.1", "--ref-sync-every", "1"], "--ref-mixup-alpha must be in"),
    ],
    ids=["no-axis", "three-axes", "no-budget", "budget", "seed", "output-dir", "type", "repeated", "run-check"],
)
def test_bad_sweeps_are_clear_errors(tmp_path, capsys, args, message):
    assert main(["sweep", "--sweep-dir", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grpo-train sweep: error: ") and message in err, err
    assert not (tmp_path / "s").exists()  # refused before any run


def test_sweep_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--seeds", "--budget", "--completions-per-step", "--jobs", "--sweep-dir"))
