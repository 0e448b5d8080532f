"""Issue 24 item 10: a missing checkpoint (or map) fails `ros2 launch` before anything starts, and a node
that exits with a configuration error stops the launch instead of respawning.

Before the fix the launch started the node, which exited with code 2 while `ros2 launch` returned 0,
and `respawn:=true` restarted it forever: neither check below existed.
"""
import ast
from pathlib import Path

import pytest

from ros2_posenet.ros.entry import EXIT_CONFIGURATION_ERROR
from ros2_posenet.ros.launch_plan import LaunchPlan, LaunchPlanError, configuration_exit_problem, require_node_files

LAUNCH_FILE = Path(__file__).resolve().parents[2] / "launch" / "relocalize.launch.py"


def plan_with(**node_parameters) -> LaunchPlan:
    return LaunchPlan(executable="posenet_node", namespace="", node_parameters=node_parameters)


def test_the_checkpoint_and_map_must_exist_before_the_node_starts(tmp_path):
    checkpoint, map_file = tmp_path / "model.pt", tmp_path / "room.npz"
    checkpoint.write_bytes(b"x")
    map_file.write_bytes(b"x")
    with pytest.raises(LaunchPlanError, match="no checkpoint: pass checkpoint:="):
        require_node_files(plan_with(checkpoint=""))
    with pytest.raises(LaunchPlanError, match=f"checkpoint {tmp_path / 'nope.pt'} does not exist"):
        require_node_files(plan_with(checkpoint=str(tmp_path / "nope.pt")))
    with pytest.raises(LaunchPlanError, match=f"map_file {tmp_path / 'nope.npz'} does not exist"):
        require_node_files(plan_with(checkpoint=str(checkpoint), map_file=str(tmp_path / "nope.npz")))
    require_node_files(plan_with(checkpoint=str(checkpoint), map_file=str(map_file)))
    require_node_files(plan_with(checkpoint=str(checkpoint), map_file=""))


def test_a_configuration_exit_stops_the_launch_instead_of_respawning():
    assert EXIT_CONFIGURATION_ERROR == 2
    assert "not respawning" in configuration_exit_problem(2, "posenet_node")
    assert configuration_exit_problem(0, "posenet_node") is None  # Ctrl-C
    assert configuration_exit_problem(3, "posenet_node") is None  # worker failure: respawn is what it asks for


def test_the_launch_file_checks_files_before_the_node_and_watches_its_exit():
    tree = ast.parse(LAUNCH_FILE.read_text())
    (start_nodes,) = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "start_nodes"]
    calls = {getattr(c.func, "id", None): c.lineno for c in ast.walk(start_nodes) if isinstance(c, ast.Call)}
    assert calls["plan_launch"] < calls["require_node_files"] < calls["Node"]
    assert "OnProcessExit" in calls and "RegisterEventHandler" in calls
    (handler,) = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "stop_on_configuration_error"]
    assert any(isinstance(n, ast.Raise) for n in ast.walk(handler))  # launch returns non-zero on it
