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

from typing import Literal

import cv2
import numpy as np
from pydantic import ConfigDict, Field, field_validator

from ..geometry import resized_pixel_coords
from .settings import GeometricSettings

FEATURE_TYPES = ("sift", "orb")
DESCRIPTOR_SIZES = {"sift": 128, "orb": 32}


class FeatureConfig(GeometricSettings):
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

    model_config = ConfigDict(title="feature config")  # the prefix of from_dict's errors

    type: Literal[FEATURE_TYPES] = "sift"
    max_features: int = Field(1000, ge=8)
    ratio: float = Field(0.8, gt=0, le=1)
    mutual: bool = True
    contrast_threshold: float = Field(0.02, gt=0, lt=1)
    orb_fast_threshold: int = Field(12, ge=1, le=255)
    orb_levels: int = Field(8, ge=1, le=16)
    max_image_size: int = 0

    @field_validator("max_image_size")
    @classmethod
    def _off_or_large_enough(cls, size: int) -> int:
        if size != 0 and size < 32:
            raise ValueError(f"must be 0 (off) or >= 32, got {size}")
        return size

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


def check_descriptors(descriptors: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """``descriptors`` as an array, or ValueError when they are not ``(N, config.descriptor_size)``."""
    descriptors = np.asarray(descriptors)
    if descriptors.ndim != 2 or descriptors.shape[1] != config.descriptor_size:
        raise ValueError(
            f"{config.type} descriptors must be (N, {config.descriptor_size}), got shape {descriptors.shape}"
        )
    return descriptors


def _as_matchable(descriptors: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """float32 for SIFT's L2 products; uint8 bytes for ORB's bits."""
    descriptors = check_descriptors(descriptors, config)
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
    ratio = ratio_in_distance_units(config.ratio, config)
    if config.type == "sift":
        # Squared L2 |a|² − 2a·b + |b|² as one BLAS product of descriptors extended by their norms and ones:
        # no pass over the (Na, Nb) result to add the norms (1.9 -> 1.5 ms a pair of ~870 SIFT features on
        # 2 cores). Exact: every term is an integer far below float32's 2^24.
        a_norms, b_norms = np.einsum("ij,ij->i", a, a)[:, None], np.einsum("ij,ij->i", b, b)[:, None]
        extended_a = np.hstack((a, np.ones_like(a_norms), a_norms))
        extended_b = np.hstack((-2.0 * b, b_norms, np.ones_like(b_norms)))
        d2 = extended_a @ extended_b.T
        return np.maximum(d2, 0.0, out=d2), ratio
    # Hamming distance from one product of ±1 bit vectors: d = (bits - a±·b±) / 2.
    sa, sb = _signed_bits(a), _signed_bits(b)
    return (sa.shape[1] - sa @ sb.T) * 0.5, ratio


def ratio_in_distance_units(ratio: float, config: FeatureConfig) -> float:
    """A ratio-test threshold in the units of this module's distances: squared for SIFT's squared L2."""
    return float(ratio) ** 2 if config.type == "sift" else float(ratio)


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


def query_feature_config(map_config: FeatureConfig, max_image_size: int = 0) -> FeatureConfig:
    """The features of a query against a map detected with ``map_config``: the same, its image shrunk to at most
    ``max_image_size`` pixels on the longer side before detection (0: as the map's; the smaller cap wins).

    SIFT is scale-invariant, so a query detected on a smaller image still matches the map's features; it costs
    about the pixel count (bench/RESULTS.md, issue 24 item 8).
    """
    caps = [size for size in (map_config.max_image_size, max_image_size) if size]
    if not caps or min(caps) == map_config.max_image_size:
        return map_config
    return map_config.replace(max_image_size=min(caps))
