"""Scene map of the geometric stage: keyframes with local features and their 3D world points.

A :class:`SceneMap` holds, per keyframe (a training image chosen by pose spacing):
its camera-to-world pose (optical frame, :mod:`ros2_posenet.geometry` convention),
intrinsics, image size, a global descriptor for retrieval
(:func:`ros2_posenet.baselines.tiny_image_descriptor`), and the local features
that have a valid 3D world point: keypoints, descriptors, points and optional
per-point records (e.g. ``track_length``). ``point_source`` says where the points
came from: ``depth`` (7-Scenes / synthetic depth), ``reconstruction`` (Cambridge
NVM points observed in the image) or ``triangulation`` (matches between keyframes
with known poses, :mod:`ros2_posenet.triangulation`). Retrieval with a query's local
features uses a bag of visual words learned from the keyframes' descriptors when first
needed (:attr:`SceneMap.visual_words`; nothing of it is stored, so older maps serve too).
A depth map's keyframes also keep a small grey view of themselves with the depth of each
pixel (``view_grey``, ``view_depth``; :mod:`.views`), a triangulated map's with the depth around
its points, which the refiner uses to check a pose of few inliers photometrically; maps without
them (older ones, reconstruction maps) skip that check.

File format: one uncompressed ``.npz`` (plain arrays, loaded with
``allow_pickle=False``): per-keyframe arrays, the per-feature arrays of all
keyframes concatenated with an ``offsets`` index, and a JSON header (format tag,
version, names, feature config, map frame, metadata). Loading a missing, corrupt
or incompatible file raises :class:`MapError` saying what to do.

Building: :class:`SceneMapBuilder` takes images (or ready-made features) with K,
pose and a *lift* (keypoints -> 3D points + validity) such as :func:`depth_lift`
or :func:`observation_lift`; :func:`select_keyframes` picks the training images;
:func:`filter_by_agreement` keeps the points that several keyframes agree on
(inconsistent depth: moving objects, noisy sensors). For depth that is not
exactly registered to the colour image (7-Scenes) triangulation is the better
remedy: a registration shift misplaces points consistently across nearby views
(bench/bench_refine.py, ``misregistered``).
"""
from __future__ import annotations

import functools
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..geometry import backproject_pixels, resized_pixel_coords, scale_intrinsics
from .features import FeatureConfig, detect_features, match_features
from .retrieval import VisualWords, tiny_image_descriptor

FORMAT = "ros2_posenet.scene_map"
VERSION = 1
POINT_SOURCES = ("depth", "reconstruction", "triangulation")
POSE_CONVENTION = "camera_to_world 4x4, optical camera frame (z fwd, x right, y down)"

# (keypoints (N, 2) px, image size (width, height)) -> (points (N, 3) world, valid (N,) bool)
Lift = Callable[[np.ndarray, tuple[int, int]], tuple[np.ndarray, np.ndarray]]


class MapError(RuntimeError):
    """A map file is missing, unreadable or incompatible; the message says what to do."""


