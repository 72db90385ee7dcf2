#!/usr/bin/env bash
# Run on a machine WITH internet before benchmarks/gpu_check_large.sh is run on a GPU machine without it: downloads
# the bitsandbytes wheel (the QLoRA check needs it; lorasens[qlora]) into .whl/ (git-ignored), to be carried along.
#   bash benchmarks/gpu_wheels.sh && ls -l .whl/
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_24_x86_64 \
    -d .whl "bitsandbytes==0.50.2"
du -sh .whl
echo "carry .whl with the working tree (64 MiB limit); gpu_check_large.sh installs from it when bitsandbytes is missing"
