"""The node's worker threads: a one-frame mailbox, a supervised thread that empties it, and statistics.

The node runs two :class:`Worker` s: the regressor (every frame it can take, newest first) and,
with a map, the refiner (the newest regressed frame whenever it is free), so the regressor's
answer never waits for the geometric stage. No rclpy here.
"""
from __future__ import annotations

import os
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# Counters that mean a frame was dropped, with the log text of each.
DROP_REASONS = {
    "superseded": "a newer frame arrived before the worker was free",
    "stale": "image older than max_image_age",
    "negative_stamp": "negative header stamp",
    "zero_stamp": "header stamp is zero (the driver did not stamp the image)",
    "future_stamp": "image stamped ahead of the node's clock by more than future_stamp_tolerance",
    "not_newer": "stamp not newer than the last published one (a measurement goes out once, in stamp order)",
    "unsupported_encoding": "unsupported image encoding",
    "empty_image": "zero-sized image",
    "truncated_image": "truncated image data",
    "image_too_large": "image larger than max_image_pixels",
    "corrupt_compressed": "corrupt compressed image",
    "bad_image": "image unusable",
    "non_finite_output": "network output is NaN/inf",
    "internal_error": "unexpected error while processing a frame",
}

# A worker that dies more often than this is not restarted again: the node exits
# with EXIT_WORKER_FAILED so that a supervisor (launch `respawn`, systemd) starts it afresh.
WORKER_RESTART_LIMIT = 5
WORKER_RESTART_WINDOW_S = 60.0
EXIT_WORKER_FAILED = 3


class LatestFrameSlot:
    """One-frame mailbox between a producer and a worker.

    ``put`` never blocks and replaces an item the worker has not taken yet (the
    caller counts that as a drop), so the worker always processes the newest one.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._item = None
        self._closed = False

    def put(self, item) -> bool:
        """Store ``item``; returns True when it replaced an untaken one."""
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify()
        return replaced

    def take(self, timeout: float | None = None):
        """The newest item, waiting up to ``timeout`` s; ``None`` on timeout or when closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


@dataclass
class Statistics:
    """Thread-safe counters plus the latencies of the current diagnostics window."""

    counts: Counter = field(default_factory=Counter)
    latencies: list = field(default_factory=list)  # seconds from worker pick-up to publish
    ages: list = field(default_factory=list)  # seconds from image stamp to publish
    refinements: list = field(default_factory=list)  # (refined?, inliers, ms, reason) of the window's refinements
    latest_covariance: np.ndarray | None = None  # of the last published base pose (diagnostics' sigma)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, key: str, n: int = 1) -> int:
        with self.lock:
            self.counts[key] += n
            return self.counts[key]

    def record(self, latency: float, age: float) -> None:
        with self.lock:
            self.counts["processed"] += 1
            self.latencies.append(latency)
            self.ages.append(age)

    def record_refinement(self, refined: bool, inliers: int, ms: float, reason: str) -> None:
        with self.lock:
            self.refinements.append((refined, inliers, ms, reason))

    def window(self) -> tuple[dict, list, list, list]:
        """Totals so far and the window's latencies, ages and refinements (the window is then reset)."""
        with self.lock:
            window = (dict(self.counts), self.latencies, self.ages, self.refinements)
            self.latencies, self.ages, self.refinements = [], [], []
            return window

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.counts)


class Worker:
    """A thread that hands every item of its :class:`LatestFrameSlot` to ``process``.

    ``process`` is expected to catch a frame's errors; should anything still end the
    thread, the reason is kept and :meth:`restart_if_dead` (the node's supervisor) starts
    a new one, up to WORKER_RESTART_LIMIT times within WORKER_RESTART_WINDOW_S.
    """

    def __init__(self, name: str, thread_name: str, process: Callable[[object], None], on_death: Callable[[str], None], nice: int = 0):
        """``nice``: added to the thread's scheduling niceness (Linux; threads it starts inherit it), so that a
        best-effort worker gets only the CPU the others leave."""
        self.name, self.thread_name, self._process, self._on_death, self.nice = name, thread_name, process, on_death, nice
        self.slot = LatestFrameSlot()
        self.failure = ""  # why the thread ended (set by the thread itself)
        self.restart_times: tuple = ()  # monotonic times of recent restarts
        self.last_restart: tuple | None = None  # (wall-clock time, reason) of the latest restart
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def put(self, item) -> bool:
        """Hand ``item`` over; True when it replaced one the worker had not taken."""
        return self.slot.put(item)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> bool:
        """Close the slot and wait for the item in hand to be finished; False if it did not stop in time.

        A KeyboardInterrupt while waiting (a second Ctrl-C) does not cut the wait short: the
        thread must be gone before the ROS context and the interpreter go.
        """
        self.slot.close()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        deadline = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                thread.join(timeout=min(0.5, max(deadline - time.monotonic(), 0.0)))
            except KeyboardInterrupt:
                continue
        return not thread.is_alive()

    def _loop(self) -> None:
        if self.nice:
            try:  # per thread on Linux: the thread id as the "process"
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + self.nice)
            except (AttributeError, OSError):  # not Linux, or not permitted: runs at the normal priority
                pass
        try:
            while not self.slot.closed:
                item = self.slot.take(timeout=0.2)
                if item is not None:
                    self._process(item)
        except BaseException as err:  # recorded for the supervisor, which restarts the worker
            self.failure = f"{type(err).__name__}: {err}"
            self._on_death(f"{self.name} stopped: {self.failure}\n{traceback.format_exc()}")

    def restart_if_dead(self) -> str | None:
        """Restart a dead thread (slot still open). Returns None when nothing was due, the reason when it
        restarted, and raises :class:`WorkerGaveUp` when it died too often to try again."""
        if self._thread is None or self._thread.is_alive() or self.slot.closed:
            return None
        now = time.monotonic()
        recent = tuple(t for t in self.restart_times if now - t < WORKER_RESTART_WINDOW_S)
        reason = self.failure or "unknown cause"
        if len(recent) >= WORKER_RESTART_LIMIT:
            raise WorkerGaveUp(len(recent) + 1, reason)
        self.restart_times = (*recent, now)
        self.last_restart = (time.time(), reason)
        self.failure = ""
        self.start()
        return reason

    def recently_restarted(self) -> bool:
        return bool(self.restart_times) and time.monotonic() - self.restart_times[-1] < WORKER_RESTART_WINDOW_S


class WorkerGaveUp(RuntimeError):
    def __init__(self, deaths: int, reason: str):
        super().__init__(f"died {deaths} times within {WORKER_RESTART_WINDOW_S:.0f} s (last: {reason})")
        self.deaths, self.reason = deaths, reason
