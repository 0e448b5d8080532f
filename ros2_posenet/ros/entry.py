"""Console-script entry points that stay quiet on Ctrl-C at any moment, imports included.

Importing the node takes seconds (torch, rclpy). A ``KeyboardInterrupt`` raised inside an
extension module's import is not always a ``KeyboardInterrupt`` by the time it reaches us
(numpy turns it into an ``ImportError``), so while importing, Ctrl-C simply ends the process
with status 0: nothing has been started yet that would need cleaning up. Once imported, the
node's ``main`` handles Ctrl-C itself (and rclpy's signal handler takes over at ``rclpy.init``).
This module imports nothing heavy.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys


def _exit_quietly(signum, frame) -> None:
    os._exit(0)


def _run(module: str) -> int:
    previous = signal.signal(signal.SIGINT, _exit_quietly)
    try:
        main = importlib.import_module(module).main
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        return main()
    except KeyboardInterrupt:
        return 0


def posenet_node() -> None:
    """``posenet_node``: the plain node, configured and active once started."""
    sys.exit(_run("ros2_posenet.ros.node"))


def posenet_lifecycle_node() -> None:
    """``posenet_lifecycle_node``: the managed node, driven by a lifecycle manager."""
    sys.exit(_run("ros2_posenet.ros.lifecycle_node"))


if __name__ == "__main__":  # python -m ros2_posenet.ros.entry [lifecycle] --ros-args ...
    if sys.argv[1:2] == ["lifecycle"]:
        del sys.argv[1]
        posenet_lifecycle_node()
    posenet_node()
