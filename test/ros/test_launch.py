"""Launch file and configuration: checked statically (launch/launch_ros are not on PyPI), and the
console script run as a real process with config/posenet.yaml."""
import ast
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ros_fixtures
from ros_fixtures import Probe, image_msg, stamp_key

ros_fixtures.isolate_ros_domain()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import rclpy  # noqa: E402
import yaml  # noqa: E402

from ros2_posenet.ros.node import PARAMETER_NAMES, PARAMETERS, validate_parameter  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
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


def test_launch_file_declares_the_plans_arguments_and_starts_nothing_before_planning(launch_tree):
    from ros2_posenet.ros.launch_plan import ARGUMENT_NAMES

    assert {"checkpoint", "image_topic", "compressed", "params_file", "tf_mode", "use_sim_time", "respawn", "managed", "rviz"} <= set(ARGUMENT_NAMES)
    (generate,) = [f for f in launch_tree.body if isinstance(f, ast.FunctionDef) and f.name == "generate_launch_description"]
    # The description holds only argument declarations and one OpaqueFunction: no Node is an action
    # of its own, so no process can start before the plan has checked everything.
    assert calls_named(generate, "Node") == []
    assert [keyword(call, "function").id for call in calls_named(generate, "OpaqueFunction")] == ["start_nodes"]
    (start_nodes,) = [f for f in launch_tree.body if isinstance(f, ast.FunctionDef) and f.name == "start_nodes"]
    plan_line = min(call.lineno for call in calls_named(start_nodes, "plan_launch"))
    assert all(call.lineno > plan_line for call in calls_named(start_nodes, "Node"))
    (posenet,) = [call for call in calls_named(start_nodes, "Node") if literal(keyword(call, "package")) == "ros2_posenet"]
    assert ast.unparse(keyword(posenet, "executable")) == "plan.executable"
    assert ast.unparse(keyword(posenet, "parameters")) == "plan.parameters"
    assert ast.unparse(keyword(posenet, "respawn")) == "plan.respawn"


def test_launch_executables_are_console_scripts():
    from ros2_posenet.ros import entry

    setup_source = (ROOT / "setup.py").read_text()
    assert '"posenet_node = ros2_posenet.ros.entry:posenet_node"' in setup_source
    assert '"posenet_lifecycle_node = ros2_posenet.ros.entry:posenet_lifecycle_node"' in setup_source
    assert callable(entry.posenet_node) and callable(entry.posenet_lifecycle_node)


# ----------------------------------------------------------------------------- launch plan (precedence, types, checks)


