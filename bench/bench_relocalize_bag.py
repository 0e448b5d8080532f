"""relocalize-bag throughput: frames/s over a recorded JPEG topic, per backend and batch size (prints figures).

Writes a bag of ``--frames`` 640×480 JPEG ``CompressedImage``s, saves a PoseNet
checkpoint with random weights (latency does not depend on them) and runs the tool
end to end (decode, resize + crop, network, frame conversions, rclpy serialisation,
bag/CSV writing) for each variant, as a user runs it. Each run also loads the
checkpoint (and, for onnxruntime, exports the graph): the same run on a one-frame bag
measures that start-up, and the per-frame figure is ``(t_N - t_1) / (N - 1)``.

    python bench/bench_relocalize_bag.py --frames 60 --backbone googlenet
"""
from __future__ import annotations

import argparse
import contextlib
import io
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from ros2_posenet.checkpoint import save_checkpoint
from ros2_posenet.model import ModelConfig, PoseNet
from ros2_posenet.preprocess import PreprocessConfig
from ros2_posenet.tools.relocalize_bag import main as relocalize_bag

TS = get_typestore(Stores.LATEST)


def write_jpeg_bag(path: Path, frames: int) -> None:
    rng = np.random.default_rng(0)
    T = TS.types
    with Writer(path, version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection("/camera/image_raw/compressed", "sensor_msgs/msg/CompressedImage", typestore=TS)
        for i in range(frames):
            image = cv2.resize(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), (640, 480), interpolation=cv2.INTER_CUBIC)
            data = cv2.imencode(".jpg", image)[1].reshape(-1)
            stamp = T["builtin_interfaces/msg/Time"](sec=1_700_000_000 + i // 30, nanosec=(i % 30) * 33_000_000)
            msg = T["sensor_msgs/msg/CompressedImage"](header=T["std_msgs/msg/Header"](stamp=stamp, frame_id="camera"), format="jpeg", data=data)
            writer.write(conn, 1_700_000_000_000_000_000 + i * 33_000_000, TS.serialize_cdr(msg, "sensor_msgs/msg/CompressedImage"))


def timed_run(bag: Path, out: Path, checkpoint: Path, backend: str, batch: int) -> float:
    args = [str(bag), "--topic", "/camera/image_raw/compressed", "--checkpoint", str(checkpoint), "--out", str(out),
            "--csv", str(out) + ".csv", "--backend", backend, "--device", "cpu", "--batch-size", str(batch), "--overwrite"]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert relocalize_bag(args) == 0
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--backbone", default="googlenet")
    parser.add_argument("--variants", nargs="+", default=["onnxruntime:1", "onnxruntime:8", "torch:1", "torch:8"])
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads; "
          f"{args.frames} JPEG frames 640x480, {args.backbone} at 256/224")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jpeg_bag(tmp / "one", 1)
        write_jpeg_bag(tmp / "many", args.frames)
        model = PoseNet(ModelConfig(backbone=args.backbone, pretrained=False))
        checkpoint = save_checkpoint(tmp / "ckpt.pt", model, PreprocessConfig(resize=256, crop=224))
        for variant in args.variants:
            backend, batch = variant.split(":")
            start_up = timed_run(tmp / "one", tmp / "out", checkpoint, backend, int(batch))
            total = timed_run(tmp / "many", tmp / "out", checkpoint, backend, int(batch))
            per_frame = (total - start_up) / (args.frames - 1)
            print(f"{backend:12s} batch {int(batch):2d}: {1e3 * per_frame:7.1f} ms/frame = {1 / per_frame:5.1f} frames/s "
                  f"(start-up {start_up:.1f} s, whole run {total:.1f} s)")


if __name__ == "__main__":
    main()
