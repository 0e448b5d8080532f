#!/usr/bin/env python3
"""How long the Bundler loader takes to read a reconstruction of Dubrovnik 6K's size.

Writes a random ``bundle.out`` (``--cameras`` cameras, ``--points`` points seen by
``--views`` cameras each, values with Bundler's own precision), then times
:func:`ros2_posenet.data.bundler.read_bundle` and the per-image point lookup the
dataset builds, and prints the figures and a linear extrapolation to Dubrovnik 6K
(6,844 cameras, ~1.9M points, ~9.6M observations).

    python bench/bench_bundler.py                          # 200k points, ~1M observations
    python bench/bench_bundler.py --points 1000000
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ros2_posenet.data.bundler import BUNDLE_HEADER, read_bundle  # noqa: E402

DUBROVNIK_OBSERVATIONS = 9.6e6


def write_random_bundle(path: Path, cameras: int, points: int, views: int, seed: int = 0) -> int:
    """A syntactically valid bundle.out of random content; returns the number of observations."""
    rng = np.random.default_rng(seed)
    with path.open("w") as out:
        out.write(f"{BUNDLE_HEADER}\n{cameras} {points}\n")
        for _ in range(cameras):
            R = np.linalg.qr(rng.normal(size=(3, 3)))[0]
            R *= np.sign(np.linalg.det(R))
            out.write(f"{rng.uniform(500, 2000):.10e} {rng.normal(0, 0.05):.10e} {rng.normal(0, 0.01):.10e}\n")
            out.write("".join(" ".join(f"{v:.10e}" for v in row) + "\n" for row in R))
            out.write(" ".join(f"{v:.10e}" for v in rng.normal(0, 100, 3)) + "\n")
        counts = rng.integers(2, 2 * views - 1, points)
        for n in counts:
            cams = rng.choice(cameras, n, replace=False)
            xy = rng.uniform(-500, 500, (n, 2))
            view = " ".join(f"{c} {k} {x:.4f} {y:.4f}" for k, (c, (x, y)) in enumerate(zip(cams, xy)))
            out.write(" ".join(f"{v:.10e}" for v in rng.normal(0, 100, 3)) + f"\n{rng.integers(0, 255)} 128 64\n{n} {view}\n")
    return int(counts.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cameras", type=int, default=6844)
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--views", type=int, default=5, help="mean cameras per point")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bundle.out"
        observations = write_random_bundle(path, args.cameras, args.points, args.views)
        size_mb = path.stat().st_size / 1e6
        start = time.perf_counter()
        recon = read_bundle(path)
        parse_s = time.perf_counter() - start
        start = time.perf_counter()
        per_image = [np.unique(recon.observations(c)[0]) for c in range(len(recon.cameras))]
        lookup_s = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"bundle.out: {args.cameras} cameras, {args.points} points, {observations} observations, {size_mb:.0f} MB")
    print(f"read_bundle: {parse_s:.1f} s ({observations / parse_s / 1e6:.2f} M observations/s); "
          f"per-image point lists: {lookup_s:.2f} s ({sum(map(len, per_image))} entries); peak RSS {peak_mb:.0f} MB")
    print(f"extrapolated to Dubrovnik 6K (~{DUBROVNIK_OBSERVATIONS / 1e6:.1f} M observations): "
          f"~{parse_s * DUBROVNIK_OBSERVATIONS / observations:.0f} s to read")


if __name__ == "__main__":
    main()
