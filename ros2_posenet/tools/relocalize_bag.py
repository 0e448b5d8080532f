"""``relocalize-bag``: run PoseNet over a recorded image topic and write the trajectory.

Reads a rosbag2 (sqlite3 or MCAP) with the ``rosbags`` library (no ROS install
needed), takes a ``sensor_msgs/Image`` or ``sensor_msgs/CompressedImage`` topic
(detected from the bag), predicts the camera pose of every frame and writes:

* a new bag with ``geometry_msgs/PoseStamped`` on ``--pose-topic`` (the optical
  camera frame's pose in the map frame) and ``tf2_msgs/TFMessage`` on ``--tf-topic``
  (``map → camera frame``), with the images' header stamps and the original bag
  receive times;
* optionally CSV (``timestamp,bag_time_ns,frame_id,x,y,z,qx,qy,qz,qw``) and TUM
  (``timestamp tx ty tz qx qy qz qw``) trajectories, timestamps = header stamps in seconds.

Frames that cannot be decoded or give a non-finite pose are skipped and counted.

    relocalize-bag recording/ --topic /camera/image_raw --checkpoint ckpt.pt --out poses_bag \\
        --csv poses.csv --tum poses.tum --backend onnxruntime
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import numpy as np
from rosbags.rosbag2 import Reader, ReaderError, StoragePlugin, Writer, WriterError
from rosbags.typesys import Stores, get_typestore

from ..backends import BACKENDS, PRECISIONS, BackendUnavailableError
from ..checkpoint import CheckpointError
from ..geometry import wxyz_to_xyzw
from ..inference import Relocalizer, finite_rows
from ..ros.image import ImageConversionError, msg_to_rgb

log = logging.getLogger("relocalize-bag")

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
POSE_TYPE = "geometry_msgs/msg/PoseStamped"
TF_TYPE = "tf2_msgs/msg/TFMessage"
STORAGES = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
CSV_HEADER = ("timestamp", "bag_time_ns", "frame_id", "x", "y", "z", "qx", "qy", "qz", "qw")


class UsageError(ValueError):
    """Bad command-line input (missing topic, existing output, ...): exit code 2."""


@dataclass
class Frame:
    """One decoded image, reduced to the network's crop."""

    bag_time: int  # ns, when the recorder received it
    sec: int  # header stamp
    nanosec: int
    frame_id: str
    crop: np.ndarray  # (crop, crop, 3) uint8 RGB


