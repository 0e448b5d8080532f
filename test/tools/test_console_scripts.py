"""Console scripts: one ``posenet-`` prefix (``export`` is a bash builtin), old names for one release with a deprecation line."""
import ast
import importlib
from pathlib import Path

import pytest

from ros2_posenet.tools import old_names

ROOT = Path(__file__).resolve().parents[2]
NODES = {"posenet_node", "posenet_lifecycle_node"}


def console_scripts() -> dict[str, str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    (entry_points,) = [kw.value for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords if kw.arg == "entry_points"]
    lines = ast.literal_eval(entry_points)["console_scripts"]
    return {name.strip(): target.strip() for name, target in (line.split("=") for line in lines)}


def test_every_script_but_the_nodes_has_the_prefix_and_a_real_target():
    scripts = console_scripts()
    new = {name for name in scripts if name.startswith("posenet-")}
    assert new >= {"posenet-train", "posenet-evaluate", "posenet-export", "posenet-demo", "posenet-build-map",
                   "posenet-relocalize-bag", "posenet-synth-scene", "posenet-make-dataset"}
    assert set(scripts) - new - NODES == set(old_names.RENAMED)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    for old, (new_name, module) in old_names.RENAMED.items():
        assert scripts[new_name] == f"{module}:main"  # the old name runs the same main()
    # `ros2 run ros2_posenet <name>` finds scripts in lib/ros2_posenet, for the new and the old names alike.
    assert "script_dir=$base/lib/ros2_posenet" in (ROOT / "setup.cfg").read_text()


@pytest.mark.parametrize("old", ["synth-scene", "build-map"])
def test_old_name_warns_on_one_line_then_runs_the_tool(old, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", [old, "--help"])
    with pytest.raises(SystemExit) as exited:
        old_names.run_old_name(old)
    assert exited.value.code == 0
    captured = capsys.readouterr()
    assert captured.err == f"{old}: this name is deprecated and goes in the next release; use posenet-{old}\n"
    assert captured.out.startswith(f"usage: posenet-{old}")
