#!/usr/bin/env bash
# GPU validation in one call of the device tool (one H200, no network, ~8 minutes), from the repository root:
#
#     bash benchmarks/gpu_run.sh                   # every stage, in priority order
#     bash benchmarks/gpu_run.sh test headline     # only these stages (on a still-warm machine, say)
#     GPU_RUN_DRY=1 bash benchmarks/gpu_run.sh     # simulated stages: the control flow, caps and files (seconds)
#     GPU_RUN_CPU=1 bash benchmarks/gpu_run.sh     # the real stage commands at CPU stand-in sizes (minutes)
#     GPU_RUN_COMMIT=abc1234 bash benchmarks/gpu_run.sh   # names the commit where the tree came without .git
#
# Stages, in priority order, each under `timeout` with its own cap (CAP_<stage>, seconds), never past the deadline
# (TOTAL_S, default 480, less RESERVE_S for the last packing):
#   env        nvidia-smi, driver, Python / torch / triton / CUDA versions, the carried wheels installed (.whl/ into
#              $WORK/site, the device README's command) and checked, the baselines' imports
#   build      the CUDA extension built (timed) for GRPO_KERNELS_CUDA_ARCHS (default 90 here), the backends listed
#   warm       first (JIT) and second call of every kernel group, per backend and dtype
#   test       the GPU test selection (GPU_TESTS, below) with xdist; junit.xml; verified.json (per-backend verdict)
#   headline   the issue's headline cases (benchmarks.report --cases): grpo_loss N16384 V151936 bf16 token IS
#              beta 0.04 for every provider, the fused-linear loss N16384 H4096 V151936, then torch.compile of
#              eager on the first; each report run measures its own ceilings
#   memcheck   compute-sanitizer memcheck over the CUDA backend's small tests
#   racecheck  compute-sanitizer racecheck over the CUDA 2-pass kernel's small cases
#   grid       the rest of the benchmark report's grid, until the deadline (it resumes into the same folder)
#
# What comes back in $OUT (the device tool returns at most 8 files): summary.md (rewritten after every stage: stage,
# status, seconds, key numbers, and the stage in flight), verified.json, run.log (every stage's output, appended as
# it goes), junit.xml, results.tar.gz (the report folder(s), re-packed after each benchmark stage). A killed call
# still returns whatever was written so far.
set -uo pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)
cd "$ROOT" || exit 1

STAGES_ALL=(env build warm test headline memcheck racecheck grid)
# the GPU test selection: every kernel test on CUDA tensors (each backend through conftest's parametrisation), the
# large shapes of test_gpu.py, the reliability suites, the benchmark tooling (-m "slow or not slow": the full-size
# N*V > 2^31 case of test_huge_shapes too)
GPU_TESTS_DEFAULT="tests/test_gpu.py tests/test_token_logprobs.py tests/test_grpo_loss.py tests/test_group_advantages.py
 tests/test_triton_kernels.py tests/test_fused_linear.py tests/test_grad_in_forward.py tests/test_huge_shapes.py
 tests/test_extreme_numerics.py tests/test_determinism.py tests/test_validation.py tests/test_bad_inputs.py
 tests/test_benchmarks_smoke.py"
HEADLINE_LOSS=grpo_loss-N16384-V151936-is-token-beta0.04-bfloat16
HEADLINE_FUSED=fused_linear_grpo_loss-N16384-V151936-H4096-is-token-beta0.04-bfloat16

