"""The one image preprocessing definition, shared by training, evaluation, the node and export.

As in PoseNet: resize so the shorter side is ``resize`` pixels, crop ``crop``×``crop``
(random while training, centre otherwise), scale to [0, 1] and normalise with the
ImageNet statistics. Every geometric step also updates the pinhole intrinsics so
the reprojection loss stays exact.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import torch

from .geometry import resized_intrinsics

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessConfig:
    """Stored in every checkpoint so inference reproduces training exactly."""

    resize: int = 256
    crop: int = 224
    mean: tuple = field(default=IMAGENET_MEAN)
    std: tuple = field(default=IMAGENET_STD)

    def __post_init__(self):
        if not (0 < self.crop <= self.resize):
            raise ValueError(f"need 0 < crop <= resize, got crop={self.crop}, resize={self.resize}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


def resized_shape(height: int, width: int, shorter: int) -> tuple[int, int, float]:
    """Output (h, w) and scale factor for resizing the shorter side to ``shorter``."""
    scale = shorter / min(height, width)
    return max(shorter, round(height * scale)), max(shorter, round(width * scale)), scale


def crop_origin(height: int, width: int, crop: int, rng: np.random.Generator | None = None) -> tuple[int, int]:
    """Top-left (y0, x0) of a crop: uniform random when ``rng`` is given, else centred."""
    if rng is None:
        return (height - crop) // 2, (width - crop) // 2
    return int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))


def adjust_intrinsics(K: np.ndarray, scale_x: float, scale_y: float, x0: float, y0: float) -> np.ndarray:
    """Intrinsics after scaling the image by (scale_x, scale_y) then cropping at (x0, y0).

    Pixel centres follow OpenCV's convention (:func:`~ros2_posenet.geometry.resized_pixel_coords`).
    """
    K2 = resized_intrinsics(K, scale_x, scale_y)
    K2[0, 2] -= x0
    K2[1, 2] -= y0
    return K2


def check_rgb_image(image: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``image`` is a non-empty HxWx3 uint8 array."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {getattr(image, 'shape', None)}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"image too small: {image.shape[1]}x{image.shape[0]}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")


def geometric_recipe(config: PreprocessConfig) -> str:
    """The exact resize + centre crop of :meth:`Preprocessor.geometric`, in words, for exported models.

    Other interpolations (bilinear, PIL, torchvision) move the predictions by up to
    decimetres and degrees, so deployed graphs carry this text in their metadata.
    """
    r, c = config.resize, config.crop
    return (
        f"RGB uint8 image H x W -> s = {r} / min(H, W); h = max({r}, round(H * s)), w = max({r}, round(W * s)) "
        "(round half to even, as Python's round); "
        "OpenCV cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if h < H else cv2.INTER_LINEAR); "
        f"centre crop y0 = (h - {c}) // 2, x0 = (w - {c}) // 2, crop = resized[y0:y0+{c}, x0:x0+{c}]; "
        f"feed uint8 NHWC (B, {c}, {c}, 3), RGB order"
    )


class Preprocessor:
    """Image (HxWx3 uint8 RGB) [+ intrinsics] -> normalised tensor (3, crop, crop) [+ intrinsics]."""

    def __init__(self, config: PreprocessConfig | None = None):
        self.config = config or PreprocessConfig()
        self._mean = torch.tensor(self.config.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.config.std, dtype=torch.float32).view(3, 1, 1)

    def resize(self, image: np.ndarray, K: np.ndarray | None = None):
        """Resize the shorter side to ``resize``; returns ``(resized_image, K_new or None)``."""
        check_rgb_image(image)
        h, w = image.shape[:2]
        nh, nw, _ = resized_shape(h, w, self.config.resize)
        resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if nh < h else cv2.INTER_LINEAR)
        return resized, None if K is None else adjust_intrinsics(K, nw / w, nh / h, 0.0, 0.0)

    def crop(self, image: np.ndarray, K: np.ndarray | None = None, rng: np.random.Generator | None = None):
        """Square ``crop`` of a resized image (random with ``rng``); returns ``(crop, K_new or None)``."""
        crop = self.config.crop
        y0, x0 = crop_origin(image.shape[0], image.shape[1], crop, rng)
        cropped = np.ascontiguousarray(image[y0 : y0 + crop, x0 : x0 + crop])
        return cropped, None if K is None else adjust_intrinsics(K, 1.0, 1.0, x0, y0)

    def geometric(self, image: np.ndarray, K: np.ndarray | None = None, rng: np.random.Generator | None = None):
        """Resize + crop a uint8 image; returns ``(cropped_image, K_new or None)``."""
        resized, K_resized = self.resize(image, K)
        return self.crop(resized, K_resized, rng)

    def normalize(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 HxWx3 (numpy or tensor) -> float (3, H, W) with ImageNet normalisation."""
        tensor = torch.as_tensor(image).permute(2, 0, 1).float().div_(255.0)
        return (tensor - self._mean.to(tensor.device)) / self._std.to(tensor.device)

    def __call__(self, image: np.ndarray, K: np.ndarray | None = None, rng: np.random.Generator | None = None):
        """Full pipeline; returns ``(tensor, K_new)`` (``K_new`` is None without ``K``)."""
        cropped, K_new = self.geometric(image, K, rng)
        return self.normalize(cropped), K_new
