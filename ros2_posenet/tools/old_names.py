"""The console scripts' names before the ``posenet-`` prefix, kept for one release.

``train``, ``evaluate``, ``export`` and ``demo`` collide with other tools on a user's PATH
(``export`` is a bash builtin: typing it never reaches ours), so every script is now
``posenet-<name>``. The old names still run the same code after one line on stderr.
"""
from __future__ import annotations

import importlib
import sys

# old name -> (new name, module whose main() runs)
RENAMED = {
    "train": ("posenet-train", "ros2_posenet.train"),
    "evaluate": ("posenet-evaluate", "ros2_posenet.evaluate"),
    "export": ("posenet-export", "ros2_posenet.tools.export"),
    "demo": ("posenet-demo", "ros2_posenet.tools.demo"),
    "build-map": ("posenet-build-map", "ros2_posenet.tools.build_map"),
    "relocalize-bag": ("posenet-relocalize-bag", "ros2_posenet.tools.relocalize_bag"),
    "synth-scene": ("posenet-synth-scene", "ros2_posenet.data.synthetic"),
}


def run_old_name(old: str) -> int:
    new, module = RENAMED[old]
    print(f"{old}: this name is deprecated and goes in the next release; use {new}", file=sys.stderr)
    return importlib.import_module(module).main()


def train() -> None:
    sys.exit(run_old_name("train"))


def evaluate() -> None:
    sys.exit(run_old_name("evaluate"))


def export() -> None:
    sys.exit(run_old_name("export"))


def demo() -> None:
    sys.exit(run_old_name("demo"))


def build_map() -> None:
    sys.exit(run_old_name("build-map"))


def relocalize_bag() -> None:
    sys.exit(run_old_name("relocalize-bag"))


def synth_scene() -> None:
    sys.exit(run_old_name("synth-scene"))
