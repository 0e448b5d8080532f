"""Run every CPU benchmark in turn (`make bench`); each prints its own figures.

The GPU script (bench/gpu_bench.sh) is separate: it is meant for a lent GPU machine.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU_BENCHES = ["bench_synthetic.py", "bench_forward.py", "bench_node_latency.py", "bench_training.py", "bench_losses.py", "bench_bundler.py", "bench_refine.py", "bench_strecha.py", "bench_relocalize_bag.py", "bench_uncertainty.py",
               "bench_real.py", "bench_covariance.py", "bench_node_refine.py", "bench_make_dataset.py"]


def main() -> int:
    failed = []
    for name in CPU_BENCHES:
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
