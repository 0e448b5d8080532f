"""Relocalizer: checkpoint -> (RGB image -> camera pose + covariance). ROS-free.

Shared by the node, the bag tool, evaluation and export, so they all preprocess and
predict identically. The geometric step (resize + centre crop, OpenCV, exactly as
in training) runs on the CPU; the rest (uint8 -> normalised float, network,
quaternion normalisation) runs in the selected backend, see :mod:`ros2_posenet.backends`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .backends import BACKENDS, PRECISIONS, BackendUnavailableError, create_backend  # noqa: F401 (re-exported)
from .checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from .covariance import covariance_matrix
from .geometry import quat_canonical
from .preprocess import Preprocessor

log = logging.getLogger(__name__)


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


def finite_rows(position: np.ndarray, quaternion: np.ndarray) -> np.ndarray:
    """Bool (B,): which predictions are entirely finite."""
    return np.all(np.isfinite(position), axis=1) & np.all(np.isfinite(quaternion), axis=1)


class Relocalizer:
    """Load a checkpoint once, then predict poses from HxWx3 uint8 RGB images.

    ``backend``: ``torch`` (eager, or ``compile=True`` / a ``torch.compile`` mode),
    ``onnxruntime`` (CPU or CUDA provider), ``tensorrt`` (onnxruntime's TensorRT
    provider or torch-tensorrt) or ``auto``. ``precision``: ``fp32`` or ``fp16``
    (CUDA only; falls back to fp32 with a warning on CPU). ``half=True`` is the
    older spelling of ``precision='fp16'``. ``cuda_graph``: the torch backend on CUDA
    replays a captured CUDA graph for single images (no effect elsewhere). An
    explicitly requested backend that cannot run here raises :class:`BackendUnavailableError`.
    """

    def __init__(
        self,
        checkpoint_path: str,
        device: str = "auto",
        half: bool = False,
        *,
        backend: str = "torch",
        precision: str | None = None,
        compile: bool | str = False,
        cuda_graph: bool = True,
        warmup: bool = True,
    ):
        self.device = resolve_device(device)
        self.checkpoint = load_checkpoint(checkpoint_path, map_location="cpu")
        preprocess = preprocess_from_checkpoint(self.checkpoint)
        self.preprocessor = Preprocessor(preprocess)
        self.covariance = covariance_matrix(self.checkpoint.get("covariance"))
        self.map_frame = self.checkpoint.get("map_frame", "map")
        precision = precision or ("fp16" if half else "fp32")
        self.model = model_from_checkpoint(self.checkpoint, self.device if backend in ("torch", "auto") else "cpu")
        self.backend = create_backend(
            self.model, preprocess, backend, self.device, precision, compile,
            device_explicit=device != "auto", onnx_metadata=export_metadata(self.checkpoint), cuda_graph=cuda_graph,
        )
        self.device = self.backend.device
        self.half = self.backend.precision == "fp16"
        if warmup:
            self.warmup()

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def crop_size(self) -> int:
        return self.preprocessor.config.crop

    def warmup(self, iterations: int = 3) -> None:
        """Run a few dummy crops so compilation/engine building/cuDNN tuning happen now, not on frame 1."""
        crop = np.zeros((1, self.crop_size, self.crop_size, 3), np.uint8)
        for _ in range(iterations):
            self.backend.infer(crop)

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The geometric preprocessing: HxWx3 uint8 RGB -> (crop, crop, 3) uint8 (resize + centre crop)."""
        return self.preprocessor.geometric(image)[0]

    def forward_crops(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Backend call on uint8 crops (B, crop, crop, 3) -> float64 positions (B, 3), quaternions (B, 4) wxyz.

        Rows may be non-finite; :meth:`predict` checks, batch callers use :func:`finite_rows`.
        """
        position, quaternion = self.backend.infer(crops)
        return np.asarray(position, dtype=float), np.asarray(quaternion, dtype=float)

    def prediction(self, position: np.ndarray, quaternion: np.ndarray) -> PosePrediction:
        """Wrap one finite (3,), (4,) result with the calibrated covariance."""
        return PosePrediction(position=position.copy(), quaternion=quaternion.copy(), covariance=self.covariance.copy())

    def predict(self, image: np.ndarray) -> PosePrediction:
        """Pose of the camera that took ``image`` (HxWx3 uint8 RGB)."""
        t, q = self.forward_crops(self.crop(image)[None])
        if not finite_rows(t, q)[0]:
            raise NonFiniteOutputError("network output is not finite")
        return self.prediction(t[0], q[0])

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[PosePrediction | None]:
        """Poses of several images in one backend call; ``None`` where the output is not finite."""
        t, q = self.forward_crops(np.stack([self.crop(image) for image in images]))
        ok = finite_rows(t, q)
        return [self.prediction(t[i], q[i]) if ok[i] else None for i in range(len(images))]

    # ---- torch-only helpers on normalised float batches (evaluation, tests)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """Preprocess one RGB uint8 image into a normalised (1, 3, crop, crop) float tensor on the device."""
        cropped = self.crop(image)
        if self.device.type == "cuda":
            # Upload uint8 (4x fewer bytes than float) and normalise on the GPU.
            cropped = torch.from_numpy(cropped).to(self.device, non_blocking=True)
        return self.preprocessor.normalize(cropped).unsqueeze(0)

    @torch.inference_mode()
    def forward_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw model call on a normalised batch (B, 3, crop, crop); returns float32 (t, q).

        Only the torch backend takes float input; the exported graphs take uint8 crops
        (use :meth:`forward_crops`).
        """
        if self.backend.name != "torch":
            raise BackendUnavailableError(
                f"forward_batch needs backend 'torch' (this Relocalizer uses {self.backend.name!r}); use forward_crops"
            )
        batch = batch.to(self.device, non_blocking=True)
        if self.half:
            batch = batch.half()
        t, q = self.model(batch)
        return t.float(), quat_canonical(q.float())


def export_metadata(checkpoint: dict) -> dict[str, str]:
    """What a deployed graph needs besides its weights (stored as ONNX metadata / TorchScript extra file)."""
    return {
        "ros2_posenet.format": "ros2_posenet.exported_model",
        "input": "image: uint8 (B, crop, crop, 3) RGB NHWC, after resize shorter side + centre crop",
        "outputs": "position: float32 (B, 3) metres; orientation: float32 (B, 4) quaternion w,x,y,z, w>=0",
        "pose_convention": checkpoint.get("pose_convention", ""),
        "preprocess": json.dumps(checkpoint["preprocess"]),
        "model_config": json.dumps(checkpoint["model_config"]),
        "map_frame": checkpoint.get("map_frame", "map"),
        "covariance": json.dumps(checkpoint.get("covariance")),
        "git_revision": str(checkpoint.get("git_revision", "unknown")),
    }
