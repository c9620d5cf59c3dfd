"""The benchmark report: every case x every provider on one device, in one run, with its ceilings.

    python -m benchmarks.report                      # the device's preset (gpu on CUDA, cpu otherwise)
    python -m benchmarks.report --ops grpo_loss --providers triton,cuda,liger,eager --budget-s 540
    python -m benchmarks.report --providers torch,compile,eager  # on the CPU: issue 20's grid (see docs/benchmarks.md)
    python -m benchmarks.report --render benchmarks/results/<device>-<date>   # markdown + plots from the JSON
    python -m benchmarks.report --predict            # byte counts and floors of the GPU cases, no run
    python -m benchmarks.report --cases grpo_loss-N16384-V151936-is-token-beta0.04-bfloat16   # named cases only

Writes ``results.json``, ``report.md`` and one PNG per op into ``<results-root>/<device>-<date>/`` (or ``--out``).
A later run into the same folder (same device) adds to it and skips what is already measured, so a long report can
be spread over several calls of a time-limited machine (``--budget-s``: start no new measurement after that many
seconds). Each run measures its own ceilings (copy bandwidth, matmul rate); every measurement refers to the run
that took it.

On a GPU every measurement runs in this process, inputs shared by the providers of a case. On the CPU each provider
runs in its own long-lived worker process (``--serve``), so that its peak resident memory is its own and its
compilations (``torch.compile``, the torch backend's CPU kernels) are made once per run, not once per case; the
cases go shape by shape, each shape's providers one after the other (only one worker holds that shape's inputs at a
time), so the providers of a case are measured minutes apart at most. A worker measures a case as: one untimed
call (compilation, first touch; its time is recorded as ``first_call_ms``), then the peak resident set is reset
(``malloc_trim`` first) and the timed calls run; peak extra = the highest resident set during them minus the
resident set before them. The workers keep the allocator's defaults (a user's process): a buffer of N·V values is
fresh memory in every call (glibc maps anything over 32 MiB anew), so its first write, page faults included, is in
every provider's time. ``--in-process`` measures everything in this process instead (faster start, looser memory:
the CI smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks import render
from benchmarks.cases import (
    OPS,
    PRESETS,
    Case,
    build_cases,
    default_preset,
    flops,
    inputs_key,
    make_inputs,
    preset_ops,
    traffic,
)
from benchmarks.measure import (
    _release_free_heap,
    copy_bandwidth,
    fresh_write_bandwidth,
    machine_info,
    matmul_rate,
    peak_extra_bytes,
    reset_peak_rss,
    status_bytes,
    synchronize,
    time_ms,
)
from benchmarks.providers import PROVIDERS, build, summarize, unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_ROOT = ROOT / "benchmarks" / "results"
# do_bench's warm-up and repetition times are milliseconds of runs, not counts
TIMING = {
    "gpu": dict(warmup_ms=25.0, rep_ms=200.0),
    "cpu": dict(warmup_ms=0.0, rep_ms=600.0, min_runs=3),
    "smoke": dict(warmup_ms=0.0, rep_ms=5.0, min_runs=3),
}
# Free memory a CPU measurement wants, in units of the logits' bytes (N·V·s) on top of its inputs: eager keeps
# log p, its gradient and the gather's zero gradient; compile about two of them; ours the gradient. A measurement
# the machine cannot hold is skipped with the reason (the machine is shared: an OOM kill would hit someone else).
MEMORY_NEED = {"eager": 4.0, "compile": 3.0}
MEMORY_NEED_OURS = 1.5
# (copy bytes, matmul n) for the ceilings; the matmul runs in the preset's dtype
CEILINGS = {"gpu": (2 << 30, 8192), "cpu": (256 << 20, 1024), "smoke": (16 << 20, 128)}
# Ceilings measured on this workplace's machines (/work/.library/device/KINDS.md), for --predict only: a report's
# own numbers always use the ceilings measured in its run.
KNOWN_CEILINGS = {"H100 (3.0 TB/s, 798 TFLOP/s)": (3.0e12, 798e12), "H200 (4.3 TB/s, 788 TFLOP/s)": (4.3e12, 788e12)}


def measure_one(case: Case, provider: str, device: torch.device, timing: dict, inputs: dict | None = None) -> dict:
    """Time, peak memory and check values of one provider on one case (raises on failure)."""
    inputs = make_inputs(case, device) if inputs is None else inputs
    run = build(provider, case, inputs)
    summary = summarize(case, run())  # the first run compiles / autotunes; its outputs are the check values
    run()
    synchronize(device)
    peak = peak_extra_bytes(run, device)
    return dict(status="ok", **time_ms(run, device, **timing), peak_extra_bytes=peak, **summary)


def measure_cpu_worker(case: Case, provider: str, timing: dict, inputs: dict) -> dict:
    """A CPU worker's measurement: one untimed call, then the timed calls with their peak resident memory."""
    device = torch.device("cpu")
    run = build(provider, case, inputs)
    start = time.perf_counter()
    outputs = run()  # compiles (torch.compile; our CPU kernels once per process) and maps the inputs' pages
    first_call_ms = (time.perf_counter() - start) * 1e3
    summary = summarize(case, outputs)
    del outputs
    _release_free_heap()
    reset_peak_rss()
    base = status_bytes("VmRSS")
    timed = time_ms(run, device, **timing)
    peak = status_bytes("VmHWM") - base
    return dict(status="ok", **timed, peak_extra_bytes=peak, first_call_ms=first_call_ms, warmup_calls=1, **summary)


