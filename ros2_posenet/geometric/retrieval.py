"""Global image descriptors for retrieval: which keyframes look like a query.

Shared by the geometric stage (keyframe retrieval without a prior) and the
nearest-neighbour baseline (:mod:`ros2_posenet.baselines`).
"""
from __future__ import annotations

import cv2
import numpy as np

from ..preprocess import check_rgb_image

DESCRIPTOR_SIZE = 16  # pixels per side of the tiny image
# Vocabulary of the bag of visual words, and the descriptors its k-means sees (25 a word). On hololens-office's
# validation blocks 2000 words put a keyframe near the truth among the 20 best for 60 % of the queries against 55 %
# with 1024 (4096: 61 %, twice the learning time), and refined 3-4 % more frames from wide priors, none wrong; learning
# takes ~9 s on 2 cores at the map's first retrieval (bench/RESULTS.md, fourth real-data pass; bench_real.py --recall).
VOCABULARY_WORDS = 2000
VOCABULARY_SAMPLE = 50000


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


class VisualWords:
    """Bag of visual words of local features: tf-idf histograms over a vocabulary learned from a map's descriptors.

    Which keyframes share the most distinctive features with a query is a far better guide
    to where it was taken than how alike the two images look as a whole (the tiny image
    mistakes a different wall of the same colour for the right one). The vocabulary is
    k-means (k-means++ start, fixed seed: the same map gives the same words) on a sample of
    the map's own descriptors, so it needs no training data and no change to the map file.
    SIFT descriptors are clustered as they are; binary (ORB) ones bit by bit.

    Args:
        descriptors: per keyframe (N_i, D) uint8 local descriptors.
        binary: the descriptors are bit strings (ORB).
        words: vocabulary size (fewer when the map has fewer descriptors).
        sample: descriptors the k-means sees at most.
    """

    def __init__(self, descriptors: list[np.ndarray], binary: bool = False, words: int = VOCABULARY_WORDS,
                 sample: int = VOCABULARY_SAMPLE, seed: int = 0):
        self.binary = binary
        rows = [self._floats(d) for d in descriptors]
        every = np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)
        if len(every) < 2:
            raise ValueError("a vocabulary needs at least two descriptors")
        rng = np.random.default_rng(seed)
        picked = every[rng.choice(len(every), min(sample, len(every)), replace=False)]
        k = int(min(words, max(2, len(picked) // 25)))  # ~25 descriptors a word at least: small maps, small vocabularies
        cv2.setRNGSeed(seed)
        criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 8, 1e-3)
        _, _, centres = cv2.kmeans(picked, k, None, criteria, 1, cv2.KMEANS_PP_CENTERS)
        self.centres = centres.astype(np.float32)
        self._centre_norms = (self.centres**2).sum(1)
        counts = np.stack([self._histogram(r) for r in rows])
        documents = max(1, len(rows))
        self.idf = np.log(documents / (1.0 + (counts > 0).sum(0))).astype(np.float32) + 1.0
        self.vectors = np.stack([self._normalised(c) for c in counts])  # (M, words)

    def _floats(self, descriptors: np.ndarray) -> np.ndarray:
        d = np.asarray(descriptors, np.uint8)
        bits = np.unpackbits(d, axis=1) if self.binary else d
        return bits.astype(np.float32).reshape(len(d), bits.shape[-1])  # a keyframe without points has (0, D)

    def _histogram(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros(len(self.centres), np.float32)
        nearest = np.argmin(self._centre_norms[None] - 2.0 * rows @ self.centres.T, axis=1)
        return np.bincount(nearest, minlength=len(self.centres)).astype(np.float32)

    def _normalised(self, counts: np.ndarray) -> np.ndarray:
        weighted = counts * self.idf
        norm = float(np.linalg.norm(weighted))
        return weighted / norm if norm > 0 else weighted

    def similarities(self, descriptors: np.ndarray) -> np.ndarray:
        """(M,) cosine similarity of a query's local descriptors with each keyframe's."""
        return self.vectors @ self._normalised(self._histogram(self._floats(descriptors)))
