"""Benchmark of the synthetic scene generator: prints frames/s (render + write, both formats).

    python bench/bench_synthetic.py [--frames 1000] [--width 320] [--height 240]

Target: 1,000 frames at 320x240 in well under a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ros2_posenet.data.synthetic import SyntheticScene, SyntheticSceneConfig, generate_scene, scene_trajectories  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000, help="total frames (80%% train, 20%% test)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n_test = max(1, args.frames // 5)
    config = SyntheticSceneConfig(seed=args.seed, width=args.width, height=args.height,
                                  frames_train=args.frames - n_test, frames_test=n_test)

    scene = SyntheticScene(config)
    poses = [T for seq in scene_trajectories(config, scene.layout).values() for T in seq["poses"]][:200]
    start = time.perf_counter()
    for T in poses:
        scene.render(T)
    render_fps = len(poses) / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = generate_scene(Path(tmp) / "scene", config)
        seconds = time.perf_counter() - start
    frames = summary["frames"]["train"] + summary["frames"]["test"]
    print(f"render only: {render_fps:.1f} frames/s at {args.width}x{args.height}")
    print(f"generate_scene: {frames} frames in {seconds:.2f} s = {frames / seconds:.1f} frames/s "
          f"(render + PNG/depth/pose + NVM with {summary['measurements']} measurements)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
