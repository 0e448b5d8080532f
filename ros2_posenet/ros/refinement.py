"""The geometric refinement stage as the node runs it.

Pairs each image with its ``CameraInfo``, undistorts when the calibration has
distortion, runs :class:`ros2_posenet.geometric.refiner.Refiner` on the regressor's pose and
returns the pose to publish: the refined one with its geometric covariance, or the
regressor's unchanged (``fallback``, ``no_camera_info``). Never raises on data: a
failed refinement is a fallback, counted by the node.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..geometry import matrix_to_pose, pose_to_matrix
from ..inference import PosePrediction
from ..geometric.refiner import STATUS_FALLBACK, STATUS_REFINED, RefinementConfig, RefinementResult, Refiner
from ..geometric.refiner_process import RefinerProcess, map_info
from ..geometric.scene_map import SceneMap
from ..geometric.tracking import Track
from .camera_info import CameraInfoBuffer, CameraInfoError, CameraIntrinsics, intrinsics_mismatch

# Outcome of one frame, also the node's counter names ("refine_<status>").
REFINED, FALLBACK, NO_CAMERA_INFO = STATUS_REFINED, STATUS_FALLBACK, "no_camera_info"


@dataclass
class RefinementOutcome:
    prediction: PosePrediction  # what to publish (camera pose, optical frame, map)
    status: str  # REFINED, FALLBACK or NO_CAMERA_INFO
    reason: str
    result: RefinementResult | None = None  # None when the refiner did not run


class Undistorter:
    """Cached remap tables: undistorting a 640x480 image costs ~1 ms with them, ~10 ms without."""

    def __init__(self):
        self._key = None
        self._maps = None

    def __call__(self, rgb: np.ndarray, intrinsics: CameraIntrinsics, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        """``interpolation``: cv2.INTER_NEAREST for depth (no blending across edges); make-dataset's depth uses it."""
        if intrinsics.distortion.size == 0 or not np.any(intrinsics.distortion):
            return rgb
        key = (intrinsics.K.tobytes(), intrinsics.distortion.tobytes(), rgb.shape[:2])
        if key != self._key:
            size = (rgb.shape[1], rgb.shape[0])
            self._maps = cv2.initUndistortRectifyMap(intrinsics.K, intrinsics.distortion, None, intrinsics.K, size, cv2.CV_16SC2)
            self._key = key
        return cv2.remap(rgb, *self._maps, interpolation=interpolation)


class NodeRefinement:
    """Map + refiner of one node; CameraInfo comes from the node's :class:`CameraInfoBuffer`.

    One image stream: its last verified pose is the next frames' first prior (:class:`Track`,
    ``refine.tracking_*``); a new map starts a new track.

    The buffer is the node's (it outlives a map switch); ``warn`` is called with a
    text once when the live camera differs from the one the map was made with.
    """

    def __init__(self, map_file: str, config: RefinementConfig | None = None, camera_infos: CameraInfoBuffer | None = None, warn=None,
                 separate_process: bool = False):
        """``separate_process``: the refiner runs in a niced child process (:class:`RefinerProcess`; the node's choice)."""
        if separate_process:  # the child loads the map (MapError says what to do) and tells what the node needs of it
            self.refiner = RefinerProcess(map_file, config)
            info = self.refiner.map_info
        else:
            self.refiner = Refiner(SceneMap.load(map_file), config)
            info = map_info(self.refiner.map)
        self.map_K, self.map_image_size, self.map_summary = info["intrinsics"], info["image_size"], info["summary"]
        self.track = Track.for_config(config or RefinementConfig())  # the stream's last verified pose
        self.map_file = map_file
        self.camera_infos = camera_infos if camera_infos is not None else CameraInfoBuffer()
        self._undistort = Undistorter()
        self._warn = warn or (lambda text: None)
        self._checked_intrinsics = False

    def check_intrinsics(self, intrinsics: CameraIntrinsics) -> None:
        """Warn (once) when the live camera is not the one the map's keyframes were taken with."""
        if self._checked_intrinsics:
            return
        self._checked_intrinsics = True
        problem = intrinsics_mismatch(intrinsics, self.map_K, self.map_image_size)
        if problem:
            self._warn(f"{problem} (map {self.map_file}); refinement uses the live CameraInfo")

    def on_camera_info(self, msg) -> None:
        """Store a CameraInfo (raises :class:`CameraInfoError`, nothing stored, when unusable) and check it."""
        self.check_intrinsics(self.camera_infos.add(msg))

    def refine(self, rgb: np.ndarray, stamp_seconds: float, prediction: PosePrediction, camera_info_tolerance: float = -1.0) -> RefinementOutcome:
        """The pose to publish for ``rgb`` given the regressor's ``prediction``.

        ``camera_info_tolerance``: largest stamp gap (s) between the image and its
        CameraInfo; negative: the latest CameraInfo whatever its stamp.
        """
        intrinsics = self.camera_infos.lookup(stamp_seconds, camera_info_tolerance)
        if intrinsics is None:
            reason = "no CameraInfo yet" if len(self.camera_infos) == 0 else f"no CameraInfo within {camera_info_tolerance} s of the image stamp"
            return RefinementOutcome(prediction, NO_CAMERA_INFO, reason)
        try:
            intrinsics = intrinsics.for_image(rgb.shape[1], rgb.shape[0])
        except CameraInfoError as err:
            return RefinementOutcome(prediction, NO_CAMERA_INFO, str(err))
        prior_T = pose_to_matrix(prediction.position, prediction.quaternion)
        result = self.track.refine(self.refiner, stamp_seconds, self._undistort(rgb, intrinsics), intrinsics.K, prior_T,
                                   prediction.covariance)
        if not result.refined:
            return RefinementOutcome(prediction, FALLBACK, result.reason, result)
        position, quaternion = matrix_to_pose(result.T)
        refined = PosePrediction(position=position, quaternion=quaternion, covariance=np.asarray(result.covariance, dtype=float))
        return RefinementOutcome(refined, REFINED, result.reason, result)
