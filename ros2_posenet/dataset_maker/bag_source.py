"""What ``make-dataset`` reads from a rosbag2: images, their CameraInfo, depth, and poses.

Reading reuses ``relocalize-bag``'s helpers (topic checks, image decoding, the
node's CameraInfo parsing); messages are deserialised by ``rosbags``. Poses come
from :mod:`.tf_buffer`: TF (``/tf`` + ``/tf_static``) looked up at each image's
stamp, or a pose topic (``PoseStamped``, ``PoseWithCovarianceStamped``, ``Odometry``)
interpolated to it, the pose's frame carried to the camera's optical frame by the
extrinsic from ``/tf_static`` or the node's ``camera_to_base``.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np

from ..frames import CameraMount
from ..ros import messages
from ..ros.camera_info import CameraInfoError, CameraIntrinsics, intrinsics_from_camera_info
from ..ros.image import ImageConversionError, raw_image_to_array
from ..bag_io import CAMERA_INFO_TYPE, IMAGE_TYPES, ODOMETRY_TYPE, TF_TYPE, UsageError, topic_connections
from .tf_buffer import NANOSECONDS, PoseSeries, TransformChainError, TransformTree

log = logging.getLogger("make-dataset")

POSE_TYPES = ("geometry_msgs/msg/PoseStamped", "geometry_msgs/msg/PoseWithCovarianceStamped", ODOMETRY_TYPE)
DEPTH_TYPES = IMAGE_TYPES  # raw, or CompressedImage from compressed_depth_image_transport
DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")  # millimetres, millimetres, metres (REP-118)
DEPTH_MAX_MM = 65534  # 65535 is the 7-Scenes "invalid" value
# compressed_depth_image_transport's ConfigHeader before the PNG: int32 format, float32 depthParam[2] (little-endian)
COMPRESSED_DEPTH_HEADER = np.dtype([("format", "<i4"), ("quant_a", "<f4"), ("quant_b", "<f4")])


def stamp_ns(stamp) -> int:
    return messages.stamp_nanoseconds(stamp)


def seconds(stamp_ns_value: int) -> str:
    return f"{stamp_ns_value // NANOSECONDS}.{stamp_ns_value % NANOSECONDS:09d}"


# ----------------------------------------------------------------------------- pose sources


@dataclass(frozen=True)
class PoseSourceSpec:
    """``--pose-source``: ``tf:MAP[:CAMERA_FRAME]``, ``topic:/name`` or ``sfm``."""

    kind: str  # "tf", "topic" or "sfm"
    map_frame: str = ""
    camera_frame: str = ""  # empty: the images' header frame_id
    topic: str = ""

    @classmethod
    def parse(cls, text: str) -> "PoseSourceSpec":
        kind, _, rest = text.partition(":")
        if kind == "sfm" and not rest:
            return cls("sfm")
        if kind == "tf" and rest:
            map_frame, _, camera = rest.partition(":")
            if map_frame and ":" not in camera:
                return cls("tf", map_frame=map_frame, camera_frame=camera)
        if kind == "topic" and rest.startswith("/") and len(rest) > 1:
            return cls("topic", topic=rest)
        raise UsageError(f"--pose-source {text!r}: expected tf:MAP_FRAME[:CAMERA_OPTICAL_FRAME], topic:/pose_topic or sfm")

    def describe(self) -> dict:
        return {k: v for k, v in (("kind", self.kind), ("map_frame", self.map_frame), ("camera_frame", self.camera_frame),
                                  ("topic", self.topic)) if v}


class TfPoses:
    """Camera optical frame in the map from TF, at an image stamp."""

    def __init__(self, tree: TransformTree, map_frame: str, camera_frame: str, tolerance: float):
        tree.chain(map_frame, camera_frame)  # a TF chain that never connects is an error, not a skip
        self.tree, self.map_frame, self.camera_frame = tree, map_frame, camera_frame
        self.tolerance_ns = round(tolerance * NANOSECONDS)

    def __call__(self, stamp: int) -> np.ndarray | None:
        return self.tree.lookup(self.map_frame, self.camera_frame, stamp, self.tolerance_ns)

    def describe(self) -> dict:
        edges = [f"{parent} -> {child} ({len(series)} samples)" for parent, child, series in self.tree.dynamic_edges(self.map_frame, self.camera_frame)]
        return {"map_frame": self.map_frame, "camera_frame": self.camera_frame, "dynamic_transforms": edges}


class TopicPoses:
    """A pose topic interpolated to the image stamp, then carried to the optical frame: ``T_map_body · T_body_optical``."""

    def __init__(self, series: PoseSeries, map_frame: str, body_frame: str, T_body_optical: np.ndarray, extrinsic_from: str, tolerance: float):
        self.series, self.map_frame, self.body_frame = series, map_frame, body_frame
        self.T_body_optical, self.extrinsic_from = T_body_optical, extrinsic_from
        self.tolerance_ns = round(tolerance * NANOSECONDS)

    def __call__(self, stamp: int) -> np.ndarray | None:
        T = self.series.at(stamp, self.tolerance_ns)
        return None if T is None else T @ self.T_body_optical

    def describe(self) -> dict:
        return {"map_frame": self.map_frame, "pose_frame": self.body_frame, "samples": len(self.series),
                "camera_extrinsic": self.extrinsic_from, "T_pose_frame_optical": np.round(self.T_body_optical, 9).tolist()}


def read_transforms(reader, typestore, counts: Counter) -> TransformTree:
    """Every transform of ``/tf`` and ``/tf_static`` (unreadable messages counted)."""
    tree = TransformTree()
    for topic, static in (("/tf", False), ("/tf_static", True)):
        connections = [c for c in reader.connections if c.topic == topic]
        bad = {c.msgtype for c in connections} - {TF_TYPE}
        if bad:
            raise UsageError(f"topic {topic} has type {sorted(bad)}, expected {TF_TYPE}")
        for connection, _, raw in reader.messages(connections=connections) if connections else ():
            try:
                msg = typestore.deserialize_cdr(raw, connection.msgtype)
            except Exception:  # rosbags raises assorted errors for truncated CDR
                counts[f"unreadable {topic} message"] += 1
                continue
            for t in msg.transforms:
                try:
                    T = messages.matrix_from_transform_msg(t.transform)
                except ValueError:
                    counts[f"invalid transform on {topic}"] += 1
                    continue
                tree.add(t.header.frame_id, t.child_frame_id, stamp_ns(t.header.stamp), T, static)
    return tree


def read_pose_topic(reader, typestore, topic: str, counts: Counter) -> tuple[PoseSeries, str, str]:
    """Samples of a pose topic, its frame_id and child frame (Odometry's; '' for the others)."""
    series, frames, children = PoseSeries(), Counter(), Counter()
    for connection, _, raw in reader.messages(connections=topic_connections(reader, topic, POSE_TYPES, "pose")):
        try:
            msg = typestore.deserialize_cdr(raw, connection.msgtype)
            pose = msg.pose.pose if hasattr(msg.pose, "pose") else msg.pose
            series.add(stamp_ns(msg.header.stamp), messages.matrix_from_pose_msg(pose))
        except Exception:  # truncated CDR, zero quaternion
            counts[f"unreadable {topic} message"] += 1
            continue
        frames[msg.header.frame_id.lstrip("/")] += 1
        children[getattr(msg, "child_frame_id", "").lstrip("/")] += 1
    if not len(series):
        raise UsageError(f"pose topic {topic} holds no usable pose")
    if len(frames) > 1 or len(children) > 1:
        raise UsageError(f"pose topic {topic} changes frames during the recording ({dict(frames)} / {dict(children)})")
    return series, next(iter(frames)), next(iter(children))


def topic_poses(reader, typestore, topic: str, image_frame: str, pose_frame: str | None, camera_to_base, tolerance: float,
                counts: Counter) -> TopicPoses:
    """:class:`TopicPoses` with the extrinsic from ``camera_to_base`` (node convention), the frame itself, or /tf_static."""
    series, map_frame, child = read_pose_topic(reader, typestore, topic, counts)
    body = (pose_frame or child or "base_link").lstrip("/")
    if camera_to_base is not None:
        return TopicPoses(series, map_frame, body, CameraMount.from_xyz_rpy(camera_to_base).T_base_optical, "--camera-to-base", tolerance)
    if body == image_frame:
        return TopicPoses(series, map_frame, body, np.eye(4), "none (the pose is the camera's optical frame)", tolerance)
    tree = read_transforms(reader, typestore, counts)
    try:
        from_body, from_camera = tree.chain(image_frame, body)
    except TransformChainError as err:
        raise UsageError(f"no extrinsic from the pose's frame '{body}' to the camera '{image_frame}' ({err}); "
                         "pass --camera-to-base X Y Z ROLL PITCH YAW or --pose-frame") from None
    T_body_optical = tree.lookup(body, image_frame, 0, 0) if _all_static(tree, body, image_frame) else None
    if T_body_optical is None:
        raise UsageError(f"the chain '{body}' -> '{image_frame}' is not all on /tf_static; pass --camera-to-base")
    return TopicPoses(series, map_frame, body, T_body_optical, "/tf_static", tolerance)


def _all_static(tree: TransformTree, a: str, b: str) -> bool:
    return not tree.dynamic_edges(a, b)


# ----------------------------------------------------------------------------- camera


def read_camera_info(reader, typestore, topic: str) -> CameraIntrinsics:
    """The one calibration of ``topic``; an error when there is none or it changes during the recording."""
    found: dict[tuple, CameraIntrinsics] = {}
    bad = 0
    for connection, _, raw in reader.messages(connections=topic_connections(reader, topic, (CAMERA_INFO_TYPE,), "CameraInfo")):
        try:
            intrinsics = intrinsics_from_camera_info(typestore.deserialize_cdr(raw, connection.msgtype))
        except (CameraInfoError, ValueError, Exception) as err:  # noqa: B014 - truncated CDR raises assorted errors
            bad += 1
            log.warning("ignoring CameraInfo on %s: %s", topic, err)
            continue
        key = (intrinsics.K.round(6).tobytes(), intrinsics.distortion.round(9).tobytes(), intrinsics.width, intrinsics.height)
        found.setdefault(key, intrinsics)
    if not found:
        raise UsageError(f"no usable CameraInfo on {topic} ({bad} unusable): the dataset needs the images' calibration")
    if len(found) > 1:
        raise UsageError(f"the CameraInfo on {topic} changes during the recording ({len(found)} calibrations); "
                         "record one calibration per dataset")
    return next(iter(found.values()))


@dataclass
class ImageMessage:
    stamp: int  # header stamp, ns
    frame_id: str
    msg: object


def read_images(reader, typestore, topic: str, counts: Counter) -> Iterator[ImageMessage]:
    """The topic's messages in bag order; unreadable ones, bad stamps and stamps out of order are counted and skipped."""
    last = None
    for connection, _, raw in reader.messages(connections=topic_connections(reader, topic, IMAGE_TYPES, "image")):
        try:
            msg = typestore.deserialize_cdr(raw, connection.msgtype)
        except Exception:
            counts["unreadable message"] += 1
            continue
        problem = messages.stamp_problem(msg.header.stamp)
        if problem:
            counts[problem[0].replace("_", " ")] += 1
            continue
        stamp = stamp_ns(msg.header.stamp)
        if last is not None and stamp <= last:
            counts["stamp out of order"] += 1
            log.warning("skipping image stamped %s: not after the previous one (%s)", seconds(stamp), seconds(last))
            continue
        last = stamp
        yield ImageMessage(stamp, msg.header.frame_id.lstrip("/"), msg)


def first_image_frame(reader, typestore, topic: str) -> tuple[str, bool]:
    """Header frame_id of the topic's first readable image, and whether the topic is compressed."""
    connections = topic_connections(reader, topic, IMAGE_TYPES, "image")
    for connection, _, raw in reader.messages(connections=connections):
        try:
            return typestore.deserialize_cdr(raw, connection.msgtype).header.frame_id.lstrip("/"), connection.msgtype == IMAGE_TYPES[1]
        except Exception:
            continue
    raise UsageError(f"image topic {topic} holds no readable message")


# ----------------------------------------------------------------------------- depth


def depth_to_millimetres(msg) -> np.ndarray:
    """A depth ``sensor_msgs/Image`` (or compressedDepth ``CompressedImage``) as uint16 millimetres, 0 where invalid
    (NaN, <= 0, beyond 65.534 m)."""
    if hasattr(msg, "format"):
        return compressed_depth_to_millimetres(msg)
    if msg.encoding not in DEPTH_ENCODINGS:
        raise ImageConversionError(f"depth encoding {msg.encoding!r} is not one of {', '.join(DEPTH_ENCODINGS)}", "unsupported_encoding")
    if msg.encoding == "32FC1":
        return _metres_to_millimetres(_float_depth(msg))
    return _valid_millimetres(raw_image_to_array(msg))


def _metres_to_millimetres(metres: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        mm = np.where(np.isfinite(metres) & (metres > 0), np.round(metres * 1000.0), 0.0)
    return _valid_millimetres(mm)


def _valid_millimetres(mm: np.ndarray) -> np.ndarray:
    return np.where(mm > DEPTH_MAX_MM, 0, mm).astype(np.uint16)


def compressed_depth_to_millimetres(msg) -> np.ndarray:
    """compressed_depth_image_transport's ``"16UC1; compressedDepth png"`` / ``"32FC1; compressedDepth png"``.

    The data is a 12-byte header, then a 16-bit PNG: the millimetres themselves for 16UC1; for
    32FC1 a quantised inverse depth ``q`` with ``depth = quant_a / (q - quant_b)`` metres (``q = 0``:
    no depth). A format without ``;`` is the plugin's first version (png). RVL is not read.
    """
    encoding, _, compression = msg.format.partition(";")
    encoding, compression = encoding.strip(), compression.strip()
    if compression and compression not in ("compressedDepth", "compressedDepth png"):
        raise ImageConversionError(f"depth format {msg.format!r}: only compressedDepth png is read (not rvl, jpeg...)", "unsupported_encoding")
    if encoding not in DEPTH_ENCODINGS:
        raise ImageConversionError(f"compressed depth encoding {encoding!r} is not one of {', '.join(DEPTH_ENCODINGS)}", "unsupported_encoding")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    size = COMPRESSED_DEPTH_HEADER.itemsize
    if data.size <= size:
        raise ImageConversionError(f"compressedDepth image of {data.size} bytes: no room for its {size}-byte header and PNG", "truncated_image")
    header = data[:size].view(COMPRESSED_DEPTH_HEADER)[0]
    pixels = cv2.imdecode(data[size:], cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.ndim != 2 or pixels.dtype != np.uint16:
        raise ImageConversionError(f"compressedDepth data after the {size}-byte header is not a 16-bit one-channel PNG", "corrupt_compressed")
    if encoding != "32FC1":
        return _valid_millimetres(pixels)
    with np.errstate(divide="ignore"):
        metres = np.where(pixels > 0, float(header["quant_a"]) / (pixels.astype(np.float64) - float(header["quant_b"])), np.nan)
    return _metres_to_millimetres(metres)


def _float_depth(msg) -> np.ndarray:
    """32FC1 pixels in metres (row padding and byte order honoured, size checked as for colour images)."""
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if height == 0 or width == 0 or step < 4 * width or data.size < step * height:
        raise ImageConversionError(f"truncated 32FC1 depth image ({width}x{height}, step {step}, {data.size} bytes)", "truncated_image")
    rows = np.ascontiguousarray(data[: step * height].reshape(height, step)[:, : 4 * width])
    return rows.view(np.dtype("f4").newbyteorder(">" if msg.is_bigendian else "<")).reshape(height, width).astype(np.float64)


def read_depth(reader, typestore, topic: str, wanted: dict[int, int], tolerance: float, counts: Counter) -> Iterator[tuple[int, object]]:
    """(frame index, depth message) for each wanted frame: the depth image stamped nearest its stamp within ``tolerance``.

    ``wanted`` maps image stamps (ns) to frame indices; one pass over the depth topic.
    """
    stamps = np.array(sorted(wanted), dtype=np.int64)
    best: dict[int, tuple[int, int]] = {}  # frame index -> (|dt|, depth stamp)
    connections = topic_connections(reader, topic, DEPTH_TYPES, "depth image")
    tolerance_ns = round(tolerance * NANOSECONDS)
    headers: list[tuple[int, int]] = []  # (message number, stamp)
    for number, (connection, _, raw) in enumerate(reader.messages(connections=connections)):
        try:
            headers.append((number, stamp_ns(typestore.deserialize_cdr(raw, connection.msgtype).header.stamp)))
        except Exception:
            counts["unreadable depth message"] += 1
    for number, stamp in headers:
        i = int(np.searchsorted(stamps, stamp))
        for j in (i - 1, i):
            if 0 <= j < len(stamps) and abs(int(stamps[j]) - stamp) <= tolerance_ns:
                frame = wanted[int(stamps[j])]
                if frame not in best or abs(int(stamps[j]) - stamp) < best[frame][0]:
                    best[frame] = (abs(int(stamps[j]) - stamp), number)
    by_number = {number: frame for frame, (_, number) in best.items()}
    for number, (connection, _, raw) in enumerate(reader.messages(connections=connections)):
        if number in by_number:
            yield by_number[number], typestore.deserialize_cdr(raw, connection.msgtype)
