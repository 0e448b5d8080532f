"""What ``launch/relocalize.launch.py`` starts, decided before anything starts (no ``launch`` import here).

The launch file reads its arguments, calls :func:`plan_launch` and :func:`require_node_files`
and only then returns the actions; every check (params file exists and parses, rviz2 is
installed, argument types, the checkpoint and map files exist) raises :class:`LaunchPlanError`
first, so a failing launch leaves no process behind and ``ros2 launch`` returns non-zero. A node
that still exits with a configuration error stops the launch instead of being respawned
(:func:`configuration_exit_problem`).

Precedence, one rule: ``params_file`` first, then only the launch arguments the user set
(an empty argument means "not set"). A key of the params file is therefore never overridden by
a launch argument's default. Every value is typed here (``checkpoint:=123`` stays the string
``"123"``), not guessed by YAML.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .entry import EXIT_CONFIGURATION_ERROR

PACKAGE = "ros2_posenet"
NODE_NAME = "posenet_node"


@dataclass(frozen=True)
class Argument:
    name: str
    description: str
    default: str = ""  # "": not set, the params file (or the node's default) decides
    choices: tuple[str, ...] | None = None
    kind: type = str  # str, bool or float
    node_parameter: bool = True  # passed to the node as a parameter of the same name when set


ARGUMENTS: tuple[Argument, ...] = (
    Argument("checkpoint", "PoseNet checkpoint (.pt) written by `train` (or set `checkpoint` in params_file)"),
    Argument("map_file", "scene map (.npz written by `build-map`) for the geometric refinement (or set `map_file` in params_file)"),
    Argument("params_file", "posenet_node parameters (default: the installed config/posenet.yaml)", node_parameter=False),
    Argument("image_topic", "camera image topic (default: params_file's image_topic)"),
    Argument("compressed", "subscribe to sensor_msgs/CompressedImage", choices=("", "true", "false"), kind=bool),
    Argument("tf_mode", "map_to_camera (standalone camera), map_to_odom (robot, REP-105) or none (robot_localization owns map->odom)",
             choices=("", "map_to_camera", "map_to_odom", "none")),
    Argument("initial_pose", "seed Nav2/AMCL on /initialpose: off, once or on_request", choices=("", "off", "once", "on_request")),
    Argument("max_rate_hz", "relocalise at most this many images per second (0: no cap)", kind=float),
    Argument("use_sim_time", "use /clock (bag replay)", choices=("", "true", "false"), kind=bool),
    Argument("namespace", "namespace of the node and its topics", node_parameter=False),
    Argument("managed", "true: the lifecycle node (posenet_lifecycle_node) for nav2_lifecycle_manager; false: the plain node",
             default="false", choices=("true", "false"), kind=bool, node_parameter=False),
    Argument("respawn", "restart the node when it exits (e.g. after an unrecoverable worker failure)",
             default="false", choices=("true", "false"), kind=bool, node_parameter=False),
    Argument("respawn_delay", "seconds before a respawn", default="2.0", kind=float, node_parameter=False),
    Argument("rviz", "start RViz with config/posenet.rviz (showing the node's image topic)",
             default="false", choices=("true", "false"), kind=bool, node_parameter=False),
)
ARGUMENT_NAMES = tuple(argument.name for argument in ARGUMENTS)
_BY_NAME = {argument.name: argument for argument in ARGUMENTS}


class LaunchPlanError(RuntimeError):
    """A launch argument or the installation makes the launch impossible; nothing has been started."""


@dataclass
class LaunchPlan:
    executable: str  # posenet_node or posenet_lifecycle_node
    namespace: str
    parameters: list = field(default_factory=list)  # [params_file path, {overrides the user set}]
    respawn: bool = False
    respawn_delay: float = 2.0
    rviz_config: str | None = None  # path of the generated RViz config, when rviz:=true
    use_sim_time: bool | None = None
    node_parameters: dict = field(default_factory=dict)  # what the node will read: params_file, then the overrides


def typed(name: str, text: str):
    """The launch argument ``name`` = ``text`` as its declared type; LaunchPlanError when it is not one."""
    argument = _BY_NAME[name]
    if argument.choices is not None and text not in argument.choices:
        raise LaunchPlanError(f"launch argument {name}:={text!r} must be one of {', '.join(c for c in argument.choices if c)}")
    if argument.kind is bool:
        return text == "true"
    if argument.kind is float:
        try:
            return float(text)
        except ValueError:
            raise LaunchPlanError(f"launch argument {name}:={text!r} must be a number") from None
    return text


def node_overrides(values: dict[str, str]) -> dict:
    """Typed node parameters for the launch arguments the user set (non-empty), nothing else."""
    return {
        name: typed(name, values[name])
        for name, argument in _BY_NAME.items()
        if argument.node_parameter and values.get(name, "") != ""
    }


def read_params_file(path: str) -> dict:
    """The parameters params_file gives posenet_node (``/**`` merged with the node's own section)."""
    if not os.path.isfile(path):
        raise LaunchPlanError(f"params_file {path} does not exist")
    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise LaunchPlanError(f"params_file {path} is not readable YAML: {err}") from None
    if not isinstance(document, dict):
        raise LaunchPlanError(f"params_file {path} is not a ROS 2 parameters file (expected `<node>: ros__parameters: ...`)")
    merged: dict = {}
    for key in ("/**", NODE_NAME, f"/{NODE_NAME}", f"/**/{NODE_NAME}"):
        section = document.get(key)
        if isinstance(section, dict):
            merged.update(section.get("ros__parameters") or {})
    return merged


def resolve_topic(topic: str, namespace: str) -> str:
    """Absolute name of ``topic`` for a node in ``namespace`` (what RViz needs)."""
    if topic.startswith("/"):
        return topic
    return "/" + "/".join(part for part in (namespace.strip("/"), topic) if part)


def rviz_config(template: str, image_topic: str, pose_topics: dict[str, str]) -> str:
    """config/posenet.rviz with the node's image topic and pose topics filled in."""
    config = yaml.safe_load(template)
    for display in config["Visualization Manager"]["Displays"]:
        kind = display.get("Class", "").rsplit("/", 1)[-1]
        if kind == "Image":
            display["Topic"]["Value"] = image_topic
        elif display.get("Name") in pose_topics:
            display["Topic"]["Value"] = pose_topics[display["Name"]]
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


# RViz display names of config/posenet.rviz -> the node parameter naming their topic.
RVIZ_POSE_DISPLAYS = {
    "Base pose (posenet)": "pose_topic",
    "Camera pose (posenet)": "camera_pose_topic",
    "Base pose covariance (posenet)": "pose_with_covariance_topic",
}


def plan_launch(values: dict[str, str], find_share: Callable[[str], str] | None = None) -> LaunchPlan:
    """Check everything and decide what to start; raises LaunchPlanError before anything starts.

    ``values``: every launch argument as text. ``find_share``: package name -> share directory
    (ament_index_python's get_package_share_directory when omitted), raising when not installed.
    """
    find_share = find_share or _ament_share
    share = _require(find_share, PACKAGE, "build and source the workspace (colcon build; source install/setup.bash)")
    params_file = values.get("params_file") or os.path.join(share, "config", "posenet.yaml")
    from_file = read_params_file(params_file)
    overrides = node_overrides(values)
    typed_flags = {name: typed(name, values.get(name) or _BY_NAME[name].default) for name in ("managed", "respawn", "respawn_delay", "rviz")}
    plan = LaunchPlan(
        executable="posenet_lifecycle_node" if typed_flags["managed"] else "posenet_node",
        namespace=values.get("namespace", ""),
        parameters=[params_file, overrides] if overrides else [params_file],
        respawn=typed_flags["respawn"],
        respawn_delay=typed_flags["respawn_delay"],
        use_sim_time=overrides.get("use_sim_time"),
        node_parameters={**from_file, **overrides},
    )
    if typed_flags["rviz"]:
        _require(find_share, "rviz2", "install it (apt install ros-$ROS_DISTRO-rviz2) or launch with rviz:=false")
        effective = {**from_file, **overrides}
        image_topic = effective.get("image_topic", "/camera/image_raw")
        if effective.get("compressed") and not image_topic.endswith("/compressed"):
            image_topic += "/compressed"  # RViz's image display picks the transport from the suffix
        defaults = {"pose_topic": "posenet/pose", "camera_pose_topic": "posenet/camera_pose", "pose_with_covariance_topic": "posenet/pose_with_covariance"}
        pose_topics = {name: resolve_topic(effective.get(param, defaults[param]), plan.namespace) for name, param in RVIZ_POSE_DISPLAYS.items()}
        template = Path(share, "config", "posenet.rviz").read_text()
        text = rviz_config(template, resolve_topic(image_topic, plan.namespace), pose_topics)
        with tempfile.NamedTemporaryFile("w", prefix="posenet_", suffix=".rviz", delete=False) as handle:
            handle.write(text)
        plan.rviz_config = handle.name
    return plan


def require_node_files(plan: LaunchPlan) -> None:
    """LaunchPlanError unless ``checkpoint`` names a file (and ``map_file`` too, when set).

    Checked before the node starts: a node without its checkpoint exits at once with code 2,
    which ``ros2 launch`` would report as success and ``respawn:=true`` would repeat forever.
    """
    checkpoint = str(plan.node_parameters.get("checkpoint") or "")
    if not checkpoint:
        raise LaunchPlanError("no checkpoint: pass checkpoint:=/path/model.pt (a .pt written by `train`) or set checkpoint in params_file")
    for name, value in (("checkpoint", checkpoint), ("map_file", str(plan.node_parameters.get("map_file") or ""))):
        if value and not os.path.isfile(value):
            raise LaunchPlanError(f"{name} {value} does not exist (launch argument {name}:= or params_file; relative paths are from {os.getcwd()})")


def configuration_exit_problem(returncode: int | None, node: str) -> str | None:
    """Why launch must stop instead of respawning ``node`` (it exited because its parameters or checkpoint are unusable)."""
    if returncode != EXIT_CONFIGURATION_ERROR:
        return None
    return f"{node} cannot start (exit code {returncode}: its parameters or checkpoint are unusable, see its FATAL line); not respawning it"


def _require(find_share: Callable[[str], str], package: str, advice: str) -> str:
    try:
        return find_share(package)
    except Exception as err:  # ament_index_python.PackageNotFoundError, LookupError...
        raise LaunchPlanError(f"package {package} is not installed ({type(err).__name__}: {err}); {advice}") from None


def _ament_share(package: str) -> str:
    from ament_index_python.packages import get_package_share_directory

    return get_package_share_directory(package)
