"""From ``results.json`` to ``report.md`` and one PNG per op; the goals check; the predictions table.

Every number shown is computed here from the raw measurements (median time, peak memory, check values) and the
case's byte / FLOP count and the ceilings of the run that took it, so a report can always be re-rendered
(``python -m benchmarks.report --render DIR``).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.cases import OPS, Case, flops, traffic
from benchmarks.providers import BASELINES, OURS, check_tolerance

TITLES = {
    "token_logprobs": "token_logprobs: log-probs, forward only (no gradient)",
    "token_logprobs_entropy_forward": "token_logprobs with entropy: forward only (no gradient)",
    "token_logprobs_entropy": "token_logprobs with entropy: forward + backward of both",
    "grpo_loss": "grpo_loss: forward + backward (dapo, clip 0.2, old log-probs given)",
    "group_advantages": "group_advantages: grouped z-score",
    "fused_linear_grpo_loss": "fused_linear_grpo_loss: from hidden states and the LM head, forward + backward",
    "distill_loss": "distill_loss: exact divergence to a teacher over the vocabulary, forward + backward",
    "grpo_loss_exact_kl": "grpo_loss, kl_estimator='exact': exact KL to the reference's logits, forward + backward",
}
# Goals from the issues (Triton #3, CUDA #4, fused-linear #5), checked on the case each issue names.
LOSS_GOALS = {
    "triton": (
        ("pct_copy", 85.0, "% of copy bandwidth, 3 passes"),
        ("x_liger", 1.2, "x Liger triton_grpo_loss"),
        ("x_trl", 1.5, "x TRL log-prob kernel + eager loss"),
        ("x_eager", 10.0, "x eager"),
    ),
    "cuda": (
        ("pct_copy_min", 85.0, "% of copy bandwidth, 2 passes"),
        ("x_liger", 1.5, "x Liger triton_grpo_loss"),
        ("x_eager", 10.0, "x eager"),
    ),
}
# The CUDA backend reads the logits twice (3 passes) unless the gradient is written in the forward
# (grad_in_forward=True: the sm_90 2-pass kernel): the 2-pass goals are checked on both.
LOSS_GOALS["cuda_gif"] = LOSS_GOALS["cuda"]
LOSS_GOAL_CASE = dict(op="grpo_loss", tokens=16384, vocab=151936, importance_sampling_level="token", beta=0.0)
FUSED_GOALS = (
    ("floor_ratio", 1.15, "time / matmul floor (at most)"),
    ("memory_ratio", 0.25, "peak / eager's (at most)"),
    ("x_trl", 1.0, "x TRL fused LM head (above)"),
    ("x_liger", 1.0, "x LigerFusedLinearGRPOLoss (above)"),
)
FUSED_GOAL_CASE = dict(
    op="fused_linear_grpo_loss", tokens=16384, hidden=4096, vocab=151936, importance_sampling_level="token", beta=0.0
)
# Issue 17: the GPU goal counts the bytes of our design (jsd: the forward reads both rows twice); the CPU goal is
# against torch.compile of the eager code (TRL's function), in time and in peak memory.
DISTILL_GOALS = {
    "triton": (("pct_copy", 85.0, "% of copy bandwidth, our bytes"),),
    "torch": (
        ("x_compile", 1.0, "x torch.compile of eager (above; a CPU goal)"),
        ("memory_ratio_compile", 1 / 3, "peak / torch.compile's (at most; a CPU goal)"),
    ),
}
DISTILL_GOAL_CASE = dict(op="distill_loss", tokens=16384, vocab=151936, divergence="jsd", beta=0.5)
AT_MOST = ("floor_ratio", "memory_ratio", "memory_ratio_compile")
SOFTWARE = (
    ("Python", "python"),
    ("torch", "torch"),
    ("triton", "triton"),
    ("liger-kernel", "liger_kernel"),
    ("trl", "trl"),
    ("transformers", "transformers"),
)
MIB = 2**20


# ----------------------------------------------------------------------------------------------------------------
# derived numbers
# ----------------------------------------------------------------------------------------------------------------
def derive(results: dict) -> list[dict]:
    """One row per measurement: the raw fields + case, traffic, ceilings of its run, throughput, ratios, check."""
    rows = []
    for m in results["measurements"]:
        case_info = results["cases"][m["case_id"]]
        ceilings = results["runs"][m["run"]]["ceilings"]
        row = dict(
            m,
            case=Case(**case_info["case"]),
            bytes=case_info["bytes"],
            bytes_min=case_info["bytes_min"],
            flops=case_info["flops"],
        )
        if m["status"] == "ok":
            seconds = m["median_ms"] * 1e-3
            copy, matmul = ceilings["copy"]["bytes_per_s"], ceilings["matmul"]["flop_per_s"]
            row.update(
                gb_per_s=row["bytes"] / seconds / 1e9,
                pct_copy=100 * row["bytes"] / seconds / copy,
                pct_copy_min=100 * row["bytes_min"] / seconds / copy,
            )
            if row["flops"]:
                row.update(
                    tflop_per_s=row["flops"] / seconds / 1e12,
                    pct_matmul=100 * row["flops"] / seconds / matmul,
                    floor_ratio=seconds / (row["flops"] / matmul),
                )
        rows.append(row)
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case_id"], {})[row["provider"]] = row
    for row in rows:
        if row["status"] != "ok":
            continue
        peers = by_case[row["case_id"]]
        for base in BASELINES:
            other = peers.get(base)
            if other is not None and other["status"] == "ok":
                row[f"x_{base}"] = other["median_ms"] / row["median_ms"]
                if base in ("eager", "compile") and other["peak_extra_bytes"] > 0:
                    key = "memory_ratio" if base == "eager" else "memory_ratio_compile"
                    row[key] = row["peak_extra_bytes"] / other["peak_extra_bytes"]
        eager = peers.get("eager")
        if eager is not None and eager["status"] == "ok" and row["provider"] != "eager":
            row["check_rel"] = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(row["norms"], eager["norms"]))
            row["check_ok"] = row["check_rel"] <= check_tolerance(row["case"])
    return rows


# ----------------------------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------------------------
def _case_columns(op: str) -> list[tuple[str, callable]]:
    if op == "group_advantages":
        return [("B", lambda c: c.rewards), ("G", lambda c: c.group_size)]
    cols = [("N", lambda c: c.tokens)] + ([("H", lambda c: c.hidden)] if op == "fused_linear_grpo_loss" else [])
    cols.append(("V", lambda c: c.vocab))
    if op in ("grpo_loss", "fused_linear_grpo_loss", "grpo_loss_exact_kl"):
        cols += [("IS", lambda c: c.importance_sampling_level), ("β", lambda c: f"{c.beta:g}")]
    if op == "distill_loss":
        cols += [
            ("divergence", lambda c: c.divergence),
            ("β", lambda c: f"{c.beta:g}" if c.divergence == "jsd" else "–"),
        ]
    return cols


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _op_table(op: str, rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["op"] == op]
    case_cols = _case_columns(op)
    two_counts = any(r["bytes_min"] != r["bytes"] for r in rows)
    bases = [b for b in BASELINES if any(r["provider"] == b and r["status"] == "ok" for r in rows)]
    head = [name for name, _ in case_cols] + ["provider", "ms"]
    if op == "fused_linear_grpo_loss":
        head += ["TFLOP/s", "% matmul", "× floor"]
    else:
        head += ["GB/s", "% copy"] + (["% copy (min bytes)"] if two_counts else [])
    head += ["peak extra (MiB)"] + [f"× {b}" for b in bases] + ["check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(get(r["case"])) for _, get in case_cols] + [r["provider"]]
        if r["status"] != "ok":
            cells += [f"{r['status']}: {r['error'][:100]}"] + ["–"] * (len(head) - len(cells) - 1)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells.append(f"{r['median_ms']:.3f}")
        if op == "fused_linear_grpo_loss":
            cells += [
                _fmt(r.get("tflop_per_s"), ".3g"),
                _fmt(r.get("pct_matmul"), ".0f"),
                _fmt(r.get("floor_ratio"), ".2f"),
            ]
        else:
            cells += [f"{r['gb_per_s']:.3g}", f"{r['pct_copy']:.0f}"] + (
                [f"{r['pct_copy_min']:.0f}"] if two_counts else []
            )
        cells.append(f"{r['peak_extra_bytes'] / MIB:.0f}")
        cells += [_fmt(r.get(f"x_{b}"), ".2f") for b in bases]
        if r["provider"] == "eager":
            cells.append("reference")
        elif "check_rel" in r:
            cells.append(f"{'ok' if r['check_ok'] else 'MISMATCH'} ({r['check_rel']:.0e})")
        else:
            cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _traffic_line(op: str, results: dict) -> str:
    info = next(c for c in results["cases"].values() if c["case"]["op"] == op)
    case = Case(**info["case"])
    terms = " + ".join(label for label, _ in info["terms"])
    line = f"Bytes per case: {terms}"
    if case.op != "group_advantages":
        line += f" (s = {case.torch_dtype.itemsize} B, {case.dtype})"
    if case.op in ("distill_loss", "grpo_loss_exact_kl"):
        reads = "the jsd's forward reads them twice" if case.op == "distill_loss" else "the forward reads them once"
        line += (
            f". GB/s and % copy count all of it (our design: the backward re-reads both rows, {reads}); min bytes = "
            "both rows read once and the gradient written once"
        )
    elif info["bytes_min"] != info["bytes"]:
        line += (
            ". GB/s and % copy count all of it (3 passes over the logits); min bytes leaves out the backward's "
            "re-read (2 passes)"
        )
    if info["flops"]:
        line += ". FLOPs: 6·N·H·V (logits, grad hidden, grad weight); × floor = time / (FLOPs / the matmul rate)"
    return line + "."


def _goal_rows(rows: list[dict], where: dict, goals_by_backend: dict) -> tuple[str, list[str]]:
    """The goal table for the case matching ``where`` (else that shape with another β, else the largest measured
    case of that op at that variant)."""
    op_rows = [r for r in rows if r["op"] == where["op"] and r["status"] == "ok"]
    if not op_rows:
        return "", []
    match = [r for r in op_rows if all(getattr(r["case"], k) == v for k, v in where.items())]
    if not match:  # the same shape at the same IS level with another beta (it moves N·4 bytes more or less)
        match = [r for r in op_rows if all(getattr(r["case"], k) == v for k, v in where.items() if k != "beta")]
        match = [r for r in match if r["case_id"] == match[0]["case_id"]] if match else match
    if not match:  # the largest case of the same variant (every key but the shape)
        variant = {k: v for k, v in where.items() if k not in ("tokens", "vocab", "hidden")}
        same_variant = [r for r in op_rows if all(getattr(r["case"], k) == v for k, v in variant.items())]
        if not same_variant:
            return "", []
        biggest = max(same_variant, key=lambda r: r["case"].tokens * r["case"].vocab * max(r["case"].hidden, 1))
        match = [r for r in same_variant if r["case_id"] == biggest["case_id"]]
    case_id = match[0]["case_id"]
    lines = []
    for r in match:
        for key, target, label in goals_by_backend.get(r["provider"], ()):
            value = r.get(key)
            if value is None:
                verdict, shown = "not measured", "–"
            else:
                met = value <= target if key in AT_MOST else value >= target
                verdict, shown = ("met" if met else "missed"), f"{value:.2f}"
            lines.append(f"| {r['provider']} | {label} | {shown} | {target:g} | {verdict} |")
    return case_id, lines


def _goals(rows: list[dict], device_type: str) -> list[str]:
    out = ["## Goals", ""]
    if device_type != "cuda":
        out += ["The goals are GPU goals (H100/H200); on this CPU run they are computed only to exercise the tool.", ""]
    fused_goals = {b: FUSED_GOALS for b in OURS}
    for where, goals, title in (
        (LOSS_GOAL_CASE, LOSS_GOALS, "fused loss"),
        (FUSED_GOAL_CASE, fused_goals, "fused-linear loss"),
        (DISTILL_GOAL_CASE, DISTILL_GOALS, "distillation loss"),
    ):
        case_id, lines = _goal_rows(rows, where, goals)
        if not lines:
            out += [f"{title}: no measurement of ours on a matching case.", ""]
            continue
        out += [
            f"{title}, on `{case_id}`:",
            "",
            "| backend | measure | measured | target | verdict |",
            "|---|---|---|---|---|",
        ]
        out += lines + [""]
    return out


# Issue 20, the torch backend on the CPU: time <= torch.compile's (of eager) and < eager's, peak extra memory <= 1/3
# of torch.compile's, on every logits case of the cpu preset.
CPU_GOAL_OPS = ("token_logprobs", "token_logprobs_entropy_forward", "grpo_loss")
CPU_MEMORY_GOAL = 1 / 3
MEMORY_RESOLUTION = MIB  # peaks below this (resident pages, outputs of N floats) are noise on the CPU


def _cpu_goals(rows: list[dict]) -> list[str]:
    """The torch backend against eager and torch.compile on every case both ran: per-case verdicts and counts."""
    by_case: dict[str, dict] = {}
    for r in rows:
        if r["op"] in CPU_GOAL_OPS and r["status"] == "ok":
            by_case.setdefault(r["case_id"], {})[r["provider"]] = r
    cases = [p for p in by_case.values() if {"torch", "compile", "eager"} <= set(p)]
    if not cases:
        return []
    out = ["## CPU goals (issue 20): the torch backend against torch.compile and eager", ""]
    out.append(
        "Goal per case: time ≤ 1.0x torch.compile's (of the eager code) and < eager's; peak extra memory ≤ 1/3 of "
        "torch.compile's. `t / compile` = our time / compile's (≤ 1 met); `t / eager` likewise (< 1 met); "
        "`mem / compile` = our peak extra / compile's (met when ours ≤ 1/3 of compile's + 1 MiB, the resolution of "
        "a CPU peak; n/a where compile's peak is under 1 MiB, i.e. only the N-sized outputs: nothing to compare). "
        "`first call s` = the case's first, untimed call (compilation included). `grad share` (backward ops) = the "
        "gradient's own bytes (N·V·s, returned to the caller, so in every provider's peak) / compile's peak: where "
        "it exceeds 1/3, no implementation that returns a new gradient buffer can meet the memory goal "
        "(`inplace_backward=True` "
        "writes it over the logits instead)."
    )
    head = (
        "| case | torch ms | compile ms | eager ms | t / compile | t / eager | % copy (torch) | peak MiB (torch / "
        "compile / eager) | mem / compile | grad share | first call s (torch / compile) | verdict |"
    )
    out += ["", head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    counts = dict(time=0, eager=0, memory=0, memory_cases=0)
    for p in cases:
        ours, comp, eager = p["torch"], p["compile"], p["eager"]
        t_comp, t_eager = ours["median_ms"] / comp["median_ms"], ours["median_ms"] / eager["median_ms"]
        counts["time"] += t_comp <= 1.0
        counts["eager"] += t_eager < 1.0
        case = ours["case"]
        backward = case.op == "grpo_loss"
        grad_bytes = case.tokens * case.vocab * case.torch_dtype.itemsize if backward else 0
        memory_ok = True
        if comp["peak_extra_bytes"] >= MEMORY_RESOLUTION:
            mem = ours["peak_extra_bytes"] / comp["peak_extra_bytes"]
            # within the resolution of a CPU peak (resident pages; the same N·V buffer measures a few KiB apart)
            memory_ok = ours["peak_extra_bytes"] <= CPU_MEMORY_GOAL * comp["peak_extra_bytes"] + MEMORY_RESOLUTION
            counts["memory_cases"] += 1
            counts["memory"] += memory_ok
            mem_cell = f"{mem:.3f}"
            share = f"{grad_bytes / comp['peak_extra_bytes']:.3f}" if backward else "–"
        else:
            mem_cell, share = "n/a", "–"
        missed = [
            name for name, ok in (("time", t_comp <= 1.0), ("eager", t_eager < 1.0), ("memory", memory_ok)) if not ok
        ]
        verdict = "met" if not missed else "missed: " + ", ".join(missed)
        peaks = " / ".join(f"{x['peak_extra_bytes'] / MIB:.0f}" for x in (ours, comp, eager))
        first = " / ".join(
            _fmt(x.get("first_call_ms", 0) / 1e3 if "first_call_ms" in x else None, ".2f") for x in (ours, comp)
        )
        out.append(
            f"| `{ours['case_id']}` | {ours['median_ms']:.1f} | {comp['median_ms']:.1f} | "
            f"{eager['median_ms']:.1f} | {t_comp:.2f} | {t_eager:.2f} | {ours['pct_copy']:.0f} | {peaks} | "
            f"{mem_cell} | {share} | {first} | {verdict} |"
        )
    n = len(cases)
    worst = max(cases, key=lambda p: p["torch"]["median_ms"] / p["compile"]["median_ms"])
    worst_ratio = worst["torch"]["median_ms"] / worst["compile"]["median_ms"]
    summary = (
        f"Time ≤ torch.compile's: met on {counts['time']} of {n} cases (worst: {worst_ratio:.2f}x on "
        f"`{worst['torch']['case_id']}`); faster than eager: {counts['eager']} of {n}; peak memory ≤ 1/3 of "
        f"torch.compile's: {counts['memory']} of the {counts['memory_cases']} cases where compile's peak is "
        "measurable."
    )
    out += ["", summary, ""]
    return out


def _fresh_text(ceilings: dict) -> str:
    fresh = ceilings.get("fresh_write")
    if fresh is None:
        return ""
    return (
        f"; first write of new memory {fresh['bytes_per_s'] / 1e9:.1f} GB/s (a {fresh['bytes'] / 2**20:.0f} "
        "MiB `torch.empty(...).fill_`, page faults included)"
    )


def _load_text(run: dict) -> str:
    """The load average (1, 5, 15 min, as uptime prints it) at the run's start and end, where recorded."""
    start, end = run["info"].get("load_average"), run.get("load_average_end")
    if start is None:
        return ""
    text = "; load average " + ", ".join(f"{x:.2f}" for x in start) + " at the start"
    return text + (" and " + ", ".join(f"{x:.2f}" for x in end) + " at the end" if end else "")


