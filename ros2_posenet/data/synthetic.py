"""Synthetic textured room rendered along robot trajectories, written as 7-Scenes, Cambridge and Bundler.

Stands in for real pose datasets in the demo, tests and benchmarks. Everything is
deterministic from ``SyntheticSceneConfig.seed``. (One module of ~860 lines on purpose:
the room, its textures, the trajectories, the ray caster and the three writers share
one config and one seed; split, each piece would only be read with the others.)

Scene: a room (floor, ceiling, four walls) with boxes in a central island and
against the walls, all axis-aligned. The world frame is **z-up** (floor at z = 0,
room centred on x = y = 0), so it can be published as the ROS map frame as is.
Every surface carries its own procedural texture (multi-octave value noise over a
random palette plus random shapes), so appearance identifies the pose.

Rendering is vectorised numpy ray casting: one ray per pixel centre, analytic
intersection with the room's walls and the boxes' slabs, so depth is exact. Rays
are built as ``R K⁻¹ (u, v, 1)``, so the ray parameter is the optical-axis depth.

Trajectories: a robot drives loops around the island (the path's distance from the
island wanders, so loops differ), looks around ±45° from its heading, its camera at
1.0–1.6 m with slowly varying pitch (±10°) and tiny roll. Train sequences alternate
driving direction; test sequences use their own seeds (different paths and look
angles) over the same area, so test poses are held out.

Output (``generate_scene``), one folder readable by both loaders::

    seq-01/frame-000000.color.png      RGB
    seq-01/frame-000000.depth.png      uint16 mm (7-Scenes; rig kinect: seen by the depth sensor)
    seq-01/frame-000000.pose.txt       4x4 camera-to-world (7-Scenes; rig kinect: of the depth sensor)
    TrainSplit.txt, TestSplit.txt      "sequence1" ... (7-Scenes)
    intrinsics.txt                     "fx fy cx cy width height" (read by the 7-Scenes loader; not with rig kinect)
    dataset_train.txt, dataset_test.txt  Cambridge pose lists referencing the same PNGs
    reconstruction.nvm                 NVM_V3: all cameras, sparse points, per-image observations
    reconstruction_size.txt            "width height" the NVM focal refers to (Cambridge loader)
    scene.yaml                         config, intrinsics, frame counts, seed (written last)

With ``"bundler"`` in ``formats`` (not by default: it renders every frame a second time)
the scene also writes a Bundler reconstruction of itself, read by ``data/bundler.py``::

    bundle/bundle.out                  v0.3: all cameras with radial distortion BUNDLER_DISTORTION, points, view lists
    list.txt, list.query.txt           images in camera order ("<image> 0 <focal>"); the test images (split file)
    bundler/seq-01/frame-000000.color.png   the frames rendered with that distortion (own copies)
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from ..geometry import body_pose_to_optical, matrix_to_pose, resized_intrinsics, rpy_to_matrix
from .bundler import (
    SPLIT_FILE as BUNDLER_SPLIT_FILE, distort_normalised, pixels_to_centre_offsets, project_to_bundler_pose,
    undistort_normalised, write_bundle, write_image_list,
)
from .cambridge import DATASET_HEADER, SIZE_FILE, project_to_cambridge_pose
from .seven_scenes import (
    DEPTH_INVALID, INTRINSICS_FILE, KINECT_COLOUR_INTRINSICS, KINECT_REGISTRATION, SPLIT_FILES, intrinsics_matrix,
    sequence_folder,
)

FORMATS = ("7scenes", "cambridge", "bundler")
RIGS = ("registered", "kinect")
DEFAULT_FORMATS = ("7scenes", "cambridge")
BUNDLER_DIR = "bundler"  # the distorted copies of the frames
BUNDLER_DISTORTION = (-0.06, 0.01)  # Bundler k1, k2: a little barrel distortion, as lenses have
# The other two coordinates of a face whose normal is along axis a: (u axis, v axis).
FACE_AXES = {0: (1, 2), 1: (0, 2), 2: (0, 1)}
LIGHT_DIRECTION = np.array([0.3, 0.5, 1.0]) / np.linalg.norm([0.3, 0.5, 1.0])
ISLAND_FRACTION = 0.15  # island half-extent / room side
PATH_CLEARANCE = 0.7  # metres between the path and the island / wall boxes
MAX_WALL_BOX_DEPTH = 0.6


@dataclass(frozen=True)
class SyntheticSceneConfig:
    """Size, camera and content of a synthetic scene.

    ``frames_train`` is split evenly over ``train_sequences`` (likewise for test).
    ``fov_deg`` is the horizontal field of view; the principal point is the image
    centre ``((W-1)/2, (H-1)/2)``.

    ``rig``: ``registered`` renders depth from the colour camera (``intrinsics.txt`` says
    so); ``kinect`` renders a Kinect v1 as 7-Scenes recorded it: colour camera with the
    Kinect colour intrinsics (``fov_deg`` unused, 4:3 images), depth from the depth sensor
    ~2.6 cm beside it (the LIRIS calibration of the 7-Scenes loader) with its own
    intrinsics, pose files of the depth sensor, no ``intrinsics.txt``; 7-Scenes format only.
    ``depth_range_m`` > 0: farther depth is written as invalid (65535), as a sensor does.
    """

    seed: int = 0
    width: int = 320
    height: int = 240
    fov_deg: float = 60.0
    frames_train: int = 2000  # a from-scratch network needs a few thousand views to generalise in position
    frames_test: int = 200
    train_sequences: int = 6
    test_sequences: int = 1
    num_points: int = 3000
    room_size: tuple = (12.0, 9.0, 3.0)
    texel_size: float = 0.02
    formats: tuple = DEFAULT_FORMATS
    rig: str = "registered"
    depth_range_m: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "room_size", tuple(float(v) for v in self.room_size))
        object.__setattr__(self, "formats", tuple(self.formats))
        problems = []
        if self.width < 16 or self.height < 16:
            problems.append(f"image size must be at least 16x16, got {self.width}x{self.height}")
        if not 10.0 <= self.fov_deg <= 150.0:
            problems.append(f"fov_deg must be in [10, 150], got {self.fov_deg}")
        if self.train_sequences < 1 or self.test_sequences < 1:
            problems.append("need at least one train and one test sequence")
        if self.frames_train < self.train_sequences or self.frames_test < self.test_sequences:
            problems.append("need at least one frame per sequence")
        if self.train_sequences + self.test_sequences > 99:
            problems.append("at most 99 sequences")
        if self.num_points < 0:
            problems.append(f"num_points must be >= 0, got {self.num_points}")
        if len(self.room_size) != 3 or min(self.room_size[:2]) < 7.0 or not 2.2 <= self.room_size[2] <= 10.0:
            problems.append(f"room_size must be (x >= 7, y >= 7, 2.2 <= z <= 10) metres, got {self.room_size}")
        if not 0.002 <= self.texel_size <= 0.1:
            problems.append(f"texel_size must be in [0.002, 0.1] m, got {self.texel_size}")
        unknown = set(self.formats) - set(FORMATS)
        if unknown or not self.formats:
            problems.append(f"formats must be a non-empty subset of {FORMATS}, got {self.formats}")
        if self.rig not in RIGS:
            problems.append(f"rig must be one of {RIGS}, got {self.rig!r}")
        if self.rig == "kinect" and (self.formats != ("7scenes",) or 3 * self.width != 4 * self.height):
            problems.append(f"rig 'kinect' writes 4:3 images in the 7-Scenes format only, got {self.width}x{self.height} "
                            f"and formats {self.formats}")
        if self.depth_range_m < 0:
            problems.append(f"depth_range_m must be >= 0 (0: unlimited), got {self.depth_range_m}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def focal(self) -> float:
        return float(self.K[0, 0])

    @property
    def K(self) -> np.ndarray:
        """(3, 3) intrinsics of the rendered colour images."""
        if self.rig == "kinect":
            return self._kinect_intrinsics(*intrinsics_matrix(KINECT_COLOUR_INTRINSICS))
        f = (self.width / 2.0) / math.tan(math.radians(self.fov_deg) / 2.0)
        return np.array([[f, 0.0, (self.width - 1) / 2.0], [0.0, f, (self.height - 1) / 2.0], [0.0, 0.0, 1.0]])

    @property
    def K_depth(self) -> np.ndarray:
        """(3, 3) intrinsics of the rendered depth images (the colour camera's unless ``rig`` is ``kinect``)."""
        if self.rig == "kinect":
            return self._kinect_intrinsics(KINECT_REGISTRATION.K_depth, KINECT_REGISTRATION.depth_size)
        return self.K

    def depth_camera_pose(self, T_world_colour: np.ndarray) -> np.ndarray:
        """Camera-to-world pose of the depth camera of a colour camera at ``T_world_colour``."""
        if self.rig == "kinect":
            return T_world_colour @ KINECT_REGISTRATION.T_colour_depth
        return T_world_colour

    def _kinect_intrinsics(self, K: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return resized_intrinsics(K, self.width / size[0], self.height / size[1])

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SyntheticSceneConfig":
        return cls(**d)


# ----------------------------------------------------------------------------- geometry


@dataclass
class Surface:
    """An axis-aligned textured rectangle: normal along ``axis`` at ``offset``."""

    axis: int
    offset: float
    u_range: tuple[float, float]
    v_range: tuple[float, float]
    normal_sign: float  # +1 if the visible side faces +axis
    texture: np.ndarray = field(repr=False, default=None)


@dataclass
class Layout:
    """Room bounds, boxes and the band the robot path stays in."""

    room_lo: np.ndarray
    room_hi: np.ndarray
    boxes: list[tuple[np.ndarray, np.ndarray]]
    path_inner: tuple[float, float]  # ellipse semi-axes the path keeps outside of
    path_outer: tuple[float, float]  # ellipse semi-axes the path keeps inside of


def make_layout(config: SyntheticSceneConfig) -> Layout:
    """Room and boxes: an island of 2–3 boxes in the middle, 1–3 boxes along each wall."""
    rng = np.random.default_rng([config.seed, 1])
    lx, ly, lz = config.room_size
    room_lo, room_hi = np.array([-lx / 2, -ly / 2, 0.0]), np.array([lx / 2, ly / 2, lz])
    ix, iy = ISLAND_FRACTION * lx, ISLAND_FRACTION * ly
    boxes = [_island_box(rng, ix, iy, lz) for _ in range(int(rng.integers(2, 4)))]
    for wall in range(4):
        boxes += _wall_boxes(rng, wall, room_lo, room_hi)
    inner = (ix + PATH_CLEARANCE, iy + PATH_CLEARANCE)
    outer = (lx / 2 - MAX_WALL_BOX_DEPTH - PATH_CLEARANCE, ly / 2 - MAX_WALL_BOX_DEPTH - PATH_CLEARANCE)
    return Layout(room_lo, room_hi, boxes, inner, outer)


def _island_box(rng: np.random.Generator, ix: float, iy: float, lz: float):
    """A box whose footprint lies inside the island ellipse (x/ix)² + (y/iy)² <= 1."""
    height = rng.uniform(0.5, min(2.4, lz - 0.3))
    for _ in range(100):
        half = np.array([rng.uniform(0.2, 0.5) * ix, rng.uniform(0.2, 0.5) * iy])
        centre = rng.uniform(-1, 1, size=2) * np.array([ix, iy]) * 0.6
        corners = centre + half * np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]])
        if np.all((corners[:, 0] / ix) ** 2 + (corners[:, 1] / iy) ** 2 <= 1.0):
            break
    else:  # a small centred box always fits
        half, centre = np.array([0.3 * ix, 0.3 * iy]), np.zeros(2)
    return np.array([*(centre - half), 0.0]), np.array([*(centre + half), height])