@dataclass
class SceneMap:
    """Keyframes, their features and 3D world points (see the module docstring).

    Attributes:
        names: keyframe image names (dataset-relative).
        poses: (M, 4, 4) camera-to-world, optical frame.
        intrinsics: (M, 3, 3) pinhole K of the images the keypoints were detected in.
        image_sizes: (M, 2) int (width, height).
        keypoints, descriptors, points3d: per keyframe (N_i, 2) float32 px,
            (N_i, D) uint8, (N_i, 3) float32 world; row k of each is one feature.
        point_info: optional per-point arrays by name, each a per-keyframe list of (N_i,).
        global_descriptors: (M, G) float32 image descriptors for retrieval (may be (M, 0)).
        view_grey, view_depth: optional (M, h, w) uint8 grey views of the keyframes and float16
            depth (m, 0 unknown) of their pixels (:func:`~.views.keyframe_view`,
            :func:`~.views.point_view_depth`); None: no views.
        point_source: ``depth``, ``reconstruction`` or ``triangulation``.
        feature_config: how the features were detected (queries must use the same).
        map_frame: the frame the poses and points are in (the checkpoint's map frame).
        metadata: free JSON-able dict (dataset, build settings, timings, calibration).
        version: file format version.
    """

    names: list[str]
    poses: np.ndarray
    intrinsics: np.ndarray
    image_sizes: np.ndarray
    keypoints: list[np.ndarray]
    descriptors: list[np.ndarray]
    points3d: list[np.ndarray]
    point_source: str
    feature_config: FeatureConfig
    point_info: dict[str, list[np.ndarray]] = field(default_factory=dict)
    global_descriptors: np.ndarray | None = None
    view_grey: np.ndarray | None = None
    view_depth: np.ndarray | None = None
    map_frame: str = "map"
    metadata: dict = field(default_factory=dict)
    version: int = VERSION

    def __post_init__(self):
        m = len(self.names)
        self.poses = np.asarray(self.poses, np.float64).reshape(m, 4, 4)
        self.intrinsics = np.asarray(self.intrinsics, np.float64).reshape(m, 3, 3)
        self.image_sizes = np.asarray(self.image_sizes, np.int64).reshape(m, 2)
        if self.global_descriptors is None:
            self.global_descriptors = np.zeros((m, 0), np.float32)
        self.global_descriptors = np.asarray(self.global_descriptors, np.float32).reshape(m, -1)
        problems = []
        if self.point_source not in POINT_SOURCES:
            problems.append(f"point_source must be one of {POINT_SOURCES}, got {self.point_source!r}")
        lists = {"keypoints": self.keypoints, "descriptors": self.descriptors, "points3d": self.points3d,
                 **{f"point_info[{k}]": v for k, v in self.point_info.items()}}
        for name, values in lists.items():
            if len(values) != m:
                problems.append(f"{name} has {len(values)} entries for {m} keyframes")
        if not problems:
            for i in range(m):
                n = len(self.keypoints[i])
                shapes = {"keypoints": (n, 2), "descriptors": (n, self.feature_config.descriptor_size), "points3d": (n, 3)}
                for name, shape in shapes.items():
                    if np.shape(getattr(self, name)[i]) != shape:
                        problems.append(f"keyframe {i}: {name} has shape {np.shape(getattr(self, name)[i])}, expected {shape}")
                for name, values in self.point_info.items():
                    if np.shape(values[i]) != (n,):
                        problems.append(f"keyframe {i}: point_info[{name}] has shape {np.shape(values[i])}, expected ({n},)")
        if not np.all(np.isfinite(self.poses)) or not np.all(np.isfinite(self.intrinsics)):
            problems.append("poses and intrinsics must be finite")
        problems += self._check_views(m)
        if problems:
            raise MapError("invalid scene map: " + "; ".join(problems[:5]))
        self.keypoints = [np.asarray(k, np.float32) for k in self.keypoints]
        self.descriptors = [np.ascontiguousarray(d, np.uint8) for d in self.descriptors]
        self.points3d = [np.asarray(p, np.float32) for p in self.points3d]

    def _check_views(self, m: int) -> list[str]:
        if self.view_grey is None and self.view_depth is None:
            return []
        if self.view_grey is None or self.view_depth is None:
            return ["view_grey and view_depth come together"]
        self.view_grey = np.asarray(self.view_grey, np.uint8)
        self.view_depth = np.asarray(self.view_depth, np.float16)
        if self.view_grey.ndim != 3 or self.view_grey.shape[0] != m or self.view_depth.shape != self.view_grey.shape:
            return [f"views of shapes {self.view_grey.shape} and {self.view_depth.shape}, expected ({m}, h, w) each"]
        if not np.all(np.isfinite(self.view_depth)) or np.any(self.view_depth < 0):
            return ["view depths must be finite and >= 0"]
        return []

    # ---- properties

    @property
    def has_views(self) -> bool:
        """Whether the keyframes carry views for the photometric check (:mod:`.views`)."""
        return self.view_grey is not None

    def view_intrinsics(self, i: int) -> np.ndarray:
        """``K`` of keyframe ``i``'s view."""
        h, w = self.view_grey.shape[1:]
        return scale_intrinsics(self.intrinsics[i], self.image_sizes[i], (w, h))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_points(self) -> int:
        return int(sum(len(p) for p in self.points3d))

    @property
    def positions(self) -> np.ndarray:
        """(M, 3) keyframe camera centres."""
        return self.poses[:, :3, 3]

    @property
    def view_directions(self) -> np.ndarray:
        """(M, 3) unit optical axes (camera z) in the world."""
        return self.poses[:, :3, 2]

    def summary(self) -> dict:
        """Size figures for logs and reports."""
        counts = [len(p) for p in self.points3d]
        return {
            "keyframes": len(self),
            "points": self.num_points,
            "points_per_keyframe_median": float(np.median(counts)) if counts else 0.0,
            "feature_type": self.feature_config.type,
            "point_source": self.point_source,
            "map_frame": self.map_frame,
        }

    # ---- keyframe selection at query time

    def nearest_keyframes(self, T_world_camera: np.ndarray, k: int, metres_per_radian: float = 1.0,
                          max_angle_deg: float = 90.0) -> np.ndarray:
        """Indices of the ``k`` keyframes closest to a pose, best first.

        Distance = centre distance (m) + ``metres_per_radian`` × angle between optical
        axes; keyframes looking more than ``max_angle_deg`` away are skipped (they see
        other parts of the scene).
        """
        if len(self) == 0:
            return np.zeros(0, np.int64)
        T = np.asarray(T_world_camera, np.float64)
        distance = np.linalg.norm(self.positions - T[:3, 3], axis=1)
        cos = np.clip(self.view_directions @ T[:3, 2], -1.0, 1.0)
        angle = np.arccos(cos)
        score = distance + metres_per_radian * angle
        candidates = np.flatnonzero(angle <= np.radians(max_angle_deg))
        order = candidates[np.argsort(score[candidates], kind="stable")]
        return order[:k]

    def retrieve_keyframes(self, image: np.ndarray, k: int, descriptors: np.ndarray | None = None) -> np.ndarray:
        """Indices of the ``k`` keyframes most similar to ``image``, best first.

        With the query's local ``descriptors`` (detected with the map's feature config), by
        their bag of visual words against the keyframes' (:attr:`visual_words`); else by the
        global descriptor (tiny image) stored in the map.
        """
        if descriptors is not None and self.num_points >= 2:
            scores = self.visual_words.similarities(descriptors)
            return np.argsort(-scores, kind="stable")[:k]
        if self.global_descriptors.shape[1] == 0:
            raise MapError("this map has no global descriptors for retrieval; rebuild it with build-map")
        query = tiny_image_descriptor(image)
        if query.shape[0] != self.global_descriptors.shape[1]:
            raise MapError(f"global descriptor size {query.shape[0]} != map's {self.global_descriptors.shape[1]}; rebuild the map")
        scores = self.global_descriptors @ query.astype(np.float32)
        return np.argsort(-scores, kind="stable")[:k]

    @functools.cached_property
    def visual_words(self) -> VisualWords:
        """The bag of visual words of the keyframes' local features, learned from them on first use (seconds on large maps)."""
        return VisualWords(self.descriptors, binary=self.feature_config.type == "orb")

    def subset(self, keep: list[np.ndarray], point_info: dict[str, list[np.ndarray]] | None = None,
               points3d: list[np.ndarray] | None = None) -> "SceneMap":
        """A copy keeping, per keyframe, the features selected by ``keep[i]`` (bool or index arrays)."""
        info = point_info if point_info is not None else {n: [v[s] for v, s in zip(vals, keep)] for n, vals in self.point_info.items()}
        return SceneMap(
            names=list(self.names), poses=self.poses.copy(), intrinsics=self.intrinsics.copy(),
            image_sizes=self.image_sizes.copy(),
            keypoints=[k[s] for k, s in zip(self.keypoints, keep)],
            descriptors=[d[s] for d, s in zip(self.descriptors, keep)],
            points3d=points3d if points3d is not None else [p[s] for p, s in zip(self.points3d, keep)],
            point_source=self.point_source, feature_config=self.feature_config, point_info=info,
            global_descriptors=self.global_descriptors.copy(), view_grey=self.view_grey, view_depth=self.view_depth,
            map_frame=self.map_frame, metadata=json.loads(json.dumps(self.metadata)),
        )

    # ---- file I/O

    def save(self, path: str | os.PathLike) -> Path:
        """Write the map as one ``.npz`` atomically (temp file + rename); returns the path."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"map files end in .npz, got {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "format": FORMAT,
            "version": self.version,
            "names": list(self.names),
            "point_source": self.point_source,
            "feature_config": self.feature_config.to_dict(),
            "map_frame": self.map_frame,
            "pose_convention": POSE_CONVENTION,
            "point_info": sorted(self.point_info),
            "metadata": self.metadata,
        }
        counts = np.array([len(k) for k in self.keypoints], np.int64)
        arrays = {
            "header": np.array(json.dumps(header)),
            "poses": self.poses,
            "intrinsics": self.intrinsics,
            "image_sizes": self.image_sizes,
            "global_descriptors": self.global_descriptors,
            "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "keypoints": _concat(self.keypoints, (0, 2), np.float32),
            "descriptors": _concat(self.descriptors, (0, self.feature_config.descriptor_size), np.uint8),
            "points3d": _concat(self.points3d, (0, 3), np.float32),
        }
        for name, values in self.point_info.items():
            arrays[f"info_{name}"] = _concat(values, (0,), None)
        if self.has_views:
            arrays["view_grey"], arrays["view_depth"] = self.view_grey, self.view_depth
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SceneMap":
        """Read a map written by :meth:`save`; raises :class:`MapError` saying what to do."""
        path = Path(path)
        rebuild = "rebuild it with `build-map` (see README, 'The geometric stage')"
        if not path.is_file():
            raise MapError(f"map file not found: {path}; build one with `build-map --dataset ... --root ... --out {path.name}`")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
            raise MapError(f"{path}: not a readable map file ({type(err).__name__}: {err}); {rebuild}") from None
        try:
            header = json.loads(str(arrays.pop("header")))
        except (KeyError, ValueError) as err:
            raise MapError(f"{path}: not a ros2_posenet scene map (no header: {err}); {rebuild}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise MapError(f"{path}: not a ros2_posenet scene map (format {header.get('format') if isinstance(header, dict) else None!r}); {rebuild}")
        version = header.get("version")
        if not isinstance(version, int) or version > VERSION or version < 1:
            raise MapError(f"{path}: map format version {version!r}, this code reads 1..{VERSION}; "
                           f"update ros2_posenet or {rebuild}")
        try:
            return cls._from_arrays(header, arrays)
        except MapError as err:
            raise MapError(f"{path}: {err}; {rebuild}") from None
        except (KeyError, ValueError, TypeError, IndexError) as err:
            raise MapError(f"{path}: corrupt map ({type(err).__name__}: {err}); {rebuild}") from None

    @classmethod
    def _from_arrays(cls, header: dict, arrays: dict) -> "SceneMap":
        offsets = arrays["offsets"]
        m = len(header["names"])
        n = int(offsets[-1]) if len(offsets) else -1
        if len(offsets) != m + 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise MapError("inconsistent keyframe offsets")
        for key in ("keypoints", "descriptors", "points3d", *(f"info_{k}" for k in header["point_info"])):
            if len(arrays[key]) != n:
                raise MapError(f"{key} has {len(arrays[key])} rows, the offsets say {n}")
        if not np.all(np.isfinite(arrays["points3d"])) or not np.all(np.isfinite(arrays["keypoints"])):
            raise MapError("non-finite keypoints or 3D points")
        split = lambda a: [a[offsets[i]:offsets[i + 1]] for i in range(m)]  # noqa: E731
        return cls(
            names=list(header["names"]),
            poses=arrays["poses"],
            intrinsics=arrays["intrinsics"],
            image_sizes=arrays["image_sizes"],
            keypoints=split(arrays["keypoints"]),
            descriptors=split(arrays["descriptors"]),
            points3d=split(arrays["points3d"]),
            point_source=header["point_source"],
            feature_config=FeatureConfig.from_dict(header["feature_config"]),
            point_info={k: split(arrays[f"info_{k}"]) for k in header["point_info"]},
            global_descriptors=arrays["global_descriptors"],
            view_grey=arrays.get("view_grey"),
            view_depth=arrays.get("view_depth"),
            map_frame=header.get("map_frame", "map"),
            metadata=header.get("metadata", {}),
            version=header["version"],
        )


def _concat(arrays: list[np.ndarray], empty_shape: tuple, dtype) -> np.ndarray:
    if not arrays:
        return np.zeros(empty_shape, dtype or np.float32)
    out = np.concatenate([np.asarray(a) for a in arrays])
    return out.astype(dtype) if dtype is not None else out


# ----------------------------------------------------------------------------- building


def select_keyframes(poses: np.ndarray, min_distance_m: float = 0.25, min_angle_deg: float = 15.0) -> np.ndarray:
    """Training images to use as keyframes, by pose spacing (greedy, in the given order).

    An image becomes a keyframe unless an already chosen keyframe is both within
    ``min_distance_m`` of it and looks within ``min_angle_deg`` of its direction, so
    revisited places are not stored twice.

    Args:
        poses: (N, 4, 4) camera-to-world.

    Returns:
        (K,) int64 indices into ``poses``, increasing.
    """
    poses = np.asarray(poses, np.float64).reshape(-1, 4, 4)
    if min_distance_m < 0 or min_angle_deg < 0:
        raise ValueError("keyframe spacing must be >= 0")
    cos_limit = np.cos(np.radians(min_angle_deg))
    kept: list[int] = []
    for i, T in enumerate(poses):
        if kept:
            chosen = poses[kept]
            near = np.linalg.norm(chosen[:, :3, 3] - T[:3, 3], axis=1) <= min_distance_m
            same_view = chosen[:, :3, 2] @ T[:3, 2] >= cos_limit
            if np.any(near & same_view):
                continue
        kept.append(i)
    return np.array(kept, np.int64)


def depth_lift(depth_m: np.ndarray, K: np.ndarray, T_world_camera: np.ndarray, min_depth: float = 0.1,
               max_depth: float = 20.0, max_relative_step: float = 0.05) -> Lift:
    """Lift keypoints with a depth image registered to the colour image.

    Args:
        depth_m: (h, w) metres (0 / non-finite invalid); may be smaller or larger than
            the colour image, keypoints are scaled to it.
        K: (3, 3) intrinsics of the *colour* image the keypoints are in.
        T_world_camera: (4, 4) camera-to-world pose.
        max_relative_step: keypoints whose 3x3 depth neighbourhood spans more than this
            fraction of their depth sit on a depth edge, where a slightly misregistered
            depth gives the background's depth to the foreground; they are dropped.

    Returns:
        ``lift(keypoints (N, 2) px, colour image size (w, h)) -> (points (N, 3) world, valid (N,))``.
    """
    depth = np.asarray(depth_m, np.float32)
    depth = np.where(np.isfinite(depth), depth, 0.0)
    T = np.asarray(T_world_camera, np.float64)
    K = np.asarray(K, np.float64)
    h, w = depth.shape
    padded = np.pad(depth, 1, mode="edge")
    stack = np.stack([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])
    lo, hi = stack.min(0), stack.max(0)

    def lift(keypoints: np.ndarray, image_size: tuple[int, int] | None = None):
        kp = np.asarray(keypoints, np.float64).reshape(-1, 2)
        width, height = image_size or (w, h)
        uv = np.round(resized_pixel_coords(kp, (w / width, h / height))).astype(np.int64)
        u, v = np.clip(uv[:, 0], 0, w - 1), np.clip(uv[:, 1], 0, h - 1)
        z = depth[v, u].astype(np.float64)
        valid = (z >= min_depth) & (z <= max_depth) & (lo[v, u] > 0) & (hi[v, u] - lo[v, u] <= max_relative_step * z)
        return backproject_pixels(kp, z, K, T), valid

    return lift


def observation_lift(observed_xy: np.ndarray, observed_points: np.ndarray, radius_px: float = 2.0) -> Lift:
    """Lift keypoints with a reconstruction's measurements in the image (Cambridge / NVM).

    A keypoint gets the 3D point of the nearest measurement within ``radius_px``.

    Args:
        observed_xy: (P, 2) measured pixels of reconstruction points in this image.
        observed_points: (P, 3) their world points.
    """
    obs_xy = np.asarray(observed_xy, np.float64).reshape(-1, 2)
    obs_pts = np.asarray(observed_points, np.float64).reshape(-1, 3)

    def lift(keypoints: np.ndarray, image_size=None):
        kp = np.asarray(keypoints, np.float64).reshape(-1, 2)
        if len(obs_xy) == 0 or len(kp) == 0:
            return np.zeros((len(kp), 3)), np.zeros(len(kp), bool)
        d2 = ((kp[:, None, :] - obs_xy[None]) ** 2).sum(-1)
        nearest = d2.argmin(1)
        return obs_pts[nearest], d2[np.arange(len(kp)), nearest] <= radius_px**2

    return lift


class SceneMapBuilder:
    """Accumulates keyframes into a :class:`SceneMap`.

    ``add_image`` detects features and lifts them to 3D; ``add_keyframe`` takes
    ready-made features and points (e.g. from :mod:`ros2_posenet.triangulation`).
    Features without a valid 3D point are not stored.
    """

    def __init__(self, feature_config: FeatureConfig | None = None, point_source: str = "depth", map_frame: str = "map"):
        if point_source not in POINT_SOURCES:
            raise ValueError(f"point_source must be one of {POINT_SOURCES}, got {point_source!r}")
        self.feature_config = feature_config or FeatureConfig()
        self.point_source = point_source
        self.map_frame = map_frame
        self._keyframes: list[dict] = []

    def __len__(self) -> int:
        return len(self._keyframes)

    def add_image(self, name: str, image: np.ndarray, K: np.ndarray, pose: np.ndarray, lift: Lift) -> int:
        """Detect features in ``image`` (HxWx3 RGB uint8), keep those ``lift`` places in 3D; returns how many.

        A depth map's keyframe also keeps its view (:func:`~.views.keyframe_view`, the size of the first
        keyframe's), made with the same ``lift``.
        """
        from .views import keyframe_view, map_view_size

        keypoints, descriptors = detect_features(image, self.feature_config)
        size = (image.shape[1], image.shape[0])
        points, valid = lift(keypoints, size)
        valid = np.asarray(valid, bool) & np.all(np.isfinite(points), axis=1)
        view = None
        if self.point_source == "depth":
            first = next((kf["view"][0] for kf in self._keyframes if kf["view"] is not None), None)
            view = keyframe_view(image, pose, lift, map_view_size(first, size))
        self.add_keyframe(name, K, pose, size, keypoints[valid], descriptors[valid], points[valid],
                          global_descriptor=tiny_image_descriptor(image), view=view)
        return int(valid.sum())

    def add_keyframe(self, name: str, K: np.ndarray, pose: np.ndarray, image_size: tuple[int, int],
                     keypoints: np.ndarray, descriptors: np.ndarray, points3d: np.ndarray,
                     point_info: dict[str, np.ndarray] | None = None, global_descriptor: np.ndarray | None = None,
                     view: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Add one keyframe with features that already have 3D points (``view``: its grey view and depth)."""
        if self._keyframes and set(point_info or {}) != set(self._keyframes[0]["info"]):
            raise ValueError("every keyframe must carry the same point_info fields")
        self._keyframes.append({
            "name": str(name), "K": np.asarray(K, np.float64), "pose": np.asarray(pose, np.float64),
            "size": tuple(int(v) for v in image_size), "keypoints": keypoints, "descriptors": descriptors,
            "points3d": points3d, "info": dict(point_info or {}),
            "global": None if global_descriptor is None else np.asarray(global_descriptor, np.float32),
            "view": view,
        })

    def build(self, metadata: dict | None = None) -> SceneMap:
        """The map of all keyframes added so far."""
        kfs = self._keyframes
        if not kfs:
            raise MapError("no keyframes: nothing to build a map from")
        has_global = all(kf["global"] is not None for kf in kfs)
        has_views = all(kf["view"] is not None for kf in kfs)
        info_names = sorted(kfs[0]["info"])
        return SceneMap(
            names=[kf["name"] for kf in kfs],
            poses=np.stack([kf["pose"] for kf in kfs]),
            intrinsics=np.stack([kf["K"] for kf in kfs]),
            image_sizes=np.array([kf["size"] for kf in kfs]),
            keypoints=[kf["keypoints"] for kf in kfs],
            descriptors=[kf["descriptors"] for kf in kfs],
            points3d=[kf["points3d"] for kf in kfs],
            point_info={n: [np.asarray(kf["info"][n]) for kf in kfs] for n in info_names},
            global_descriptors=np.stack([kf["global"] for kf in kfs]) if has_global else None,
            view_grey=np.stack([kf["view"][0] for kf in kfs]) if has_views else None,
            view_depth=np.stack([kf["view"][1] for kf in kfs]) if has_views else None,
            point_source=self.point_source, feature_config=self.feature_config, map_frame=self.map_frame,
            metadata=dict(metadata or {}),
        )


