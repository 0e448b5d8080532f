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
from .checkpoint import CHECKPOINT_PARAMETER, load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from .covariance import UNCERTAINTY_METHODS, covariance_matrix, scale_covariance, unit_covariances, with_floor
from .geometry import quat_canonical
from .preprocess import Preprocessor, geometric_recipe

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
    ``checkpoint_setting``: how the caller's user sets the path (e.g. ``"--checkpoint"``), for the
    missing-checkpoint advice.

    ``uncertainty``: how the per-frame covariance of :class:`PosePrediction` is made —
    ``fixed`` (one calibrated matrix), ``mc_dropout`` (``mc_samples`` dropout passes of the head
    after one backbone pass) or ``variance_head``; ``None``: the checkpoint's choice (``fixed``
    for checkpoints without per-frame calibration). The per-frame methods run the eager torch
    model (the exported ONNX/TensorRT graphs have neither dropout nor the variance output):
    with another backend they fall back to ``fixed`` with a warning.
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
        checkpoint_setting: str = CHECKPOINT_PARAMETER,
        uncertainty: str | None = None,
        mc_samples: int | None = None,
    ):
        self.device = resolve_device(device)
        self.checkpoint = load_checkpoint(checkpoint_path, map_location="cpu", setting=checkpoint_setting)
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
        self.uncertainty, self.mc_samples, self._scales = self._uncertainty_settings(uncertainty, mc_samples)
        if warmup:
            self.warmup()

    def _uncertainty_settings(self, requested: str | None, mc_samples: int | None) -> tuple[str, int, tuple[float, float]]:
        """(method, MC samples, (position, rotation) scale) from the request and the checkpoint's calibration."""
        stored = (self.checkpoint.get("covariance") or {}).get("uncertainty") or {}
        method = requested or stored.get("method") or "fixed"
        if method not in UNCERTAINTY_METHODS:
            raise ValueError(f"uncertainty must be one of {', '.join(UNCERTAINTY_METHODS)}, got {method!r}")
        samples = int(mc_samples if mc_samples is not None else stored.get("mc_samples", 32))
        if samples < 2:
            raise ValueError(f"mc_samples must be >= 2, got {samples}")
        if method == "fixed":
            return method, samples, (1.0, 1.0)
        scales = stored.get("scales", {})
        if method not in scales:
            raise ValueError(
                f"the checkpoint has no calibration for uncertainty {method!r} (it offers: "
                f"{', '.join(['fixed', *scales])}); retrain with this ros2_posenet or use uncertainty 'fixed'"
            )
        if self.backend.name != "torch":
            log.warning("uncertainty %r needs the torch backend (the exported graph has no dropout and no variance "
                        "output); backend %s publishes the fixed calibrated covariance", method, self.backend.name)
            return "fixed", samples, (1.0, 1.0)
        return method, samples, tuple(float(v) for v in scales[method])

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

    def forward_crops_with_covariance(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`forward_crops`, plus each frame's calibrated covariance (B, 6, 6) float64."""
        if self.uncertainty == "fixed":
            t, q = self.forward_crops(crops)
            return t, q, np.repeat(self.covariance[None], len(t), axis=0)
        batch = torch.stack([self.preprocessor.normalize(crop) for crop in crops])
        t, q, cov = self.forward_batch_with_covariance(batch)
        return t.double().cpu().numpy(), q.double().cpu().numpy(), cov.cpu().numpy()

    @torch.inference_mode()
    def forward_batch_with_covariance(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward_batch` plus the per-frame covariance (B, 6, 6) float64 of ``self.uncertainty``."""
        if self.uncertainty == "fixed":
            t, q = self.forward_batch(batch)
            return t, q, torch.from_numpy(self.covariance).expand(len(t), 6, 6).clone()
        batch = batch.to(self.device, dtype=next(self.model.parameters()).dtype, non_blocking=True)
        outputs = self.model.uncertainty_outputs(batch, self.mc_samples if self.uncertainty == "mc_dropout" else 0)
        outputs = {k: v.float() for k, v in outputs.items()}
        cov = with_floor(scale_covariance(unit_covariances(outputs)[self.uncertainty], *self._scales))
        return outputs["t"], quat_canonical(outputs["q"]), cov

    def prediction(self, position: np.ndarray, quaternion: np.ndarray, covariance: np.ndarray | None = None) -> PosePrediction:
        """Wrap one finite (3,), (4,) result with its covariance (default: the fixed calibrated one)."""
        covariance = self.covariance if covariance is None else covariance
        return PosePrediction(position=position.copy(), quaternion=quaternion.copy(), covariance=np.array(covariance, dtype=float))

    def predict(self, image: np.ndarray) -> PosePrediction:
        """Pose of the camera that took ``image`` (HxWx3 uint8 RGB), with its covariance."""
        t, q, cov = self.forward_crops_with_covariance(self.crop(image)[None])
        if not (finite_rows(t, q)[0] and np.all(np.isfinite(cov[0]))):
            raise NonFiniteOutputError("network output is not finite")
        return self.prediction(t[0], q[0], cov[0])

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[PosePrediction | None]:
        """Poses of several images in one backend call; ``None`` where the output is not finite."""
        t, q, cov = self.forward_crops_with_covariance(np.stack([self.crop(image) for image in images]))
        ok = finite_rows(t, q) & np.all(np.isfinite(cov), axis=(1, 2))
        return [self.prediction(t[i], q[i], cov[i]) if ok[i] else None for i in range(len(images))]

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
        "input": "image: uint8 (B, crop, crop, 3) RGB NHWC, after resize shorter side + centre crop (see preprocessing)",
        "preprocessing": geometric_recipe(preprocess_from_checkpoint(checkpoint)),
        "resize_interpolation": "cv2.INTER_AREA when shrinking, cv2.INTER_LINEAR when enlarging",
        "outputs": "position: float32 (B, 3) metres; orientation: float32 (B, 4) quaternion w,x,y,z, w>=0",
        "pose_convention": checkpoint.get("pose_convention", ""),
        "preprocess": json.dumps(checkpoint["preprocess"]),
        "model_config": json.dumps(checkpoint["model_config"]),
        "map_frame": checkpoint.get("map_frame", "map"),
        "covariance": json.dumps(checkpoint.get("covariance")),
        "git_revision": str(checkpoint.get("git_revision", "unknown")),
    }
