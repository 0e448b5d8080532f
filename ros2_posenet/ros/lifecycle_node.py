"""``posenet_lifecycle_node``: the same node as a managed (lifecycle) node, for ``nav2_lifecycle_manager``.

It starts *unconfigured* and does nothing until its lifecycle manager (or
``ros2 lifecycle set /posenet_node configure``) drives it:

* configure: read and check the parameters, load the checkpoint (and its map frame), create
  the publishers and the ``~/relocalize`` / ``~/enable`` services; a bad parameter or
  checkpoint makes the transition fail (logged), the node stays unconfigured;
* activate: start the inference and refinement workers and subscribe to images (and odometry, CameraInfo);
* deactivate: unsubscribe and stop the workers (the frames in flight are finished first);
* cleanup: destroy publishers and services and free the model and its GPU memory;
* shutdown: deactivate and clean up from any state.

The four steps are :class:`~ros2_posenet.ros.node.PoseNetNode`'s own ``_configure``,
``_activate``, ``_deactivate`` and ``_cleanup``, which the plain node runs at construction.
"""
from __future__ import annotations

import sys

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from ..checkpoint import CheckpointError
from .node import ConfigurationError, PoseNetNode, main as node_main


class PoseNetLifecycleNode(PoseNetNode, LifecycleNode):
    """Managed posenet node; takes the standard :class:`rclpy.node.Node` keyword arguments."""

    MANAGED = True

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
        except (ConfigurationError, CheckpointError) as err:
            self.get_logger().error(f"cannot configure: {err}")
            self._cleanup()
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._activate()
        except ConfigurationError as err:
            self.get_logger().error(f"cannot activate: {err}")
            self._deactivate()
            return TransitionCallbackReturn.FAILURE
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS  # back to unconfigured: the manager may configure again


def main(argv: list[str] | None = None) -> int:
    """Console script ``posenet_lifecycle_node``."""
    return node_main(argv, node_class=PoseNetLifecycleNode)


if __name__ == "__main__":
    sys.exit(main())
