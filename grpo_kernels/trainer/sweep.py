"""``grpo-train sweep``: one run per point of a grid of one or two settings and per seed, then a table and a plot.

    grpo-train sweep --num-generations 2,4,8,16 --seeds 0,1,2 --budget completions --sweep-dir sweeps/group-size
    grpo-train sweep --beta 0,0.04 --loss-type grpo,dapo --seeds 0,1 --jobs 2 --steps 40

Any ``grpo-train`` flag of a number or of a fixed set of choices whose value is a comma-separated list is an axis of
the grid (at most two); every other flag goes to each run unchanged. Each run has its own output directory,
``SWEEP_DIR/runs/<axis>=<value>_seed=<seed>/``, and is marked finished by ``sweep_run.json`` there. Running the same
command again resumes the sweep: finished runs are skipped, an interrupted run continues from its latest checkpoint
(``--resume``, exact) or, without one, starts again.

When the group size (``--num-generations``) is an axis, ``--budget`` says what stays fixed across its values:
``prompts`` (``--batch-prompts`` prompts per step, so ``G`` times as many completions) or ``completions``
(``--completions-per-step`` completions, so ``N / G`` prompts per step).

Output: ``SWEEP_DIR/sweep.md`` (per setting: held-out accuracy before and after GRPO, mean +- sample std over the
seeds; wall time; completion tokens generated in GRPO) and ``SWEEP_DIR/sweep.png`` (the smoothed mean reward curve
of each setting; the held-out accuracy after GRPO against the setting, error bars one std).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import list_checkpoints
from .config import TrainConfig
from .metrics import read_metrics

DONE = "sweep_run.json"  # written into a run's directory when it has finished


class SweepError(ValueError):
    """A bad sweep command, a sweep directory holding another sweep, or a failed run; the message says which."""


@dataclass
class Run:
    name: str
    setting: tuple  # the values of the axes, in axis order
    seed: int
    argv: list[str]  # grpo-train flags, --output-dir included
    out: Path


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _axis_type(name: str):
    """The type of a setting that can be an axis (a number or a choice), or None."""
    field = _fields().get(name)
    if field is None:
        return None
    hint = typing.get_type_hints(TrainConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = args[0]
    if kind in (int, float) or (kind is str and field.metadata.get("choices")):
        return kind
    return None


def split_axes(args: list[str]) -> tuple[dict[str, list], list[str]]:
    """``(axes, rest)``: every ``--flag v1,v2,...`` of an axis-able setting becomes ``axes[name] = [v1, v2, ...]``."""
    axes, rest, i = {}, [], 0
    while i < len(args):
        token = args[i]
        flag, eq, inline = token.partition("=")
        name = flag[2:].replace("-", "_") if flag.startswith("--") else None
        kind = _axis_type(name) if name else None
        value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
        if kind is not None and value is not None and "," in value:
            try:
                axes[name] = [kind(v) for v in value.split(",")]
            except ValueError:
                raise SweepError(f"{flag} {value!r}: every value must be a {kind.__name__}") from None
            i += 1 if eq else 2
            continue
        rest.append(token)
        i += 1
    return axes, rest


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_of(rest: list[str], name: str):
    """The value the runs' flags give ``name`` (the last occurrence wins, as argparse does), else the default."""
    from .cli import build_parser

    return getattr(build_parser().parse_args(rest), name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo-train sweep",
        allow_abbrev=False,  # --seed (a run's flag, refused) must not read as --seeds
        description="Run grpo-train over a grid of one or two settings (a flag given a comma-separated list of "
        "values) and several seeds; write a markdown table and a PNG. Every other flag goes to each run.",
    )
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each setting runs once per seed")
    parser.add_argument("--sweep-dir", default="grpo-sweep", help="runs/, sweep.md, sweep.png and sweep.json go here")
    parser.add_argument(
        "--budget",
        choices=("prompts", "completions"),
        default=None,
        help="with --num-generations as an axis: hold the prompts per step fixed, or the completions per step",
    )
    parser.add_argument(
        "--completions-per-step",
        type=int,
        default=None,
        help="--budget completions: completions per step (default: --batch-prompts x "
        "--num-generations of the flags, or their defaults)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time: 1 runs them one after another in this process; more start "
        "`python -m grpo_kernels.trainer` processes (OMP_NUM_THREADS = cores / jobs unless "
        "set)",
    )
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window of the reward curves (steps)")
    return parser