def installed_share(tmp_path) -> Path:
    """This package installed into a scratch prefix the way the venv has it (scripts/install_share.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import install_share
    finally:
        sys.path.pop(0)
    install_share.link_data_files(tmp_path)
    return tmp_path


@pytest.fixture
def ament_prefix(tmp_path, monkeypatch):
    """A real ament index with ros2_posenet and without rviz2, found by ament_index_python."""
    prefix = installed_share(tmp_path / "prefix")
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(prefix))
    return prefix


def launch_values(**values) -> dict:
    from ros2_posenet.ros.launch_plan import ARGUMENTS

    return {**{a.name: a.default for a in ARGUMENTS}, **values}


def test_launch_arguments_override_the_params_file_only_when_set(ament_prefix):
    from ros2_posenet.ros.launch_plan import plan_launch

    plan = plan_launch(launch_values(checkpoint="/maps/floor1.pt"))
    params_file = str(ament_prefix / "share/ros2_posenet/config/posenet.yaml")
    assert plan.parameters == [params_file, {"checkpoint": "/maps/floor1.pt"}]  # image_topic, tf_mode... stay the file's
    assert plan.executable == "posenet_node" and plan.respawn is False and plan.rviz_config is None

    plan = plan_launch(launch_values(checkpoint="123", compressed="true", use_sim_time="false", tf_mode="none", max_rate_hz="7", respawn="true", managed="true"))
    assert plan.parameters[1] == {"checkpoint": "123", "compressed": True, "use_sim_time": False, "tf_mode": "none", "max_rate_hz": 7.0}
    assert type(plan.parameters[1]["checkpoint"]) is str  # typed, never YAML-guessed into an int
    assert plan.respawn is True and plan.respawn_delay == 2.0 and plan.executable == "posenet_lifecycle_node"


def test_launch_plan_fails_before_anything_starts(ament_prefix, tmp_path):
    from ros2_posenet.ros.launch_plan import LaunchPlanError, plan_launch

    with pytest.raises(LaunchPlanError, match="params_file /missing.yaml does not exist"):
        plan_launch(launch_values(params_file="/missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("posenet_node: [unclosed")
    with pytest.raises(LaunchPlanError, match="not readable YAML"):
        plan_launch(launch_values(params_file=str(broken)))
    with pytest.raises(LaunchPlanError, match="package rviz2 is not installed.*rviz:=false"):
        plan_launch(launch_values(rviz="true"))
    with pytest.raises(LaunchPlanError, match="compressed:='yes' must be one of true, false"):
        plan_launch(launch_values(compressed="yes"))
    with pytest.raises(LaunchPlanError, match="max_rate_hz:='fast' must be a number"):
        plan_launch(launch_values(max_rate_hz="fast"))


def test_rviz_config_follows_the_nodes_topics(ament_prefix, tmp_path):
    from ros2_posenet.ros.launch_plan import plan_launch

    assert "/camera/image_raw" not in (ROOT / "config" / "posenet.rviz").read_text()  # set by the launch, not hard-coded
    params = tmp_path / "robot.yaml"
    params.write_text("posenet_node:\n  ros__parameters:\n    image_topic: front/image\n    compressed: true\n")

    def find(package):  # the real index for ros2_posenet; rviz2 stands for itself by a directory
        if package == "rviz2":
            return str(tmp_path)
        from ament_index_python.packages import get_package_share_directory

        return get_package_share_directory(package)

    plan = plan_launch(launch_values(params_file=str(params), rviz="true", namespace="robot1"), find_share=find)
    rviz = yaml.safe_load(Path(plan.rviz_config).read_text())
    topics = {d["Name"]: d.get("Topic", {}).get("Value") for d in rviz["Visualization Manager"]["Displays"]}
    assert topics["Camera image"] == "/robot1/front/image/compressed"  # from the params file, in the namespace
    assert topics["Base pose (posenet)"] == "/robot1/posenet/pose"
    assert rviz["Visualization Manager"]["Global Options"]["Fixed Frame"] == "map"
    plan = plan_launch(launch_values(params_file=str(params), rviz="true", image_topic="/cam/raw", compressed="false"), find_share=find)
    rviz = yaml.safe_load(Path(plan.rviz_config).read_text())
    assert {d["Name"]: d.get("Topic", {}).get("Value") for d in rviz["Visualization Manager"]["Displays"]}["Camera image"] == "/cam/raw"


def test_the_venv_is_an_install_space_for_get_package_share_directory():
    """`make venv` links the data files into .venv/share and puts .venv on AMENT_PREFIX_PATH."""
    result = subprocess.run(
        [sys.executable, "-c", "from ament_index_python.packages import get_package_share_directory as g; print(g('ros2_posenet'))"],
        capture_output=True, text=True, timeout=120,
    )
    if "AMENT_PREFIX_PATH" in result.stderr and not (Path(sys.prefix) / "share/ros2_posenet").exists():
        pytest.skip("this Python environment was not made by scripts/setup_venv.sh")
    assert result.returncode == 0, result.stderr
    share = Path(result.stdout.strip())
    for name in ("launch/relocalize.launch.py", "config/posenet.yaml", "config/posenet.rviz", "config/ekf.yaml", "package.xml"):
        assert (share / name).is_file(), name
    assert (share / "config/posenet.yaml").read_text() == PARAMS_FILE.read_text()  # linked: edits show through


def test_launch_config_files_exist_and_are_installed():
    source = (ROOT / "ros2_posenet" / "ros" / "launch_plan.py").read_text()
    installed = {(dest, os.path.normpath(src)) for dest, sources in setup_data_files() for src in sources}
    for name in ("posenet.yaml", "posenet.rviz", "ekf.yaml"):
        assert (ROOT / "config" / name).is_file()
        assert ("share/ros2_posenet/config", f"config/{name}") in installed
    assert '"config", "posenet.yaml"' in source and '"config", "posenet.rviz"' in source  # what the plan reads from the share
    assert ("share/ros2_posenet/launch", "launch/relocalize.launch.py") in installed
    assert ("share/ament_index/resource_index/packages", "resource/ros2_posenet") in installed


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
    from ros2_posenet.ros.launch_plan import RVIZ_POSE_DISPLAYS, rviz_config

    pose_topics = {name: "/" + params[param] for name, param in RVIZ_POSE_DISPLAYS.items()}
    rviz = yaml.safe_load(rviz_config((ROOT / "config" / "posenet.rviz").read_text(), params["image_topic"], pose_topics))
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
    """The console script's code path (ros2_posenet.ros.entry), which keeps Ctrl-C quiet during imports too."""
    return [sys.executable, "-m", "ros2_posenet.ros.entry", "--ros-args", *ros_args]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_node_process(*ros_args: str, cwd) -> subprocess.Popen:
    return subprocess.Popen(node_command(*ros_args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(), cwd=cwd)


def interrupt(process: subprocess.Popen, timeout: float = 30.0) -> str:
    """Ctrl-C the process and return its output; killed if it does not stop in time (never left running)."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[0] + f"\n[killed: no exit within {timeout} s of SIGINT]"


def test_node_process_serves_with_the_params_file_and_stops_cleanly(tmp_path):
    checkpoint = ros_fixtures.overflow_checkpoint(tmp_path / "model.pt")  # hand-set: dark images -> pose at the origin
    process = start_node_process(
        "--params-file", str(PARAMS_FILE), "-r", "__ns:=/launch_test",
        "-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu", "-p", "cpu_threads:=1", "-p", "image_topic:=camera/image_raw",
        cwd=tmp_path,
    )
    context = rclpy.Context()
    try:
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
                pytest.fail("node process never answered:\n" + interrupt(process))
            pose = probe.poses[stamp_key(stamp)]
            assert pose.header.frame_id == "map" and pose.header.stamp == stamp
            # tf_mode map_to_camera from the params file; /tf is a separate topic, so wait for it too.
            assert ros_fixtures.wait_for(lambda: ("map", "camera_link", stamp_key(stamp)) in probe.tf, 10.0), "no map -> camera_link on /tf"
        finally:
            probe.close()
    finally:
        rclpy.try_shutdown(context=context)
        output = interrupt(process)
    assert process.returncode == 0, output
    assert "relocalising images from /launch_test/camera/image_raw" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("delay", [1.0, 2.5, 5.0])
def test_ctrl_c_during_start_up_exits_quietly(tmp_path, delay):
    """SIGINT while Python imports torch/rclpy, while the model loads, or once it runs: exit 0, no traceback.

    (Not earlier than ~0.5 s: in the PyPI venv the ROS wheels' start-up hook re-executes Python
    in its first moments, and a signal caught just before that exec is lost with the old image.)
    """
    checkpoint = ros_fixtures.overflow_checkpoint(tmp_path / "model.pt")
    process = start_node_process("-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu", "-p", "cpu_threads:=1", "-r", "__ns:=/ctrl_c", cwd=tmp_path)
    try:
        time.sleep(delay)
    finally:
        output = interrupt(process)
    assert process.returncode == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output


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


# ----------------------------------------------------------------------------- install: rosdep keys, test isolation

# Top-level modules imported by ros2_posenet and launch/ -> the rosdep key that installs them on Kilted.
# Checked against ros/rosdistro rosdep/python.yaml (python3-numpy, -opencv, -pil, -yaml, -tqdm,
# -transforms3d, -onnxruntime-pip, -pytest) and the rosdep run on Kilted (python3-torch,
# python3-torchvision, python3-matplotlib, python3-rosbags-pip); ROS packages are their own keys.
ROSDEP_KEYS = {
    "numpy": "python3-numpy", "cv2": "python3-opencv", "PIL": "python3-pil", "yaml": "python3-yaml", "tqdm": "python3-tqdm",
    "transforms3d": "python3-transforms3d", "torch": "python3-torch", "torchvision": "python3-torchvision",
    "matplotlib": "python3-matplotlib", "rosbags": "python3-rosbags-pip", "onnxruntime": "python3-onnxruntime-pip",
}
# No rosdep key (pip, from requirements.txt) or optional extras imported only when asked for.
# pydantic: its key python3-pydantic is Ubuntu noble's pydantic 1; version 2 comes from requirements.txt.
PIP_ONLY = {"onnx", "torch_tensorrt", "pycolmap", "poselib", "pydantic"}


def imported_top_level_modules() -> set[str]:
    modules = set()
    for path in [*ROOT.joinpath("ros2_posenet").rglob("*.py"), *ROOT.joinpath("launch").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def test_every_import_has_a_rosdep_key_in_package_xml():
    import xml.etree.ElementTree as ET

    declared = {e.text for e in ET.parse(ROOT / "package.xml").getroot() if e.tag in ("exec_depend", "depend")}
    stdlib = set(sys.stdlib_module_names)
    missing = []
    for module in sorted(imported_top_level_modules() - stdlib - PIP_ONLY - {"ros2_posenet"}):
        key = ROSDEP_KEYS.get(module, module)  # ROS packages: the module is the package (rclpy, std_srvs, ...)
        if key not in declared:
            missing.append(f"{module} -> {key}")
    assert not missing, f"imports without a rosdep key in package.xml: {missing}"
    assert not any(key in declared for key in ("python3-rosbags", "python3-onnxruntime")), "not rosdep keys: use the -pip ones"
    assert "lifecycle_msgs" in declared  # rclpy.lifecycle imports it


def test_each_test_run_holds_its_own_ros_domain():
    code = "import ros_domain, os; ros_domain.isolate_ros_domain(); print(os.environ['ROS_DOMAIN_ID'])"
    env = {**os.environ, "ROS_DOMAIN_ID": os.environ["ROS_DOMAIN_ID"], "PYTHONPATH": str(ROOT / "test")}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT / "test")
    assert other.returncode == 0, other.stderr
    assert 1 <= int(other.stdout) <= 101 and other.stdout.strip() != os.environ["ROS_DOMAIN_ID"]  # this run still holds ours
