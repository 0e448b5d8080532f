"""A ROS_DOMAIN_ID per test run (imports only the standard library, so a subprocess can use it cheaply)."""
from __future__ import annotations

import fcntl
import os
import random
import tempfile

_DOMAIN_LOCK = None  # held open for the life of the test run


def isolate_ros_domain() -> None:
    """Give this test run a ROS_DOMAIN_ID that no other run on the machine holds (before ``rclpy.init``).

    Domains 1-101 (0 is every robot's default; above 101 Linux runs out of DDS ports) are taken
    with an exclusive ``flock`` on a file per domain, kept until the process exits, so concurrent
    runs can never cross-talk, whatever ROS_DOMAIN_ID the shell exported (that one may be a
    robot's). ``ROS2_POSENET_TEST_DOMAIN_ID`` forces a domain. Node subprocesses inherit it.
    """
    global _DOMAIN_LOCK
    if _DOMAIN_LOCK is not None:
        return
    forced = os.environ.get("ROS2_POSENET_TEST_DOMAIN_ID")
    candidates = [int(forced)] if forced else random.sample(range(1, 102), 101)
    for domain in candidates:
        handle = open(os.path.join(tempfile.gettempdir(), f"ros2_posenet_test_domain_{domain}.lock"), "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _DOMAIN_LOCK = handle
        os.environ["ROS_DOMAIN_ID"] = str(domain)
        break
    else:
        raise RuntimeError("every ROS_DOMAIN_ID 1-101 is held by another test run on this machine")
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
