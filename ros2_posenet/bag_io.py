"""rosbag2 helpers shared by the tools that read recordings (``posenet-relocalize-bag``, ``posenet-make-dataset``).

ROS-free (the ``rosbags`` library): message type names, topic lookup with clear errors, and
outputs staged under a temporary name so that a failed run leaves nothing half-written.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from rosbags.rosbag2 import Reader

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
ODOMETRY_TYPE = "nav_msgs/msg/Odometry"
TF_TYPE = "tf2_msgs/msg/TFMessage"


class UsageError(ValueError):
    """Bad command-line input (missing topic, existing output, bad parameter, ...): exit code 2."""


def topic_connections(reader: Reader, topic: str, types: tuple[str, ...], what: str) -> list:
    """The connections of ``topic``; a clear error when it is missing or of another type."""
    connections = [c for c in reader.connections if c.topic == topic]
    if not connections:
        present = sorted({c.topic for c in reader.connections if c.msgtype in types})
        raise UsageError(f"topic {topic!r} is not in the bag; {what} topics there: {present or 'none'}")
    bad = {c.msgtype for c in connections} - set(types)
    if bad:
        raise UsageError(f"topic {topic!r} has type {sorted(bad)}, expected {' or '.join(types)}")
    return connections


class StagedPath:
    """An output written under a temporary name beside its destination, then moved into place or removed.

    The staging folder sits in the destination's directory (same file system, so the
    move is a rename) and the output keeps its final name inside it, so a bag's
    ``metadata.yaml`` names the right files.
    """

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".partial", dir=self.final.parent))
        self.path = self.folder / self.final.name

    def commit(self) -> None:
        if self.final.is_dir() and not self.final.is_symlink():
            shutil.rmtree(self.final)
        elif self.final.exists() or self.final.is_symlink():
            self.final.unlink()
        os.replace(self.path, self.final)
        self.folder.rmdir()

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