def _machine_line(info: dict) -> str:
    if info["device_type"] != "cuda":
        threads = f"{info['cpu_count']} logical CPUs, {info['torch_threads']} torch threads"
        return f"- Device: CPU {info['cpu_model']}, {threads}"
    return (
        f"- Device: {info['device_name']} ({info['sm_count']} SMs, compute capability "
        f"{info['compute_capability']}, {info['memory_bytes'] / 2**30:.0f} GiB), driver {info['driver']}, CUDA "
        f"runtime {info['cuda_runtime']}; CPU {info['cpu_model']}"
    )


def markdown(results: dict) -> str:
    rows = derive(results)
    first = results["runs"][0]["info"]
    lines = [f"# Benchmarks: {results['device_name']}, {first['date_utc'][:10]}", "", _machine_line(first)]
    versions = ", ".join(f"{name} {first[key]}" for name, key in SOFTWARE)
    lines.append(f"- Software: {versions}")
    for i, run in enumerate(results["runs"]):
        info, c = run["info"], run["ceilings"]
        commit = (info["git_commit"] or "unknown")[:12] + (" + uncommitted changes" if info["git_dirty"] else "")
        threads = f", {info['torch_threads']} threads" if info["device_type"] != "cuda" else ""
        copy, matmul = c["copy"], c["matmul"]
        lines.append(
            f"- Run {i + 1}: {info['date_utc']}, commit {commit}, preset {run['preset']}{threads}; copy "
            f"{copy['bytes_per_s'] / 1e9:.1f} GB/s (a {copy['bytes'] / 2 / 2**20:.0f} MiB copy, read + "
            f"written){_fresh_text(c)}, matmul {matmul['flop_per_s'] / 1e12:.2f} TFLOP/s "
            f"({matmul['dtype']}, n = {matmul['n']})"
            + _load_text(run)
            + (f"; note: {run['note']}" if run["note"] else "")
        )
    if first["device_type"] == "cuda":
        timer = "`triton.testing.do_bench` median (CUDA events, L2 flushed before each run), after two warm-up calls"
    elif results["runs"][0]["in_process"]:
        timer = "median of a `perf_counter` loop, in one process, after two warm-up calls"
    else:
        timer = (
            "median of a `perf_counter` loop (at least 3 calls), each provider in its own long-lived worker "
            "process, after one warm-up call per case (first call: its time, compilation included)"
        )
    lines += [
        f"- Timer: {timer}. ms = median time of one call (forward + backward where named).",
        (
            "- GB/s = the case's byte count / time; % copy = that / the copy bandwidth of the same run. "
            "× X = X's time / this provider's time (above 1: faster than X)."
        ),
        (
            "- peak extra = peak memory during one call above what was allocated before it (outputs and gradients "
            "included; the inputs not). check = relative difference of the gradient (or output) norms to eager's."
        ),
        "",
    ]
    if first["device_type"] != "cuda":
        note = (
            "> CPU run: the torch backend (the CPU path) against the baselines; it says nothing about the Triton "
            "or CUDA kernels, whose performance is measured on a GPU."
        )
        lines += [note, ""]
        lines += _cpu_goals(rows)
    lines += _goals(rows, first["device_type"])
    for op in OPS:
        if any(r["op"] == op for r in rows):
            lines += [
                f"## {TITLES[op]}",
                "",
                _traffic_line(op, results),
                "",
                *_op_table(op, rows),
                "",
                f"![{op}]({op}.png)",
                "",
            ]
    if results["skipped"]:
        lines += ["## Not measured", ""] + [f"- {key}: {reason}" for key, reason in sorted(results["skipped"].items())]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------------------
