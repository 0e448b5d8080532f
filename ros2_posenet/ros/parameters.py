"""The node's parameters: one typed table, :class:`NodeSettings`, from which everything else derives.

Each field of the frozen dataclass is a ROS parameter: its type annotation is the parameter's
type, its default the declared default, and its metadata (:func:`param`) the description, the
check and whether it may change at run time. From that one table come

* :data:`PARAMETERS` (:class:`ParamSpec` rows): what the node declares and ``posenet_node --help`` lists;
* :func:`validate_parameter` / :func:`type_problem`: what the node and ``relocalize-bag`` refuse;
* :data:`FLOAT_PARAMETERS`: parameters that take integers from YAML or ``ros2 param set`` and are
  stored as doubles;
* :func:`add_parameter_flag`: ``relocalize-bag``'s ``--flag`` of a parameter.

A :class:`NodeSettings` is one consistent snapshot of the values (the live model and map are held
by the node separately); the node swaps it atomically when a parameter changes.
"""
import argparse
import math
import os
import types
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, Callable

from ..backends import COMPILE_MODES
from ..covariance import UNCERTAINTY_METHODS
from ..frames import CameraMount, extrinsic_matrix
from ..inference import BACKENDS, PRECISIONS
from ..initial_pose import INITIAL_POSE_MODES

NODE_NAME = "posenet_node"
TF_MODES = ("map_to_camera", "map_to_odom", "none")
ODOM_SOURCES = ("auto", "topic", "tf")
IMAGE_QOS = ("sensor_data", "reliable")


class ConfigurationError(ValueError):
    """A parameter value or the environment makes the node unable to start; the text says what to change."""


# ----------------------------------------------------------------------------- checks


