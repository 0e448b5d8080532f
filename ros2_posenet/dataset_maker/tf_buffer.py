"""Transforms over time, looked up at image stamps the way a dataset needs them (ROS-free).

A dataset's poses are labels: a frame whose pose would have to be extrapolated, or
interpolated across a long gap in the recorded transforms, is better dropped than
written wrong. :class:`PoseSeries` therefore interpolates (lerp + slerp, the project's
:func:`ros2_posenet.frames.interpolate_pose`) only between two samples that lie within
``tolerance`` of the stamp on *both* sides (an exact sample needs no neighbour).
:class:`TransformTree` is ``/tf`` + ``/tf_static`` as tf2 sees them: a tree of frames,
static edges constant, dynamic edges each a :class:`PoseSeries`. Stamps are integer
nanoseconds so interpolation weights are exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..frames import interpolate_pose
from ..geometry import invert_matrix

NANOSECONDS = 1_000_000_000


class TransformChainError(ValueError):
    """Two frames that no chain of recorded transforms connects (or a frame with two parents)."""


class PoseSeries:
    """Poses of one frame in another over time; samples may be added in any order."""

    def __init__(self):
        self._stamps: list[int] = []
        self._poses: list[np.ndarray] = []
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, stamp_ns: int, T: np.ndarray) -> None:
        self._stamps.append(int(stamp_ns))
        self._poses.append(np.asarray(T, dtype=float))
        self._sorted = None

    def __len__(self) -> int:
        return len(self._stamps)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._sorted is None:
            stamps = np.asarray(self._stamps, dtype=np.int64)
            order = np.argsort(stamps, kind="stable")
            self._sorted = stamps[order], np.stack(self._poses)[order] if self._poses else np.zeros((0, 4, 4))
        return self._sorted

    @property
    def span_ns(self) -> tuple[int, int] | None:
        stamps, _ = self._arrays()
        return (int(stamps[0]), int(stamps[-1])) if len(stamps) else None

    def at(self, stamp_ns: int, tolerance_ns: int) -> np.ndarray | None:
        """Pose at ``stamp_ns``; ``None`` unless samples within ``tolerance_ns`` lie on both sides (or one is exact)."""
        stamps, poses = self._arrays()
        i = int(np.searchsorted(stamps, stamp_ns, side="left"))
        if i < len(stamps) and stamps[i] == stamp_ns:
            return poses[i].copy()
        if i == 0 or i == len(stamps):
            return None
        before, after = int(stamps[i - 1]), int(stamps[i])
        if stamp_ns - before > tolerance_ns or after - stamp_ns > tolerance_ns:
            return None
        return interpolate_pose(poses[i - 1], poses[i], (stamp_ns - before) / (after - before))


@dataclass
class _Edge:
    parent: str
    static: np.ndarray | None = None  # T_parent_child of a /tf_static edge
    series: PoseSeries = field(default_factory=PoseSeries)


class TransformTree:
    """``/tf`` and ``/tf_static`` of a recording: ``lookup(target, source, stamp)`` = ``T_target_source``."""

    def __init__(self):
        self._edges: dict[str, _Edge] = {}

    def add(self, parent: str, child: str, stamp_ns: int, T_parent_child: np.ndarray, static: bool) -> None:
        parent, child = parent.lstrip("/"), child.lstrip("/")
        edge = self._edges.get(child)
        if edge is None:
            edge = self._edges[child] = _Edge(parent)
        elif edge.parent != parent:
            raise TransformChainError(f"frame '{child}' has two parents in the recording: '{edge.parent}' and '{parent}'")
        if static:
            edge.static = np.asarray(T_parent_child, dtype=float)
        else:
            edge.series.add(stamp_ns, T_parent_child)

    @property
    def frames(self) -> set[str]:
        return set(self._edges) | {edge.parent for edge in self._edges.values()}

    def _path_to_root(self, frame: str) -> list[str]:
        path = [frame]
        while path[-1] in self._edges:
            path.append(self._edges[path[-1]].parent)
            if len(path) > len(self._edges) + 1:
                raise TransformChainError(f"the transforms above frame '{frame}' form a loop")
        return path

    def chain(self, target: str, source: str) -> tuple[list[str], list[str]]:
        """Frames from ``source`` up to the common ancestor, and from ``target`` up to it; an error when unconnected."""
        target, source = target.lstrip("/"), source.lstrip("/")
        for frame in (target, source):
            if frame not in self.frames:
                known = ", ".join(sorted(self.frames)) or "none"
                raise TransformChainError(f"frame '{frame}' is in no transform of /tf or /tf_static (frames there: {known})")
        up_source, up_target = self._path_to_root(source), self._path_to_root(target)
        common = next((f for f in up_source if f in up_target), None)
        if common is None:
            raise TransformChainError(
                f"the TF chain never connects '{target}' and '{source}': their trees have roots "
                f"'{up_target[-1]}' and '{up_source[-1]}'"
            )
        return up_source[: up_source.index(common)], up_target[: up_target.index(common)]

    def lookup(self, target: str, source: str, stamp_ns: int, tolerance_ns: int) -> np.ndarray | None:
        """``T_target_source`` at the stamp; ``None`` when a dynamic edge of the chain has no sample close enough."""
        from_source, from_target = self.chain(target, source)
        T_common_source = self._compose(from_source, stamp_ns, tolerance_ns)
        T_common_target = self._compose(from_target, stamp_ns, tolerance_ns)
        if T_common_source is None or T_common_target is None:
            return None
        return invert_matrix(T_common_target) @ T_common_source

    def _compose(self, frames: list[str], stamp_ns: int, tolerance_ns: int) -> np.ndarray | None:
        """Pose of ``frames[0]`` in the parent of ``frames[-1]``."""
        T = np.eye(4)
        for frame in frames:
            edge = self._edges[frame]
            T_edge = edge.static if edge.static is not None else edge.series.at(stamp_ns, tolerance_ns)
            if T_edge is None:
                return None
            T = T_edge @ T
        return T

    def dynamic_edges(self, target: str, source: str) -> list[tuple[str, str, PoseSeries]]:
        """The ``/tf`` (non-static) edges of the chain, as (parent, child, series)."""
        from_source, from_target = self.chain(target, source)
        return [(self._edges[f].parent, f, self._edges[f].series) for f in from_source + from_target if self._edges[f].static is None]