def plan(options: argparse.Namespace, train_args: list[str]) -> tuple[dict, list[Run], dict]:
    """``(axes, runs, description)`` of a sweep command, every run's flags checked before anything runs."""
    from .cli import build_parser as train_parser

    axes, rest = split_axes(train_args)
    if not 1 <= len(axes) <= 2:
        raise SweepError(
            f"a sweep needs one or two settings given as comma-separated lists (e.g. --num-generations "
            f"2,4,8), got {len(axes)}: {', '.join(axes) or 'none'}"
        )
    for name in ("output_dir", "seed", "resume", "overwrite"):
        if any(a == _flag(name) or a.startswith(_flag(name) + "=") for a in rest):
            raise SweepError(f"{_flag(name)} is set by the sweep for each run (use --sweep-dir and --seeds)")
    try:
        seeds = [int(s) for s in options.seeds.split(",")]
    except ValueError:
        raise SweepError(f"--seeds {options.seeds!r}: expected comma-separated integers") from None
    if options.jobs < 1:
        raise SweepError(f"--jobs must be >= 1, got {options.jobs}")
    if options.smooth < 1:
        raise SweepError(f"--smooth must be >= 1, got {options.smooth}")
    for name, values in axes.items():
        if len(set(values)) != len(values):
            raise SweepError(f"{_flag(name)}: a value is repeated in {values}")

    budget = options.budget
    group_axis = "num_generations" in axes
    if group_axis and budget is None:
        raise SweepError(
            "--num-generations is an axis: say what stays fixed with --budget prompts (prompts per step) "
            "or --budget completions (completions per step)"
        )
    prompts = _value_of(rest, "batch_prompts")
    completions = options.completions_per_step
    if budget == "completions":
        completions = completions or prompts * _value_of(rest, "num_generations")
    elif completions is not None:
        raise SweepError("--completions-per-step goes with --budget completions")

    root = Path(options.sweep_dir)
    runs = []
    for setting in itertools.product(*axes.values()):
        for seed in seeds:
            name = "_".join(f"{k}={v}" for k, v in zip(axes, setting, strict=True)) + f"_seed={seed}"
            argv = list(rest)
            for k, v in zip(axes, setting, strict=True):
                argv += [_flag(k), str(v)]
            values = dict(zip(axes, setting, strict=True))
            if budget == "completions":
                group = values.get("num_generations", _value_of(rest, "num_generations"))
                if completions % group:
                    raise SweepError(
                        f"--completions-per-step {completions} is not divisible by --num-generations {group}"
                    )
                argv += ["--batch-prompts", str(completions // group)]
            out = root / "runs" / name
            argv += ["--seed", str(seed), "--output-dir", str(out), "--no-progress"]
            try:
                TrainConfig(**vars(train_parser().parse_args(argv))).resolved()
            except ValueError as e:
                raise SweepError(f"run {name}: {e}") from None
            runs.append(Run(name, setting, seed, argv, out))
    if budget == "completions":
        held = f"completions per step held at {completions} (prompts per step = {completions} / num_generations)"
    elif group_axis:
        held = f"prompts per step held at {prompts} (completions per step = {prompts} x num_generations)"
    else:
        held = f"prompts per step {prompts}, completions per step {prompts} x num_generations"
    description = {
        "axes": axes,
        "seeds": seeds,
        "flags": rest,
        "budget": budget,
        "held": held,
        "completions_per_step": completions,
    }
    return axes, runs, description


# ----------------------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------------------
def _attempt_args(run: Run) -> tuple[list[str], bool]:
    """The run's flags for this attempt: --resume when it has a checkpoint, --overwrite when it left anything else."""
    if list_checkpoints(run.out / "checkpoints"):
        return [*run.argv, "--resume"], True
    if run.out.exists() and any(run.out.iterdir()):
        return [*run.argv, "--overwrite"], False
    return list(run.argv), False


def _mark_done(run: Run, wall: float, resumed: bool) -> None:
    tmp = run.out / f".{DONE}.tmp"
    tmp.write_text(json.dumps({"wall_time_s": wall, "resumed": resumed, "argv": run.argv}, indent=1))
    os.replace(tmp, run.out / DONE)


def _run_in_process(run: Run) -> None:
    from .cli import main

    argv, resumed = _attempt_args(run)
    print(f"grpo-train sweep: {run.name}{' (resumed)' if resumed else ''}", flush=True)
    start = time.perf_counter()
    code = main(argv)
    if code != 0:
        raise SweepError(f"run {run.name} failed (exit code {code}); fix it and run the sweep again to resume")
    _mark_done(run, time.perf_counter() - start, resumed)


def _run_subprocess(run: Run, env: dict) -> str | None:
    """Runs ``python -m grpo_kernels.trainer``; its output goes to ``run.out/log.txt``. The error, or None."""
    argv, resumed = _attempt_args(run)
    run.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (run.out / "log.txt").open("a") as log:
        code = subprocess.call([sys.executable, "-m", "grpo_kernels.trainer", *argv], stdout=log, stderr=log, env=env)
    if code != 0:
        return f"run {run.name} failed (exit code {code}, see {run.out / 'log.txt'})"
    _mark_done(run, time.perf_counter() - start, resumed)
    return None


def run_sweep(runs: list[Run], jobs: int) -> None:
    todo = [r for r in runs if not (r.out / DONE).is_file()]
    for run in runs:
        if run not in todo:
            print(f"grpo-train sweep: {run.name} finished already, skipped", flush=True)
    if jobs == 1:
        for run in todo:
            _run_in_process(run)
        return
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        errors = [e for e in pool.map(lambda r: _run_subprocess(r, env), todo) if e]
    if errors:
        raise SweepError("; ".join(errors) + "; run the sweep again to resume")


# ----------------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------------
def run_result(run: Run) -> dict:
    """What the table and the plot need from one finished run (read from its metrics.jsonl)."""
    records = read_metrics(run.out / "metrics.jsonl")
    evals = {r["eval"]: r for r in records if "eval" in r}
    grpo = [r for r in records if r.get("phase") == "grpo"]
    done = json.loads((run.out / DONE).read_text())
    return {
        "name": run.name,
        "setting": list(run.setting),
        "seed": run.seed,
        "before": evals["before_grpo"]["accuracy"] if "before_grpo" in evals else None,
        "after": evals["after_grpo"]["accuracy"] if "after_grpo" in evals else None,
        "wall_time_s": done["wall_time_s"],
        "resumed": done["resumed"],
        "completion_tokens": sum(r["completion_tokens"] for r in grpo),
        "rewards": [r["reward_mean"] for r in grpo],
        "prompts_per_step": _value_of(run.argv, "batch_prompts"),
        "completions_per_step": _value_of(run.argv, "batch_prompts") * _value_of(run.argv, "num_generations"),
    }


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(axes: dict, results: list[dict]) -> list[dict]:
    """One row per setting: the statistics over its seeds."""
    rows = []
    for setting in itertools.product(*axes.values()):
        group = [r for r in results if tuple(r["setting"]) == setting]
        before, before_std = _mean_std([r["before"] for r in group])
        after, after_std = _mean_std([r["after"] for r in group])
        rows.append(
            {
                "setting": list(setting),
                "runs": len(group),
                "seeds": [r["seed"] for r in group],
                "prompts_per_step": group[0]["prompts_per_step"],
                "completions_per_step": group[0]["completions_per_step"],
                "before": before,
                "before_std": before_std,
                "after": after,
                "after_std": after_std,
                "wall_time_s": statistics.fmean(r["wall_time_s"] for r in group),
                "completion_tokens": statistics.fmean(r["completion_tokens"] for r in group),
            }
        )
    return rows


def _percent(mean, std) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}%" + ("" if std is None else f" ± {100 * std:.1f}")


def markdown_table(axes: dict, rows: list[dict], description: dict) -> str:
    names = list(axes)
    lines = [
        f"# grpo-train sweep over {' x '.join(names)}",
        "",
        f"Budget: {description['held']}. Seeds: {', '.join(map(str, description['seeds']))}. "
        f"Flags of every run: `{' '.join(description['flags']) or '(defaults)'}`.",
        "Held-out accuracy: greedy, mean ± sample std over the seeds. Wall time: mean per run (start-up, warm-up, "
        "GRPO and evaluation; of the last attempt when a run was resumed). Tokens: completion tokens sampled in GRPO.",
        "",
        "| " + " | ".join(names) + " | prompts/step | completions/step | runs | accuracy before GRPO | "
        "accuracy after GRPO | wall time (s) | tokens generated |",
        "|" + "---:|" * (len(names) + 7),
    ]
    for row in rows:
        cells = [
            *map(str, row["setting"]),
            str(row["prompts_per_step"]),
            str(row["completions_per_step"]),
            str(row["runs"]),
            _percent(row["before"], row["before_std"]),
            _percent(row["after"], row["after_std"]),
            f"{row['wall_time_s']:.1f}",
            f"{row['completion_tokens']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _smooth(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot_sweep(axes: dict, results: list[dict], rows: list[dict], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(axes)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for setting in itertools.product(*axes.values()):
        curves = [r["rewards"] for r in results if tuple(r["setting"]) == setting and r["rewards"]]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
        label = ", ".join(f"{k}={v}" for k, v in zip(names, setting, strict=True))
        left.plot(range(1, length + 1), _smooth(mean, window), label=label, linewidth=1.2)
    left.set(
        title=f"reward (mean over seeds, moving average of {window} steps)", xlabel="GRPO step", ylabel="reward_mean"
    )
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    first = axes[names[0]]
    for other in itertools.product(*list(axes.values())[1:]) if len(names) > 1 else [()]:
        picked = [r for r in rows if tuple(r["setting"][1:]) == other and r["after"] is not None]
        xs = [first.index(r["setting"][0]) for r in picked]
        label = ", ".join(f"{k}={v}" for k, v in zip(names[1:], other, strict=True)) or "after GRPO"
        right.errorbar(
            xs,
            [100 * r["after"] for r in picked],
            yerr=[100 * (r["after_std"] or 0) for r in picked],
            marker="o",
            capsize=4,
            label=label,
        )
    right.set_xticks(range(len(first)), [str(v) for v in first])
    right.set(title="held-out accuracy after GRPO (mean ± std over seeds)", xlabel=names[0], ylabel="accuracy (%)")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep(argv: list[str]) -> dict:
    """Run (or resume) a sweep; returns ``{"rows", "results", "table", "png"}``."""
    options, train_args = build_parser().parse_known_args(argv)
    axes, runs, description = plan(options, train_args)
    root = Path(options.sweep_dir)
    root.mkdir(parents=True, exist_ok=True)
    spec_path = root / "sweep.json"
    spec = json.loads(json.dumps({k: v for k, v in description.items() if k != "held"}))  # JSON-normalised
    if spec_path.exists():
        previous = json.loads(spec_path.read_text())
        if previous != spec:
            raise SweepError(
                f"{str(root)!r} holds another sweep ({previous}); use another --sweep-dir, or the same "
                "command to resume that one"
            )
    else:
        spec_path.write_text(json.dumps(spec, indent=1))
    run_sweep(runs, options.jobs)
    results = [run_result(r) for r in runs]
    rows = summarise(axes, results)
    table = markdown_table(axes, rows, description)
    (root / "sweep.md").write_text(table)
    (root / "results.json").write_text(json.dumps({"rows": rows, "runs": results}, indent=1))
    plot_sweep(axes, results, rows, root / "sweep.png", options.smooth)
    print(table)
    print(f"table: {root / 'sweep.md'}   plot: {root / 'sweep.png'}")
    return {"rows": rows, "results": results, "table": root / "sweep.md", "png": root / "sweep.png"}


def main(argv: list[str] | None = None) -> int:
    try:
        sweep(sys.argv[1:] if argv is None else argv)
    except SweepError as e:
        print(f"grpo-train sweep: error: {e}", file=sys.stderr)
        return 2
    return 0
