"""Launch file and configuration: checked statically (launch/launch_ros are not on PyPI), and the
console script run as a real process with config/posenet.yaml."""
import ast
import glob
import os
import signal
import subprocess
import sys
from pathlib import Path

import ros_fixtures
from ros_fixtures import Probe, image_msg, stamp_key

ros_fixtures.isolate_ros_domain()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import rclpy  # noqa: E402
import yaml  # noqa: E402

from ros2_posenet.ros.node import PARAMETER_NAMES, PARAMETERS, validate_parameter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / "launch" / "relocalize.launch.py"
PARAMS_FILE = ROOT / "config" / "posenet.yaml"


def calls_named(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name
    ]


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def literal(node):
    return ast.literal_eval(node) if node is not None else None


@pytest.fixture(scope="module")
def launch_tree() -> ast.Module:
    return ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))


@pytest.fixture(scope="module")
def params() -> dict:
    document = yaml.safe_load(PARAMS_FILE.read_text())
    return document["/**"]["ros__parameters"]


def setup_data_files() -> list[tuple[str, list[str]]]:
    """setup.py's data_files, evaluated (globs included) as setuptools would, from the repo root."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    (setup_call,) = calls_named(tree, "setup")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        scope = {"glob": glob.glob, "PACKAGE": "ros2_posenet"}
        return eval(compile(ast.Expression(keyword(setup_call, "data_files")), "setup.py", "eval"), scope)
    finally:
        os.chdir(cwd)


def test_launch_file_declares_the_documented_arguments(launch_tree):
    declared = {literal(call.args[0]) for call in calls_named(launch_tree, "DeclareLaunchArgument")}
    assert {"checkpoint", "image_topic", "compressed", "params_file", "tf_mode", "use_sim_time"} <= declared
    assert "generate_launch_description" in {f.name for f in ast.walk(launch_tree) if isinstance(f, ast.FunctionDef)}


def test_launch_runs_the_installed_console_script(launch_tree):
    nodes = [call for call in calls_named(launch_tree, "Node") if literal(keyword(call, "executable")) == "posenet_node"]
    assert len(nodes) == 1
    assert literal(keyword(nodes[0], "package")) == "ros2_posenet"
    setup_source = (ROOT / "setup.py").read_text()
    assert '"posenet_node = ros2_posenet.ros.node:main"' in setup_source
    from ros2_posenet.ros.node import main

    assert callable(main)


def test_launch_parameter_overrides_are_declared_node_parameters(launch_tree, params):
    (node,) = [call for call in calls_named(launch_tree, "Node") if literal(keyword(call, "executable")) == "posenet_node"]
    overrides = [d for d in keyword(node, "parameters").elts if isinstance(d, ast.Dict)]
    keys = {literal(k) for d in overrides for k in d.keys}
    assert keys <= set(PARAMETER_NAMES) | {"use_sim_time"}, keys - set(PARAMETER_NAMES)
    # Launch defaults agree with the params file, so launching without arguments changes nothing.
    defaults = {
        literal(call.args[0]): literal(keyword(call, "default_value"))
        for call in calls_named(launch_tree, "DeclareLaunchArgument")
        if isinstance(keyword(call, "default_value"), ast.Constant)
    }
    assert defaults["image_topic"] == params["image_topic"]
    assert defaults["tf_mode"] == params["tf_mode"]
    assert defaults["compressed"] == str(params["compressed"]).lower()


def test_launch_config_files_exist_and_are_installed(launch_tree):
    referenced = {
        part.value
        for call in calls_named(launch_tree, "PathJoinSubstitution")
        for part in call.args[0].elts
        if isinstance(part, ast.Constant) and part.value.endswith((".yaml", ".rviz"))
    }
    assert referenced == {"posenet.yaml", "posenet.rviz"}
    installed = {(dest, os.path.normpath(src)) for dest, sources in setup_data_files() for src in sources}
    for name in referenced:
        assert (ROOT / "config" / name).is_file()
        assert ("share/ros2_posenet/config", f"config/{name}") in installed
    assert ("share/ros2_posenet/config", "config/ekf.yaml") in installed
    assert ("share/ros2_posenet/launch", "launch/relocalize.launch.py") in installed


def test_params_file_sets_every_declared_parameter_with_valid_values(params):
    assert set(params) == set(PARAMETER_NAMES)
    for spec in PARAMETERS:
        value = params[spec.name]
        assert type(value) is type(spec.default), f"{spec.name}: {type(value).__name__} in yaml, node declares {type(spec.default).__name__}"
        if spec.name != "checkpoint":  # set by the launch argument
            assert validate_parameter(spec.name, value) is None, spec.name


def test_ekf_example_fuses_posenet_as_absolute_pose(params):
    ekf = yaml.safe_load((ROOT / "config" / "ekf.yaml").read_text())
    odom_ekf, map_ekf = ekf["ekf_filter_node_odom"]["ros__parameters"], ekf["ekf_filter_node_map"]["ros__parameters"]
    assert odom_ekf["world_frame"] == "odom" and "pose0" not in odom_ekf  # odom stays continuous (REP-105)
    assert map_ekf["world_frame"] == "map" and map_ekf["publish_tf"] is True
    assert map_ekf["pose0"] == "/" + params["pose_with_covariance_topic"]  # the node in the root namespace
    assert map_ekf["pose0_differential"] is False and map_ekf["pose0_relative"] is False
    assert map_ekf["pose0_rejection_threshold"] > 0
    x, y, z, roll, pitch, yaw = map_ekf["pose0_config"][:6]
    assert (x, y, yaw) == (True, True, True)
    for cfg in (odom_ekf, map_ekf):
        assert cfg["odom0"] == params["odom_topic"]
        assert len(cfg["odom0_config"]) == 15 and cfg["odom0_differential"] is False
        assert (cfg["map_frame"], cfg["odom_frame"], cfg["base_link_frame"]) == ("map", params["odom_frame"], params["base_frame"])
    initial = np.array(map_ekf["initial_estimate_covariance"], dtype=float).reshape(15, 15)
    assert initial[0, 0] >= 10 and initial[1, 1] >= 10 and initial[5, 5] >= 1  # accept the first fix anywhere
    assert all(isinstance(v, float) for v in map_ekf["initial_estimate_covariance"])  # rcl rejects mixed int/float arrays


def test_rviz_config_shows_image_pose_and_tf(params):
    rviz = yaml.safe_load((ROOT / "config" / "posenet.rviz").read_text())
    manager = rviz["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "map"
    topics = {d["Class"].split("/")[-1] + ":" + d.get("Topic", {}).get("Value", "") for d in manager["Displays"]}
    assert "Image:" + params["image_topic"] in topics
    assert "Pose:/" + params["pose_topic"] in topics
    assert "Pose:/" + params["camera_pose_topic"] in topics
    assert "PoseWithCovariance:/" + params["pose_with_covariance_topic"] in topics
    assert "TF:" in topics


def test_docs_describe_every_parameter_and_counter():
    from ros2_posenet.ros.node import DROP_REASONS

    doc = (ROOT / "docs" / "ROS.md").read_text()
    for name in PARAMETER_NAMES:
        assert f"| `{name}` |" in doc, name
    for counter in (*DROP_REASONS, "no_odometry", "bad_odometry"):
        assert f"| `{counter}` |" in doc, counter


# ----------------------------------------------------------------------------- the console script


def node_command(*ros_args: str) -> list[str]:
    return [sys.executable, "-m", "ros2_posenet.ros.node", "--ros-args", *ros_args]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_node_process_serves_with_the_params_file_and_stops_cleanly(tmp_path):
    checkpoint = ros_fixtures.overflow_checkpoint(tmp_path / "model.pt")  # hand-set: dark images -> pose at the origin
    process = subprocess.Popen(
        node_command(
            "--params-file", str(PARAMS_FILE), "-r", "__ns:=/launch_test",
            "-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu", "-p", "cpu_threads:=1", "-p", "image_topic:=camera/image_raw",
        ),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(), cwd=tmp_path,
    )
    context = rclpy.Context()
    rclpy.init(context=context)
    probe = Probe(context, "launch_test")
    try:
        assert ros_fixtures.wait_for(lambda: probe.image_pub.get_subscription_count() > 0 or process.poll() is not None, 60.0)
        # Fresh stamps on every try: right after discovery a best-effort frame can be lost, and
        # resending the same stamp later would (rightly) be dropped as older than max_image_age.
        for _ in range(20):
            stamp = rclpy.clock.Clock().now().to_msg()
            if probe.send(image_msg(np.full((72, 96, 3), 40, np.uint8), stamp), timeout=0.5, republish=0.5):
                break
        else:
            process.kill()
            pytest.fail("node process never answered:\n" + process.communicate()[0])
        pose = probe.poses[stamp_key(stamp)]
        assert pose.header.frame_id == "map" and pose.header.stamp == stamp
        assert ("map", "camera_link", stamp_key(stamp)) in probe.tf  # tf_mode map_to_camera from the params file
    finally:
        probe.close()
        rclpy.shutdown(context=context)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert "relocalising images from /launch_test/camera/image_raw" in output
    assert "Traceback" not in output


def test_node_process_explains_a_missing_checkpoint(tmp_path):
    result = subprocess.run(
        node_command("--params-file", str(PARAMS_FILE), "-p", f"checkpoint:={tmp_path / 'nope.pt'}", "-p", "device:=cpu"),
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "train" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_node_help_lists_the_parameters():
    result = subprocess.run(
        [sys.executable, "-m", "ros2_posenet.ros.node", "--help"], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert result.returncode == 0
    for name in ("checkpoint", "tf_mode", "camera_to_base", "max_image_age"):
        assert name in result.stdout
