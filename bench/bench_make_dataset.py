"""Time posenet-make-dataset on a 2,000-frame bag with poses (TF, depth), and SfM per 100 frames.

    python bench/bench_make_dataset.py --frames 2000 --unique 100 --width 640 --height 480 --work /tmp/bench_md

The bag is written like the tests' (test/tools/test_make_dataset.py): ``--unique`` rendered
frames of the synthetic scene, repeated with fresh stamps up to ``--frames`` (the cost per frame
does not depend on the content), 10 Hz images + CameraInfo + 16UC1 depth, TF at 25 Hz.
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "test"), str(ROOT / "test" / "tools")]

import test_make_dataset as t  # noqa: E402
from ros2_posenet.data.synthetic import SyntheticSceneConfig, generate_scene  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--unique", type=int, default=100)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_make_dataset"))
    p.add_argument("--sfm-frames", type=int, default=100, help="frames for the SfM timing (0: skip)")
    a = p.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    config = SyntheticSceneConfig(width=a.width, height=a.height, frames_train=a.unique, frames_test=1, train_sequences=1,
                                  test_sequences=1, num_points=0, formats=("7scenes",))
    start = time.perf_counter()
    generate_scene(a.work / "scene", config)
    unique = t.scene_frames(a.work / "scene", "seq-01")
    frames = [unique[i % len(unique)] for i in range(a.frames)]
    t.write_scene_bag(a.work / "bag", frames, config.K, (a.width, a.height))
    size = sum(f.stat().st_size for f in (a.work / "bag").glob("*")) / 1e6
    print(f"bag: {a.frames} frames {a.width}x{a.height} + depth, {size:.0f} MB, made in {time.perf_counter() - start:.0f} s")
    for label, extra in (("all frames kept", t.KEEP_ALL), ("default selection", [])):
        out = a.work / "ds"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        rc = t.main([str(a.work / "bag"), "--image-topic", "/camera/image_raw", "--depth-topic", "/camera/depth/image_raw",
                     "--pose-source", f"tf:map:{t.CAMERA}", "--out", str(out), "--block-seconds", "20", "--quiet", *extra])
        print(f"make-dataset ({label}): rc {rc}, {time.perf_counter() - start:.1f} s wall")
    if a.sfm_frames:
        out = a.work / "sfm"
        start = time.perf_counter()
        bag = a.work / "sfm_bag"
        t.write_scene_bag(bag, unique[: a.sfm_frames], config.K, (a.width, a.height), depth=False)
        rc = t.main([str(bag), "--image-topic", "/camera/image_raw", "--pose-source", "sfm", "--align-to", f"tf:map:{t.CAMERA}",
                     "--out", str(out), "--test-fraction", "0", "--quiet", *t.KEEP_ALL])
        print(f"make-dataset sfm on {a.sfm_frames} frames: rc {rc}, {time.perf_counter() - start:.1f} s wall")
        if rc == 0:
            s = yaml.safe_load((out / "dataset.yaml").read_text())["sfm"]
            print(f"  {s['mapper']} mapping, {s['matcher']} matching: registered {s['registered']}/{s['frames']} in {s['seconds']} s; "
                  f"alignment residual RMS {1000 * s['alignment']['residual_rms_m']:.1f} mm, median {1000 * s['alignment']['residual_median_m']:.1f} mm")


if __name__ == "__main__":
    main()
