"""A :class:`~.refiner.Refiner` in a child process: the same ``refine``, with its own interpreter lock and priority.

The node's regressor must keep the camera's rate while refinement runs beside it (issue 24
item 7). In one process they share the GIL: every time the refiner's Python code holds it,
the regressor's next torch call waits, and a lower-priority thread that is preempted while
holding it stalls the regressor for as long as the scheduler leaves it off the CPU (a
priority inversion). numpy's OpenBLAS and OpenCV's thread pools, started by other threads,
also run the refiner's work at full priority. A child process has its own GIL, and its
whole process (every thread it starts) is niced and, on Linux, scheduled as ``SCHED_IDLE``, so
it takes only the CPU the regressor leaves.

Protocol: pickled requests ``(rgb, K, prior_T, prior_covariance)`` on the child's stdin,
pickled ``("ok", RefinementResult)`` or ``("error", type name, message)`` on a private copy
of its stdout (its own stdout goes to stderr, so library prints cannot corrupt the stream).
The child ignores SIGINT (a terminal's Ctrl-C reaches the whole process group; the parent
decides when it ends) and ends when its stdin closes, so it never outlives its parent.
ROS-free.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np

from .scene_map import MapError

# Process niceness added to the child: it yields the CPU to the regressor (and to other nodes). 19, the
# lowest priority: at 10 the regressor kept 92 % of its rate at a 30 Hz camera on 2 cores, at 19 98 %.
REFINER_PROCESS_NICE = 19
# OpenCV threads of the child (0: OpenCV's default, one per core). One: the child's SIFT then never spreads
# over both cores of a small CPU; the regressor kept 92-99 % of its rate (2 threads: 87-93 %) and more poses
# were verified (10-11/s against 9/s), 30 Hz camera, 640x480, 2 cores (bench/bench_node_refine.py).
REFINER_PROCESS_THREADS = 1
# Linux's SCHED_IDLE policy for the child on top of the niceness: a core running only SCHED_IDLE work counts
# as idle, so a woken regressor (or camera driver) thread is placed on it and preempts the refiner at once,
# instead of queueing behind it or beside the regressor on the other core (a niced task still takes its turn).
REFINER_PROCESS_IDLE = True
# numpy's OpenBLAS threads busy-wait: on a loaded 2-core machine two of them made the matching
# products 10x slower than one (bench/RESULTS.md); the refiner's products are small anyway.
CHILD_ENVIRONMENT = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


class RefinerProcessError(RuntimeError):
    """The child process died or could not start; the next ``refine`` starts a new one."""


class RefinerProcess:
    """``Refiner(SceneMap.load(map_file), config).refine`` served by a child process (thread-safe, one call at a time).

    Args:
        map_file: the scene map (``.npz``), loaded by the child.
        config: :class:`~.refiner.RefinementConfig` (None: defaults).
        nice: niceness added to the child process (None: ``REFINER_PROCESS_NICE``).
        threads: OpenCV threads of the child (None: ``REFINER_PROCESS_THREADS``; 0: OpenCV's default).
        idle: schedule the child as ``SCHED_IDLE`` (None: ``REFINER_PROCESS_IDLE``; Linux only, else ignored).

    ``map_info``: the map's first keyframe camera and size figures (:func:`map_info`), as the child
    read them: the parent need not load the map too.

    Raises (at construction): :class:`~.scene_map.MapError` when the child cannot load the map,
    ValueError when it cannot take the config, with the child's message.
    """

    def __init__(self, map_file, config=None, nice: int | None = None, threads: int | None = None, idle: bool | None = None):
        self.map_file = str(map_file)
        self.nice = int(REFINER_PROCESS_NICE if nice is None else nice)
        self.threads = int(REFINER_PROCESS_THREADS if threads is None else threads)
        self.idle = bool(REFINER_PROCESS_IDLE if idle is None else idle)
        self._config = None if config is None else config.to_dict()
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._finalizer = None
        self.map_info: dict = {}
        self._start()

    @property
    def pid(self) -> int | None:
        """The child's process id (None when it is not running)."""
        return None if self._process is None else self._process.pid

    def refine(self, rgb, K, prior_T=None, prior_covariance=None, tracked=None):
        """:meth:`~.refiner.Refiner.refine` in the child: a ``RefinementResult``; ValueError as the refiner raises
        it. A child found dead is replaced and the frame tried once more; :class:`RefinerProcessError` when the
        new one dies on it too (the next call starts another)."""
        with self._lock:
            for attempt in (1, 2):
                if self._process is None or self._process.poll() is not None:
                    self._start()
                try:
                    self._send((rgb, K, prior_T, prior_covariance, tracked))
                    answer = self._receive()
                    break
                except (EOFError, OSError, pickle.UnpicklingError) as err:
                    code = self._process.wait()
                    self._stop()
                    if attempt == 2:
                        raise RefinerProcessError(f"refinement process exited with code {code} ({type(err).__name__})") from None
        if answer[0] == "ok":
            return answer[1]
        _, kind, message = answer
        if kind == "ValueError":  # a malformed argument, as the refiner says
            raise ValueError(message)
        raise RuntimeError(f"{kind}: {message}")

    def close(self) -> None:
        """End the child (it finishes the frame in hand); also done when this object is collected or at exit."""
        with self._lock:
            self._stop()

    # ---- internals

    def _start(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        environment = {**os.environ, **CHILD_ENVIRONMENT,
                       "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH", "")]))}
        self._process = subprocess.Popen([sys.executable, "-m", __name__, self.map_file, str(self.nice), str(self.threads), str(int(self.idle))],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment)
        self._finalizer = weakref.finalize(self, _end, self._process)
        try:
            self._send(self._config)
            answer = self._receive()
        except (EOFError, OSError, pickle.UnpicklingError):
            answer = ("error", "RefinerProcessError", f"refinement process exited with code {self._process.wait()} while starting")
        if answer[0] != "ready":
            self._stop()
            error = MapError if answer[1] == "MapError" else ValueError  # a bad map is the map's fault, as in the parent
            raise error(f"refinement process for {self.map_file}: {answer[2]}")
        self.map_info = answer[1]

    def _stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._process, self._finalizer = None, None

    def _send(self, message) -> None:
        pickle.dump(message, self._process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self._process.stdin.flush()

    def _receive(self):
        return pickle.load(self._process.stdout)


def _end(process: subprocess.Popen) -> None:
    """Close the child's stdin (it exits after the frame in hand); kill it if it does not."""
    for stream in (process.stdin, process.stdout):
        try:
            stream.close()
        except OSError:
            pass
    try:
        process.wait(timeout=10.0)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def map_info(scene_map) -> dict:
    """What the parent needs of the map without loading it again: its first keyframe's camera and its size figures."""
    return {"intrinsics": np.array(scene_map.intrinsics[0]), "image_size": tuple(int(v) for v in scene_map.image_sizes[0]),
            "summary": scene_map.summary()}


def serve(map_file: str, nice: int, threads: int = 0, idle: bool = False) -> int:
    """The child: load the map, then answer requests until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints of the libraries go to stderr, not into the answers
    os.nice(nice)  # before any thread starts (Linux: per thread, inherited by the threads it starts), as the policy
    if idle and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # not permitted here: niceness alone
            pass
    requests = sys.stdin.buffer

    def answer(message) -> None:
        pickle.dump(message, answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()

    try:
        config_dict = pickle.load(requests)
        from .refiner import RefinementConfig, Refiner
        from .scene_map import SceneMap

        if threads > 0:
            import cv2

            cv2.setNumThreads(threads)
        refiner = Refiner(SceneMap.load(map_file), None if config_dict is None else RefinementConfig.from_dict(config_dict),
                          prepare=False)
    except EOFError:
        return 0
    except Exception as err:  # reported to the parent, which raises it
        answer(("error", type(err).__name__, str(err)))
        return 1
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pycolmap's glog installs a handler that dumps a stack
    answer(("ready", map_info(refiner.map)))
    # After "ready": the node starts (or switches maps) without waiting for the vocabulary; its first frame does.
    refiner.prepare_retrieval()
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            return 0
        try:
            answer(("ok", refiner.refine(*request)))
        except Exception as err:  # the frame fails, the child serves on
            answer(("error", type(err).__name__, str(err)))


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4]))))
