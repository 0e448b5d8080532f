"""``relocalize-bag``: run PoseNet over a recorded image topic and write what the node would have published.

(About 670 lines: the command line, the bag reading and the staged writing of one tool; the
per-frame messages themselves come from :mod:`ros2_posenet.ros.outputs`, shared with the node.)

Reads a rosbag2 (sqlite3 or MCAP) with the ``rosbags`` library, takes a
``sensor_msgs/Image`` or ``sensor_msgs/CompressedImage`` topic (detected from the bag)
and, for every frame, writes into a new bag the messages ``posenet_node`` publishes for
that image with the same parameters, built by the node's own code
(:class:`ros2_posenet.frames.RelocalizedPoses` and :mod:`ros2_posenet.ros.messages`,
serialised by rclpy):

* ``pose_topic`` (``PoseStamped``): the robot base (``base_frame``) in the map;
* ``pose_with_covariance_topic`` (``PoseWithCovarianceStamped``): the same with the
  calibrated covariance carried over to the base;
* ``camera_pose_topic`` (``PoseStamped``): the camera body frame (REP-103) in the map;
* ``verified_pose_topic`` (``PoseWithCovarianceStamped``), with ``--map``: the frames the scene map
  verified, with their geometric covariance;
* ``/tf`` per ``tf_mode``: ``map_to_camera`` (map → camera_frame), ``map_to_odom``
  (map → odom, with odom → base from the bag's ``nav_msgs/Odometry`` or ``/tf``) or
  ``none``; ``/tf_static`` once with ``publish_camera_to_base_tf``.

Every message carries its image's header stamp and is written at the image's bag
receive time. Parameters are the node's (``--params-file config/posenet.yaml`` and/or
flags named like them, e.g. ``--camera-to-base 0.1 0 0.3 0 0.2 0``); command-line flags
win. Optionally the base trajectory is also written as CSV
(``timestamp,bag_time_ns,frame_id,child_frame_id,x,y,z,qx,qy,qz,qw``) and TUM
(``timestamp tx ty tz qx qy qz qw``), timestamps = header stamps in seconds, values
exactly those of the ``pose_topic`` messages, or with a map those of ``verified_pose_topic`` where the
map verified the frame.

Frames the node would drop (undecodable, too large, zero/negative stamp, non-finite
pose) are skipped, named by their header stamp, and counted. Outputs are written to temporary paths beside their
destinations and moved into place only when at least one pose was written; existing
outputs are never replaced without ``--overwrite``. Needs rclpy (the venv and any
ROS 2 install have it) to serialise the node's messages.

    relocalize-bag recording/ --topic /camera/image_raw --checkpoint ckpt.pt --out poses_bag \\
        --params-file config/posenet.yaml --csv poses.csv --tum poses.tum
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
from typing import Callable, Iterable, Iterator, TextIO

import numpy as np
import yaml
from builtin_interfaces.msg import Time
from rclpy.expand_topic_name import expand_topic_name
from rclpy.serialization import serialize_message
from rosbags.rosbag2 import Reader, ReaderError, StoragePlugin, Writer, WriterError
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.typesys import Stores, get_typestore

from ..backends import BackendUnavailableError
from ..bag_io import CAMERA_INFO_TYPE, IMAGE_TYPES, ODOMETRY_TYPE, TF_TYPE, StagedPath, UsageError, topic_connections
from ..checkpoint import CheckpointError
from ..frames import CameraMount, PoseHistory, RelocalizedPoses
from ..inference import PosePrediction, Relocalizer, finite_rows
from ..ros import messages
from ..geometric.refiner import RefinementConfig
from ..ros.camera_info import CameraInfoError, stamp_gap_problem
from ..ros.image import ImageConversionError, msg_to_rgb
from ..ros.refinement import REFINED, NodeRefinement
from ..geometric.scene_map import MapError
from ..ros import outputs
from ..ros.outputs import TF_QOS, TF_STATIC_QOS
from ..ros.parameters import NODE_NAME, PARAMETERS, NodeSettings, add_parameter_flag, camera_info_topic_of, type_problem, validate_parameter

log = logging.getLogger("relocalize-bag")

STORAGES = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
CSV_HEADER = ("timestamp", "bag_time_ns", "frame_id", "child_frame_id", "x", "y", "z", "qx", "qy", "qz", "qw")

_SPECS = {spec.name: spec for spec in PARAMETERS}
# The node's parameters that mean something offline; the others (QoS, staleness, rate, services,
# diagnostics) concern live streams.
BAG_PARAMETERS = tuple(name for name in (
    "checkpoint", "device", "backend", "precision", "compile", "cuda_graph", "cpu_threads", "image_topic", "uncertainty", "mc_samples",
    "max_image_pixels", "map_frame", "odom_frame", "base_frame", "camera_frame", "camera_to_base",
    "publish_camera_to_base_tf", "tf_mode", "odom_source", "odom_topic", "odom_tolerance", "transform_tolerance",
    "pose_topic", "pose_with_covariance_topic", "camera_pose_topic", "verified_pose_topic",
    "map_file", "refine", "refine_config", "camera_info_topic", "camera_info_tolerance",
) if name in _SPECS)
# Where the tool's default differs from the node's: offline, onnxruntime is the faster CPU choice.
BAG_DEFAULTS = {"backend": "auto"}
# Parameters whose flags are written by hand (kept from earlier versions: --topic, --checkpoint, --device, --compile).
SPECIAL_FLAGS = frozenset({"checkpoint", "image_topic", "compile", "device", "map_file"})


# ----------------------------------------------------------------------------- parameters


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="posenet-relocalize-bag",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="Parameters not given default to the params file's, then to the node's (posenet_node --help), "
        "except backend (auto). Relative topic names resolve in the root namespace, as for a node started without one. "
        "odom_source auto reads odom -> base from the bag's Odometry on odom_topic when it has one, else from its /tf.",
    )
    parser.add_argument("input", help="input rosbag2 (directory, or a .mcap/.db3 file)")
    parser.add_argument("--out", required=True, help="output bag directory")
    parser.add_argument("--csv", help="also write the base trajectory (pose_topic; with a map the verified pose where there is one) as CSV")
    parser.add_argument("--tum", help="also write the base trajectory (pose_topic) in TUM format")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --out/--csv/--tum (default: refuse)")
    parser.add_argument("--params-file", help="the node's parameters YAML (e.g. config/posenet.yaml)")
    parser.add_argument("--storage", choices=sorted(STORAGES), help="output storage (default: the input's)")
    parser.add_argument("--batch-size", type=int, default=8, help="frames per network call")
    parser.add_argument("--topic", dest="image_topic", help="Image or CompressedImage topic (node parameter image_topic)")
    parser.add_argument("--checkpoint", help=_SPECS["checkpoint"].description)
    parser.add_argument("--device", help=_SPECS["device"].description)
    add_parameter_flag(parser, "compile")
    parser.add_argument("--map", "--map-file", dest="map_file", help=_SPECS["map_file"].description + " The bag must hold the images' CameraInfo (camera_info_topic).")
    for name in BAG_PARAMETERS:
        if name not in SPECIAL_FLAGS:
            add_parameter_flag(parser, name)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def load_params_file(path: str) -> dict:
    """The ``posenet_node`` parameters of a ROS 2 params file (``/**`` and ``posenet_node`` sections, merged in order)."""
    try:
        content = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UsageError(f"cannot read params file {path}: {err}") from None
    if not isinstance(content, dict):
        raise UsageError(f"params file {path} is not a ROS 2 params file (expected '<node>: ros__parameters: ...')")
    values: dict = {}
    for node, section in content.items():
        if str(node) in ("/**", NODE_NAME, "/" + NODE_NAME) or str(node).endswith("/" + NODE_NAME):
            if not isinstance(section, dict) or not isinstance(section.get("ros__parameters"), dict):
                raise UsageError(f"params file {path}: section {node!r} lacks a 'ros__parameters' mapping")
            values.update(section["ros__parameters"])
    if not values:
        raise UsageError(f"params file {path} has no parameters for {NODE_NAME} (sections '/**' or '{NODE_NAME}')")
    return values


def resolve_parameters(args: argparse.Namespace) -> dict:
    """The node's parameters for this run: node defaults < tool defaults < params file < flags; validated like the node."""
    values = {name: _SPECS[name].default for name in BAG_PARAMETERS} | BAG_DEFAULTS
    if args.params_file:
        from_file = load_params_file(args.params_file)
        unknown = sorted(set(from_file) - set(_SPECS) - {"use_sim_time"})
        if unknown:
            log.warning("params file: %s: not %s parameters, ignored", ", ".join(unknown), NODE_NAME)
        live_only = sorted(set(from_file) & set(_SPECS) - set(BAG_PARAMETERS))
        if live_only:
            log.info("params file: %s concern live streams, ignored for a recording", ", ".join(live_only))
        values.update({k: v for k, v in from_file.items() if k in BAG_PARAMETERS})
    values.update({name: getattr(args, name) for name in BAG_PARAMETERS if getattr(args, name, None) is not None})
    problems = []
    for name in BAG_PARAMETERS:
        problem = type_problem(name, values[name]) or validate_parameter(name, values[name])
        if problem and not (name == "checkpoint" and not values[name]):
            problems.append(f"{name} = {values[name]!r}: {problem}")
    if problems:
        raise UsageError("bad parameters: " + "; ".join(problems))
    if not values["checkpoint"]:
        raise UsageError("no checkpoint: pass --checkpoint FILE (or set checkpoint in --params-file)")
    problem = outputs.camera_to_base_tf_problem(values["tf_mode"], values["publish_camera_to_base_tf"])
    if problem:
        raise UsageError(problem)
    for name in ("image_topic", "odom_topic", "pose_topic", "pose_with_covariance_topic", "camera_pose_topic", "verified_pose_topic"):
        values[name] = absolute_topic(values[name])
    values["mount"] = CameraMount.from_xyz_rpy([float(v) for v in values["camera_to_base"]])
    return values


def absolute_topic(name: str) -> str:
    """A node topic name as ``posenet_node`` in the root namespace resolves it (``posenet/pose`` -> ``/posenet/pose``)."""
    try:
        return expand_topic_name(name, NODE_NAME, "/")
    except Exception as err:  # rclpy raises ValueError or its own NameValidationException
        raise UsageError(f"invalid topic name {name!r}: {err}") from None


# ----------------------------------------------------------------------------- reading


@dataclass
class Frame:
    """One decoded image with what the node would use of it."""

    bag_time: int  # ns, when the recorder received it
    stamp: Time  # header stamp: names the frame and stamps every output
    rgb: np.ndarray  # HxWx3 uint8, the camera image (for per-frame refinement)
    crop: np.ndarray  # (crop, crop, 3) uint8 RGB network input
    verified: PosePrediction | None = None  # the pose the map verified (with a map), else None

    @property
    def timestamp(self) -> str:
        return stamp_text(self.stamp)


def stamp_text(stamp) -> str:
    """Header stamp in seconds, printed exactly (no float rounding)."""
    return f"{stamp.sec}.{stamp.nanosec:09d}"


def input_storage(path: str | Path) -> str:
    """``mcap`` or ``sqlite3``, from the bag's files."""
    path = Path(path)
    files = [path] if path.is_file() else list(path.glob("*"))
    return "mcap" if any(f.suffix == ".mcap" for f in files) else "sqlite3"


def read_frames(
    reader: Reader, connections: list, typestore, reloc: Relocalizer, skipped: Counter, max_pixels: int = 0
) -> Iterator[Frame]:
    """Decode every image of ``connections`` into the network's crop, in bag order; bad ones are skipped."""
    for connection, bag_time, raw in reader.messages(connections=connections):
        try:
            msg = typestore.deserialize_cdr(raw, connection.msgtype)
        except Exception as err:  # rosbags raises assorted errors for truncated CDR
            skipped["unreadable message"] += 1
            log.warning("skipping message at bag time %d ns (no header stamp readable): %s", bag_time, err)
            continue
        problem = messages.stamp_problem(msg.header.stamp)
        if problem:
            reason, detail = problem
            skipped[reason.replace("_", " ")] += 1
            log.warning("skipping image: %s", detail)
            continue
        stamp = messages.stamp_from_nanoseconds(messages.stamp_nanoseconds(msg.header.stamp))  # normalised, as the node stamps its outputs
        try:
            rgb = msg_to_rgb(msg, max_pixels, lambda text: log.warning("image stamped %s: %s", stamp_text(stamp), text))
            crop = reloc.crop(rgb)
        except (ImageConversionError, ValueError) as err:
            skipped["undecodable image"] += 1
            log.warning("skipping image stamped %s: %s", stamp_text(stamp), err)
            continue
        yield Frame(bag_time, stamp, rgb, crop)


def read_odometry(reader: Reader, typestore, params: dict) -> tuple[PoseHistory, str]:
    """All odom → base poses of the bag (``nav_msgs/Odometry`` on odom_topic, or ``/tf``), and where they came from."""
    source = params["odom_source"]
    has_topic = any(c.topic == params["odom_topic"] and c.msgtype == ODOMETRY_TYPE for c in reader.connections)
    if source == "auto":
        source = "topic" if has_topic else "tf"
    history = PoseHistory(max_samples=sys.maxsize)
    if source == "topic":
        connections = topic_connections(reader, params["odom_topic"], (ODOMETRY_TYPE,), "Odometry")
        for connection, _, raw in reader.messages(connections=connections):
            with contextlib.suppress(Exception):  # the node ignores unreadable odometry and invalid poses too
                msg = typestore.deserialize_cdr(raw, connection.msgtype)
                history.add(messages.stamp_to_seconds(msg.header.stamp), messages.matrix_from_pose_msg(msg.pose.pose))
        return history, f"topic {params['odom_topic']}"
    connections = [c for c in reader.connections if c.topic == "/tf" and c.msgtype == TF_TYPE]
    for connection, _, raw in reader.messages(connections=connections) if connections else ():  # [] would mean all topics
        with contextlib.suppress(Exception):
            for transform in typestore.deserialize_cdr(raw, connection.msgtype).transforms:
                if transform.header.frame_id == params["odom_frame"] and transform.child_frame_id == params["base_frame"]:
                    history.add(messages.stamp_to_seconds(transform.header.stamp), messages.matrix_from_transform_msg(transform.transform))
    if not len(history):
        raise UsageError(
            f"tf_mode map_to_odom needs odom -> base: the bag has no nav_msgs/Odometry on {params['odom_topic']} "
            f"and no direct {params['odom_frame']} -> {params['base_frame']} transform on /tf"
        )
    return history, "/tf"


# ----------------------------------------------------------------------------- the per-frame pipeline


def batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def predict_batch(reloc: Relocalizer, frames: list[Frame]) -> list[PosePrediction | None]:
    """The network's camera poses for a batch of frames (one backend call); ``None`` where not finite.

    The one place that turns frames into predictions: a refinement step (e.g. against a
    map) wraps this function.
    """
    t, q, cov = reloc.forward_crops_with_covariance(np.stack([f.crop for f in frames]))  # as Relocalizer.predict
    ok = finite_rows(t, q) & np.all(np.isfinite(cov), axis=(1, 2))
    return [reloc.prediction(t[i], q[i], cov[i]) if ok[i] else None for i in range(len(frames))]


Predictor = Callable[[Relocalizer, list], list]


def relocalize(
    frames: Iterable[Frame], reloc: Relocalizer, mount: CameraMount, batch_size: int, skipped: Counter,
    predict: Predictor = predict_batch,
) -> Iterator[tuple[Frame, RelocalizedPoses]]:
    """Frames with the node's poses for them (base, camera, covariance); non-finite ones are skipped."""
    for batch in batched(frames, batch_size):
        for frame, prediction in zip(batch, predict(reloc, batch)):
            poses = None if prediction is None else RelocalizedPoses.from_prediction(
                prediction.position, prediction.quaternion, prediction.covariance, mount
            )
            if poses is None or not poses.is_finite:
                skipped["non-finite network output"] += 1
                log.warning("skipping image stamped %s: network output is not finite", frame.timestamp)
                continue
            yield frame, poses


class NodeOutputs:
    """The messages ``posenet_node`` publishes for one relocalised frame, as ``(topic, message)`` pairs.

    Built by the node's own :mod:`ros2_posenet.ros.outputs`: the regressor's poses and TF, and, where
    the map verified the frame, its pose on ``verified_pose_topic`` (offline every frame is refined;
    the node refines the newest frame whenever its refiner is free).
    """

    def __init__(self, params: dict, map_frame: str, odometry: PoseHistory | None, counts: Counter):
        self.params, self.map_frame, self.odometry, self.counts = params, map_frame, odometry, counts
        self.settings = NodeSettings.from_parameters({name: params[name] for name in BAG_PARAMETERS})

    def __call__(self, frame: Frame, poses: RelocalizedPoses) -> list[tuple[str, object]]:
        s = self.settings
        pose, pose_cov, camera_pose = messages.relocalization_poses(poses, self.map_frame, frame.stamp)
        out = [(s.pose_topic, pose), (s.pose_with_covariance_topic, pose_cov), (s.camera_pose_topic, camera_pose)]
        transform = self.transform(frame, poses)
        if transform is not None:
            out.append(("/tf", messages.tf_message([transform])))
        verified = self.verified_poses(frame)
        if verified is not None:
            out.append((s.verified_pose_topic, messages.pose_with_covariance_stamped(verified.T_map_base, verified.base_covariance, self.map_frame, frame.stamp)))
        return out

    def verified_poses(self, frame: Frame) -> RelocalizedPoses | None:
        p = frame.verified
        if p is None:
            return None
        poses = RelocalizedPoses.from_prediction(p.position, p.quaternion, p.covariance, self.settings.mount)
        return poses if poses.is_finite else None

    def trajectory_pose(self, frame: Frame, poses: RelocalizedPoses):
        """The PoseStamped of the trajectory files: the verified pose where the map verified one, else pose_topic's."""
        verified = self.verified_poses(frame)
        return messages.pose_stamped((verified or poses).T_map_base, self.map_frame, frame.stamp)

    def transform(self, frame: Frame, poses: RelocalizedPoses):
        """The node's TF for ``tf_mode`` (None: none, or no odometry near the stamp, which is counted)."""
        s = self.settings
        T_odom_base = None
        if s.tf_mode == "map_to_odom":
            T_odom_base = self.odometry.lookup(messages.stamp_to_seconds(frame.stamp), s.odom_tolerance)
            if T_odom_base is None:
                self.counts["no odometry (map -> odom not written)"] += 1
                log.warning("no odometry within odom_tolerance of the image stamped %s: map -> odom not written", frame.timestamp)
                return None
        return outputs.frame_transform(s, self.map_frame, poses, frame.stamp, T_odom_base)

    def static_extrinsic(self, stamp: Time):
        """``/tf_static`` base_frame → camera_frame, as the node sends once with ``publish_camera_to_base_tf``."""
        return messages.tf_message([outputs.static_extrinsic(self.settings, stamp)])


# ----------------------------------------------------------------------------- writing


def ros_type_name(msg) -> str:
    """``pkg/msg/Name`` of an rclpy message instance."""
    return f"{type(msg).__module__.split('.')[0]}/msg/{type(msg).__name__}"


def recorded_qos(profile) -> Qos:
    """An rclpy QoS profile as rosbag2 metadata (durations unspecified), so ``ros2 bag play`` offers it again."""
    zero = QosTime(0, 0)
    return Qos(
        QosHistory(profile.history.value), profile.depth, QosReliability(profile.reliability.value),
        QosDurability(profile.durability.value), zero, zero, QosLiveliness(profile.liveliness.value), zero, False,
    )


class BagSink:
    """Writes rclpy messages, serialised by rclpy (the node's bytes on the wire), into a rosbags Writer.

    ``/tf`` and ``/tf_static`` are recorded with the node's QoS for them (``/tf_static``
    transient local, so a replay latches it like the node's publisher).
    """

    QOS = {"/tf": TF_QOS, "/tf_static": TF_STATIC_QOS}

    def __init__(self, writer: Writer, typestore):
        self.writer, self.typestore = writer, typestore
        self.connections: dict[tuple[str, str], object] = {}

    def write(self, topic: str, msg, bag_time: int) -> None:
        key = (topic, ros_type_name(msg))
        if key not in self.connections:
            qos = [recorded_qos(self.QOS[topic])] if topic in self.QOS else []
            self.connections[key] = self.writer.add_connection(topic, key[1], typestore=self.typestore, offered_qos_profiles=qos)
        self.writer.write(self.connections[key], bag_time, serialize_message(msg))


def trajectory_values(pose_msg) -> list[str]:
    """``x y z qx qy qz qw`` of a PoseStamped, as text."""
    p, o = pose_msg.pose.position, pose_msg.pose.orientation
    return [repr(float(v)) for v in (p.x, p.y, p.z, o.x, o.y, o.z, o.w)]


def csv_writer(stream: TextIO, child_frame: str):
    writer = csv.writer(stream)
    writer.writerow(CSV_HEADER)
    return lambda frame, pose: writer.writerow(
        [frame.timestamp, frame.bag_time, pose.header.frame_id, child_frame, *trajectory_values(pose)]
    )


def tum_writer(stream: TextIO):
    stream.write("# timestamp tx ty tz qx qy qz qw\n")
    return lambda frame, pose: stream.write(" ".join([frame.timestamp, *trajectory_values(pose)]) + "\n")


# ----------------------------------------------------------------------------- main


def check_paths(args: argparse.Namespace) -> None:
    """Fail before loading the model when the input is missing or an output cannot be written."""
    source = Path(args.input)
    if not source.exists():
        raise UsageError(f"input bag {args.input} does not exist")
    outputs = {"--out": args.out, "--csv": args.csv, "--tum": args.tum}
    outputs = {flag: Path(path) for flag, path in outputs.items() if path}
    resolved = [p.resolve() for p in outputs.values()]
    if len(set(resolved)) < len(resolved):
        raise UsageError("--out, --csv and --tum must be different paths")
    for flag, path in outputs.items():
        target = path.resolve()
        if target == source.resolve() or source.resolve().is_relative_to(target):
            raise UsageError(f"{flag} {path} would replace the input bag")
        if not target.parent.is_dir():
            raise UsageError(f"directory of {flag} {path} does not exist")
        if (path.exists() or path.is_symlink()) and not args.overwrite:
            raise UsageError(f"{flag} {path} exists already; choose another path, remove it, or pass --overwrite")


@dataclass
class Summary:
    written: int  # frames relocalised (one message per pose topic each)
    skipped: Counter  # frames dropped, by reason
    notes: Counter  # other counts (e.g. map -> odom transforms missing)


def run(args: argparse.Namespace) -> Summary:
    """Relocalise the whole topic; outputs move into place only when a pose was written."""
    from tqdm import tqdm

    params = resolve_parameters(args)
    check_paths(args)
    typestore = get_typestore(Stores.LATEST)
    summary = Summary(0, Counter(), Counter())
    staged = {flag: StagedPath(path) for flag, path in (("out", args.out), ("csv", args.csv), ("tum", args.tum)) if path}
    try:
        with Reader(args.input) as reader:
            connections = topic_connections(reader, params["image_topic"], IMAGE_TYPES, "image")
            odometry = None
            if params["tf_mode"] == "map_to_odom":
                odometry, where = read_odometry(reader, typestore, params)
                log.info("odom -> base from %s (%d poses)", where, len(odometry))
            reloc = load_relocalizer(params)
            predict = predict_batch
            if params["map_file"] and params["refine"]:
                stage = load_refinement(reader, typestore, params, connections)
                predict = refining_predictor(stage, params["camera_info_tolerance"], summary.notes)
            node_outputs = NodeOutputs(params, params["map_frame"] or reloc.map_frame, odometry, summary.notes)
            log.info("backend %s (%s, %s); poses in frame '%s', tf_mode %s", reloc.backend_name, reloc.device,
                     "fp16" if reloc.half else "fp32", node_outputs.map_frame, params["tf_mode"])
            with contextlib.ExitStack() as stack:
                bag = BagSink(stack.enter_context(open_writer(staged["out"].path, args)), typestore)
                trajectories = []
                if "csv" in staged:
                    trajectories.append(csv_writer(stack.enter_context(open(staged["csv"].path, "w", newline="")), params["base_frame"]))
                if "tum" in staged:
                    trajectories.append(tum_writer(stack.enter_context(open(staged["tum"].path, "w"))))
                frames = read_frames(reader, connections, typestore, reloc, summary.skipped, int(params.get("max_image_pixels", 0)))
                total = sum(c.msgcount for c in connections)
                results = relocalize(frames, reloc, params["mount"], args.batch_size, summary.skipped, predict)
                for frame, poses in tqdm(results, total=total, unit="frame", disable=None):
                    if summary.written == 0 and params["publish_camera_to_base_tf"]:
                        bag.write("/tf_static", node_outputs.static_extrinsic(frame.stamp), frame.bag_time)
                    topic_messages = node_outputs(frame, poses)
                    for topic, msg in topic_messages:
                        bag.write(topic, msg, frame.bag_time)
                    pose_msg = node_outputs.trajectory_pose(frame, poses)
                    for write in trajectories:
                        write(frame, pose_msg)
                    summary.written += 1
        if summary.written:
            for output in staged.values():
                output.commit()
    finally:
        for output in staged.values():
            output.discard()
    return summary


def load_refinement(reader: Reader, typestore, params: dict, image_connections: list) -> "BagRefinement":
    """The node's refinement stage on ``map_file``, fed the bag's CameraInfo as the images come."""
    compressed = any(c.msgtype == IMAGE_TYPES[1] for c in image_connections)
    topic = absolute_topic(params["camera_info_topic"] or camera_info_topic_of(params["image_topic"], compressed))
    connections = topic_connections(reader, topic, (CAMERA_INFO_TYPE,), "CameraInfo")
    count = sum(c.msgcount for c in connections)
    if count == 0:
        raise UsageError(f"no CameraInfo on {topic}: the refinement needs the images' calibration")
    config = RefinementConfig.from_yaml(params["refine_config"]) if params["refine_config"] else None
    stage = NodeRefinement(params["map_file"], config, warn=log.warning)
    log.info("refining against %s (%s) with the %d CameraInfo of %s", params["map_file"], stage.map_summary, count, topic)
    return BagRefinement(stage, BagCameraInfos(reader, connections, typestore, stage))


class BagCameraInfos:
    """The bag's CameraInfo handed to the refinement stage in bag order, each before the images recorded after it.

    That is what the node holds when a frame reaches it: the CameraInfo received so far
    (its buffer keeps the latest 100), never a later one. Read with a second cursor
    beside the images', so nothing is loaded up front. A CameraInfo recorded at the same
    time as an image counts as received before it.
    """

    # A CameraInfo stamped this far from its receive time is reported, as the node reports it (its defaults).
    MAX_AGE, MAX_AHEAD = _SPECS["max_image_age"].default, _SPECS["future_stamp_tolerance"].default

    def __init__(self, reader: Reader, connections: list, typestore, stage: NodeRefinement):
        self._messages = reader.messages(connections=connections)
        self._next = next(self._messages, None)
        self._typestore, self._stage = typestore, stage

    def receive_until(self, bag_time: int, notes: Counter) -> None:
        """Give the stage every CameraInfo recorded at or before ``bag_time`` (ns) not given yet."""
        while self._next is not None and self._next[1] <= bag_time:
            connection, received, raw = self._next
            self._receive(connection, received, raw, notes)
            self._next = next(self._messages, None)

    def _receive(self, connection, received: int, raw, notes: Counter) -> None:
        try:
            msg = self._typestore.deserialize_cdr(raw, connection.msgtype)
            self._stage.on_camera_info(msg)
        except (CameraInfoError, ValueError) as err:  # the node counts these as bad_camera_info
            notes["bad CameraInfo (ignored)"] += 1
            if notes["bad CameraInfo (ignored)"] == 1:
                log.warning("ignoring CameraInfo on %s at bag time %d ns: %s (further ones only counted)", connection.topic, received, err)
            return
        age = (received - messages.stamp_nanoseconds(msg.header.stamp)) * 1e-9
        far = stamp_gap_problem(age, self.MAX_AGE, self.MAX_AHEAD)
        if far:
            notes["CameraInfo stamped far from its receive time"] += 1
            if notes["CameraInfo stamped far from its receive time"] == 1:
                log.warning("CameraInfo on %s at bag time %d ns %s (further ones only counted)", connection.topic, received, far)


@dataclass
class BagRefinement:
    stage: NodeRefinement
    camera_infos: BagCameraInfos


def refining_predictor(refinement: BagRefinement, tolerance: float, notes: Counter) -> Predictor:
    """:func:`predict_batch` followed by the node's refinement of each frame (regressor's pose on fallback)."""

    def predict(reloc: Relocalizer, frames: list[Frame]) -> list[PosePrediction | None]:
        predictions = predict_batch(reloc, frames)
        for i, (frame, prediction) in enumerate(zip(frames, predictions)):
            refinement.camera_infos.receive_until(frame.bag_time, notes)
            if prediction is None:
                continue
            stamp = messages.stamp_nanoseconds(frame.stamp) * 1e-9  # as the node computes it, to the last bit
            outcome = refinement.stage.refine(frame.rgb, stamp, prediction, tolerance)
            notes[f"refinement {outcome.status}"] += 1
            if outcome.status != REFINED:
                log.info("image stamped %s: refinement %s (%s), regressor's pose kept", frame.timestamp, outcome.status, outcome.reason)
            if outcome.status == REFINED:  # published apart, as the node's refiner does; the regressor's pose stands
                frame.verified = outcome.prediction
        return predictions

    return predict


def load_relocalizer(params: dict) -> Relocalizer:
    if params["cpu_threads"] > 0:
        import torch

        torch.set_num_threads(int(params["cpu_threads"]))
    settings = NodeSettings.from_parameters({name: params[name] for name in BAG_PARAMETERS})
    return outputs.build_relocalizer(settings, checkpoint_setting="--checkpoint")


def open_writer(path: Path, args: argparse.Namespace) -> Writer:
    return Writer(path, version=Writer.VERSION_LATEST, storage_plugin=STORAGES[args.storage or input_storage(args.input)])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    try:
        summary = run(args)
    except (UsageError, CheckpointError, MapError, BackendUnavailableError, ReaderError, WriterError, OSError, ValueError) as err:
        # ValueError: e.g. device cuda without a GPU, as the node reports it at start-up
        print(f"relocalize-bag: error: {err}", file=sys.stderr)
        return 2
    skipped = summary.skipped
    details = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
    notes = "".join(f"; {n} {note}" for note, n in summary.notes.items())
    if summary.written == 0:
        print(f"relocalize-bag: error: no pose was written (skipped {sum(skipped.values())}: {details or 'no frames'}); "
              "no output was created", file=sys.stderr)
        return 1
    outputs = ", ".join(p for p in (args.out, args.csv, args.tum) if p)
    print(f"relocalize-bag: wrote {summary.written} poses to {outputs}"
          + (f"; skipped {sum(skipped.values())} ({details})" if skipped else "") + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