defaults() {
    : "${OUT:=/tmp/grpo-out}"
    : "${WORK:=/tmp/grpo-gpu-run}"  # outside the synced tree: site-packages, results, per-stage logs
    : "${TOTAL_S:=480}" "${RESERVE_S:=20}" "${MIN_STAGE_S:=15}"
    : "${CAP_env:=60}" "${CAP_build:=240}" "${CAP_warm:=45}" "${CAP_test:=200}" "${CAP_headline:=180}"
    : "${CAP_memcheck:=75}" "${CAP_racecheck:=75}" "${CAP_grid:=600}"
    : "${GPU_TESTS:=$GPU_TESTS_DEFAULT}" "${XDIST_WORKERS:=12}"  # Triton's JIT is the long part: 12 of the 16 cores
    : "${GRPO_KERNELS_CUDA_ARCHS:=90}"  # the lent machine's H200 only: half the build time of "80;90"
    : "${GPU_RUN_DRY:=}" "${GPU_RUN_CPU:=}" "${GPU_RUN_DRY_SLEEP:=}"
    export OUT WORK TOTAL_S RESERVE_S GPU_TESTS XDIST_WORKERS GRPO_KERNELS_CUDA_ARCHS GPU_RUN_DRY GPU_RUN_CPU
    export GPU_RUN_DRY_SLEEP PYTHONUNBUFFERED=1
    export PYTHONPATH="$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    unset TRITON_INTERPRET
}

now() { date +%s; }
log() { echo "$*" | tee -a "$OUT/run.log"; }
cell() { tr '|' '/' | sed 's/$/<br>/' | tr -d '\n' | sed 's/<br>$//'; }  # lines -> one markdown table cell