def measure_guarded(
    case: Case, provider: str, device: torch.device, timing: dict, inputs: dict | None = None, worker: bool = False
) -> dict:
    """:func:`measure_one` (or :func:`measure_cpu_worker`), with an out-of-memory or any other failure recorded
    instead of ending the report."""
    try:
        if worker:
            return measure_cpu_worker(case, provider, timing, inputs)
        return measure_one(case, provider, device, timing, inputs)
    except torch.cuda.OutOfMemoryError as e:
        return dict(status="oom", error=str(e).splitlines()[0])
    except Exception as e:  # noqa: BLE001 - recorded in the results and printed; the other providers go on
        traceback.print_exc()
        return dict(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0])
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure_in_subprocess(case: Case, provider: str, timing: dict, threads: int) -> dict:
    """:func:`measure_guarded` on the CPU in a fresh Python process (its own peak resident memory)."""
    spec = json.dumps(dict(case=case.as_dict(), provider=provider, timing=timing, threads=threads))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--worker", spec],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(status="error", error=f"worker exited with {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def _worker(spec: str) -> None:
    spec = json.loads(spec)
    torch.set_num_threads(spec["threads"])
    result = measure_guarded(Case(**spec["case"]), spec["provider"], torch.device("cpu"), spec["timing"])
    print(json.dumps(result))


RESULT_PREFIX = "@@result "


def _serve(spec: str) -> None:
    """A CPU worker: one provider, requests on stdin (a case and the file of its inputs, as JSON, or ``release``),
    one result line each. The inputs are memory-mapped from the file the parent wrote (one copy in memory for all
    workers, made once per shape)."""
    spec = json.loads(spec)
    torch.set_num_threads(spec["threads"])
    inputs: dict = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("release"):
            inputs.clear()
            _release_free_heap()
            result: dict = dict(released=True)
        else:
            case = Case(**request["case"])
            if inputs.get("path") != request["inputs"]:
                inputs.clear()
                _release_free_heap()
                inputs.update(path=request["inputs"], values=torch.load(request["inputs"], mmap=True))
            result = measure_guarded(
                case, spec["provider"], torch.device("cpu"), spec["timing"], inputs["values"], worker=True
            )
        print(RESULT_PREFIX + json.dumps(result), flush=True)


class CpuWorkers:
    """One :func:`_serve` process per provider, started on first use, ended by :meth:`close`."""

    def __init__(self, timing: dict, threads: int):
        self.timing, self.threads, self.procs = timing, threads, {}

    def _proc(self, provider: str) -> subprocess.Popen:
        if provider not in self.procs:
            spec = json.dumps(dict(provider=provider, timing=self.timing, threads=self.threads))
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
            self.procs[provider] = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.report", "--serve", spec],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        return self.procs[provider]

    def _ask(self, provider: str, request: dict) -> dict:
        proc = self._proc(provider)
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX) :])
        code = proc.wait()
        del self.procs[provider]
        return dict(status="error", error=f"worker for {provider} exited with {code} (killed for memory?)")

    def measure(self, case: Case, provider: str, inputs: Path) -> dict:
        need = _memory_need(case, provider)
        available = _available_bytes()
        if available is not None and need > available:
            return dict(
                status="skipped",
                error=f"needs ~{need / 2**30:.1f} GiB free, {available / 2**30:.1f} available (shared machine)",
            )
        return self._ask(provider, dict(case=case.as_dict(), inputs=str(inputs)))

    def release(self, provider: str) -> None:
        if provider in self.procs:
            self._ask(provider, dict(release=True))

    def close(self) -> None:
        """End the workers: EOF on their stdin, then a kill for one still busy after 10 s (an interrupted run)."""
        for proc in self.procs.values():
            proc.stdin.close()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def _memory_need(case: Case, provider: str) -> int:
    logits = case.tokens * case.vocab * case.torch_dtype.itemsize
    return int(MEMORY_NEED.get(provider, MEMORY_NEED_OURS) * logits) + (256 << 20)


