"""Metrics: one JSON record per line (``metrics.jsonl``) and a PNG of the curves at the end.

Step records: ``{"step", "phase": "sft" | "grpo", ...}``; held-out results: ``{"step", "eval": name, "accuracy",
"correct", "total"}``. Every record of step k is written before checkpoint k, which is what lets a resume cut the file
back to exactly the checkpoint (:func:`grpo_kernels.trainer.checkpoint.repair_metrics`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# Keys that measure the machine rather than the training; everything else is reproducible run to run.
TIMING_KEYS = ("step_time", "generation_time", "tokens_per_s")


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    """Loss, reward, accuracy, KL, entropy and completion length against the step (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    steps = [r for r in records if "phase" in r]
    evals = [r for r in records if "eval" in r]
    panels = [
        ("loss", "loss"),
        ("reward_mean", "reward (mean)"),
        ("accuracy", "accuracy (train samples)"),
        ("kl", "KL to reference (beta > 0)"),
        ("entropy", "entropy (nats)"),
        ("completion_length", "completion tokens"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for phase, style in (("sft", "C1"), ("grpo", "C0")):
            points = [(r["step"], r[key]) for r in steps if r["phase"] == phase and key in r and math.isfinite(r[key])]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=phase, linewidth=1)
        if key == "accuracy" and evals:
            ax.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "ks", label="held-out (greedy)")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