def _wall_boxes(rng: np.random.Generator, wall: int, room_lo: np.ndarray, room_hi: np.ndarray):
    """1–3 non-overlapping boxes flush with one wall (0: -x, 1: +x, 2: -y, 3: +y)."""
    along = 1 if wall < 2 else 0  # the axis running along the wall
    across = 1 - along
    start, stop = room_lo[along] + 0.3, room_hi[along] - 0.3
    boxes, cursor = [], start
    for _ in range(int(rng.integers(1, 4))):
        length = rng.uniform(0.5, 2.0)
        cursor += rng.uniform(0.3, 2.5)
        if cursor + length > stop:
            break
        depth = rng.uniform(0.25, MAX_WALL_BOX_DEPTH)
        lo, hi = np.zeros(3), np.zeros(3)
        lo[along], hi[along] = cursor, cursor + length
        if wall % 2 == 0:
            lo[across], hi[across] = room_lo[across], room_lo[across] + depth
        else:
            lo[across], hi[across] = room_hi[across] - depth, room_hi[across]
        hi[2] = rng.uniform(0.4, min(2.2, room_hi[2] - 0.3))
        boxes.append((lo, hi))
        cursor += length
    return boxes


def make_surfaces(layout: Layout) -> list[Surface]:
    """Room faces (ids 0–5: 2·axis + side) then 6 faces per box (6 + 6·box + 2·axis + side)."""
    surfaces = []
    for lo, hi, inward in [(layout.room_lo, layout.room_hi, True)] + [(lo, hi, False) for lo, hi in layout.boxes]:
        for axis in range(3):
            ua, va = FACE_AXES[axis]
            for side in (0, 1):
                offset = (lo, hi)[side][axis]
                # Room faces are seen from inside, box faces from outside.
                normal_sign = (1.0 if side == 0 else -1.0) * (1.0 if inward else -1.0)
                surfaces.append(Surface(axis, float(offset), (lo[ua], hi[ua]), (lo[va], hi[va]), normal_sign))
    return surfaces