def _save_inputs(case: Case, folder: Path) -> Path:
    """The case's inputs (:func:`make_inputs`) in a file the CPU workers memory-map (on /dev/shm where there is one)."""
    path = folder / "inputs.pt"
    inputs = make_inputs(case, torch.device("cpu"))
    torch.save(inputs, path)
    del inputs
    _release_free_heap()
    return path


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def results_dir(root: Path, info: dict) -> Path:
    """``<root>/<device>-<date>``: ``nvidia-h100-80gb-hbm3-2026-11-20``, ``cpu-amd-epyc-...-2026-11-20``."""
    name = info["device_name"] if info["device_type"] == "cuda" else f"cpu-{info['cpu_model']}"
    return root / f"{_slug(name)}-{info['date_utc'][:10]}"


def empty_results(device_name: str) -> dict:
    return dict(schema=1, device_name=device_name, runs=[], cases={}, measurements=[], skipped={})


def load_results(path: Path, device_name: str) -> dict:
    file = path / "results.json"
    if not file.exists():
        return empty_results(device_name)
    results = json.loads(file.read_text())
    if results["device_name"] != device_name:
        raise SystemExit(f"{file} holds results of {results['device_name']!r}, not {device_name!r}: use another --out")
    return results


def save_results(path: Path, results: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path / "results.json")


def run_report(args: argparse.Namespace) -> Path:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still ends its workers, removes its files
    device = torch.device(args.device)
    preset = args.preset or default_preset(device)
    cases = _selected_cases(preset, args)  # before anything is measured: a wrong --cases fails at once
    torch.set_num_threads(args.threads)
    info = machine_info(device)
    out = Path(args.out) if args.out else results_dir(Path(args.results_root), info)
    results = empty_results(info["device_name"]) if args.fresh else load_results(out, info["device_name"])
    copy_bytes, matmul_n = CEILINGS[preset]
    dtype = getattr(torch, PRESETS[preset]["dtype"])
    print(
        f"{info['device_name']}: measuring the ceilings ({copy_bytes >> 20} MiB copy, {matmul_n}^3 matmul)", flush=True
    )
    ceilings = dict(copy=copy_bandwidth(device, copy_bytes), matmul=matmul_rate(device, dtype, matmul_n))
    if device.type == "cpu":
        ceilings["fresh_write"] = fresh_write_bandwidth(copy_bytes)
    run_index = len(results["runs"])
    in_process = device.type == "cuda" or args.in_process
    results["runs"].append(
        dict(info=info, ceilings=ceilings, preset=preset, argv=sys.argv[1:], note=args.note, in_process=in_process)
    )
    copy, matmul = ceilings["copy"], ceilings["matmul"]
    fresh = (
        f", first write of new memory {ceilings['fresh_write']['bytes_per_s'] / 1e9:.1f} GB/s"
        if "fresh_write" in ceilings
        else ""
    )
    print(
        f"copy {copy['bytes_per_s'] / 1e9:.1f} GB/s{fresh}, matmul {matmul['flop_per_s'] / 1e12:.2f} TFLOP/s "
        f"({matmul['dtype']})",
        flush=True,
    )

    done = {(m["case_id"], m["provider"]) for m in results["measurements"] if m["status"] in ("ok", "oom")}
    timing = TIMING[preset]
    start, stopped = time.monotonic(), False
    workers = None if in_process else CpuWorkers(timing, args.threads)

    def record(case: Case, provider: str, m: dict) -> None:
        t = traffic(case)
        results["cases"][case.id] = dict(
            case=case.as_dict(), terms=t["terms"], bytes=t["bytes"], bytes_min=t["bytes_min"], flops=flops(case)
        )
        results["measurements"] = [
            x for x in results["measurements"] if (x["case_id"], x["provider"]) != (case.id, provider)
        ]  # a retried error
        results["measurements"].append(dict(case_id=case.id, op=case.op, provider=provider, run=run_index, **m))
        results["skipped"].pop(f"{case.op}/{provider}", None)  # available now (e.g. wheels installed since)
        save_results(out, results)
        ok = m["status"] == "ok"
        shown = f"{m['median_ms']:.3f} ms, peak +{m['peak_extra_bytes'] / 2**20:.0f} MiB" if ok else m["error"]
        print(f"{case.id:<60} {provider:<8} {shown}", flush=True)

    # in process: case by case, the providers of a case on the same inputs; CPU workers: shape by shape, each
    # provider's cases of the shape in a row (its worker keeps the shape's inputs until released)
    cases = [c for c in cases if args.filter is None or re.search(args.filter, c.id)]
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault(("case", case.id) if in_process else inputs_key(case), []).append(case)
    shm = Path("/dev/shm")
    scratch = None if in_process else tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None)
    try:
        for group in groups.values():
            inputs, saved = None, None
            for provider in args.providers:
                asked = False
                for case in group:
                    if (case.id, provider) in done:
                        continue
                    reason = unavailable_reason(provider, case, device)
                    if reason is not None:
                        key = f"{case.op}/{provider}"
                        if key not in results["skipped"]:
                            print(f"skip {key}: {reason}", flush=True)
                        results["skipped"][key] = reason
                        continue
                    if args.budget_s is not None and time.monotonic() - start > args.budget_s:
                        stopped = True
                        break
                    if in_process:
                        inputs = make_inputs(case, device) if inputs is None else inputs
                        m = measure_guarded(case, provider, device, timing, inputs)
                    else:
                        saved = _save_inputs(case, Path(scratch.name)) if saved is None else saved
                        m, asked = workers.measure(case, provider, saved), True
                    record(case, provider, m)
                if asked:
                    workers.release(provider)
                if stopped:
                    break
            del inputs
            if saved is not None:
                saved.unlink()
            if stopped:
                break
    finally:
        if workers is not None:
            workers.close()
            scratch.cleanup()
    results["runs"][run_index]["load_average_end"] = list(os.getloadavg())
    save_results(out, results)
    render.write_report(out, results)
    if stopped:
        print(f"stopped after --budget-s {args.budget_s}: run the same command again to continue into {out}")
    print(f"wrote {out}/results.json, report.md and plots")
    return out


