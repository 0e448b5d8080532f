"""What ``make-dataset`` reads from plain images: a folder of image files or a video, and a calibration file.

Such input has no poses, so it goes to SfM (``--pose-source sfm``) with metric scale from
``--known-distance``. Each frame gets a stamp so that the bag route's selection and
time-block split apply unchanged:

* a folder: the image files sorted by name, ``1 / --fps`` seconds apart;
* a video: each frame's time in the file (OpenCV ``CAP_PROP_POS_MSEC``), else ``index / fps``.

The calibration comes from a ROS camera-calibration YAML (what ``camera_calibration`` and
``camera_info_manager`` write: ``image_width``, ``image_height``, ``camera_matrix``,
``distortion_model``, ``distortion_coefficients``), checked like a CameraInfo message, or from a
plain ``fx fy cx cy`` (no distortion). ROS-free.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import cv2
import numpy as np
import yaml

from ..bag_io import UsageError
from ..ros.camera_info import CameraInfoError, CameraIntrinsics, intrinsics_from_camera_info
from ..ros.image import ImageConversionError
from .tf_buffer import NANOSECONDS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Frame:
    stamp: int  # ns from the first frame
    load: Callable[[], np.ndarray]  # HxWx3 uint8 RGB; ImageConversionError when unreadable


class ImageInput:
    """Frames of an image folder or a video, all of one size (another size is an error: one camera per dataset)."""

    kind = ""

    def __init__(self, path: Path):
        self.path = path
        self.size: tuple[int, int] | None = None  # (width, height) of the first frame

    def frames(self) -> Iterator[Frame]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {self.kind: str(self.path.resolve())}

    def _checked(self, rgb: np.ndarray, name: str) -> np.ndarray:
        size = (rgb.shape[1], rgb.shape[0])
        if self.size is None:
            self.size = size
        elif size != self.size:
            raise UsageError(f"{name} is {size[0]}x{size[1]}, the first image {self.size[0]}x{self.size[1]}: "
                             "one dataset needs images of one camera at one size")
        return rgb


class ImageFolder(ImageInput):
    kind = "images"

    def __init__(self, path: Path, fps: float):
        super().__init__(path)
        if not path.is_dir():
            raise UsageError(f"--images {path} is not a folder")
        self.files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise UsageError(f"--images {path} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
        if not fps > 0:
            raise UsageError("--fps must be > 0")
        self.period_ns = round(NANOSECONDS / fps)
        self._checked(self._read(self.files[0]), self.files[0].name)

    def frames(self) -> Iterator[Frame]:
        for i, file in enumerate(self.files):
            yield Frame(i * self.period_ns, lambda file=file: self._checked(self._read(file), file.name))

    @staticmethod
    def _read(file: Path) -> np.ndarray:
        bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ImageConversionError(f"{file.name} cannot be read as an image", "corrupt_compressed")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def describe(self) -> dict:
        return {**super().describe(), "files": len(self.files), "stamps": f"file order, {NANOSECONDS / self.period_ns:g} frames/s (--fps)"}


class VideoFile(ImageInput):
    kind = "video"

    def __init__(self, path: Path):
        super().__init__(path)
        if not path.is_file():
            raise UsageError(f"--video {path} does not exist")
        capture = self._open()
        try:
            ok, bgr = capture.read()
            self.fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        finally:
            capture.release()
        if not ok or bgr is None:
            raise UsageError(f"--video {path}: OpenCV cannot read a frame from it (not a video, or a codec it lacks)")
        self._checked(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), "frame 0")
        self.stamps_from = "the frame times in the file"

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            capture.release()
            raise UsageError(f"--video {self.path}: OpenCV cannot open it as a video")
        return capture

    def frames(self) -> Iterator[Frame]:
        """Decoded in file order (a video can only be read forwards); frames whose time does not advance are dropped."""
        capture = self._open()
        try:
            last = None
            for index in itertools.count():
                ok, bgr = capture.read()
                if not ok:
                    return
                stamp = self._stamp(capture, index)
                if last is not None and stamp <= last:
                    continue
                last = stamp
                rgb = self._checked(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), f"frame {index}")
                yield Frame(stamp, lambda rgb=rgb: rgb)
        finally:
            capture.release()

    def _stamp(self, capture: cv2.VideoCapture, index: int) -> int:
        msec = capture.get(cv2.CAP_PROP_POS_MSEC)
        if index > 0 and msec <= 0 and self.fps > 0:  # a container without frame times
            self.stamps_from = f"frame index / {self.fps:g} frames/s"
            return round(index * NANOSECONDS / self.fps)
        return round(msec * 1e6)

    def describe(self) -> dict:
        return {**super().describe(), "fps": self.fps, "stamps": self.stamps_from}


def open_image_input(images: str | None, video: str | None, fps: float) -> ImageInput:
    return ImageFolder(Path(images), fps) if images else VideoFile(Path(video))


# ----------------------------------------------------------------------------- calibration


def read_calibration_yaml(path: str | Path) -> CameraIntrinsics:
    """A ROS camera-calibration YAML (``camera_calibration`` / ``camera_info_manager``) -> intrinsics."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise UsageError(f"--camera-info {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"--camera-info {path} is not YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--camera-info {path}: expected a camera calibration mapping (image_width, camera_matrix, ...)")
    try:
        info = SimpleNamespace(
            header=SimpleNamespace(frame_id=str(data.get("camera_name", path.name))),
            width=int(data["image_width"]), height=int(data["image_height"]),
            k=_matrix(data, "camera_matrix", 3, 3),
            d=_matrix(data, "distortion_coefficients", 1, None) if "distortion_coefficients" in data else np.zeros(0),
            distortion_model=str(data.get("distortion_model", "plumb_bob")))
        return intrinsics_from_camera_info(info)
    except KeyError as err:
        raise UsageError(f"--camera-info {path}: missing {err.args[0]}") from None
    except (CameraInfoError, TypeError, ValueError) as err:
        raise UsageError(f"--camera-info {path}: {err}") from None


def _matrix(data: dict, key: str, rows: int, cols: int | None) -> np.ndarray:
    """``{rows, cols, data}`` as camera_info_manager writes it, checked against the expected shape."""
    entry = data[key]
    if not isinstance(entry, dict) or "data" not in entry:
        raise ValueError(f"{key} must be a mapping with rows, cols and data")
    values = np.asarray(entry["data"], dtype=float).ravel()
    n_rows, n_cols = int(entry.get("rows", rows)), int(entry.get("cols", values.size // max(rows, 1)))
    if n_rows * n_cols != values.size or n_rows != rows or (cols is not None and n_cols != cols):
        raise ValueError(f"{key} has {values.size} values for rows {n_rows} x cols {n_cols}; expected {rows} x {cols or 'N'}")
    return values


def intrinsics_from_values(values: list[float], size: tuple[int, int]) -> CameraIntrinsics:
    """``--intrinsics FX FY CX CY`` for images of ``size`` (no distortion)."""
    fx, fy, cx, cy = (float(v) for v in values)
    if not all(np.isfinite([fx, fy, cx, cy])) or fx <= 0 or fy <= 0:
        raise UsageError(f"--intrinsics {fx:g} {fy:g} {cx:g} {cy:g}: focal lengths must be finite and > 0")
    return CameraIntrinsics(np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]), np.zeros(0), size[0], size[1])