@dataclass
class PoseRecord:
    """One relocalised frame: camera-to-map pose of the optical frame."""

    bag_time: int
    sec: int
    nanosec: int
    frame_id: str
    position: np.ndarray  # (3,)
    quaternion: np.ndarray  # (4,) w, x, y, z

    @property
    def timestamp(self) -> str:
        """Header stamp in seconds, printed exactly (no float rounding)."""
        return f"{self.sec}.{self.nanosec:09d}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="relocalize-bag", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("input", help="input rosbag2 (directory, or a .mcap/.db3 file)")
    parser.add_argument("--topic", required=True, help="Image or CompressedImage topic")
    parser.add_argument("--checkpoint", required=True, help="ros2_posenet checkpoint (.pt)")
    parser.add_argument("--out", required=True, help="output bag directory (must not exist)")
    parser.add_argument("--csv", help="also write the trajectory as CSV")
    parser.add_argument("--tum", help="also write the trajectory in TUM format")
    parser.add_argument("--storage", choices=sorted(STORAGES), help="output storage (default: the input's)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: torch on CUDA, onnxruntime on CPU")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp16 on CUDA only")
    parser.add_argument("--compile", action="store_true", help="torch backend: torch.compile the model")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--batch-size", type=int, default=8, help="frames per network call")
    parser.add_argument("--pose-topic", default="/posenet/pose")
    parser.add_argument("--tf-topic", default="/tf")
    parser.add_argument("--map-frame", help="parent frame (default: the checkpoint's map frame)")
    parser.add_argument("--child-frame", help="TF child frame (default: each image's frame_id)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


# ----------------------------------------------------------------------------- reading


def input_storage(path: str | Path) -> str:
    """``mcap`` or ``sqlite3``, from the bag's files."""
    path = Path(path)
    files = [path] if path.is_file() else list(path.glob("*"))
    return "mcap" if any(f.suffix == ".mcap" for f in files) else "sqlite3"


def image_connections(reader: Reader, topic: str) -> list:
    """The connections of ``topic``; a clear error when it is missing or not an image topic."""
    connections = [c for c in reader.connections if c.topic == topic]
    if not connections:
        images = sorted({c.topic for c in reader.connections if c.msgtype in IMAGE_TYPES})
        raise UsageError(f"topic {topic!r} is not in the bag; image topics there: {images or 'none'}")
    bad = {c.msgtype for c in connections} - set(IMAGE_TYPES)
    if bad:
        raise UsageError(f"topic {topic!r} has type {sorted(bad)}, expected sensor_msgs/msg/Image or CompressedImage")
    return connections


def read_frames(reader: Reader, connections: list, typestore, reloc: Relocalizer, skipped: Counter) -> Iterator[Frame]:
    """Decode every image of ``connections`` into a network crop, in bag order."""
    for connection, bag_time, raw in reader.messages(connections=connections):
        msg = typestore.deserialize_cdr(raw, connection.msgtype)
        try:
            crop = reloc.crop(msg_to_rgb(msg))
        except (ImageConversionError, ValueError) as err:
            skipped["undecodable image"] += 1
            log.warning("skipping image at bag time %d: %s", bag_time, err)
            continue
        stamp = msg.header.stamp
        yield Frame(bag_time, int(stamp.sec), int(stamp.nanosec), msg.header.frame_id, crop)


def batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def relocalize(frames: Iterable[Frame], reloc: Relocalizer, batch_size: int, skipped: Counter) -> Iterator[PoseRecord]:
    """Run the network on batches of frames; frames with non-finite output are skipped."""
    for batch in batched(frames, batch_size):
        positions, quaternions = reloc.forward_crops(np.stack([f.crop for f in batch]))
        for frame, ok, t, q in zip(batch, finite_rows(positions, quaternions), positions, quaternions):
            if not ok:
                skipped["non-finite network output"] += 1
                log.warning("skipping image at bag time %d: network output is not finite", frame.bag_time)
                continue
            yield PoseRecord(frame.bag_time, frame.sec, frame.nanosec, frame.frame_id, t, q)


# ----------------------------------------------------------------------------- writing


class PoseBagWriter:
    """Writes PoseStamped + TFMessage for each record into a new bag."""

    def __init__(self, writer: Writer, typestore, args: argparse.Namespace, map_frame: str):
        self.writer, self.ts = writer, typestore
        self.map_frame = args.map_frame or map_frame
        self.child_frame = args.child_frame
        self.pose_conn = writer.add_connection(args.pose_topic, POSE_TYPE, typestore=typestore)
        self.tf_conn = writer.add_connection(args.tf_topic, TF_TYPE, typestore=typestore)

    def header(self, record: PoseRecord, frame_id: str):
        T = self.ts.types
        stamp = T["builtin_interfaces/msg/Time"](sec=record.sec, nanosec=record.nanosec)
        return T["std_msgs/msg/Header"](stamp=stamp, frame_id=frame_id)

    def quaternion_msg(self, record: PoseRecord):
        x, y, z, w = wxyz_to_xyzw(record.quaternion)
        return self.ts.types["geometry_msgs/msg/Quaternion"](x=x, y=y, z=z, w=w)

    def pose_msg(self, record: PoseRecord):
        T = self.ts.types
        pose = T["geometry_msgs/msg/Pose"](
            position=T["geometry_msgs/msg/Point"](*map(float, record.position)),
            orientation=self.quaternion_msg(record),
        )
        return T[POSE_TYPE](header=self.header(record, self.map_frame), pose=pose)

    def tf_msg(self, record: PoseRecord):
        T = self.ts.types
        transform = T["geometry_msgs/msg/Transform"](
            translation=T["geometry_msgs/msg/Vector3"](*map(float, record.position)),
            rotation=self.quaternion_msg(record),
        )
        child = self.child_frame or record.frame_id or "camera"
        stamped = T["geometry_msgs/msg/TransformStamped"](
            header=self.header(record, self.map_frame), child_frame_id=child, transform=transform
        )
        return T[TF_TYPE](transforms=[stamped])

    def write(self, record: PoseRecord) -> None:
        self.writer.write(self.pose_conn, record.bag_time, self.ts.serialize_cdr(self.pose_msg(record), POSE_TYPE))
        self.writer.write(self.tf_conn, record.bag_time, self.ts.serialize_cdr(self.tf_msg(record), TF_TYPE))


def trajectory_row(record: PoseRecord) -> list[str]:
    """``x y z qx qy qz qw`` as text (ROS/TUM quaternion order)."""
    values = np.concatenate((record.position, wxyz_to_xyzw(record.quaternion)))
    return [repr(float(v)) for v in values]


def csv_writer(stream: TextIO):
    writer = csv.writer(stream)
    writer.writerow(CSV_HEADER)
    return lambda r: writer.writerow([r.timestamp, r.bag_time, r.frame_id, *trajectory_row(r)])


def tum_writer(stream: TextIO):
    stream.write("# timestamp tx ty tz qx qy qz qw\n")
    return lambda r: stream.write(" ".join([r.timestamp, *trajectory_row(r)]) + "\n")


# ----------------------------------------------------------------------------- main


def check_outputs(args: argparse.Namespace) -> None:
    """Fail before loading the model when an output cannot be written."""
    if Path(args.out).exists():
        raise UsageError(f"output bag {args.out} exists already; choose another --out or remove it")
    if not Path(args.input).exists():
        raise UsageError(f"input bag {args.input} does not exist")
    for path in (args.csv, args.tum):
        if path and not Path(path).resolve().parent.is_dir():
            raise UsageError(f"directory of {path} does not exist")


def run(args: argparse.Namespace) -> tuple[int, Counter]:
    """Relocalise the whole topic; returns (poses written, skipped frames by reason)."""
    from tqdm import tqdm

    check_outputs(args)
    typestore = get_typestore(Stores.LATEST)
    skipped: Counter = Counter()
    written = 0
    with Reader(args.input) as reader, contextlib.ExitStack() as stack:
        connections = image_connections(reader, args.topic)
        reloc = Relocalizer(args.checkpoint, device=args.device, backend=args.backend, precision=args.precision, compile=args.compile)
        log.info("backend %s (%s, %s)", reloc.backend_name, reloc.device, "fp16" if reloc.half else "fp32")
        sinks = [PoseBagWriter(stack.enter_context(open_writer(args)), typestore, args, reloc.map_frame).write]
        if args.csv:
            sinks.append(csv_writer(stack.enter_context(open(args.csv, "w", newline=""))))
        if args.tum:
            sinks.append(tum_writer(stack.enter_context(open(args.tum, "w"))))
        total = sum(c.msgcount for c in connections)
        frames = read_frames(reader, connections, typestore, reloc, skipped)
        for record in tqdm(relocalize(frames, reloc, args.batch_size, skipped), total=total, unit="frame", disable=None):
            for sink in sinks:
                sink(record)
            written += 1
    return written, skipped


def open_writer(args: argparse.Namespace) -> Writer:
    return Writer(args.out, version=Writer.VERSION_LATEST, storage_plugin=STORAGES[args.storage or input_storage(args.input)])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    try:
        written, skipped = run(args)
    except (UsageError, CheckpointError, BackendUnavailableError, ReaderError, WriterError, OSError) as err:
        print(f"relocalize-bag: error: {err}", file=sys.stderr)
        return 2
    details = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
    print(f"relocalize-bag: wrote {written} poses to {args.out}" + (f"; skipped {sum(skipped.values())} ({details})" if skipped else ""))
    if written == 0:
        print("relocalize-bag: error: no pose was written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
