"""Reference predictors that put a pose regressor's errors into context.

* :class:`MeanPoseBaseline` always answers the training set's mean pose: a regressor
  that does not beat it has learned nothing about the image.
* :class:`NearestNeighbourBaseline` answers the pose of the most similar training
  image under a simple global descriptor (:func:`ros2_posenet.geometric.retrieval.tiny_image_descriptor`). Absolute
  pose regressors are known to perform close to image retrieval (Sattler et al.,
  "Understanding the limitations of CNN-based absolute camera pose regression",
  CVPR 2019), so this is the figure a model should be compared with.

Both work on tensors: positions (N, 3), quaternions (N, 4) w,x,y,z and
descriptors (N, D).
"""
from __future__ import annotations

import torch

from .geometry import quat_canonical, quat_normalize


def average_quaternion(q: torch.Tensor) -> torch.Tensor:
    """Rotation average (4,) of quaternions (N, 4), sign-invariant.

    The eigenvector of the largest eigenvalue of ``Σ q qᵀ`` (Markley et al. 2007):
    unlike averaging components it ignores the q / -q ambiguity and stays unit.
    """
    if q.ndim != 2 or q.shape[-1] != 4 or q.shape[0] == 0:
        raise ValueError(f"need quaternions of shape (N>0, 4), got {tuple(q.shape)}")
    qn = quat_normalize(q.double())
    _, vectors = torch.linalg.eigh(qn.T @ qn)  # eigenvalues ascending
    return quat_canonical(vectors[:, -1]).to(q.dtype)


class MeanPoseBaseline:
    """Predicts the training set's mean position and average rotation for every image."""

    def __init__(self, train_t: torch.Tensor, train_q: torch.Tensor):
        if train_t.ndim != 2 or train_t.shape[-1] != 3 or train_t.shape[0] == 0:
            raise ValueError(f"need positions of shape (N>0, 3), got {tuple(train_t.shape)}")
        self.position = train_t.double().mean(0).to(train_t.dtype)
        self.rotation = average_quaternion(train_q)

    def predict(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Poses for ``n`` query images: ``(t (n, 3), q (n, 4))``."""
        return self.position.expand(n, 3).clone(), self.rotation.expand(n, 4).clone()


class NearestNeighbourBaseline:
    """Image retrieval: the pose of the training image with the most similar descriptor."""

    def __init__(self, train_descriptors: torch.Tensor, train_t: torch.Tensor, train_q: torch.Tensor):
        if train_descriptors.ndim != 2 or train_descriptors.shape[0] != train_t.shape[0] or train_t.shape[0] == 0:
            raise ValueError(
                f"need (N>0, D) descriptors with one pose each, got {tuple(train_descriptors.shape)} "
                f"descriptors and {tuple(train_t.shape)} positions"
            )
        self.descriptors = train_descriptors.float()
        self.positions = train_t
        self.rotations = train_q

    def neighbours(self, query_descriptors: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Index (M,) of the best-matching training image for each query descriptor (M, D)."""
        if query_descriptors.shape[-1] != self.descriptors.shape[-1]:
            raise ValueError(
                f"query descriptors have {query_descriptors.shape[-1]} dims, training ones {self.descriptors.shape[-1]}"
            )
        # Chunked so large query sets never build a huge similarity matrix at once.
        best = [
            (block.float() @ self.descriptors.T).argmax(-1)
            for block in query_descriptors.split(chunk)
        ]
        return torch.cat(best) if best else torch.zeros(0, dtype=torch.long)

    def predict(self, query_descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieved poses ``(t (M, 3), q (M, 4))``."""
        idx = self.neighbours(query_descriptors)
        return self.positions[idx], self.rotations[idx]