def _selected_cases(preset: str, args: argparse.Namespace) -> list[Case]:
    """The preset's cases of ``--ops``, only those named by ``--cases`` when given (in ``--cases`` order)."""
    cases = build_cases(preset, None if args.ops is None else tuple(args.ops))
    if not args.cases:
        return cases
    by_id = {case.id: case for case in cases}
    unknown = [name for name in args.cases if name not in by_id]
    if unknown:
        raise SystemExit(f"--cases: {unknown} not in preset {preset!r} (ops {args.ops}); its cases: {sorted(by_id)}")
    return [by_id[name] for name in args.cases]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=tuple(PRESETS), help="case grid (default: gpu on CUDA, cpu otherwise)")
    parser.add_argument("--ops", type=lambda s: s.split(","), help=f"comma-separated, of {OPS} (default: the preset's)")
    parser.add_argument(
        "--providers", type=lambda s: s.split(","), default=list(PROVIDERS), help=f"comma-separated, of {PROVIDERS}"
    )
    parser.add_argument("--filter", help="only the cases whose id matches this regular expression")
    parser.add_argument(
        "--cases",
        type=lambda s: s.split(","),
        default=None,
        help="comma-separated case ids (e.g. the GPU run's headline cases); default: every case",
    )
    parser.add_argument("--results-root", default=str(DEFAULT_RESULTS_ROOT))
    parser.add_argument("--out", help="results folder (default: <results-root>/<device>-<date>)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--budget-s", type=float, help="start no new measurement after this many seconds")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="CPU: measure in this process (faster start; peak memory then counts reused memory loosely)",
    )
    parser.add_argument("--fresh", action="store_true", help="discard the results already in the folder")
    parser.add_argument("--note", default="", help="a line recorded with the run (e.g. 'shared, contended CPU')")
    parser.add_argument("--render", metavar="DIR", help="only write report.md and the plots from DIR/results.json")
    parser.add_argument("--predict", action="store_true", help="print byte counts and floors of the GPU cases")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ops is None:
        args.ops = list(preset_ops(args.preset or default_preset(torch.device(args.device))))
    for name in args.ops:
        if name not in OPS:
            parser.error(f"unknown op {name!r}; ops are {OPS}")
    for name in args.providers:
        if name not in PROVIDERS:
            parser.error(f"unknown provider {name!r}; providers are {PROVIDERS}")
    if args.serve:
        _serve(args.serve)
    elif args.worker:
        _worker(args.worker)
    elif args.render:
        results = json.loads((Path(args.render) / "results.json").read_text())
        render.write_report(Path(args.render), results)
        print(f"wrote {args.render}/report.md and plots")
    elif args.predict:
        print(render.predictions(build_cases("gpu"), KNOWN_CEILINGS))
    else:
        run_report(args)


if __name__ == "__main__":
    main()
