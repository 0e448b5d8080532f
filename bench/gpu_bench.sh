#!/usr/bin/env bash
# One-line runner for a lent GPU machine (device tool `run`, from the repo root): bash bench/gpu_bench.sh [gpu_bench.py options]
# The GPU image lacks transforms3d: carry it as a wheel in .whl/ (see bench/RESULTS.md, "Running the GPU benchmark").
cd "$(dirname "$0")/.." && { [ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}; true; } && PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} python3 bench/gpu_bench.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_bench.log"
