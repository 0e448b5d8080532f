"""SfM route of posenet-make-dataset on real images: hololens-office (7-Scenes layout, JPEG, true poses).

    python bench/bench_make_dataset_sfm_real.py --root ../shared/data/hololens-office --work /tmp/bench_md_real [--mapper incremental] [--sfm-seed N]

The images go into a bag as CompressedImage (the JPEG bytes as recorded) at 10 Hz with their CameraInfo,
in the order they were recorded (``frames.txt``: the test frames are blocks cut out of one walk, so the
seq-01 + seq-02 file order jumps in time, which breaks sequential matching),
and the true camera poses as a PoseStamped topic, which --align-to uses for metric scale and gravity;
the written poses are then compared with the true ones (the usual ATE after a similarity alignment).
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "test"), str(ROOT / "test" / "tools")]

import test_make_dataset as t  # noqa: E402
from rosbags.rosbag2 import StoragePlugin, Writer  # noqa: E402
from ros2_posenet.data.seven_scenes import read_intrinsics_file, read_pose_file  # noqa: E402
from ros2_posenet.geometry import matrix_to_pose, rotation_angle_deg_np  # noqa: E402
from ros2_posenet.tools.make_dataset import main as make_dataset  # noqa: E402


def recording_order(root: Path) -> list[Path]:
    """The colour frames in the order of the original walk (``frames.txt``: sequence/frame, position)."""
    rows = [line.split() for line in (root / "frames.txt").read_text().splitlines() if line and not line.startswith("#")]
    return [root / f"{name}.color.jpg" for name, _, _ in sorted(rows, key=lambda row: int(row[1]))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", type=Path, default=ROOT.parent / "shared" / "data" / "hololens-office")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_md_real"))
    p.add_argument("--matcher", default="auto")
    p.add_argument("--mapper", default="global")
    p.add_argument("--sfm-seed", type=int, default=0)
    a = p.parse_args()
    if not a.root.is_dir():
        print(f"skipped: {a.root} not found")
        return
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    K, size = read_intrinsics_file(a.root / "intrinsics.txt")
    images = recording_order(a.root)
    stamps = t.image_stamps(len(images))
    truth = {}
    with Writer(a.work / "bag", version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.SQLITE3) as writer:
        c_img = writer.add_connection("/camera/image_raw/compressed", "sensor_msgs/msg/CompressedImage", typestore=t.TS)
        c_info = writer.add_connection("/camera/camera_info", "sensor_msgs/msg/CameraInfo", typestore=t.TS)
        c_pose = writer.add_connection("/truth", "geometry_msgs/msg/PoseStamped", typestore=t.TS)
        for path, ns in zip(images, stamps):
            T = read_pose_file(Path(str(path).replace(".color.jpg", ".pose.txt")))
            truth[f"{ns // 10**9}.{ns % 10**9:09d}"] = T
            msg = t.TS.types["sensor_msgs/msg/CompressedImage"](header=t.header(ns, t.CAMERA), format="jpeg",
                                                                  data=np.frombuffer(path.read_bytes(), np.uint8))
            writer.write(c_img, ns, t.TS.serialize_cdr(msg, "sensor_msgs/msg/CompressedImage"))
            writer.write(c_info, ns, t.TS.serialize_cdr(t.camera_info_msg(ns, K, size), "sensor_msgs/msg/CameraInfo"))
            pose = t.TS.types["geometry_msgs/msg/PoseStamped"](header=t.header(ns, "map"), pose=t.pose_msg(T))
            writer.write(c_pose, ns, t.TS.serialize_cdr(pose, "geometry_msgs/msg/PoseStamped"))
    out = a.work / "ds"
    start = time.perf_counter()
    rc = make_dataset([str(a.work / "bag"), "--image-topic", "/camera/image_raw/compressed", "--pose-source", "sfm",
                       "--align-to", "topic:/truth", "--pose-frame", t.CAMERA, "--matcher", a.matcher, "--mapper", a.mapper, "--sfm-seed", str(a.sfm_seed), "--out", str(out),
                       "--test-fraction", "0", "--quiet", *t.KEEP_ALL])
    wall = time.perf_counter() - start
    if rc != 0:
        print(f"rc {rc} after {wall:.0f} s wall: no dataset (the error line above says why)")
        return
    meta = yaml.safe_load((out / "dataset.yaml").read_text())
    rows = [r.split(",") for r in (out / "frames.csv").read_text().splitlines()[1:]]
    errors = []
    for seq, frame, stamp in rows:
        T, E = read_pose_file(out / seq / f"{frame}.pose.txt"), truth[stamp]
        errors.append((np.linalg.norm(T[:3, 3] - E[:3, 3]), rotation_angle_deg_np(matrix_to_pose(T)[1], matrix_to_pose(E)[1])))
    errors = np.array(errors)
    s = meta["sfm"]
    print(f"rc {rc}; {len(images)} frames, registered {s['registered']} ({100 * s['registered'] / len(images):.0f} %), "
          f"{s['models']} models, matcher {s['matcher']}, SfM {s['seconds']} s, make-dataset {wall:.0f} s wall")
    print(f"after alignment to the true poses: median {100 * np.median(errors[:, 0]):.1f} cm / {np.median(errors[:, 1]):.2f} deg, "
          f"90th pct {100 * np.percentile(errors[:, 0], 90):.1f} cm / {np.percentile(errors[:, 1], 90):.2f} deg; "
          f"alignment residual RMS {100 * s['alignment']['residual_rms_m']:.1f} cm")


if __name__ == "__main__":
    main()
