#!/usr/bin/env bash
# One-line runner for a lent GPU machine (device tool `run`, from the repo root): bash bench/gpu_bench.sh [gpu_bench.py options]
# First the CUDA-only tests (CUDA graph, fp16), then the benchmark. The GPU image lacks transforms3d: carry it as a
# wheel in .whl/ (bench/RESULTS.md, "Running the GPU benchmark"). Logs and JSON go to $OUT (or /tmp).
cd "$(dirname "$0")/.." && { [ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}; true; } && export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} && { timeout 120 python3 -m pytest -q -rs -p no:cacheprovider test/test_inference_backends.py -k "cuda" 2>&1 | tee "${OUT:-/tmp}/gpu_tests.log"; python3 bench/gpu_bench.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_bench.log"; }
