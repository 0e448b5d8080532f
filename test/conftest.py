"""Fixtures shared by the ROS tests (real rclpy; see ros_fixtures.py)."""
import pytest

from ros_fixtures import RunningNode, ros_context


@pytest.fixture(scope="module")
def context():
    """A private rclpy context for the module's nodes."""
    with ros_context() as ctx:
        yield ctx


@pytest.fixture
def closing():
    """``closing(x)`` returns ``x`` and closes it after the test, pass or fail (newest first)."""
    opened = []
    yield lambda item: opened.append(item) or item
    for item in reversed(opened):
        item.close()


@pytest.fixture
def start(context, closing):
    """``start(namespace, **parameters)``: a PoseNetNode with a Probe (ros_fixtures.RunningNode), closed after the test."""
    return lambda namespace, **parameters: closing(RunningNode(context, namespace, **parameters))
