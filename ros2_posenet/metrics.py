"""Pose-error metrics and batched prediction, shared by training (validation) and evaluation.

Errors: position error is the Euclidean distance in metres; rotation error is the
geodesic angle ``2·acos|<q̂, q>|`` in degrees (never a difference of Euler angles).
Summaries give median and mean errors and the share of frames within (0.25 m, 2°),
(0.5 m, 5°) and (5 m, 10°).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .geometry import position_error, quat_canonical, rotation_error_deg

# (metres, degrees) pairs: the usual relocalisation accuracy bins (fine, medium, coarse).
THRESHOLDS = ((0.25, 2.0), (0.5, 5.0), (5.0, 10.0))
METHOD_MODEL = "posenet"
METHOD_MEAN = "mean pose"
METHOD_NN = "nearest neighbour"
METHOD_REFINED = "posenet + refinement"
METHOD_RETRIEVAL_REFINED = "retrieval + refinement"

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def pose_errors(pred_t: torch.Tensor, pred_q: torch.Tensor, true_t: torch.Tensor, true_q: torch.Tensor):
    """Per-frame errors: ``(position (N,) metres, rotation (N,) degrees)`` as float64 numpy."""
    pos = position_error(pred_t.double(), true_t.double())
    rot = rotation_error_deg(pred_q.double(), true_q.double())
    return pos.cpu().numpy(), rot.cpu().numpy()


def threshold_key(metres: float, degrees: float) -> str:
    """Name of a threshold bin in result dicts, e.g. ``within_0.25m_2deg``."""
    return f"within_{metres:g}m_{degrees:g}deg"


def summarize_errors(position_err: np.ndarray, rotation_err: np.ndarray, thresholds=THRESHOLDS) -> dict:
    """Median/mean errors and the share of frames inside each (m, °) bin.

    Args:
        position_err: (N,) metres. rotation_err: (N,) degrees.
    """
    position_err, rotation_err = np.asarray(position_err, float), np.asarray(rotation_err, float)
    if position_err.shape != rotation_err.shape or position_err.ndim != 1:
        raise ValueError(f"need two (N,) error arrays, got {position_err.shape} and {rotation_err.shape}")
    n = len(position_err)
    summary = {
        "frames": n,
        "median_position_m": float(np.median(position_err)) if n else float("nan"),
        "median_rotation_deg": float(np.median(rotation_err)) if n else float("nan"),
        "mean_position_m": float(np.mean(position_err)) if n else float("nan"),
        "mean_rotation_deg": float(np.mean(rotation_err)) if n else float("nan"),
    }
    for metres, degrees in thresholds:
        inside = (position_err <= metres) & (rotation_err <= degrees)
        summary[threshold_key(metres, degrees)] = float(inside.mean()) if n else float("nan")
    return summary


def dataset_poses(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth ``(t (N, 3), q (N, 4))`` of a dataset, read from its ``samples`` records.

    Reading the records avoids decoding every image just to get its pose.
    """
    base, indices = unwrap_subset(dataset)
    records = [base.samples[i] for i in indices]
    t = torch.tensor(np.array([record_field(r, "position") for r in records], dtype=np.float64), dtype=torch.float32)
    q = torch.tensor(np.array([record_field(r, "rotation") for r in records], dtype=np.float64), dtype=torch.float32)
    return t, quat_canonical(q)


def record_field(record, name: str):
    return record[name] if isinstance(record, dict) else getattr(record, name)


def unwrap_subset(dataset) -> tuple[Dataset, list[int]]:
    """The underlying dataset and the indices a (possibly nested) ``Subset`` selects."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, torch.utils.data.Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


@torch.inference_mode()
def predict_poses(
    forward: Forward,
    dataset: Dataset,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = False,
    desc: str = "predict",
) -> dict[str, torch.Tensor]:
    """Run ``forward`` over a (non-augmented) dataset.

    Args:
        forward: preprocessed images (B, 3, H, W) -> (t (B, 3), q (B, 4)); e.g. an eval-mode
            PoseNet or :meth:`Relocalizer.forward_batch`.

    Returns:
        CPU float32 tensors ``pred_t`` (N, 3), ``pred_q`` (N, 4), ``true_t``, ``true_q`` and
        ``index`` (N,) in dataset order.
    """
    from .data import collate_pose_batch

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_pose_batch)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("pred_t", "pred_q", "true_t", "true_q", "index")}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        t, q = forward(batch["image"])
        out["pred_t"].append(t.float().cpu())
        out["pred_q"].append(quat_canonical(q.float().cpu()))
        out["true_t"].append(batch["position"].float())
        out["true_q"].append(batch["rotation"].float())
        out["index"].append(torch.as_tensor(batch["index"]).long())
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}


def model_forward(model: torch.nn.Module, device: torch.device) -> Forward:
    """Wrap an eval-mode model as a :data:`Forward` that moves batches to ``device``."""

    def forward(images: torch.Tensor):
        t, q = model(images.to(device, non_blocking=True))
        return t.float(), q.float()

    return forward