def _is_frame_id(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if value.startswith("/"):
        return "tf2 frame ids must not start with '/'"
    return None


def _optional_frame_id(value: str) -> str | None:
    return _is_frame_id(value) if value else None


def _non_empty(value: str) -> str | None:
    return None if value else "must not be empty"


def _number(minimum: float, strictly: bool = False) -> Callable[[Any], str | None]:
    def check(value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "must be a finite number"
        if value < minimum or (strictly and value == minimum):
            return f"must be {'>' if strictly else '>='} {minimum}"
        return None

    return check


def _device(value: str) -> str | None:
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return None
    return "must be auto, cpu, cuda or cuda:N"


def _compile_mode(value) -> str | None:
    if isinstance(value, bool) or value in COMPILE_MODES:
        return None
    return f"must be true, false or one of {', '.join(COMPILE_MODES)}"


def _initial_pose_mode(value) -> str | None:
    # YAML (rcl's parser, `-p initial_pose:=off`) reads an unquoted off as the boolean false.
    if value is False or (isinstance(value, str) and value in INITIAL_POSE_MODES):
        return None
    return f"must be one of {', '.join(INITIAL_POSE_MODES)}"


def _extrinsic(value) -> str | None:
    try:
        extrinsic_matrix(list(value))
    except (TypeError, ValueError):
        return "must be 6 finite numbers [x, y, z, roll, pitch, yaw] (metres, radians)"
    return None


def param(default, description: str, check: Callable[[Any], str | None] | None = None, *, choices: tuple[str, ...] | None = None,
          run_time: bool = False, dynamic_typing: bool = False):
    """A parameter field of :class:`NodeSettings`.

    ``run_time``: may change while the node runs (topics, QoS and start-up options may not);
    ``choices``: the allowed strings (checked, and offered by ``relocalize-bag``'s flag);
    ``dynamic_typing``: the declared type accepts other types too (beyond integers for doubles).
    """
    metadata = {"description": description, "check": check, "choices": choices, "read_only": not run_time, "dynamic_typing": dynamic_typing}
    return field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class NodeSettings:
    """A consistent snapshot of ``posenet_node``'s parameters (the table itself: one field per parameter)."""

    checkpoint: str = param("", "Path to a ros2_posenet checkpoint (.pt) written by `train`. Changing it at run time (another map or floor) loads the new model in the background and swaps it atomically; a bad file leaves the old model serving.", _non_empty, run_time=True)
    device: str = param("auto", "Inference device: auto (CUDA when available), cpu, cuda or cuda:N.", _device, run_time=True)
    backend: str = param("torch", "Inference backend: torch, onnxruntime, tensorrt (CUDA) or auto.", choices=BACKENDS, run_time=True)
    precision: str = param("fp32", "Network precision: fp32, or fp16 on CUDA (falls back to fp32 on CPU with a warning).", choices=PRECISIONS, run_time=True)
    uncertainty: str = param("", "Per-frame covariance of the regressor: fixed, mc_dropout or variance_head (torch backend; calibrated in the checkpoint); empty: the checkpoint's choice.", choices=("", *UNCERTAINTY_METHODS), run_time=True)
    mc_samples: int = param(0, "Dropout samples per frame for uncertainty mc_dropout (0: the checkpoint's).", _number(0), run_time=True)
    compile: bool | str = param(False, "torch backend: torch.compile the network (true, or a mode: default, reduce-overhead, max-autotune); slow first start.", _compile_mode, dynamic_typing=True)
    cuda_graph: bool = param(True, "torch backend on CUDA: replay a captured CUDA graph per frame (lower latency).")
    cpu_threads: int = param(0, "CPU threads of torch and OpenCV, process-wide (0: their defaults). 1-2 avoids starving other nodes on a shared CPU; with a map, 1 keeps the refinement (a lower-priority thread) off the regressor's core.", _number(0))
    image_topic: str = param("/camera/image_raw", "Image topic (for compressed images usually <camera>/image_raw/compressed).", _non_empty)
    compressed: bool = param(False, "Subscribe to sensor_msgs/CompressedImage (jpeg/png) instead of sensor_msgs/Image.")
    image_qos: str = param("sensor_data", "Image subscription QoS: sensor_data (best effort) or reliable.", choices=IMAGE_QOS)
    image_qos_depth: int = param(1, "Image subscription queue depth; 1 keeps only the newest frame.", _number(1))
    map_frame: str = param("", "Map frame id of the outputs; empty: the map frame recorded in the checkpoint.", _optional_frame_id, run_time=True)
    odom_frame: str = param("odom", "Odometry frame (REP-105), parent of base_frame in tf_mode map_to_odom.", _is_frame_id, run_time=True)
    base_frame: str = param("base_link", "Robot base frame whose pose is published.", _is_frame_id, run_time=True)
    camera_frame: str = param("camera_link", "Camera body frame (REP-103: x forward, z up; not the optical frame).", _is_frame_id, run_time=True)
    camera_to_base: tuple[float, ...] = param((0.0,) * 6, "Pose of camera_frame in base_frame as [x, y, z, roll, pitch, yaw] (m, rad), as in a URDF joint origin.", _extrinsic, run_time=True, dynamic_typing=True)
    publish_camera_to_base_tf: bool = param(False, "Also publish camera_to_base as a static base_frame -> camera_frame transform (when no URDF does).")
    tf_mode: str = param("map_to_camera", "TF to publish: map_to_camera (standalone camera), map_to_odom (robot, REP-105) or none (robot_localization owns map -> odom).", choices=TF_MODES)
    odom_source: str = param("auto", "Where map_to_odom reads odom -> base: topic (nav_msgs/Odometry on odom_topic), tf (tf2), auto (tf when tf2_ros is installed, else topic).", choices=ODOM_SOURCES)
    odom_topic: str = param("/odom", "nav_msgs/Odometry topic (odom -> base) for tf_mode map_to_odom with odom_source topic.", _non_empty)
    odom_tolerance: float = param(0.2, "Largest gap (s) between an image stamp and the odometry used for it.", _number(0.0), run_time=True)
    transform_tolerance: float = param(0.0, "Seconds added to the stamp of published TF (like AMCL), so lookups at 'now' succeed between relocalisations.", _number(0.0), run_time=True)
    max_image_age: float = param(1.0, "Drop frames older than this many seconds when the worker takes them (0: never).", _number(0.0), run_time=True)
    enabled: bool = param(True, "Relocalise incoming images; false pauses inference (the model stays loaded, ~/relocalize still answers). ~/enable sets it.", run_time=True)
    max_rate_hz: float = param(0.0, "Relocalise at most this many images per second (0: as many as the model keeps up with); the others are skipped before decoding.", _number(0.0), run_time=True)
    initial_pose: str = param("off", "Seed Nav2/AMCL on initial_pose_topic: off, once (the first confident pose while someone subscribes) or on_request (each ~/relocalize call). The topic is advertised only in once and on_request.", _initial_pose_mode, run_time=True, dynamic_typing=True)
    initial_pose_topic: str = param("/initialpose", "geometry_msgs/PoseWithCovarianceStamped topic AMCL reads its initial pose from (planar: x, y, yaw).", _non_empty)
    initial_pose_max_position_std: float = param(0.5, "Seed only when the position standard deviation (worst horizontal direction, m) is at most this.", _number(0.0, strictly=True), run_time=True)
    initial_pose_max_yaw_std: float = param(0.35, "Seed only when the yaw standard deviation (rad) is at most this.", _number(0.0, strictly=True), run_time=True)
    relocalize_timeout: float = param(5.0, "Seconds ~/relocalize waits for an image to relocalise before it answers with a failure.", _number(0.0, strictly=True), run_time=True)
    pose_topic: str = param("posenet/pose", "Output geometry_msgs/PoseStamped of base_frame in the map: the regressor's pose of every relocalised frame.", _non_empty)
    pose_with_covariance_topic: str = param("posenet/pose_with_covariance", "Output geometry_msgs/PoseWithCovarianceStamped of base_frame in the map: the regressor's pose with its calibrated covariance, every relocalised frame.", _non_empty)
    camera_pose_topic: str = param("posenet/camera_pose", "Output geometry_msgs/PoseStamped of camera_frame in the map (the regressor's).", _non_empty)
    verified_pose_topic: str = param("posenet/verified/pose_with_covariance", "Output geometry_msgs/PoseWithCovarianceStamped of base_frame in the map: only poses the scene map verified (map_file), with their geometric covariance; later and rarer than pose_with_covariance_topic.", _non_empty)
    diagnostics_period: float = param(1.0, "Seconds between diagnostic_msgs/DiagnosticArray messages on /diagnostics.", _number(0.0, strictly=True))
    log_period: float = param(30.0, "Seconds between summary log lines (0: never).", _number(0.0))
    log_throttle: float = param(5.0, "Each kind of dropped-frame warning is logged at most once per this many seconds.", _number(0.0), run_time=True)
    future_stamp_tolerance: float = param(1.0, "Drop frames stamped more than this many seconds ahead of the node's clock (0: never).", _number(0.0), run_time=True)
    map_file: str = param("", "Scene map (.npz written by `build-map`) for the geometric refinement: the regressor's poses are verified by local features + PnP-RANSAC in a second worker and published on verified_pose_topic with their geometric covariance; empty: regressor only. Switched at run time like checkpoint.", run_time=True)
    refine: bool = param(True, "Refine poses against map_file when one is given; false publishes the regressor's poses only (the map stays loaded).", run_time=True)
    refine_config: str = param("", "YAML of refinement settings (RefinementConfig fields, e.g. config/refine.yaml); empty: the defaults.", run_time=True)
    camera_info_topic: str = param("", "sensor_msgs/CameraInfo of the images, needed by the refinement; empty: camera_info beside image_topic (/camera/image_raw -> /camera/camera_info).")
    camera_info_tolerance: float = param(-1.0, "Largest gap (s) between an image stamp and the CameraInfo used for it; negative: the latest CameraInfo (a fixed calibration).", _number(-math.inf), run_time=True)
    initial_pose_require_refined: bool = param(False, "With a map: seed initial_pose_topic only with geometrically verified (refined) poses.", run_time=True)
    max_image_pixels: int = param(25_000_000, "Drop images of more pixels (width x height, read from the header before decoding; 0: no limit).", _number(0), run_time=True)

    @cached_property
    def mount(self) -> CameraMount:
        return CameraMount.from_xyz_rpy(self.camera_to_base)

    @classmethod
    def from_parameters(cls, values: dict) -> "NodeSettings":
        """Settings of parameter values (defaults for the missing ones); ConfigurationError lists every bad value."""
        unknown = sorted(set(values) - set(_SPECS))
        if unknown:
            raise ConfigurationError(f"unknown parameters: {', '.join(unknown)}")
        problems = [f"parameter '{name}' = {value!r}: {problem}" for name, value in values.items()
                    if (problem := type_problem(name, value) or validate_parameter(name, value))]
        if problems:
            raise ConfigurationError("; ".join(problems))
        return cls(**{name: _stored(name, value) for name, value in values.items()})

    def with_changes(self, changes: dict) -> "NodeSettings":
        """A copy with ``changes`` (parameter name -> value), checked and typed like :meth:`from_parameters`."""
        return NodeSettings.from_parameters({**self.values(), **changes})

    def values(self) -> dict:
        """Parameter name -> value."""
        return {name: getattr(self, name) for name in PARAMETER_NAMES}


def _stored(name: str, value):
    """The value as the settings hold it: floats for doubles, a tuple for camera_to_base, 'off' for YAML's false."""
    kind = _SPECS[name].kind
    if kind is float:
        return float(value)
    if kind is tuple:
        return tuple(float(v) for v in value)
    if name == "initial_pose" and value is False:
        return "off"
    return value


# ----------------------------------------------------------------------------- derived views


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any  # as declared to ROS (a list for camera_to_base)
    description: str
    check: Callable[[Any], str | None] | None = None
    read_only: bool = True  # fixed after start-up (topics, model); False: may change at run time
    dynamic_typing: bool = False  # the declared type also accepts other types (integers for doubles, ...)
    kind: type = str  # bool, int, float, str, tuple (camera_to_base) or types.UnionType (compile)
    choices: tuple[str, ...] | None = None


def _spec(f) -> ParamSpec:
    kind = f.type if isinstance(f.type, type) else (tuple if getattr(f.type, "__origin__", None) is tuple else types.UnionType)
    meta = f.metadata
    check = meta["check"]
    if check is None and meta["choices"] is not None:
        choices = meta["choices"]
        check = lambda value, choices=choices: None if value in choices else f"must be {'empty or ' if '' in choices else ''}one of {', '.join(c for c in choices if c)}"  # noqa: E731
    return ParamSpec(
        name=f.name, default=list(f.default) if kind is tuple else f.default, description=meta["description"], check=check,
        read_only=meta["read_only"], dynamic_typing=meta["dynamic_typing"] or kind in (float, tuple), kind=kind, choices=meta["choices"],
    )


PARAMETERS: tuple[ParamSpec, ...] = tuple(_spec(f) for f in fields(NodeSettings))
PARAMETER_NAMES = tuple(spec.name for spec in PARAMETERS)
_SPECS = {spec.name: spec for spec in PARAMETERS}
# Doubles: they accept integers (YAML `2`, `ros2 param set ... 2`) and the node stores them as doubles.
FLOAT_PARAMETERS = tuple(spec.name for spec in PARAMETERS if spec.kind is float)
# Changing any of these loads a new model (and map) in the background (node._switch_model).
MODEL_PARAMETERS = ("checkpoint", "device", "backend", "precision", "uncertainty", "mc_samples", "map_file", "refine_config")
# Run-time changes that must name an existing file at once (SetParameters fails otherwise).
FILE_PARAMETERS = ("checkpoint", "map_file")


def spec(name: str) -> ParamSpec:
    return _SPECS[name]


def validate_parameter(name: str, value: Any) -> str | None:
    """Problem with ``value`` for parameter ``name`` (``None`` when fine)."""
    row = _SPECS.get(name)
    if row is None or row.check is None:
        return None
    return row.check(value)


def type_problem(name: str, value) -> str | None:
    """What ROS would refuse for the declared type of ``name`` (``None`` when the type fits)."""
    kind = _SPECS[name].kind
    if kind is types.UnionType:  # compile: a boolean or a mode
        return None if isinstance(value, (bool, str)) else "must be true, false or a mode"
    if name == "initial_pose" and value is False:
        return None
    if kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if kind in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
        return None if ok else ("must be a number" if kind is float else "must be an integer")
    if kind is tuple:
        return None if isinstance(value, (list, tuple)) else "must be a list"
    return None if isinstance(value, str) else "must be a string"


def missing_file_problem(name: str, value) -> str | None:
    """'no such file: PATH' for a file parameter that names a missing file (empty map_file is fine: no map)."""
    if name not in FILE_PARAMETERS or not isinstance(value, str) or (name == "map_file" and not value):
        return None
    return None if os.path.isfile(value) else f"no such file: {value}"


def camera_info_topic_of(image_topic: str, compressed: bool = False) -> str:
    """The CameraInfo topic beside an image topic, as image_transport names it.

    ``/camera/image_raw`` -> ``/camera/camera_info``; ``/camera/image_raw/compressed`` -> ``/camera/camera_info``.
    """
    base = image_topic.rstrip("/")
    if compressed and base.endswith("/compressed"):
        base = base[: -len("/compressed")]
    namespace = base.rsplit("/", 1)[0] if "/" in base else ""
    return f"{namespace}/camera_info" if namespace or base.startswith("/") else "camera_info"


def argument_parser() -> argparse.ArgumentParser:
    """``posenet_node --help``: every parameter with its default and description."""
    listing = "\n".join(f"  {row.name} (default {row.default!r}): {row.description}" for row in PARAMETERS)
    return argparse.ArgumentParser(
        prog=NODE_NAME,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PoseNet camera relocalisation node. Set parameters with ROS arguments, e.g.\n"
        "  ros2 run ros2_posenet posenet_node --ros-args -p checkpoint:=model.pt -p image_topic:=/camera/image_raw\n"
        "or a params file (--ros-args --params-file config/posenet.yaml).",
        epilog="parameters:\n" + listing,
    )


def add_parameter_flag(parser: argparse.ArgumentParser, name: str, flag: str | None = None) -> None:
    """``--name-with-dashes`` for parameter ``name`` (``relocalize-bag``), typed and limited as the table says."""
    row = _SPECS[name]
    flag = flag or "--" + name.replace("_", "-")
    if row.kind is types.UnionType:  # compile: a bare flag means true
        parser.add_argument(flag, dest=name, action="store_true", default=None, help=row.description)
    elif row.kind is bool:
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=row.description)
    elif row.kind is tuple:
        parser.add_argument(flag, dest=name, type=float, nargs=len(row.default), metavar=("X", "Y", "Z", "ROLL", "PITCH", "YAW"), help=row.description)
    else:
        parser.add_argument(flag, dest=name, type=row.kind, choices=row.choices, help=row.description)
