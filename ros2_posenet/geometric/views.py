"""Photometric verification: does the image look like the map at a pose? (dense pose verification)

A pose from a handful of inliers is as often a chance alignment as a right answer: on
hololens-office right poses and chance poses both come with 13–30 inliers. Their images tell
them apart. A depth map's keyframe keeps a small grey view of itself with the depth of each of
its pixels (:func:`keyframe_view`, stored in the map); at a candidate pose the keyframe's pixels
are moved into the query image by their depth and compared with what the query shows there
(normalised cross-correlation, which ignores the exposure's gain and offset). Right poses agree
(NCC ≥ 0.8 for 90 % of hololens-office's true poses), chance poses do not (≤ 0.75 for those
metres away): the idea of InLoc's dense pose verification (Taira et al., CVPR 2018), on views
small enough (a quarter of the image side) to cost a few milliseconds. A pose 0.2–0.4 m off
still looks at the same surfaces and can correlate as well, so the refiner lets a look vouch
only where no other keyframes give another pose (``RefinementConfig.photometric_min_ncc``).

A triangulated map has no dense depth: its keyframe's view knows the depth only around its own map
points (:func:`point_view_depth`), where its features, hence its texture, are. Right poses agree
there less often than on a dense view (half of hololens-office's right poses of few inliers at 0.85,
against 72 %), chance poses metres away far less (at most 0.47 on its validation blocks, against 0.72),
so the same threshold serves both. Reconstruction maps carry no views: the check is off there.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..geometry import backproject_pixels, invert_matrix, resized_pixel_coords, scale_intrinsics

# Views are this fraction of the keyframe's image side: enough texture to tell places apart, few
# pixels to move (hololens-office: 135 x 90), and forgiving of the centimetres a right pose is off ...
VIEW_SCALE = 0.25
# ... and never longer than this, so a view of a large photo tolerates the same pose error and costs the same.
VIEW_MAX_SIDE = 160
# Where only map points give depth, each point's depth covers the (2r + 1)² view pixels around its feature
# (a small fronto-parallel patch; r = 2 is 20 pixels of a 640-pixel image): r = 1 and 2 agreed alike on
# hololens-office's validation blocks, 2 covers 55 % of a view instead of 36 %.
POINT_PATCH_RADIUS = 2
# A keyframe whose pixels cover less of the query than this (the pose looks elsewhere) does not vote.
MIN_OVERLAP = 0.2
# Blur of the query's view (pixels of the view): a right pose is a few centimetres off, so the
# comparison must not hinge on single pixels.
QUERY_BLUR_PX = 0.7


def view_size(image_size) -> tuple[int, int]:
    """``(width, height)`` of the view of an image of ``image_size`` (w, h)."""
    w, h = (int(v) for v in image_size)
    scale = min(VIEW_SCALE, VIEW_MAX_SIDE / max(w, h))
    return max(8, round(w * scale)), max(8, round(h * scale))


def map_view_size(first_view: np.ndarray | None, image_size) -> tuple[int, int]:
    """``(width, height)`` of a map's next keyframe view: the first view's (``first_view``, (h, w); a map stacks
    its views into one array), or :func:`view_size` of ``image_size`` (w, h) for the first."""
    return view_size(image_size) if first_view is None else (first_view.shape[1], first_view.shape[0])


def grey(image: np.ndarray, size) -> np.ndarray:
    """(h, w) uint8 grey ``image`` (RGB or grey) resized to ``size`` (w, h) by area averaging."""
    image = np.asarray(image)
    g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    return cv2.resize(np.ascontiguousarray(g, np.uint8), tuple(int(v) for v in size), interpolation=cv2.INTER_AREA)


def _depth_along_axis(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """(N,) depth of world ``points`` (N, 3) along the optical axis of the camera at ``pose`` (camera-to-world)."""
    pose = np.asarray(pose, np.float64)
    return (np.asarray(points, np.float64).reshape(-1, 3) - pose[:3, 3]) @ pose[:3, 2]


def keyframe_view(image: np.ndarray, pose: np.ndarray, lift, size) -> tuple[np.ndarray, np.ndarray]:
    """A keyframe's view: ``(grey (h, w) uint8, depth (h, w) float16 metres, 0 where unknown)`` at ``size`` (w, h).

    ``lift``: the keyframe's :data:`~ros2_posenet.geometric.scene_map.Lift` (the map's own depth,
    registration included), asked at the centre of every view pixel.
    """
    w, h = (int(v) for v in size)
    image_size = (image.shape[1], image.shape[0])
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    centres = resized_pixel_coords(np.stack([u.ravel(), v.ravel()], 1), (image_size[0] / w, image_size[1] / h))
    points, valid = lift(centres.astype(np.float32), image_size)
    depth = _depth_along_axis(points, pose)
    depth = np.where(np.asarray(valid, bool) & np.isfinite(depth) & (depth > 0), depth, 0.0)
    return grey(image, size), depth.reshape(h, w).astype(np.float16)


def point_view_depth(keypoints: np.ndarray, points3d: np.ndarray, pose: np.ndarray, image_size, size,
                     radius: int = POINT_PATCH_RADIUS) -> np.ndarray:
    """The depth of a keyframe's view where only its map points are known: ``(h, w)`` float16 metres, 0 unknown.

    ``keypoints`` (N, 2) are the features (pixels of the keyframe's ``image_size``) whose world points are
    ``points3d`` (N, 3); each point's depth along the optical axis covers the (2·``radius`` + 1)² pixels
    of the view (``size``, (w, h)) around its feature, the nearer point where patches overlap.
    """
    w, h = (int(v) for v in size)
    depth = _depth_along_axis(points3d, pose)
    uv = np.rint(resized_pixel_coords(np.asarray(keypoints, np.float64).reshape(-1, 2),
                                      (w / image_size[0], h / image_size[1]))).astype(np.int64)
    keep = (depth > 0) & (depth < np.finfo(np.float16).max)  # a point at infinity (parallel rays) says nothing
    uv, depth = uv[keep], depth[keep]
    offsets = np.arange(-radius, radius + 1)
    du, dv = (d.ravel() for d in np.meshgrid(offsets, offsets))
    u, v = (uv[:, 0, None] + du).ravel(), (uv[:, 1, None] + dv).ravel()
    z = np.repeat(depth, len(du))
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    nearest = np.full(h * w, np.inf)
    np.minimum.at(nearest, v[inside] * w + u[inside], z[inside])
    return np.where(np.isfinite(nearest), nearest, 0.0).reshape(h, w).astype(np.float16)


@dataclass(frozen=True)
class QueryView:
    """The query image as the views are compared with it: blurred grey (float32) and its ``K``."""

    image: np.ndarray
    K: np.ndarray

    @classmethod
    def of(cls, image: np.ndarray, K: np.ndarray) -> "QueryView":
        image_size = (image.shape[1], image.shape[0])
        size = view_size(image_size)
        blurred = cv2.GaussianBlur(grey(image, size).astype(np.float32), (0, 0), QUERY_BLUR_PX)
        return cls(blurred, scale_intrinsics(K, image_size, size))


def view_agreement(query: QueryView, T_query: np.ndarray, view_grey: np.ndarray, view_depth: np.ndarray,
                   view_K: np.ndarray, T_view: np.ndarray, min_overlap: float = MIN_OVERLAP) -> float:
    """NCC between a keyframe's view moved into the query at pose ``T_query`` (camera-to-world) and the query.

    NaN where fewer than ``min_overlap`` of the view's pixels with depth land in the query image
    (the keyframe does not see what the pose says the query sees).
    """
    depth = np.asarray(view_depth, np.float64)
    v, u = np.nonzero(depth > 0)
    if len(u) < 16:
        return float("nan")
    world = backproject_pixels(np.stack([u, v], 1), depth[v, u], view_K, np.asarray(T_view, np.float64))
    inverse = invert_matrix(np.asarray(T_query, np.float64))
    cam = world @ inverse[:3, :3].T + inverse[:3, 3]
    h, w = query.image.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        x = query.K[0, 0] * cam[:, 0] / cam[:, 2] + query.K[0, 2]
        y = query.K[1, 1] * cam[:, 1] / cam[:, 2] + query.K[1, 2]
    inside = (cam[:, 2] > 0.05) & (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    if inside.sum() < max(16, min_overlap * len(u)):
        return float("nan")
    seen = cv2.remap(query.image, x[inside].astype(np.float32)[:, None], y[inside].astype(np.float32)[:, None],
                     cv2.INTER_LINEAR).ravel()
    mine = np.asarray(view_grey, np.float32)[v[inside], u[inside]]
    if seen.std() < 1e-3 or mine.std() < 1e-3:  # a flat patch says nothing
        return float("nan")
    return float(np.corrcoef(mine, seen)[0, 1])
