"""``/diagnostics`` and the periodic log line of ``posenet_node``.

Each diagnostics period the node's counters and the window's latencies and refinements become
one ``DiagnosticStatus``: ERROR when the inference worker stopped, WARN after a worker restart,
new bad-input drops, a map that could not be loaded, or a map against which *every* frame of the
window failed to refine (the regressor alone is then serving, whatever the map promised), OK
otherwise.
"""
from __future__ import annotations

import sys
import time
from collections import Counter

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray

from ..covariance import standard_deviations
from . import messages
from .worker import DROP_REASONS

# Counters of the geometric stage shown in every status (refine_<outcome> and CameraInfo problems).
REFINE_COUNTERS = ("refine_refined", "refine_fallback", "refine_no_camera_info", "refine_error", "refine_skipped",
                   "verified_published", "bad_camera_info", "camera_info_far_stamp")


def restart_note(worker, restarts: int) -> str:
    """'<worker> restarted N times, last at HH:MM:SS UTC (reason)', or '' when it never restarted."""
    if worker.last_restart is None:
        return ""
    when, reason = worker.last_restart
    return f"{worker.name} restarted {restarts} times, last at {time.strftime('%H:%M:%S', time.gmtime(when))} UTC ({reason})"


class DiagnosticsReporter:
    """Publishes the node's status on ``/diagnostics`` and writes its summary log line."""

    def __init__(self, node):
        self._node = node
        self.publisher = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._window_start = time.monotonic()
        self._last_drop_counts: dict = {}
        self.recent: dict = {}  # the values of the latest status (the log line's rate)

    def restart_notes(self) -> str:
        node = self._node
        restarts = node.counters().get("worker_restarts", 0)
        return "; ".join(note for note in (restart_note(w, restarts) for w in node.workers) if note)

    def values(self) -> tuple[dict, bool]:
        """The status values of this window, and whether new bad-input drops happened in it."""
        node = self._node
        s, live = node._settings, node._live
        counts, latencies, ages, refinements = node.stats.window()
        now = time.monotonic()
        elapsed = max(now - self._window_start, 1e-9)
        self._window_start = now
        values = {
            "rate_hz": len(latencies) / elapsed,
            "latency_mean_ms": 1e3 * float(np.mean(latencies)) if latencies else float("nan"),
            "latency_max_ms": 1e3 * float(np.max(latencies)) if latencies else float("nan"),
            "age_at_publish_mean_ms": 1e3 * float(np.mean(ages)) if ages else float("nan"),
            "received": counts.get("received", 0),
            "processed": counts.get("processed", 0),
        }
        dropped = {reason: counts.get(reason, 0) for reason in (*DROP_REASONS, "no_odometry", "bad_odometry")}
        values.update({f"dropped_{reason}" if reason in DROP_REASONS else reason: n for reason, n in dropped.items()})
        values["format_mismatch"] = counts.get("format_mismatch", 0)
        values["worker_restarts"] = counts.get("worker_restarts", 0)
        values["last_worker_restart"] = self.restart_notes() or "never"
        if live is not None:
            values.update({"device": str(live.relocalizer.device), "backend": live.relocalizer.backend_name,
                           "uncertainty": live.relocalizer.uncertainty})
        values.update({"checkpoint": s.checkpoint, "tf_mode": s.tf_mode})
        values.update(self._refinement_values(counts, refinements, elapsed))
        if node.stats.latest_covariance is not None:  # what the EKF is told now
            values.update(standard_deviations(node.stats.latest_covariance))
        new_problems = any(dropped[r] > self._last_drop_counts.get(r, 0) for r in dropped if r not in ("superseded", "not_newer"))
        self._last_drop_counts = dropped
        return values, new_problems

    def _refinement_values(self, counts: dict, window: list, elapsed: float) -> dict:
        """The geometric stage in this window: verified rate, share refined, inliers, time per frame."""
        node = self._node
        s, live = node._settings, node._live
        values = {"map_file": s.map_file or "none", "refine": bool(s.refine and live is not None and live.refinement is not None)}
        if node._refinement_problem:
            values["refinement_problem"] = node._refinement_problem
        values.update({key: counts.get(key, 0) for key in REFINE_COUNTERS})
        if window:
            refined, inliers, ms = (np.asarray(column, dtype=float) for column in list(zip(*window))[:3])
            values.update({"verified_rate_hz": float(refined.sum()) / elapsed, "refined_share": float(refined.mean()),
                           "refine_inliers_mean": float(inliers.mean()), "refine_ms_mean": float(ms.mean())})
            if not refined.any():
                reason, n = Counter(row[3] for row in window).most_common(1)[0]
                values["refinement_failing"] = f"all {len(window)} frames of the last {elapsed:.1f} s fell back; most often: {reason} ({n})"
        return values

    def publish(self) -> None:
        node = self._node
        values, new_problems = self.values()
        self.recent = values
        stopped = [w.name for w in node.workers if w.slot is not None and not w.is_alive()]
        if stopped:
            level, message = messages.DIAGNOSTIC_ERROR, f"{', '.join(stopped)} stopped"
        elif any(w.recently_restarted() for w in node.workers):
            level, message = messages.DIAGNOSTIC_WARN, self.restart_notes()
        elif new_problems:
            level, message = messages.DIAGNOSTIC_WARN, "frames dropped for bad input (see values)"
        elif node._refinement_problem:
            level, message = messages.DIAGNOSTIC_WARN, "geometric refinement off: the map could not be loaded (see refinement_problem)"
        elif "refinement_failing" in values:
            level, message = messages.DIAGNOSTIC_WARN, f"geometric refinement failing, no verified pose: {values['refinement_failing']}"
        else:
            level, message = messages.DIAGNOSTIC_OK, f"relocalising at {values['rate_hz']:.1f} Hz"
        self.publish_status(level, message, values)

    def last_word(self, text: str, deaths: int) -> None:
        """FATAL log and ERROR status when a worker died too often and the node exits for a respawn."""
        node = self._node
        try:
            node.get_logger().fatal(text)
        except Exception:
            print(f"[FATAL] [{node.get_name()}]: {text}", file=sys.stderr)
        try:  # a last word for /diagnostics before the node goes
            self.publish_status(messages.DIAGNOSTIC_ERROR, text, {**self.recent, "worker_restarts": deaths - 1})
        except Exception:
            pass

    def publish_status(self, level, message: str, values: dict) -> None:
        node = self._node
        live = node._live
        hardware = str(live.relocalizer.device) if live is not None else "none"
        self.publisher.publish(
            messages.diagnostic_array(node.get_clock().now().to_msg(), f"{node.get_name()}: relocalization", hardware, level, message, values)
        )

    def log_summary(self) -> None:
        """One info line: totals, and rate/latency of the latest diagnostics window."""
        node = self._node
        counts, recent = node.counters(), self.recent
        drops = ", ".join(f"{reason} {counts[reason]}" for reason in (*DROP_REASONS, "no_odometry") if counts.get(reason))
        timing = ""
        if recent and recent["rate_hz"] > 0:
            timing = f" ({recent['rate_hz']:.1f} Hz, latency {recent['latency_mean_ms']:.1f} ms mean / {recent['latency_max_ms']:.1f} ms max)"
        verified = f"; verified {counts.get('verified_published', 0)} by the map" if node._settings.map_file else ""
        restarts = self.restart_notes()
        node.get_logger().info(
            f"received {counts.get('received', 0)} frames, relocalised {counts.get('processed', 0)}{timing}{verified}"
            + (f"; dropped: {drops}" if drops else "")
            + (f"; {restarts}" if restarts else "")
        )

    def destroy(self) -> None:
        self._node.destroy_publisher(self.publisher)


class ThrottledLog:
    """Warnings and errors of one node, each kind at most once per ``log_throttle`` seconds.

    rclpy refuses a severity change at one call site ("Logger severity cannot be changed
    between calls"), so each severity has its own logger call. A failing logger is reported
    on stderr and never propagates into the frame pipeline.
    """

    def __init__(self, node):
        self._node = node
        self._last: dict[str, float] = {}

    def warn(self, key: str, text: str) -> None:
        if self._due(key):
            self._safely(lambda: self._node.get_logger().warning(text), "WARN", text)

    def error(self, key: str, text: str) -> None:
        if self._due(key):
            self._safely(lambda: self._node.get_logger().error(text), "ERROR", text)

    def _safely(self, log, severity: str, text: str) -> None:
        try:
            log()
        except Exception as err:
            print(f"[{severity}] [{self._node.get_name()}]: {text} (rclpy logging failed: {err})", file=sys.stderr)

    def _due(self, key: str) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        s = self._node._settings
        if last is not None and now - last < (s.log_throttle if s is not None else 5.0):
            return False
        self._last[key] = now
        return True