# ----------------------------------------------------------------------------- textures


def value_noise(shape: tuple[int, int], cell_texels: float, octaves: int, rng: np.random.Generator) -> np.ndarray:
    """Multi-octave value noise in [0, 1] of ``shape`` (h, w); coarsest cell ``cell_texels``."""
    h, w = shape
    total = np.zeros(shape, np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        cell = max(2.0, cell_texels / 2**octave)
        grid = rng.random((int(h / cell) + 3, int(w / cell) + 3), dtype=np.float32)
        up = cv2.resize(grid, (int((grid.shape[1]) * cell), int((grid.shape[0]) * cell)), interpolation=cv2.INTER_CUBIC)
        oy, ox = int(rng.integers(0, max(1, up.shape[0] - h))), int(rng.integers(0, max(1, up.shape[1] - w)))
        total += amplitude * up[oy : oy + h, ox : ox + w]
        norm += amplitude
        amplitude *= 0.55
    total /= norm
    lo, hi = np.percentile(total, [1, 99])
    return np.clip((total - lo) / max(hi - lo, 1e-6), 0, 1)


def random_color(rng: np.random.Generator, value=(0.25, 0.95)) -> np.ndarray:
    """An RGB colour (3,) in [0, 255] of random hue, moderate saturation."""
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(60, 220), int(255 * rng.uniform(*value))]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def make_texture(width_m: float, height_m: float, texel: float, rng: np.random.Generator) -> np.ndarray:
    """A unique texture (h, w, 3) uint8 for a surface of ``width_m`` x ``height_m`` metres."""
    w, h = max(4, int(math.ceil(width_m / texel))), max(4, int(math.ceil(height_m / texel)))
    palette = np.stack([random_color(rng) for _ in range(3)])
    noise = value_noise((h, w), cell_texels=rng.uniform(0.5, 1.2) / texel, octaves=5, rng=rng)
    # Piecewise-linear blend through the three palette colours.
    a = np.clip(noise * 2, 0, 1)[..., None]
    b = np.clip(noise * 2 - 1, 0, 1)[..., None]
    img = palette[0] * (1 - a) + palette[1] * a
    img = img * (1 - b) + palette[2] * b
    img = np.ascontiguousarray(img.astype(np.uint8))
    _draw_shapes(img, width_m * height_m, texel, rng)
    grain = rng.normal(0, 6, size=(h, w, 1)).astype(np.float32)  # texture at close range
    return np.clip(img.astype(np.float32) + grain, 0, 255).astype(np.uint8)


def _draw_shapes(img: np.ndarray, area_m2: float, texel: float, rng: np.random.Generator) -> None:
    """Random rectangles, discs, lines and triangles (5–50 cm), about 2.5 per m²."""
    h, w = img.shape[:2]
    for _ in range(int(4 + 2.5 * area_m2)):
        color = tuple(float(c) for c in random_color(rng, value=(0.05, 1.0)))
        size = rng.uniform(0.05, 0.5) / texel
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        kind = rng.integers(0, 4)
        if kind == 0:
            p0 = (int(cx - size / 2), int(cy - size * rng.uniform(0.2, 0.6)))
            p1 = (int(cx + size / 2), int(cy + size * rng.uniform(0.2, 0.6)))
            cv2.rectangle(img, p0, p1, color, -1 if rng.random() < 0.7 else max(1, int(size / 10)))
        elif kind == 1:
            cv2.circle(img, (int(cx), int(cy)), max(1, int(size / 2)), color, -1, cv2.LINE_AA)
        elif kind == 2:
            angle = rng.uniform(0, np.pi)
            d = np.array([np.cos(angle), np.sin(angle)]) * size
            cv2.line(img, (int(cx - d[0]), int(cy - d[1])), (int(cx + d[0]), int(cy + d[1])), color,
                     max(1, int(size / 12)), cv2.LINE_AA)
        else:
            pts = (np.array([cx, cy]) + rng.uniform(-size / 2, size / 2, size=(3, 2))).astype(np.int32)
            cv2.fillPoly(img, [pts], color, cv2.LINE_AA)


