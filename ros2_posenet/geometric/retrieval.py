"""Global image descriptors for retrieval: which keyframes look like a query.

Shared by the geometric stage (keyframe retrieval without a prior) and the
nearest-neighbour baseline (:mod:`ros2_posenet.baselines`).
"""
from __future__ import annotations

import cv2
import numpy as np

from ..preprocess import check_rgb_image

DESCRIPTOR_SIZE = 16  # pixels per side of the tiny image


def tiny_image_descriptor(image: np.ndarray, size: int = DESCRIPTOR_SIZE) -> np.ndarray:
    """Global descriptor (3·size²,) of an HxWx3 uint8 RGB image.

    The image is centre-cropped to a square, shrunk to ``size``×``size`` (area
    averaging), and each channel is made zero-mean; the vector is L2-normalised so
    the dot product of two descriptors is their normalised cross-correlation,
    which tolerates global brightness and contrast changes.
    """
    check_rgb_image(image)
    h, w = image.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    square = image[y0 : y0 + side, x0 : x0 + side]
    tiny = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    tiny -= tiny.reshape(-1, 3).mean(0)
    vector = tiny.reshape(-1)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 1e-6 else vector