# ----------------------------------------------------------------------------------------------------------------
# the stages (each runs in its own bash process under `timeout`; exit 0 ok, 77 skipped, anything else failed)
# ----------------------------------------------------------------------------------------------------------------
dry_sleep() {  # GPU_RUN_DRY_SLEEP="build:5,test:2": a simulated stage takes that long (to test the caps)
    local item
    for item in ${GPU_RUN_DRY_SLEEP//,/ }; do
        [ "${item%%:*}" = "$1" ] && sleep "${item#*:}"
    done
    return 0
}

stage_env() {
    uname -a
    nvidia-smi || echo "nvidia-smi: not available"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,persistence_mode,mig.mode.current \
        --format=csv 2>/dev/null
    command -v nvcc >/dev/null && nvcc --version | tail -2
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -1
    if [ -n "$GPU_RUN_DRY" ]; then
        dry_sleep env
        echo "@@ dry run: $(uname -m), $(python3 --version 2>&1)"
        return 0
    fi
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
            .whl/*.whl || { echo "@@ installing .whl/*.whl FAILED"; return 1; }
        ls .whl
        python3 -m benchmarks.wheelset .whl --installed | sed 's/^/wheels: /;$s/^wheels: /@@ wheels: /'
    else
        echo "@@ no .whl/ carried: the liger and trl baselines will be skipped"
    fi
    python3 -m benchmarks.gpu_run env --facts-out "$WORK/facts.json"
}

stage_build() {
    if [ -n "$GPU_RUN_DRY" ]; then
        dry_sleep build
        echo "@@ dry run: would build the CUDA extension for archs $GRPO_KERNELS_CUDA_ARCHS"
        return 0
    fi
    GRPO_KERNELS_VERBOSE_BUILD=1 python3 -m benchmarks.gpu_run build
}

stage_warm() {
    if [ -n "$GPU_RUN_DRY" ]; then
        dry_sleep warm
        echo "@@ dry run: would time the first and second call of each kernel"
        return 0
    fi
    python3 -m benchmarks.gpu_run warm
}

stage_test() {
    local junit="$OUT/junit.xml" collected="$WORK/collected.txt" rc=0
    local args=(-q -p no:cacheprovider -p benchmarks.gpu_order -m "slow or not slow" -rfE --durations=25)
    if [ -n "$GPU_RUN_DRY" ]; then
        dry_sleep test
        cat >"$junit" <<'EOF'
<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_gpu" name="test_real_vocab_logprobs_and_loss[gpu-triton-V151936-bfloat16]" time="1"/>
<testcase classname="tests.test_gpu" name="test_real_vocab_logprobs_and_loss[gpu-cuda-V151936-bfloat16]" time="1"><skipped message="dry"/></testcase>
<testcase classname="tests.test_gpu" name="test_real_vocab_logprobs_and_loss[cpu-torch-V151936-bfloat16]" time="1"/>
</testsuite></testsuites>
EOF
        echo "would run: python3 -m pytest ${args[*]} -n $XDIST_WORKERS --dist loadgroup $GPU_TESTS"
        printf '%s\n' "tests/test_gpu.py::test_real_vocab_logprobs_and_loss[gpu-triton-V151936-bfloat16]" \
            "tests/test_gpu.py::test_real_vocab_logprobs_and_loss[gpu-cuda-V151936-bfloat16]" \
            "tests/test_gpu.py::test_real_vocab_logprobs_and_loss[cpu-torch-V151936-bfloat16]" \
            "tests/test_gpu.py::test_real_vocab_logprobs_and_loss[gpu-torch-V151936-bfloat16]" >"$collected"
        python3 -m benchmarks.gpu_run verdict "$junit" --exit-code 0 --out "$OUT/verified.json" --collected "$collected" \
            --facts '{"device": "cpu", "arch": null, "driver": null, "torch": null, "triton": null, "cuda": null, "date": null}'
        return 0
    fi
    if python3 -c "import xdist" 2>/dev/null && [ "$XDIST_WORKERS" != 0 ]; then
        args+=(-n "$XDIST_WORKERS" --dist loadgroup)
    fi
    if python3 -c "import pytest_timeout" 2>/dev/null; then
        args+=(--timeout 120 --timeout-method thread)  # a hung kernel costs one test (its worker), not the stage
    fi
    rm -f "$collected"
    # shellcheck disable=SC2086  # GPU_TESTS is a list of paths
    # pytest gets the stage's cap less 40 s: on SIGINT it writes junit.xml (xdist needs some seconds to stop its
    # workers; SIGKILL after 15 s), and the verdict needs a few more
    GPU_RUN_COLLECTED="$collected" PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
        timeout -s INT -k 15 $((STAGE_CAP - 40)) python3 -m pytest "${args[@]}" --junitxml="$junit" $GPU_TESTS || rc=$?
    echo "pytest exit code $rc; $(wc -l <"$collected" 2>/dev/null || echo 0) tests collected"
    python3 -m benchmarks.gpu_run verdict "$junit" --exit-code "$rc" --out "$OUT/verified.json" --collected "$collected" \
        --facts-file "$WORK/facts.json"
    [ "$rc" = 0 ]
}

report() {  # python -m benchmarks.report with the device's settings, into $WORK/results
    local device_args=()
    [ -n "$GPU_RUN_CPU" ] && device_args=(--device cpu --preset smoke --in-process --threads 2)
    python3 -m benchmarks.report "${device_args[@]}" --results-root "$WORK/results" "$@"
}

stage_headline() {
    local loss=$HEADLINE_LOSS fused=$HEADLINE_FUSED rc=0
    if [ -n "$GPU_RUN_DRY" ]; then
        dry_sleep headline
        mkdir -p "$WORK/results/dry-run" && echo '{}' >"$WORK/results/dry-run/results.json"
        echo "@@ dry run: would measure $loss and $fused"
        return 0
    fi
    if [ -n "$GPU_RUN_CPU" ]; then
        loss=grpo_loss-N32-V500-is-token-beta0.04-float32
        fused=fused_linear_grpo_loss-N32-V500-H16-is-token-beta0.04-float32
    fi
    # Three report runs into one folder, each measuring its copy bandwidth and matmul rate first: the fused loss,
    # the fused-linear loss, then torch.compile of eager (its compilation is the longest single step). --budget-s
    # stops a run from starting a new measurement; the stage's cap stops the one in flight.
    local end=$((STAGE_START + STAGE_CAP))
    report --ops grpo_loss --cases "$loss" --providers triton,cuda,cuda_gif,eager,liger,trl,torch \
        --budget-s 60 --note "gpu_run.sh headline" || rc=1
    report --ops fused_linear_grpo_loss --cases "$fused" --providers triton,cuda,eager,trl,torch,liger \
        --budget-s $((end - $(now) - 90 > 1 ? end - $(now) - 90 : 1)) --note "gpu_run.sh headline" || rc=1
    report --ops grpo_loss --cases "$loss" --providers compile \
        --budget-s $((end - $(now) - 75 > 1 ? end - $(now) - 75 : 1)) --note "gpu_run.sh headline" || rc=1
    for dir in "$WORK"/results/*/; do
        python3 -m benchmarks.gpu_run headline "$dir"
    done
    return $rc
}

sanitizer() {  # $1 = tool, then the pytest arguments
    local tool=$1
    shift
    if [ -n "$GPU_RUN_DRY" ]; then
        dry_sleep "$tool"
        echo "@@ dry run: would run compute-sanitizer --tool $tool over: $*"
        return 0
    fi
    if ! command -v compute-sanitizer >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "@@ skipped: no compute-sanitizer or no GPU here"
        return 77
    fi
    # the caching allocator hides out-of-bounds accesses inside its blocks from memcheck: every tensor its own block
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT -k 10 $((STAGE_CAP - 10)) \
        compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 --target-processes all \
        python3 -m pytest -q -p no:cacheprovider -x -rfE "$@"
    local rc=$?
    case $rc in
        0) echo "@@ $tool: no errors" ;;
        99) echo "@@ $tool: ERRORS reported (run.log)" ;;
        124) echo "@@ $tool: stopped at its cap (no error reported before)" ;;
        *) echo "@@ $tool: exit code $rc (test failure or sanitizer trouble; run.log)" ;;
    esac
    return $rc
}

