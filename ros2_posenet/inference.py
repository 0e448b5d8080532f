"""Relocalizer: checkpoint -> (RGB image -> camera pose + covariance). ROS-free.

Shared by the node, the bag tool, evaluation and export, so they all preprocess and
predict identically.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from .covariance import covariance_matrix
from .geometry import quat_canonical
from .preprocess import Preprocessor


@dataclass
class PosePrediction:
    """Camera-to-world pose in the checkpoint's map frame (optical camera frame)."""

    position: np.ndarray  # (3,) metres
    quaternion: np.ndarray  # (4,) w, x, y, z, unit, w >= 0
    covariance: np.ndarray  # (6, 6) x y z roll pitch yaw


class NonFiniteOutputError(ValueError):
    """The network produced NaN/inf (corrupt weights, numeric blow-up, garbage input)."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(device)


class Relocalizer:
    """Load a checkpoint once, then predict poses from HxWx3 uint8 RGB images."""

    def __init__(self, checkpoint_path: str, device: str = "auto", half: bool = False):
        self.device = resolve_device(device)
        self.checkpoint = load_checkpoint(checkpoint_path, map_location="cpu")
        self.model = model_from_checkpoint(self.checkpoint, self.device)
        self.half = bool(half and self.device.type == "cuda")
        if self.half:
            self.model.half()
        self.preprocessor = Preprocessor(preprocess_from_checkpoint(self.checkpoint))
        self.covariance = covariance_matrix(self.checkpoint.get("covariance"))
        self.map_frame = self.checkpoint.get("map_frame", "map")

    @torch.inference_mode()
    def forward_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw model call on a preprocessed batch (B, 3, crop, crop); returns float32 (t, q)."""
        batch = batch.to(self.device, non_blocking=True)
        if self.half:
            batch = batch.half()
        t, q = self.model(batch)
        return t.float(), quat_canonical(q.float())

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """Preprocess one RGB uint8 image into a (1, 3, crop, crop) tensor."""
        cropped, _ = self.preprocessor.geometric(image)
        if self.device.type == "cuda":
            # Upload uint8 (4x fewer bytes than float) and normalise on the GPU.
            cropped = torch.from_numpy(cropped).to(self.device, non_blocking=True)
        return self.preprocessor.normalize(cropped).unsqueeze(0)

    def predict(self, image: np.ndarray) -> PosePrediction:
        """Pose of the camera that took ``image`` (HxWx3 uint8 RGB)."""
        t, q = self.forward_batch(self.prepare(image))
        t, q = t[0].cpu().numpy().astype(float), q[0].cpu().numpy().astype(float)
        if not (np.all(np.isfinite(t)) and np.all(np.isfinite(q))):
            raise NonFiniteOutputError("network output is not finite")
        return PosePrediction(position=t, quaternion=q, covariance=self.covariance.copy())