def filter_by_agreement(scene_map: SceneMap, neighbours: int = 4, min_views: int = 2, tolerance_m: float = 0.02,
                        relative_tolerance: float = 0.01, max_angle_deg: float = 60.0) -> SceneMap:
    """Keep the map points that other keyframes place at the same spot, averaged over them.

    Each keyframe's features are matched with those of its ``neighbours`` nearest
    keyframes (:meth:`SceneMap.nearest_keyframes`); a matched pair *agrees* when its
    two 3D points are within ``tolerance_m + relative_tolerance × distance to the
    camera``. A point is kept when it agrees with at least ``min_views - 1`` other
    keyframes, and is replaced by the mean of itself and its agreeing partners.
    Points that land at different spots from different viewpoints (noise, moving
    objects) are dropped; a consistent bias (a registration shift between depth and
    colour cameras) mostly survives, see the module docstring. Adds
    ``point_info['track_length']`` (1 + agreeing keyframes).
    """
    if min_views < 1 or neighbours < 1:
        raise ValueError("min_views and neighbours must be >= 1")
    cfg = scene_map.feature_config
    sums = [p.astype(np.float64).copy() for p in scene_map.points3d]
    counts = [np.ones(len(p), np.int64) for p in scene_map.points3d]
    for i in range(len(scene_map)):
        near = scene_map.nearest_keyframes(scene_map.poses[i], neighbours + 1, max_angle_deg=max_angle_deg)
        for j in near[near != i][:neighbours]:
            pairs = match_features(scene_map.descriptors[i], scene_map.descriptors[j], cfg)
            if len(pairs) == 0:
                continue
            xi = scene_map.points3d[i][pairs[:, 0]].astype(np.float64)
            xj = scene_map.points3d[j][pairs[:, 1]].astype(np.float64)
            range_i = np.linalg.norm(xi - scene_map.poses[i][:3, 3], axis=1)
            agree = np.linalg.norm(xi - xj, axis=1) <= tolerance_m + relative_tolerance * range_i
            np.add.at(sums[i], pairs[agree, 0], xj[agree])
            np.add.at(counts[i], pairs[agree, 0], 1)
    keep = [c >= min_views for c in counts]
    points = [(s / c[:, None])[k].astype(np.float32) for s, c, k in zip(sums, counts, keep)]
    info = {n: [v[k] for v, k in zip(vals, keep)] for n, vals in scene_map.point_info.items()}
    info["track_length"] = [c[k].astype(np.int32) for c, k in zip(counts, keep)]
    filtered = scene_map.subset(keep, point_info=info, points3d=points)
    filtered.metadata["agreement_filter"] = {
        "neighbours": neighbours, "min_views": min_views, "tolerance_m": tolerance_m,
        "relative_tolerance": relative_tolerance, "points_before": scene_map.num_points, "points_after": filtered.num_points,
    }
    return filtered
