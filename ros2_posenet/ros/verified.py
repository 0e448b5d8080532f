"""The node's second stage: verify regressed frames against the scene map, publish the verified stream.

The inference worker publishes the regressor's pose of every frame at once and hands the frame
(a :class:`RefineJob`) to the refinement worker's one-frame mailbox; this stage takes the newest
whenever it is free, so refinement never delays the regressor. A pose the map verified goes out
on ``verified_pose_topic`` with its geometric covariance, once and in stamp order; a fallback
publishes nothing new (the regressor's pose of that frame is out already) and is counted
(``refine_<status>``) for ``/diagnostics``. Either way the robot interfaces (``/initialpose``,
``~/relocalize``) hear about the frame with ``refined`` True or False.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

import numpy as np

from ..frames import RelocalizedPoses
from ..inference import PosePrediction, Relocalizer
from . import messages
from .parameters import NodeSettings
from .refinement import REFINED, NodeRefinement


@dataclass(frozen=True)
class LiveModel:
    """What serves frames now: the regressor and, with a map, the refinement stage; swapped as one."""

    relocalizer: Relocalizer
    refinement: NodeRefinement | None = None


@dataclass(frozen=True)
class RefineJob:
    """A regressed frame handed to the refiner, with the settings and model it was regressed with."""

    rgb: np.ndarray
    stamp_ns: int
    prediction: PosePrediction
    poses: RelocalizedPoses  # the regressor's, published already
    settings: NodeSettings
    live: LiveModel


class VerifiedStage:
    """The refinement worker's work for one node (``process`` is the worker's per-item function)."""

    def __init__(self, node):
        self._node = node
        self.last_stamp_ns = 0  # newest verified pose published: once, in stamp order

    def process(self, job: RefineJob) -> None:
        node = self._node
        try:
            self._refine_and_publish(job)
        except Exception as err:  # never let one frame kill the worker
            if node.context.ok():  # at shutdown the context goes first: the frame is simply not published
                node._drop("internal_error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")

    def _refine_and_publish(self, job: RefineJob) -> None:
        node, s, live = self._node, job.settings, job.live
        outcome = self._refine(job)
        status = "error" if outcome is None else outcome.status
        poses, map_frame, stamp = job.poses, s.map_frame or live.relocalizer.map_frame, messages.stamp_from_nanoseconds(job.stamp_ns)
        if status == REFINED:
            p = outcome.prediction
            poses = RelocalizedPoses.from_prediction(p.position, p.quaternion, p.covariance, s.mount)
            publisher = node._verified
            if poses.is_finite and job.stamp_ns > self.last_stamp_ns and publisher is not None and node.context.ok():
                self.last_stamp_ns = job.stamp_ns
                publisher.publish(poses, map_frame, stamp)
                node.stats.count("verified_published")
                node.stats.latest_covariance = poses.base_covariance
        node.stats.count(f"refine_{status}")  # after publishing: a frame counted is a frame done with
        robot = node._robot
        if robot is not None:
            robot.on_relocalized(poses.T_map_base, poses.base_covariance, map_frame, stamp, status == REFINED)

    def _refine(self, job: RefineJob):
        """The refinement outcome (None when the stage raised: logged), recorded for diagnostics."""
        node, s = self._node, job.settings
        started = time.perf_counter()
        try:
            outcome = job.live.refinement.refine(job.rgb, job.stamp_ns * 1e-9, job.prediction, s.camera_info_tolerance)
        except Exception as err:  # a bug or a malformed CameraInfo: counted and reported, the regressor's pose stands
            count = node.counters().get("refine_error", 0) + 1
            node._error_throttled("refine_error", f"refinement failed: {type(err).__name__}: {err} [{count} so far]")
            node.stats.record_refinement(False, 0, 1e3 * (time.perf_counter() - started), "error")
            return None
        result = outcome.result
        failure = getattr(result, "failure", "") if result is not None else ""
        node.stats.record_refinement(outcome.status == REFINED, result.inliers if result is not None else 0,
                                     1e3 * (time.perf_counter() - started), failure or outcome.status)
        if outcome.status != REFINED:
            node._warn_throttled(f"refine_{outcome.status}", f"refinement {outcome.status}: {outcome.reason}; no verified pose for this frame")
        return outcome
