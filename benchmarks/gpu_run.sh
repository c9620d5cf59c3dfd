#!/usr/bin/env bash
# Build, test and benchmark on a GPU machine without network, in one command (from the repository root):
#
#     bash benchmarks/gpu_run.sh                 # setup test static bench pack
#     bash benchmarks/gpu_run.sh bench pack      # only these stages (a later call: the report resumes)
#
# Stages:
#   setup   build the CUDA extension ahead of time where setup.py offers it, print the GPU, the versions, the backends
#           and why any is missing
# Every call first installs the wheels carried in .whl/ (liger-kernel, trl; see docs/benchmarks.md) into /tmp/site.
#   test    the whole test suite, slow cases included
#   static  python -m benchmarks.static_report
#   bench   python -m benchmarks.report, stopping before the time limit (it resumes where it stopped on the next call
#           while the machine is still warm: the results live in /tmp/grpo-bench-results, outside the synced tree)
#   pack    results and logs into $OUT: bench-results.tar.gz and one log per stage
#
# TOTAL_S (default 540) is the time this command may take: the device tool stops a command at 600 s. The benchmark
# gets what the earlier stages left, less BENCH_MARGIN_S (default 120: the longest single measurement plus the report).
# BENCH_ARGS passes more arguments to the report (e.g. "--ops grpo_loss --providers triton,cuda,liger,eager").
set -uo pipefail

START=$(date +%s)
TOTAL_S=${TOTAL_S:-540}
BENCH_MARGIN_S=${BENCH_MARGIN_S:-120}
OUT=${OUT:-/tmp/grpo-out}
RESULTS_ROOT=${RESULTS_ROOT:-/tmp/grpo-bench-results}
SITE=/tmp/site
mkdir -p "$OUT" "$RESULTS_ROOT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

# The carried wheels, once per machine (every stage may need them; a warm machine keeps /tmp/site between calls).
if compgen -G ".whl/*.whl" >/dev/null && [ ! -e "$SITE/.installed" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        && touch "$SITE/.installed" || { echo "installing .whl/*.whl failed"; exit 1; }
fi

stage_setup() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
    if grep -q GRPO_KERNELS_BUILD_CUDA setup.py; then
        GRPO_KERNELS_BUILD_CUDA=1 python3 setup.py build_ext --inplace || return 1
    fi
    python3 - <<'EOF'
import importlib, torch
from grpo_kernels.backends import BACKENDS, unavailable_reason
for name in BACKENDS:
    print(f"backend {name}: {unavailable_reason(name, torch.device('cuda')) or 'available'}")
for module in ("grpo_kernels.fused_linear", "liger_kernel", "trl.kernels"):
    try:
        importlib.import_module(module)
        print(f"{module}: importable")
    except Exception as e:
        print(f"{module}: NOT importable: {type(e).__name__}: {e}")
EOF
}

stage_test() { python3 -m pytest tests -q -m "slow or not slow" -p no:cacheprovider; }

stage_static() { python3 -m benchmarks.static_report --out "$RESULTS_ROOT/static"; }

stage_bench() {
    local budget=$((TOTAL_S - BENCH_MARGIN_S - ($(date +%s) - START)))
    if [ "$budget" -le 0 ]; then
        echo "no time left for the benchmark in this call: run 'bash benchmarks/gpu_run.sh bench pack' next"
        return 0
    fi
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    python3 -m benchmarks.report --results-root "$RESULTS_ROOT" --budget-s "$budget" ${BENCH_ARGS:-}
}

stage_pack() { tar czf "$OUT/bench-results.tar.gz" -C "$RESULTS_ROOT" . && ls -l "$OUT"; }

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(setup test static bench pack)
status=0
for stage in "${stages[@]}"; do
    echo "=== $stage ($(($(date +%s) - START)) s elapsed)"
    if [ "$stage" = pack ]; then
        stage_pack || status=1
    else
        "stage_$stage" 2>&1 | tee "$OUT/$stage.log" || status=1
    fi
done
echo "=== done in $(($(date +%s) - START)) s, status $status"
exit $status
