"""Console-script entry points that stay quiet on Ctrl-C at any moment, imports included.

Importing the node takes seconds (torch, rclpy). A ``KeyboardInterrupt`` raised inside an
extension module's import is not always a ``KeyboardInterrupt`` by the time it reaches us
(numpy turns it into an ``ImportError``), so while importing, Ctrl-C simply ends the process
with status 0: nothing has been started yet that would need cleaning up. Once imported, the
node's ``main`` (:func:`run_node`) handles Ctrl-C and SIGTERM itself (rclpy's signal handler takes over
at ``rclpy.init``; at shutdown the workers are joined before the context goes). This module imports
nothing heavy at import time.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading


# Exit code of a node whose parameters or checkpoint are unusable (launch stops instead of respawning it).
EXIT_CONFIGURATION_ERROR = 2


def _exit_quietly(signum, frame) -> None:
    os._exit(0)


def _run(module: str) -> int:
    previous = signal.signal(signal.SIGINT, _exit_quietly)
    try:
        main = importlib.import_module(module).main
        _let_rclpy_handle_sigterm()  # pycolmap is imported here too: a Ctrl-C inside it becomes a RuntimeError
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        return main()
    except KeyboardInterrupt:
        return 0


def run_node(node_class: type, argv: list[str] | None = None) -> int:
    """Spin ``node_class`` until shutdown: 0 on a clean shutdown (Ctrl-C or SIGTERM, even during start-up),
    2 on a configuration error, ``node.exit_code`` when the node asks for a restart."""
    import rclpy
    from rclpy.executors import ExternalShutdownException

    from ..checkpoint import CheckpointError
    from .parameters import NODE_NAME, ConfigurationError, argument_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    argument_parser().parse_args(rclpy.utilities.remove_ros_args(["prog", *argv])[1:])
    _let_rclpy_handle_sigterm()
    interrupted = _record_interrupts()
    node = None
    try:
        rclpy.init(args=["prog", *argv])
        node = node_class()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as err:
        if interrupted.is_set() or not rclpy.ok():
            pass  # Ctrl-C surfacing inside an extension call (pybind11 wraps it), or the context shut down under us
        elif isinstance(err, (ConfigurationError, CheckpointError)):
            rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {err}")
            return EXIT_CONFIGURATION_ERROR
        else:
            raise
    finally:
        _shut_down_quietly(node)
    return node.exit_code if node is not None else 0


def _record_interrupts() -> threading.Event:
    """Python's SIGINT handler, which rclpy's own handler chains to: it records the Ctrl-C, then raises as usual.

    A ``KeyboardInterrupt`` raised while pybind11 converts a call's arguments (rclpy taking a
    message, say) reaches us as a ``RuntimeError``, and rclpy shuts the context down from its
    own thread a moment later, so ``rclpy.ok()`` alone cannot tell that error from a real one.
    """
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return interrupted  # main() called from a test's thread: signals are not ours to handle

    def on_sigint(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    return interrupted


def _let_rclpy_handle_sigterm() -> None:
    """Import pycolmap (the map stage's default solver) before ``rclpy.init`` and take back SIGTERM.

    Importing pycolmap installs glog's failure signal handler, SIGTERM included, which dumps a
    stack trace and kills the process: imported later (when a map loads), it would replace
    rclpy's handler and turn launch's SIGTERM into exit -15. Imported first and reset to the
    default, rclpy's handler (installed at ``rclpy.init``) owns SIGTERM as it owns SIGINT.
    """
    try:
        import pycolmap  # noqa: F401
    except ImportError:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _shut_down_quietly(node) -> None:
    """Join the workers, destroy the node, shut rclpy down.

    rclpy's handler shut the context down at the first SIGINT/SIGTERM; further ones (launch sends
    SIGTERM after its timeout, users press Ctrl-C twice) are ignored from here on: a worker inside
    torch or OpenCV must finish before the context and the interpreter go, or the process aborts.
    """
    import rclpy

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, signal.SIG_IGN)
        except ValueError:  # not the main thread (main() called from a test's thread)
            pass
    try:
        if node is not None:
            node.destroy_node()
    except KeyboardInterrupt:
        pass
    finally:
        rclpy.try_shutdown()


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