def _short(case: Case) -> str:
    if case.op == "group_advantages":
        return f"B{case.rewards}\nG{case.group_size}"
    label = f"N{case.tokens}\n" + (f"H{case.hidden} " if case.hidden else "") + f"V{case.vocab}"
    if case.op in ("grpo_loss", "fused_linear_grpo_loss", "grpo_loss_exact_kl"):
        label += f"\n{case.importance_sampling_level[:3]} β{case.beta:g}"
    if case.op == "distill_loss":
        label += f"\n{case.divergence}" + (f" β{case.beta:g}" if case.divergence == "jsd" else "")
    return label


def plot_op(op: str, rows: list[dict], title: str, path: Path) -> None:
    """Grouped bars per case: % of the ceiling (copy bandwidth or matmul rate) and peak extra memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["op"] == op and r["status"] == "ok"]
    if not rows:
        return
    case_ids = list(dict.fromkeys(r["case_id"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    labels = {r["case_id"]: _short(r["case"]) for r in rows}
    key, ylabel = (
        ("pct_matmul", "% of matmul rate") if op == "fused_linear_grpo_loss" else ("pct_copy", "% of copy bandwidth")
    )
    width = 0.8 / len(providers)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.55 * len(case_ids) * 2 + 3), 4.8))
    panels = ((lambda r: r[key], ylabel), (lambda r: r["peak_extra_bytes"] / MIB, "peak extra memory (MiB)"))
    for ax, (value, name) in zip(axes, panels):
        for i, provider in enumerate(providers):
            by_case = {r["case_id"]: r for r in rows if r["provider"] == provider}
            xs = [j + (i - (len(providers) - 1) / 2) * width for j, c in enumerate(case_ids) if c in by_case]
            ax.bar(xs, [value(by_case[c]) for c in case_ids if c in by_case], width, label=provider)
        ax.set_xticks(range(len(case_ids)), [labels[c] for c in case_ids], fontsize=7)
        ax.set_ylabel(name)
    axes[0].axhline(100, color="black", linewidth=0.8, linestyle="--")  # the ceiling measured in the same run
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, results: dict) -> None:
    rows = derive(results)
    (out / "report.md").write_text(markdown(results))
    device = results["device_name"]
    for op in OPS:
        plot_op(op, rows, f"{TITLES[op]}\n{device}", out / f"{op}.png")


# ----------------------------------------------------------------------------------------------------------------
# predictions (benchmarks/NOTES.md)
# ----------------------------------------------------------------------------------------------------------------
def predictions(cases: list[Case], ceilings: dict[str, tuple[float, float]]) -> str:
    """Bytes and FLOPs of each case, and the time floors they imply at the given (bytes/s, FLOP/s) ceilings.

    One row per shape: the variants of a shape (IS level, beta) differ only by the reference log-probs, N·4 bytes.
    """
    names = list(ceilings)
    head = ["op", "shape", "bytes (GB)", "min bytes (GB)", "TFLOPs"] + [f"floor ms, {n}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = set()
    for case in cases:
        shape = _short(case).split("\n")
        key = (case.op, *shape[:2], case.divergence)
        if key in seen:
            continue
        seen.add(key)
        t, f = traffic(case), flops(case)
        floors = []
        for bandwidth, rate in ceilings.values():
            if f:
                floors.append(f"{f / rate * 1e3:.3g} (matmul)")
            elif case.op in ("distill_loss", "grpo_loss_exact_kl"):
                floors.append(
                    f"{t['bytes'] / bandwidth * 1e3:.3g} (ours), {t['bytes_min'] / bandwidth * 1e3:.3g} (min)"
                )
            elif t["bytes_min"] != t["bytes"]:
                floors.append(
                    f"{t['bytes'] / bandwidth * 1e3:.3g} (3 passes), {t['bytes_min'] / bandwidth * 1e3:.3g} (2)"
                )
            else:
                floors.append(f"{t['bytes'] / bandwidth * 1e3:.3g}")
        cells = [
            case.op,
            " ".join(shape[:2] + ([case.divergence] if case.divergence else [])),
            f"{t['bytes'] / 1e9:.3g}",
            f"{t['bytes_min'] / 1e9:.3g}",
            f"{f / 1e12:.3g}" if f else "–",
        ]
        lines.append("| " + " | ".join(cells + floors) + " |")
    return "\n".join(lines)
