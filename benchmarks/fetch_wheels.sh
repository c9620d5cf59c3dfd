#!/usr/bin/env bash
# Download, here (where pip reaches the registry), the wheels the GPU machine's image lacks for the benchmark
# baselines, into .whl/ (ignored by git: never commit wheels). The GPU machine runs Python 3.12 and has no network;
# benchmarks/gpu_run.sh installs whatever .whl/ holds with `pip install --no-deps --target` (the device README's
# command), so this list must be complete: benchmarks/wheelset.py checks every wheel's Requires-Dist against the
# image's package list in the device tool's KINDS.md.
#
#     bash benchmarks/fetch_wheels.sh            # into .whl/ (emptied first)
#     WHEEL_DIR=/tmp/w bash benchmarks/fetch_wheels.sh
#
# What and why (checked 2026-12-01 against KINDS.md's list of the 'cuda' image):
#   liger-kernel 0.8.5   baseline (needs torch, triton: in the image)
#   trl 1.16.0           baseline; needs datasets, which the image lacks (the rest of its needs are there)
#   datasets 5.2.0       the version this repository's CPU environment tests trl 1.16 with; needs dill, multiprocess
#   dill 0.4.1, multiprocess 0.70.19 (the py312 wheel)
# The benchmarks import only trl.kernels and liger_kernel, which need none of datasets/dill/multiprocess: those are
# carried so that `import trl` and its trainer work there as well.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${WHEEL_DIR:-.whl}
KINDS=${KINDS_MD:-/work/.library/device/KINDS.md}
WHEELS=(liger-kernel==0.8.5 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

rm -rf "$DEST"
mkdir -p "$DEST"
# The device README's command: CPython 3.12 binaries for the manylinux tags the machine accepts, no dependencies.
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"

python3 -m benchmarks.wheelset "$DEST" --kinds "$KINDS" --python 3.12
du -sh "$DEST"