# ----------------------------------------------------------------------------- scene


class SyntheticScene:
    """Geometry, textures and sparse points of a synthetic room; renders any camera.

    Attributes:
        config: the scene's configuration.
        layout: room and boxes.
        surfaces: textured faces, indexed by surface id.
        points: (P, 3) float64 distinctive surface points (texture corners).
        point_colors: (P, 3) uint8.
    """

    def __init__(self, config: SyntheticSceneConfig):
        self.config = config
        self.layout = make_layout(config)
        self.surfaces = make_surfaces(self.layout)
        self._boxes_lo = np.array([lo for lo, _ in self.layout.boxes], dtype=np.float64).reshape(-1, 3)
        self._boxes_hi = np.array([hi for _, hi in self.layout.boxes], dtype=np.float64).reshape(-1, 3)
        self._build_textures()
        self.points, self.point_colors = self._sample_points(config.num_points)
        self._rays: dict = {}

    # -- construction ----------------------------------------------------------------
    def _build_textures(self) -> None:
        """One texture per surface, shading baked in, packed into a flat atlas for gathering."""
        texel = self.config.texel_size
        chunks, offsets, widths, heights = [], [], [], []
        total = 0
        for sid, surf in enumerate(self.surfaces):
            rng = np.random.default_rng([self.config.seed, 2, sid])
            tex = make_texture(np.ptp(surf.u_range), np.ptp(surf.v_range), texel, rng)
            normal = np.zeros(3)
            normal[surf.axis] = surf.normal_sign
            shade = 0.5 + 0.5 * max(0.0, float(normal @ LIGHT_DIRECTION))
            surf.texture = tex
            chunks.append((tex.astype(np.float32) * shade).astype(np.uint8).reshape(-1, 3))
            offsets.append(total)
            heights.append(tex.shape[0])
            widths.append(tex.shape[1])
            total += tex.shape[0] * tex.shape[1]
        self._atlas = np.concatenate(chunks)
        self._tex_offset = np.array(offsets, np.int64)
        self._tex_w = np.array(widths, np.int64)
        self._tex_h = np.array(heights, np.int64)
        self._surf_axis = np.array([s.axis for s in self.surfaces], np.int64)
        self._surf_u0 = np.array([s.u_range[0] for s in self.surfaces], np.float32)
        self._surf_v0 = np.array([s.v_range[0] for s in self.surfaces], np.float32)

    def _sample_points(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """About ``count`` texture corners (Shi–Tomasi) spread over the surfaces by area."""
        if count == 0:
            return np.zeros((0, 3)), np.zeros((0, 3), np.uint8)
        texel = self.config.texel_size
        areas = np.array([np.ptp(s.u_range) * np.ptp(s.v_range) for s in self.surfaces])
        areas[[6 + 6 * b + 4 for b in range(len(self.layout.boxes))]] = 0.0  # box bottoms lie on the floor
        quota = np.floor(count * areas / areas.sum()).astype(int)
        quota[np.argsort(-areas)[: count - quota.sum()]] += 1
        points, colors = [], []
        for sid, (surf, n) in enumerate(zip(self.surfaces, quota)):
            if n == 0:
                continue
            gray = cv2.cvtColor(surf.texture, cv2.COLOR_RGB2GRAY)
            corners = cv2.goodFeaturesToTrack(gray, maxCorners=int(n), qualityLevel=0.01, minDistance=4)
            uv = np.zeros((0, 2)) if corners is None else corners.reshape(-1, 2).astype(np.float64)
            if len(uv) < n:  # flat texture: top up with uniform samples
                rng = np.random.default_rng([self.config.seed, 3, sid])
                extra = rng.uniform([0, 0], [gray.shape[1] - 1, gray.shape[0] - 1], size=(n - len(uv), 2))
                uv = np.concatenate([uv, extra])
            iu, iv = np.round(uv).astype(int).T
            colors.append(surf.texture[iv, iu])
            xyz = np.zeros((len(uv), 3))
            ua, va = FACE_AXES[surf.axis]
            xyz[:, surf.axis] = surf.offset
            xyz[:, ua] = surf.u_range[0] + (uv[:, 0] + 0.5) * texel
            xyz[:, va] = surf.v_range[0] + (uv[:, 1] + 0.5) * texel
            points.append(xyz)
        return np.concatenate(points), np.concatenate(colors)

    # -- rendering -------------------------------------------------------------------
    def _camera_rays(self, K: np.ndarray, width: int, height: int) -> np.ndarray:
        """(3, H, W) float32 camera-frame rays ``K⁻¹ (u, v, 1)`` through the pixel centres."""
        key = (np.asarray(K, np.float64).tobytes(), width, height)
        if key not in self._rays:
            if len(self._rays) >= 8:  # callers rendering many crops: keep the cache small
                self._rays.clear()
            u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
            pix = np.stack((u, v, np.ones_like(u)))
            self._rays[key] = np.einsum("ij,jhw->ihw", np.linalg.inv(K), pix).astype(np.float32)
        return self._rays[key]

    def cast(self, T_world_camera: np.ndarray, K: np.ndarray, width: int, height: int):
        """Ray-cast a pinhole camera: ``(depth (H, W) float32 metres, surface id (H, W) int64, rays (3, H, W))``.

        ``rays`` are world-frame directions with unit optical-axis component, so the
        hit point of pixel (v, u) is ``origin + depth[v, u] * rays[:, v, u]``.
        """
        R = np.asarray(T_world_camera[:3, :3], np.float64)
        origin = np.asarray(T_world_camera[:3, 3], np.float64)
        rays = np.einsum("ij,jhw->ihw", R.astype(np.float32), self._camera_rays(K, width, height))
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / rays
            # Inside the room every ray leaves through the nearest of its three exit planes.
            exits = np.maximum((self.layout.room_lo - origin).astype(np.float32)[:, None, None] * inv,
                               (self.layout.room_hi - origin).astype(np.float32)[:, None, None] * inv)
            axis = exits.argmin(0)
            depth = np.take_along_axis(exits, axis[None], 0)[0]
            sid = 2 * axis + (np.take_along_axis(rays, axis[None], 0)[0] > 0)
            for b in range(len(self._boxes_lo)):
                self._cast_box(b, origin, R, K, width, height, rays, inv, depth, sid)
        return depth, sid, rays

    def _cast_box(self, b, origin, R, K, width, height, rays, inv, depth, sid) -> None:
        """Slab test of box ``b`` on the pixels of its screen bounding box; updates depth/sid in place."""
        lo, hi = self._boxes_lo[b], self._boxes_hi[b]
        window = self._screen_window(lo, hi, origin, R, K, width, height)
        if window is None:
            return
        v0, v1, u0, u1 = window
        inv_w = inv[:, v0:v1, u0:u1]
        t1 = (lo - origin).astype(np.float32)[:, None, None] * inv_w
        t2 = (hi - origin).astype(np.float32)[:, None, None] * inv_w
        t_min = np.minimum(t1, t2)
        t_near = t_min.max(0)
        t_far = np.maximum(t1, t2).min(0)
        best = depth[v0:v1, u0:u1]
        hit = (t_near <= t_far) & (t_near > 1e-4) & (t_near < best)
        if not hit.any():
            return
        entry_axis = t_min.argmax(0)  # the slab entered last is the face that was hit
        axis = entry_axis[hit]
        going_negative = np.take_along_axis(rays[:, v0:v1, u0:u1], entry_axis[None], 0)[0][hit] < 0
        best[hit] = t_near[hit]
        sid[v0:v1, u0:u1][hit] = 6 + 6 * b + 2 * axis + going_negative  # a ray going -axis meets the hi face

    @staticmethod
    def _screen_window(lo, hi, origin, R, K, width, height):
        """Pixel window (v0, v1, u0, u1) covering the box; full image if it straddles the camera plane."""
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        cam = (corners - origin) @ R
        if np.all(cam[:, 2] <= 1e-3):
            return None
        if np.any(cam[:, 2] <= 1e-3):
            return 0, height, 0, width
        uv = cam[:, :2] / cam[:, 2:] @ K[:2, :2].T + K[:2, 2]
        u0, v0 = np.floor(uv.min(0) - 1).astype(int)
        u1, v1 = np.ceil(uv.max(0) + 2).astype(int)
        u0, u1, v0, v1 = max(u0, 0), min(u1, width), max(v0, 0), min(v1, height)
        if u0 >= u1 or v0 >= v1:
            return None
        return v0, v1, u0, u1

    def render(self, T_world_camera: np.ndarray, K: np.ndarray | None = None,
               width: int | None = None, height: int | None = None):
        """Render ``(rgb (H, W, 3) uint8, depth (H, W) float32 metres)`` of a camera-to-world pose.

        ``K``, ``width``, ``height`` default to the scene's camera.
        """
        K = self.config.K if K is None else np.asarray(K, np.float64)
        width, height = width or self.config.width, height or self.config.height
        depth, sid, rays = self.cast(T_world_camera, K, width, height)
        origin = np.asarray(T_world_camera[:3, 3], np.float32)
        hit = origin[:, None, None] + depth[None] * rays
        axis = self._surf_axis[sid]
        u = np.where(axis == 0, hit[1], hit[0])
        v = np.where(axis == 2, hit[1], hit[2])
        inv_texel = np.float32(1.0 / self.config.texel_size)
        w_tex, h_tex = self._tex_w[sid], self._tex_h[sid]
        iu = np.clip(((u - self._surf_u0[sid]) * inv_texel).astype(np.int64), 0, w_tex - 1)
        iv = np.clip(((v - self._surf_v0[sid]) * inv_texel).astype(np.int64), 0, h_tex - 1)
        rgb = self._atlas[self._tex_offset[sid] + iv * w_tex + iu]
        fog = (0.8 + 0.2 * np.exp(-depth / 6.0))[..., None]  # distant surfaces slightly darker
        return (rgb * fog).astype(np.uint8), depth

    def visible_points(self, T_world_camera: np.ndarray, depth: np.ndarray, K: np.ndarray | None = None):
        """Points seen by a camera: in front, inside the image, not occluded.

        Occlusion test: the point's depth must match the rendered depth at its pixel
        within 2 cm + 1 %.

        Returns:
            ``(ids (n,), uv (n, 2))``: point indices and exact projected pixels.
        """
        K = self.config.K if K is None else np.asarray(K, np.float64)
        height, width = depth.shape
        cam = (self.points - T_world_camera[:3, 3]) @ T_world_camera[:3, :3]
        z = cam[:, 2]
        front = z > 0.05
        uv = np.full((len(z), 2), -1e9)
        uv[front] = cam[front, :2] / z[front, None] @ K[:2, :2].T + K[:2, 2]
        iu, iv = np.round(uv[:, 0]).astype(np.int64), np.round(uv[:, 1]).astype(np.int64)
        inside = front & (iu >= 0) & (iu < width) & (iv >= 0) & (iv < height)
        ids = np.flatnonzero(inside)
        rendered = depth[iv[ids], iu[ids]]
        keep = np.abs(rendered - z[ids]) < 0.02 + 0.01 * z[ids]
        return ids[keep], uv[ids[keep]]


# ----------------------------------------------------------------------------- trajectories


def _smooth_wave(rng: np.random.Generator, s: np.ndarray, amplitude: float, period: tuple[float, float]) -> np.ndarray:
    """Sum of two sinusoids in arc length ``s`` with random periods/phases, peak <= amplitude."""
    wave = np.zeros_like(s)
    for share in (0.75, 0.25):
        wave += share * np.sin(2 * np.pi * s / rng.uniform(*period) + rng.uniform(0, 2 * np.pi))
    return amplitude * wave


def robot_trajectory(layout: Layout, n_frames: int, direction: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 4, 4) camera-to-world poses (optical frame) of a robot looping around the island.

    The path is an ellipse whose radius wanders between the island and the wall
    boxes (non-integer frequencies, so successive loops differ), resampled at
    equal arc length; 1–1.3 loops per sequence.
    """
    (ai, bi), (ao, bo) = layout.path_inner, layout.path_outer
    loops = rng.uniform(1.0, 1.3)
    theta = np.linspace(0, 2 * np.pi * loops, 4000) * direction + rng.uniform(0, 2 * np.pi)
    band = 0.5 + _smooth_wave(rng, np.abs(theta), 0.4, (2.0, 5.0))  # in (0.1, 0.9) of the band
    x = (ai + band * (ao - ai)) * np.cos(theta)
    y = (bi + band * (bo - bi)) * np.sin(theta)
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    s = np.linspace(0, arc[-1], n_frames, endpoint=False) if n_frames > 1 else np.zeros(1)
    px, py = np.interp(s, arc, x), np.interp(s, arc, y)
    ds = 0.05
    heading = np.arctan2(np.interp(s + ds, arc, y) - py, np.interp(s + ds, arc, x) - px)
    yaw = heading + _smooth_wave(rng, s, np.radians(45), (4.0, 12.0))
    pitch = _smooth_wave(rng, s, np.radians(10), (3.0, 9.0))
    roll = _smooth_wave(rng, s, np.radians(1), (1.0, 3.0))
    z = 1.3 + _smooth_wave(rng, s, 0.3, (5.0, 15.0))
    poses = np.zeros((n_frames, 4, 4))
    for i in range(n_frames):
        T_body = np.eye(4)
        T_body[:3, :3] = rpy_to_matrix(roll[i], pitch[i], yaw[i])
        T_body[:3, 3] = (px[i], py[i], z[i])
        poses[i] = body_pose_to_optical(T_body)
    return poses


def frames_per_sequence(total: int, sequences: int) -> list[int]:
    """Split ``total`` frames as evenly as possible (earlier sequences get the remainder)."""
    return [total // sequences + (1 if i < total % sequences else 0) for i in range(sequences)]


def scene_trajectories(config: SyntheticSceneConfig, layout: Layout | None = None) -> dict[str, dict]:
    """All sequences: ``{"seq-01": {"split": "train", "poses": (n, 4, 4)}, ...}`` (train first).

    Train sequence k drives in direction (+1, -1, +1, ...); test sequence j drives like
    train sequence j (mod count) but on its own seed, so its path and look angles differ.
    """
    layout = layout or make_layout(config)
    splits = [("train", n) for n in frames_per_sequence(config.frames_train, config.train_sequences)]
    splits += [("test", n) for n in frames_per_sequence(config.frames_test, config.test_sequences)]
    out = {}
    for number, (split, n) in enumerate(splits, start=1):
        k = number - 1 if split == "train" else (number - 1 - config.train_sequences) % config.train_sequences
        direction = 1 if k % 2 == 0 else -1
        rng = np.random.default_rng([config.seed, 4, number])
        out[sequence_folder(number)] = {"split": split, "poses": robot_trajectory(layout, n, direction, rng)}
    return out


# ----------------------------------------------------------------------------- writers


GENERATED_FILES = (
    "TrainSplit.txt", "TestSplit.txt", INTRINSICS_FILE, "dataset_train.txt", "dataset_test.txt",
    "reconstruction.nvm", SIZE_FILE, "scene.yaml", "list.txt", BUNDLER_SPLIT_FILE,
)
GENERATED_FOLDERS = ("bundle", BUNDLER_DIR)


def _prepare_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty (use overwrite=True / --overwrite to replace a scene)")
        for seq in out_dir.glob("seq-[0-9][0-9]"):
            shutil.rmtree(seq)
        for name in GENERATED_FILES:
            (out_dir / name).unlink(missing_ok=True)
        for name in GENERATED_FOLDERS:
            if (out_dir / name).is_dir():
                shutil.rmtree(out_dir / name)
    out_dir.mkdir(parents=True, exist_ok=True)


def write_pose(path: Path, T: np.ndarray) -> None:
    path.write_text("".join(" ".join(f"{v:.9f}" for v in row) + "\n" for row in T))


def _write_depth(path: Path, depth_m: np.ndarray, depth_range_m: float = 0.0) -> None:
    """Millimetres; beyond ``depth_range_m`` (> 0) the sensor's invalid value 65535."""
    mm = np.clip(np.round(depth_m * 1000.0), 1, DEPTH_INVALID - 1).astype(np.uint16)
    if depth_range_m > 0:
        mm[depth_m > depth_range_m] = DEPTH_INVALID
    cv2.imwrite(str(path), mm)


def _write_cambridge_list(path: Path, frames: list[tuple[str, np.ndarray]]) -> None:
    lines = list(DATASET_HEADER)
    for name, T in frames:
        centre, q = project_to_cambridge_pose(T[:3, 3], _matrix_quat(T))
        lines.append(name + " " + " ".join(f"{v:.9f}" for v in (*centre, *q)))
    path.write_text("\n".join(lines) + "\n")


def _matrix_quat(T: np.ndarray) -> np.ndarray:
    return matrix_to_pose(T)[1]


def _write_nvm(path: Path, scene: SyntheticScene, frames: list[tuple[str, np.ndarray]],
               observations: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """NVM_V3 with every frame as a camera; returns the number of measurements."""
    K = scene.config.K
    centre_px = K[:2, 2]
    lines = ["NVM_V3", "", str(len(frames))]
    for name, T in frames:
        centre, q = project_to_cambridge_pose(T[:3, 3], _matrix_quat(T))
        lines.append(f"{name} {K[0, 0]:.9f} " + " ".join(f"{v:.12f}" for v in (*q, *centre)) + " 0 0")
    per_point: list[list[str]] = [[] for _ in range(len(scene.points))]
    for cam, (ids, uv) in enumerate(observations):
        offsets = uv - centre_px
        for feature, (pid, (x, y)) in enumerate(zip(ids.tolist(), offsets.tolist())):
            per_point[pid].append(f"{cam} {feature} {x:.6f} {y:.6f}")
    lines += ["", str(len(scene.points))]
    for (X, Y, Z), (r, g, b), meas in zip(scene.points.tolist(), scene.point_colors.tolist(), per_point):
        lines.append(f"{X:.9f} {Y:.9f} {Z:.9f} {r} {g} {b} {len(meas)}" + ("" if not meas else " " + " ".join(meas)))
    lines += ["", "0", ""]  # end of models, as VisualSFM writes it
    path.write_text("\n".join(lines))
    return sum(len(m) for m in per_point)


class DistortedCamera:
    """The scene's camera with Bundler's radial distortion ``(k1, k2)``: renders exact distorted views.

    Each distorted pixel sees the pinhole pixel ``f · undistort((u - c) / f) + c``; a pinhole
    view with a margin wide enough for all of them is rendered and resampled there, so the
    image content is the scene's, not an extrapolation at the borders.
    """

    def __init__(self, config: SyntheticSceneConfig, k1: float, k2: float):
        self.k1, self.k2 = float(k1), float(k2)
        self.K, self.width, self.height = config.K, config.width, config.height
        f, centre = self.K[0, 0], self.K[:2, 2]
        u, v = np.meshgrid(np.arange(self.width, dtype=np.float64), np.arange(self.height, dtype=np.float64))
        source = undistort_normalised((np.stack((u.ravel(), v.ravel()), axis=1) - centre) / f, k1, k2) * f + centre
        below = -source.min(0)
        above = source.max(0) - (self.width - 1, self.height - 1)
        self.pad = int(math.ceil(max(0.0, *below, *above))) + 2
        self.K_padded = self.K.copy()
        self.K_padded[:2, 2] += self.pad
        self.map = (source + self.pad).astype(np.float32).reshape(self.height, self.width, 2)

    def render(self, scene: "SyntheticScene", T_world_camera: np.ndarray) -> np.ndarray:
        """Distorted RGB (H, W, 3) uint8 view of a camera-to-world pose."""
        rgb, _ = scene.render(T_world_camera, self.K_padded, self.width + 2 * self.pad, self.height + 2 * self.pad)
        return cv2.remap(rgb, self.map[..., 0], self.map[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def distort_pixels(self, uv: np.ndarray) -> np.ndarray:
        """Where pinhole pixels (N, 2) of the scene's camera land in the distorted image."""
        f, centre = self.K[0, 0], self.K[:2, 2]
        return distort_normalised((np.asarray(uv, np.float64) - centre) / f, self.k1, self.k2) * f + centre


def _write_bundler(out_dir: Path, scene: SyntheticScene, camera: DistortedCamera, frames: list[tuple[str, np.ndarray]],
                   observations: list[tuple[np.ndarray, np.ndarray]], test_names: list[str]) -> int:
    """``bundle/bundle.out``, ``list.txt`` and the split file of the distorted copies; returns the measurements."""
    config = scene.config
    cameras, views = [], []
    for (_, T), (ids, uv) in zip(frames, observations):
        R, t = project_to_bundler_pose(*matrix_to_pose(T))
        cameras.append((config.focal, camera.k1, camera.k2, R, t))
        views.append((ids, pixels_to_centre_offsets(camera.distort_pixels(uv), config.width, config.height)))
    (out_dir / "bundle").mkdir(exist_ok=True)
    names = [f"{BUNDLER_DIR}/{name}" for name, _ in frames]
    write_image_list(out_dir / "list.txt", names, [config.focal] * len(names))
    write_image_list(out_dir / BUNDLER_SPLIT_FILE, [f"{BUNDLER_DIR}/{name}" for name in test_names])
    return write_bundle(out_dir / "bundle" / "bundle.out", cameras, scene.points, scene.point_colors, views)


def generate_scene(out_dir: str | Path, config: SyntheticSceneConfig | None = None, *,
                   overwrite: bool = False, progress: bool = False) -> dict:
    """Render the scene's sequences and write them in the requested formats.

    Args:
        out_dir: scene folder (created; must be empty unless ``overwrite``).
        config: scene settings; default :class:`SyntheticSceneConfig()` (the demo's size).
        overwrite: replace a previously generated scene in ``out_dir``.
        progress: show a tqdm progress bar on stderr.

    Returns:
        Summary dict (also written to ``scene.yaml``): root, seed, width, height,
        intrinsics, frames per split, sequences per split, points, measurements,
        formats, seconds.
    """
    config = config or SyntheticSceneConfig()
    out_dir = Path(out_dir)
    start = time.perf_counter()
    _prepare_output(out_dir, overwrite)
    scene = SyntheticScene(config)
    sequences = scene_trajectories(config, scene.layout)
    write_7scenes = "7scenes" in config.formats
    distorted = DistortedCamera(config, *BUNDLER_DISTORTION) if "bundler" in config.formats else None
    frames = {"train": [], "test": []}
    observations = []
    total = sum(len(seq["poses"]) for seq in sequences.values())
    with tqdm(total=total, desc="synth-scene", unit="frame", disable=not progress, file=sys.stderr) as bar:
        for folder, seq in sequences.items():
            (out_dir / folder).mkdir()
            for i, T in enumerate(seq["poses"]):
                rgb, depth = scene.render(T)
                stem = out_dir / folder / f"frame-{i:06d}"
                cv2.imwrite(f"{stem}.color.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
                if write_7scenes:
                    T_depth = config.depth_camera_pose(T)
                    sensed = depth if T_depth is T else scene.cast(T_depth, config.K_depth, config.width, config.height)[0]
                    _write_depth(Path(f"{stem}.depth.png"), sensed, config.depth_range_m)
                    write_pose(Path(f"{stem}.pose.txt"), T_depth)
                if distorted is not None:
                    (out_dir / BUNDLER_DIR / folder).mkdir(parents=True, exist_ok=True)
                    copy = out_dir / BUNDLER_DIR / folder / f"frame-{i:06d}.color.png"
                    cv2.imwrite(str(copy), cv2.cvtColor(distorted.render(scene, T), cv2.COLOR_RGB2BGR))
                frames[seq["split"]].append((f"{folder}/frame-{i:06d}.color.png", T))
                observations.append(scene.visible_points(T, depth))
                bar.update()

    numbers = {split: [int(f[4:]) for f, s in sequences.items() if s["split"] == split] for split in ("train", "test")}
    K = config.K
    if write_7scenes:
        for split, name in SPLIT_FILES.items():
            (out_dir / name).write_text("".join(f"sequence{n}\n" for n in numbers[split]))
    if write_7scenes and config.rig == "registered":
        (out_dir / INTRINSICS_FILE).write_text(
            f"{K[0, 0]:.9f} {K[1, 1]:.9f} {K[0, 2]:.9f} {K[1, 2]:.9f} {config.width} {config.height}\n")
    measurements = 0
    if "cambridge" in config.formats:
        for split in ("train", "test"):
            _write_cambridge_list(out_dir / f"dataset_{split}.txt", frames[split])
        measurements = _write_nvm(out_dir / "reconstruction.nvm", scene, frames["train"] + frames["test"], observations)
        (out_dir / SIZE_FILE).write_text(f"{config.width} {config.height}\n")
    if distorted is not None:
        measurements = _write_bundler(out_dir, scene, distorted, frames["train"] + frames["test"], observations,
                                      [name for name, _ in frames["test"]])

    summary = {
        "root": str(out_dir),
        "seed": config.seed,
        "width": config.width,
        "height": config.height,
        "intrinsics": {"fx": float(K[0, 0]), "fy": float(K[1, 1]), "cx": float(K[0, 2]), "cy": float(K[1, 2])},
        "frames": {split: len(frames[split]) for split in frames},
        "sequences": {split: [sequence_folder(n) for n in numbers[split]] for split in numbers},
        "points": int(len(scene.points)),
        "measurements": int(measurements),
        "mean_visible_points": float(np.mean([len(ids) for ids, _ in observations])),
        "formats": list(config.formats),
        "rig": config.rig,
        "world_frame": "z-up; camera poses camera-to-world, optical frame",
        "seconds": round(time.perf_counter() - start, 3),
        "config": config.to_dict(),
    }
    # Written last: its presence marks a complete scene.
    (out_dir / "scene.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = SyntheticSceneConfig()
    p = argparse.ArgumentParser(
        prog="posenet-synth-scene",
        description="Render a synthetic textured room along robot trajectories and write it "
        "in the 7-Scenes and Cambridge Landmarks layouts (add bundler to --formats for a Bundler "
        "reconstruction with radially distorted copies of the frames).",
    )
    p.add_argument("--out", required=True, type=Path, help="scene folder to create")
    p.add_argument("--frames-train", type=int, default=d.frames_train, help="training frames (all train sequences)")
    p.add_argument("--frames-test", type=int, default=d.frames_test, help="test frames (all test sequences)")
    p.add_argument("--train-sequences", type=int, default=d.train_sequences)
    p.add_argument("--test-sequences", type=int, default=d.test_sequences)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--fov", type=float, default=d.fov_deg, help="horizontal field of view, degrees")
    p.add_argument("--points", type=int, default=d.num_points, help="sparse 3D points in the reconstruction")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(d.formats))
    p.add_argument("--rig", choices=RIGS, default=d.rig,
                   help="kinect: unregistered Kinect v1 depth and depth-sensor poses, as the official 7-Scenes (with --formats 7scenes)")
    p.add_argument("--depth-range", type=float, default=d.depth_range_m,
                   help="metres beyond which depth is written invalid (65535); 0: unlimited")
    p.add_argument("--overwrite", action="store_true", help="replace an existing scene in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """``synth-scene`` entry point; returns the exit code (2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = SyntheticSceneConfig(
            seed=args.seed, width=args.width, height=args.height, fov_deg=args.fov,
            frames_train=args.frames_train, frames_test=args.frames_test,
            train_sequences=args.train_sequences, test_sequences=args.test_sequences,
            num_points=args.points, formats=tuple(args.formats), rig=args.rig, depth_range_m=args.depth_range,
        )
        summary = generate_scene(args.out, config, overwrite=args.overwrite, progress=not args.quiet)
    except (ValueError, FileExistsError, OSError) as err:
        print(f"synth-scene: error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {summary['frames']['train']} train + {summary['frames']['test']} test frames "
        f"({summary['width']}x{summary['height']}, {summary['points']} points) to {summary['root']} "
        f"in {summary['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
