"""Guided matching: query features against map points projected by a pose, within a pixel window.

A pose says where each map point must appear; a query feature is then compared only with
the projections within ``window`` pixels of it. The pairs inside the window come from a
uniform grid of ``window``-sized cells (each feature looks in its own and the 8 neighbouring
cells), so the work grows with the candidate pairs (tens per feature), not with features ×
projections (2,000 × 8,000 = 16 M entries for a dense matrix).
"""
from __future__ import annotations

import numpy as np

from .features import FeatureConfig, check_descriptors, ratio_in_distance_units

_NEIGHBOUR_CELLS = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]


def pairs_within(points_a: np.ndarray, points_b: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` with ``|a_i - b_j|² <= radius²`` (float32), in no particular order.

    Args:
        points_a, points_b: (Na, 2), (Nb, 2) pixel coordinates (finite).
        radius: > 0, pixels.
    """
    a, b = np.asarray(points_a, np.float32).reshape(-1, 2), np.asarray(points_b, np.float32).reshape(-1, 2)
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    empty = np.zeros(0, np.int64)
    if len(a) == 0 or len(b) == 0:
        return empty, empty
    origin = np.minimum(a.min(0), b.min(0))
    cell_a = np.floor((a - origin) / radius).astype(np.int64) + 1  # +1: a neighbour cell of column 0 is still >= 0
    cell_b = np.floor((b - origin) / radius).astype(np.int64) + 1
    rows = int(max(cell_a[:, 1].max(), cell_b[:, 1].max())) + 2
    key_b = cell_b[:, 0] * rows + cell_b[:, 1]
    order = np.argsort(key_b, kind="stable")
    sorted_keys = key_b[order]
    found_a, found_b = [], []
    for dx, dy in _NEIGHBOUR_CELLS:
        key = (cell_a[:, 0] + dx) * rows + (cell_a[:, 1] + dy)
        lo, hi = np.searchsorted(sorted_keys, key, "left"), np.searchsorted(sorted_keys, key, "right")
        counts = hi - lo
        total = int(counts.sum())
        if not total:
            continue
        ia = np.repeat(np.arange(len(a)), counts)
        offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        found_a.append(ia)
        found_b.append(order[np.repeat(lo, counts) + offsets])
    if not found_a:
        return empty, empty
    ia, ib = np.concatenate(found_a), np.concatenate(found_b)
    offset = a[ia] - b[ib]
    keep = np.einsum("ij,ij->i", offset, offset) <= np.float32(radius) ** 2
    return ia[keep], ib[keep]


def pair_distances(desc_a: np.ndarray, desc_b: np.ndarray, ia: np.ndarray, ib: np.ndarray,
                   config: FeatureConfig) -> np.ndarray:
    """(P,) float32 distances of the pairs ``(ia, ib)``: squared L2 for SIFT, Hamming for ORB
    (the units of :func:`~.features.descriptor_distances`)."""
    a, b = check_descriptors(desc_a, config), check_descriptors(desc_b, config)
    if config.type == "sift":
        difference = a[ia].astype(np.float32) - b[ib]
        return np.einsum("ij,ij->i", difference, difference)
    return np.bitwise_count(a[ia] ^ b[ib]).sum(1).astype(np.float32)


def ratio_and_mutual(ia: np.ndarray, ib: np.ndarray, distances: np.ndarray, ratio: float, mutual: bool) -> np.ndarray:
    """Pairs ``(M, 2)`` of candidate lists ``(ia, ib, distances)`` (any order, no pair twice) passing the ratio
    test (nearest < ratio × second nearest among ``i``'s candidates; one candidate passes) and, with
    ``mutual``, the mutual check (``i`` is ``j``'s nearest among its candidates). Ties go to the lower index,
    as :func:`~.features.match_from_distances` on the dense matrix with the other entries ``inf``."""
    if len(ia) == 0:
        return np.zeros((0, 2), np.int64)
    by_row = np.lexsort((ib, distances, ia))  # per i: nearest first, ties by j
    first = np.r_[True, ia[by_row][1:] != ia[by_row][:-1]]
    best = by_row[first]  # one per i with candidates, in order of i
    second = np.full(len(best), np.inf, np.float32)
    has_second = np.r_[~first[1:], False][first]  # the entry after a row's first belongs to the same row
    second[has_second] = distances[by_row[np.flatnonzero(first)[has_second] + 1]]
    keep = distances[best] < ratio * second
    if mutual:
        by_col = np.lexsort((ia, distances, ib))
        col_first = by_col[np.r_[True, ib[by_col][1:] != ib[by_col][:-1]]]
        winner = np.full(int(ib.max()) + 1, -1, np.int64)
        winner[ib[col_first]] = ia[col_first]
        keep &= winner[ib[best]] == ia[best]
    best = best[keep]
    return np.column_stack((ia[best], ib[best])).astype(np.int64)


def guided_matches(keypoints: np.ndarray, descriptors: np.ndarray, projections: np.ndarray, map_descriptors: np.ndarray,
                   window_px: float, config: FeatureConfig, ratio: float) -> np.ndarray:
    """Pairs ``(M, 2)`` (query feature, projected map point): nearest in appearance among the projections within
    ``window_px`` of the feature, passing the ratio test (``ratio``, as ``FeatureConfig.ratio``) and the mutual check.

    The same pairs as :func:`~.features.match_from_distances` on the dense distance matrix with every pair
    outside the window set to ``inf`` (:func:`guided_matches_dense`), from the pairs inside it only.
    """
    ia, ib = pairs_within(keypoints, projections, window_px)
    distances = pair_distances(descriptors, map_descriptors, ia, ib, config)
    return ratio_and_mutual(ia, ib, distances, ratio_in_distance_units(ratio, config), True)


def guided_matches_dense(keypoints, descriptors, projections, map_descriptors, window_px: float, config: FeatureConfig,
                         ratio: float) -> np.ndarray:
    """The reference of :func:`guided_matches`: a features × projections matrix (for tests and benchmarks)."""
    from .features import descriptor_distances, match_from_distances

    kp, uv = np.asarray(keypoints, np.float32), np.asarray(projections, np.float32)
    if len(kp) == 0 or len(uv) == 0:
        return np.zeros((0, 2), np.int64)
    near = ((kp[:, None, :] - uv[None]) ** 2).sum(-1) <= np.float32(window_px) ** 2
    distances, _ = descriptor_distances(descriptors, map_descriptors, config)
    return match_from_distances(np.where(near, distances, np.inf).astype(np.float32), ratio_in_distance_units(ratio, config), True)
