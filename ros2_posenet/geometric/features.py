"""Local image features for the geometric stage: detection and matching (OpenCV).

Two detectors, chosen by :class:`FeatureConfig.type`:

* ``sift`` (default): OpenCV SIFT, descriptors stored as uint8 (OpenCV's own 8-bit
  output: the float descriptor is already integer-valued in 0..255, so nothing is
  lost and the map is 4x smaller), matched by L2 distance.
* ``orb``: OpenCV ORB, 256-bit binary descriptors (32 uint8), matched by Hamming
  distance; detection is ~10x faster than SIFT, brute-force matching is not, and
  the poses are less precise (bench/RESULTS.md).

Both distances come from one matrix product per image pair (float L2 for SIFT,
±1 bit vectors for ORB's Hamming), as fast as OpenCV's brute-force matcher here.

Matching keeps a pair ``(i, j)`` when ``j`` is ``i``'s nearest neighbour and
passes Lowe's ratio test (nearest / second nearest distance < ``ratio``) and, with
``mutual``, when ``i`` is also ``j``'s nearest neighbour.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..geometry import resized_pixel_coords
from .settings import StrictDictSettings

FEATURE_TYPES = ("sift", "orb")
DESCRIPTOR_SIZES = {"sift": 128, "orb": 32}


@dataclass(frozen=True)
class FeatureConfig(StrictDictSettings):
    """How features are detected and matched; stored in every map.

    Attributes:
        type: ``sift`` or ``orb``.
        max_features: cap on features per image (the strongest are kept), which
            bounds map size and query time.
        ratio: Lowe's ratio test threshold (nearest / second nearest distance).
        mutual: keep only mutual nearest neighbours.
        contrast_threshold: SIFT contrast threshold (OpenCV's default is 0.04; lower
            finds more features in low-contrast indoor images).
        orb_fast_threshold: ORB's FAST corner threshold.
        orb_levels: ORB pyramid levels (scale factor 1.2).
        max_image_size: images whose longer side exceeds this many pixels are shrunk
            to it (area interpolation) before detection, keypoints scaled back
            (0: never). SIFT's cost grows with the pixel count: OpenCV doubles the
            image for its first octave.
    """

    SETTINGS_NAME = "feature config"  # prefix of the errors of from_dict (not a field)

    type: str = "sift"
    max_features: int = 1000
    ratio: float = 0.8
    mutual: bool = True
    contrast_threshold: float = 0.02
    orb_fast_threshold: int = 12
    orb_levels: int = 8
    max_image_size: int = 0

    def __post_init__(self):
        problems = []
        if self.type not in FEATURE_TYPES:
            problems.append(f"type must be one of {FEATURE_TYPES}, got {self.type!r}")
        if not isinstance(self.max_features, (int, np.integer)) or self.max_features < 8:
            problems.append(f"max_features must be an integer >= 8, got {self.max_features!r}")
        if not 0.0 < float(self.ratio) <= 1.0:
            problems.append(f"ratio must be in (0, 1], got {self.ratio!r}")
        if not 0.0 < float(self.contrast_threshold) < 1.0:
            problems.append(f"contrast_threshold must be in (0, 1), got {self.contrast_threshold!r}")
        if not 1 <= int(self.orb_fast_threshold) <= 255 or not 1 <= int(self.orb_levels) <= 16:
            problems.append("orb_fast_threshold must be in 1..255 and orb_levels in 1..16")
        if not isinstance(self.max_image_size, (int, np.integer)) or not (self.max_image_size == 0 or self.max_image_size >= 32):
            problems.append(f"max_image_size must be 0 (off) or an integer >= 32, got {self.max_image_size!r}")
        if problems:
            raise ValueError("feature config: " + "; ".join(problems))

    @property
    def descriptor_size(self) -> int:
        """Bytes per descriptor (both detectors store uint8)."""
        return DESCRIPTOR_SIZES[self.type]



def _detector(config: FeatureConfig):
    if config.type == "sift":
        # OpenCV's 8-bit SIFT descriptors; nOctaveLayers=3, edgeThreshold=10, sigma=1.6 as in Lowe's paper.
        return cv2.SIFT_create(config.max_features, 3, config.contrast_threshold, 10, 1.6, cv2.CV_8U)
    return cv2.ORB_create(
        nfeatures=config.max_features, scaleFactor=1.2, nlevels=config.orb_levels,
        fastThreshold=config.orb_fast_threshold, scoreType=cv2.ORB_HARRIS_SCORE,
    )


def to_gray(image: np.ndarray) -> np.ndarray:
    """HxW uint8 grey image from an HxWx3 RGB or HxW grey uint8 array (raises ValueError otherwise)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    raise ValueError(f"image must be HxWx3 RGB or HxW grey, got shape {image.shape}")