stage_memcheck() {
    sanitizer memcheck tests/test_token_logprobs.py tests/test_grpo_loss.py tests/test_group_advantages.py \
        tests/test_grad_in_forward.py -k cuda
}

stage_racecheck() {  # the 2-pass kernel's shared / distributed shared memory at cluster sizes 1 and 2
    sanitizer racecheck tests/test_gpu.py -k "grad_in_forward_cluster and gpu-cuda and (V4096 or V65536 or V32000)"
}

stage_grid() {
    if [ -n "$GPU_RUN_DRY" ]; then
        dry_sleep grid
        echo "@@ dry run: would continue the report's grid"
        return 0
    fi
    local budget=$((STAGE_CAP - 60))
    [ "$budget" -gt 0 ] || budget=1
    report --budget-s "$budget" --note "gpu_run.sh grid" || return 1
    for file in "$WORK"/results/*/results.json; do
        python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print('@@', len(r['measurements']),
            'measurements,', len(r['cases']), 'cases so far in', sys.argv[1].split('/')[-2])" "$file"
    done
}

# ----------------------------------------------------------------------------------------------------------------
# the driver: caps, deadline, summary, packing
# ----------------------------------------------------------------------------------------------------------------
summary() {  # rewrite $OUT/summary.md from the rows so far; $1: the footer line
    {
        echo "# GPU run, $(date -u -d "@$START" +%Y-%m-%dT%H:%MZ)"
        echo
        echo "- device: $GPU_LINE"
        echo "- commit: $COMMIT_LINE"
        echo "- mode: ${GPU_RUN_DRY:+dry run (simulated stages)}${GPU_RUN_CPU:+real stages at CPU sizes}${MODE_REAL:-}"
        echo "- budget: TOTAL_S=$TOTAL_S, caps: $(for s in "${STAGES_ALL[@]}"; do v=CAP_$s; printf '%s %s, ' "$s" "${!v}"; done | sed 's/, $//')"
        echo
        echo "| stage | status | s | key numbers |"
        echo "|---|---|---|---|"
        cat "$WORK/rows.md"
        echo
        echo "$1"
    } >"$OUT/summary.md"
}

pack() {
    if [ -d "$WORK/results" ] && [ -n "$(ls -A "$WORK/results" 2>/dev/null)" ]; then
        tar czf "$OUT/results.tar.gz.tmp" -C "$WORK/results" . && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
    fi
}

run_stage() {
    local name=$1 cap_var="CAP_$1" cap left start rc status keys
    cap=${!cap_var:-60}
    left=$((DEADLINE - $(now) - RESERVE_S))
    if [ "$left" -lt "$MIN_STAGE_S" ]; then
        echo "| $name | skipped | 0 | no time left (${left} s before the deadline) |" >>"$WORK/rows.md"
        log "=== $name: skipped, ${left} s left"
        return
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    start=$(now)
    summary "in flight: **$name** since $((start - START)) s (cap $cap s)"
    log "=== $name (cap $cap s, $((start - START)) s elapsed)"
    STAGE_START=$start STAGE_CAP=$cap timeout -s INT -k 15 "$cap" bash "$SELF" __stage "$name" 2>&1 |
        tee -a "$OUT/run.log" "$WORK/logs/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        77) status=skipped ;;
        124 | 137) status="timeout (cap $cap s)" ;;
        *) status="failed ($rc)" ;;
    esac
    keys=$(grep '^@@ ' "$WORK/logs/$name.log" | sed 's/^@@ //' | cell)
    echo "| $name | $status | $(($(now) - start)) | ${keys:-–} |" >>"$WORK/rows.md"
    log "=== $name: $status in $(($(now) - start)) s"
    pack
}

main() {
    defaults
    START=$(now)
    DEADLINE=$((START + TOTAL_S))
    export START DEADLINE
    if [ -z "$GPU_RUN_DRY$GPU_RUN_CPU" ] && ! nvidia-smi -L >/dev/null 2>&1; then
        echo "no GPU (nvidia-smi -L failed): dry run (GPU_RUN_CPU=1 runs the real stages at CPU sizes)"
        GPU_RUN_DRY=1
        export GPU_RUN_DRY
    fi
    [ -z "$GPU_RUN_DRY$GPU_RUN_CPU" ] && MODE_REAL="GPU"
    rm -rf "$WORK/logs" "$WORK/rows.md" "$WORK/results"
    mkdir -p "$OUT" "$WORK/logs" "$WORK/site"
    : >"$WORK/rows.md"
    echo "[]" >"$OUT/verified.json"  # until the test stage says otherwise
    GPU_LINE=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
    GPU_LINE=${GPU_LINE:-"none (nvidia-smi not available)"}
    # the copy of the tree on the device machine may come without .git: GPU_RUN_COMMIT names the commit then
    if git rev-parse --short HEAD >/dev/null 2>&1; then
        COMMIT_LINE="$(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' (working tree differs)')"
    else
        COMMIT_LINE="${GPU_RUN_COMMIT:-unknown} (no .git here${GPU_RUN_COMMIT:+: as given by GPU_RUN_COMMIT})"
    fi
    local stages=("$@")
    [ ${#stages[@]} -eq 0 ] && stages=("${STAGES_ALL[@]}")
    for stage in "${stages[@]}"; do
        if ! declare -F "stage_$stage" >/dev/null; then
            echo "unknown stage $stage; stages: ${STAGES_ALL[*]}" >&2
            exit 2
        fi
    done
    log "=== gpu_run.sh: stages ${stages[*]}, TOTAL_S=$TOTAL_S, OUT=$OUT, device: $GPU_LINE"
    for stage in "${stages[@]}"; do
        run_stage "$stage"
    done
    pack
    summary "done in $(($(now) - START)) s"
    log "=== done in $(($(now) - START)) s; $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    cat "$OUT/summary.md"
}

if [ "${1:-}" = "__stage" ]; then
    "stage_$2"
    exit $?
fi
main "$@"
