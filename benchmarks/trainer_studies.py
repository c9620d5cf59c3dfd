"""Summarise the studies of ``benchmarks/trainer_studies.sh`` into one markdown page and a results folder.

    python -m benchmarks.trainer_studies OUT_DIR [--results DIR]

Reads each sweep's ``sweep.json`` and ``results.json`` (``grpo-train sweep``'s own numbers) and each single run's
``metrics.jsonl``, ``NAME.log`` (the parameter counts) and ``NAME.time`` (``/usr/bin/time -v``: wall time, CPU time,
peak resident memory). Writes ``studies.md`` and copies the sweeps' tables, plots and JSON, the single runs'
metrics and the machine description into ``--results`` (default: ``OUT_DIR/results``), the folder to commit.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
from pathlib import Path

SWEEPS = {
    "g-completions": "group size at a fixed 128 completions per step (prompts per step = 128 / G)",
    "g-prompts": "group size at a fixed 16 prompts per step (completions per step = 16 G)",
    "ref-sync": "reference sync every 10 optimizer steps (α = 0.6, TRL's default) against a frozen one, β = 0.04",
}
SINGLE = {
    "full": "full fine-tuning (the defaults)",
    "lora16-lr1e-4": "LoRA r = 16, α = 32, lr 1e-4 (the full run's)",
    "lora16-lr1e-3": "LoRA r = 16, α = 32, lr 1e-3",
    "learned": "`--reward learned --reward accuracy=0` (the learned reward only; the rule accuracy logged)",
}
SEEDS = (0, 1, 2)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _time_file(path: Path) -> dict:
    """Wall seconds, CPU seconds and peak RSS (MiB) from ``/usr/bin/time -v``."""
    text = path.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    seconds = 0.0
    for part in wall.split(":"):
        seconds = seconds * 60 + float(part)
    user = float(re.search(r"User time \(seconds\): (\S+)", text).group(1))
    system = float(re.search(r"System time \(seconds\): (\S+)", text).group(1))
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return {"wall_s": seconds, "cpu_s": user + system, "peak_rss_mib": rss_kib / 1024}


def single_run(out: Path, name: str) -> dict | None:
    run = out / name
    if not (run / "final").exists():
        return None
    records = _records(run / "metrics.jsonl")
    evals = {r["eval"]: r for r in records if "eval" in r}
    grpo = [r for r in records if r.get("phase") == "grpo"]
    params = re.search(r"parameters: ([\d,]+) trainable of ([\d,]+)", (out / f"{name}.log").read_text())
    half = len(grpo) // 2
    result = {
        "name": name,
        "before": evals["before_grpo"]["accuracy"],
        "after": evals["after_grpo"]["accuracy"],
        "train_accuracy_last_half": statistics.fmean(r["accuracy"] for r in grpo[half:]),
        "trainable_parameters": int(params.group(1).replace(",", "")) if params else None,
        "parameters": int(params.group(2).replace(",", "")) if params else None,
        **_time_file(out / f"{name}.time"),
    }
    if "reward/learned" in grpo[0]:
        result["learned_reward_last_half"] = statistics.fmean(r["reward/learned"] for r in grpo[half:])
    return result


def _pct(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f}% ± {100 * std:.1f}"


def _learning_speed(sweep: dict) -> list[str]:
    """Mean GRPO training reward over the first and the second half of the steps, per setting (results.json)."""
    lines = [
        "| setting | runs | reward, first half of the steps | reward, second half | completions per run |",
        "|---|---:|---:|---:|---:|",
    ]
    by_setting: dict[str, list[dict]] = {}
    for run in sweep["runs"]:
        by_setting.setdefault(", ".join(map(str, run["setting"])), []).append(run)
    for setting, runs in by_setting.items():
        half = len(runs[0]["rewards"]) // 2
        first = statistics.fmean(statistics.fmean(r["rewards"][:half]) for r in runs)
        second = statistics.fmean(statistics.fmean(r["rewards"][half:]) for r in runs)
        completions = runs[0]["completions_per_step"] * len(runs[0]["rewards"])
        lines.append(f"| {setting} | {len(runs)} | {first:.3f} | {second:.3f} | {completions} |")
    return lines


def summarise(out: Path, results: Path) -> str:
    results.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "machine.txt", results / "machine.txt")
    lines = ["# grpo-train studies on the built-in task", "", "Machine and versions: `machine.txt`.", ""]
    for sweep_name, what in SWEEPS.items():
        sweep_dir = out / sweep_name
        if not (sweep_dir / "results.json").exists():
            lines += [f"## {sweep_name}: not finished", ""]
            continue
        target = results / sweep_name
        target.mkdir(exist_ok=True)
        for file in ("sweep.md", "sweep.png", "sweep.json", "results.json"):
            shutil.copy(sweep_dir / file, target / file)
        sweep = json.loads((sweep_dir / "results.json").read_text())
        table = (sweep_dir / "sweep.md").read_text().split("\n", 2)[2]  # without its title
        lines += [f"## {sweep_name}: {what}", "", table.strip(), "", f"![{sweep_name}]({sweep_name}/sweep.png)", ""]
        lines += ["Mean training reward (all seeds) over the first and the second half of GRPO:", ""]
        lines += [*_learning_speed(sweep), ""]
    rows = []
    for kind, what in SINGLE.items():
        runs = [r for s in SEEDS if (r := single_run(out, f"{kind}-{s}")) is not None]
        for run in runs:
            (results / "runs").mkdir(exist_ok=True)
            shutil.copy(out / run["name"] / "metrics.jsonl", results / "runs" / f"{run['name']}.metrics.jsonl")
            shutil.copy(out / f"{run['name']}.time", results / "runs" / f"{run['name']}.time")
        if not runs:
            rows.append(f"| {what} | 0 | – | – | – | – | – | – | – |")
            continue
        learned = [r["learned_reward_last_half"] for r in runs if "learned_reward_last_half" in r]
        rows.append(
            f"| {what} | {len(runs)} | {_pct([r['before'] for r in runs])} | {_pct([r['after'] for r in runs])} | "
            f"{_pct([r['train_accuracy_last_half'] for r in runs])} | "
            + (f"{statistics.fmean(learned):.3f}" if learned else "–")
            + f" | {runs[0]['trainable_parameters']:,} of {runs[0]['parameters']:,} | "
            f"{statistics.fmean(r['wall_s'] for r in runs):.0f} (cpu {statistics.fmean(r['cpu_s'] for r in runs):.0f})"
            f" | {max(r['peak_rss_mib'] for r in runs):.0f} |"
        )
    lines += [
        "## Single runs: full fine-tuning, LoRA, the learned reward (seeds 0, 1, 2, one process each)",
        "",
        "Accuracy: greedy held-out (256 problems), mean ± sample std over the seeds; training accuracy: the rule "
        "accuracy of the sampled completions over the second half of GRPO; learned reward: its mean over the same "
        "steps; wall / cpu: seconds per run from `/usr/bin/time -v`; peak: the largest maximum resident set size "
        "of the three runs (MiB).",
        "",
        "| run | seeds | accuracy before GRPO | after GRPO | training accuracy, 2nd half | learned reward, 2nd half "
        "| trainable parameters | wall s (cpu s) | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    text = "\n".join(lines)
    (results / "studies.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the OUT_DIR given to trainer_studies.sh")
    parser.add_argument("--results", type=Path, help="folder to write (default: OUT_DIR/results)")
    args = parser.parse_args(argv)
    print(summarise(args.out, args.results or args.out / "results"))


if __name__ == "__main__":
    main()