def detect_features(image: np.ndarray, config: FeatureConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints and descriptors of one image.

    Args:
        image: HxWx3 uint8 RGB or HxW uint8 grey.
        config: detector settings (default :class:`FeatureConfig()`).

    Returns:
        ``(keypoints (N, 2) float32 pixel coordinates (x right, y down, pixel centres
        at integers), descriptors (N, D) uint8)``, N <= ``config.max_features``,
        strongest first.
    """
    config = config or FeatureConfig()
    gray = to_gray(image)
    scale = None
    if config.max_image_size and max(gray.shape) > config.max_image_size:
        shrink = max(gray.shape) / config.max_image_size
        size = (max(1, round(gray.shape[1] / shrink)), max(1, round(gray.shape[0] / shrink)))
        scale = np.array([gray.shape[1] / size[0], gray.shape[0] / size[1]], np.float32)
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    keypoints, descriptors = _detector(config).detectAndCompute(gray, None)
    if descriptors is None or not keypoints:
        return np.zeros((0, 2), np.float32), np.zeros((0, config.descriptor_size), np.uint8)
    order = np.argsort([-kp.response for kp in keypoints], kind="stable")[: config.max_features]
    xy = np.array([keypoints[i].pt for i in order], dtype=np.float32).reshape(-1, 2)
    if scale is not None:  # back to full-size pixels, the project's one convention for scaled images
        xy = resized_pixel_coords(xy, scale).astype(np.float32)
    return xy, np.ascontiguousarray(descriptors[order], dtype=np.uint8)


def _as_matchable(descriptors: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """float32 for SIFT's L2 products; uint8 bytes for ORB's bits."""
    descriptors = np.asarray(descriptors)
    if descriptors.ndim != 2 or descriptors.shape[1] != config.descriptor_size:
        raise ValueError(
            f"{config.type} descriptors must be (N, {config.descriptor_size}), got shape {descriptors.shape}"
        )
    dtype = np.float32 if config.type == "sift" else np.uint8
    return np.ascontiguousarray(descriptors, dtype=dtype)


def match_features(desc_a: np.ndarray, desc_b: np.ndarray, config: FeatureConfig | None = None) -> np.ndarray:
    """Index pairs ``(M, 2)`` int64 ``(i in a, j in b)`` passing the ratio test (and mutual check).

    A feature of ``a`` whose two nearest neighbours in ``b`` are almost equally close
    is ambiguous (repeated texture) and dropped; so is every feature when ``b`` has
    fewer than two descriptors to compare with.
    """
    config = config or FeatureConfig()
    if len(desc_a) == 0 or len(desc_b) < 2:
        _as_matchable(desc_a, config), _as_matchable(desc_b, config)  # shapes are still checked
        return np.zeros((0, 2), np.int64)
    distances, ratio = descriptor_distances(desc_a, desc_b, config)
    return match_from_distances(distances, ratio, config.mutual)


def descriptor_distances(desc_a: np.ndarray, desc_b: np.ndarray, config: FeatureConfig | None = None) -> tuple[np.ndarray, float]:
    """(Na, Nb) float32 distances and ``config.ratio`` in their units (squared L2 for SIFT, Hamming for ORB)."""
    config = config or FeatureConfig()
    a, b = _as_matchable(desc_a, config), _as_matchable(desc_b, config)
    if config.type == "sift":
        # Squared L2 from one BLAS product; the ratio test compares squared distances.
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        return np.maximum(d2, 0.0), config.ratio**2
    # Hamming distance from one product of ±1 bit vectors: d = (bits - a±·b±) / 2.
    sa, sb = _signed_bits(a), _signed_bits(b)
    return (sa.shape[1] - sa @ sb.T) * 0.5, config.ratio


def _signed_bits(descriptors: np.ndarray) -> np.ndarray:
    """(N, 8·bytes) float32 of ±1 per descriptor bit."""
    return np.unpackbits(descriptors, axis=1).astype(np.float32) * 2.0 - 1.0


def match_from_distances(distances: np.ndarray, ratio: float, mutual: bool) -> np.ndarray:
    """Ratio test (nearest < ratio × second nearest) + mutual check on an (Na, Nb) distance matrix (overwritten).

    ``inf`` marks pairs that may not match (e.g. outside a search window); a row with one
    finite candidate passes the ratio test.
    """
    d = np.asarray(distances, dtype=np.float32)
    rows = np.arange(len(d))
    back = d.argmin(0) if mutual else None
    best = d.argmin(1)
    nearest = d[rows, best]
    d[rows, best] = np.inf
    keep = nearest < ratio * d.min(1)
    if mutual:
        keep &= back[best] == rows
    return np.column_stack((rows[keep], best[keep])).astype(np.int64)
