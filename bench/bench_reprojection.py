#!/usr/bin/env python3
"""What the reprojection fine-tune does to a model: metres and degrees vs pixels, per checkpoint.

For each checkpoint, on the same frames (the training config's validation holdout by
default, the training frames or the test split), prints the median position and rotation errors beside the
median reprojection error of the scene points in pixels (what stage 2 minimises, at the
network's input resolution). If a fine-tuned model has *fewer* pixels but *more* metres
on held-out frames, the reprojection objective itself is trading position for rotation
(for points at similar depths, a sideways shift and a small turn move them alike), not
over-fitting or a bug.

    python bench/bench_reprojection.py runs/demo/train/learned/best.pt runs/demo/train/reprojection/last.pt
    python bench/bench_reprojection.py A.pt B.pt --split test --scene runs/scene-synthetic
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ros2_posenet.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint  # noqa: E402
from ros2_posenet.data import build_dataset, collate_pose_batch  # noqa: E402
from ros2_posenet.geometry import position_error, rotation_error_deg  # noqa: E402
from ros2_posenet.losses import reprojection_residuals  # noqa: E402
from ros2_posenet.train import sequence_ids, validation_split  # noqa: E402


def frames(checkpoint_payload: dict, split: str, scene: str | None, max_points: int):
    """The evaluation frames (with scene points) a checkpoint's training config describes."""
    cfg = checkpoint_payload["train_config"]
    data = cfg["data"]
    root = scene or data["root"]
    dataset = build_dataset(data["kind"], root, "test" if split == "test" else "train",
                            preprocess_from_checkpoint(checkpoint_payload), augment=False, max_points=max_points)
    if split in ("train", "val"):
        # Checkpoints from before data.val_split used blocks without a gap.
        held_out = validation_split(sequence_ids(dataset), {"val_split": "blocks", "val_gap": 0, **data})
        dataset = torch.utils.data.Subset(dataset, held_out.val if split == "val" else held_out.train)
    return dataset


@torch.inference_mode()
def per_frame_errors(model: torch.nn.Module, dataset, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Per frame: position error (m), rotation error (°), median point reprojection error (px)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_pose_batch)
    out = {"position_m": [], "rotation_deg": [], "reprojection_px": []}
    for batch in loader:
        t, q = model(batch["image"])
        residual, valid = reprojection_residuals(t, q, batch)
        pixels = residual.norm(dim=-1).masked_fill(~valid, float("nan"))
        out["reprojection_px"].append(torch.nanmedian(pixels, dim=1).values)
        out["position_m"].append(position_error(t, batch["position"]))
        out["rotation_deg"].append(rotation_error_deg(q, batch["rotation"]))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--split", choices=("train", "val", "test"), default="val",
                   help="train: the training frames (no augmentation) minus the validation holdout")
    p.add_argument("--scene", default=None, help="scene folder (default: the first checkpoint's data.root)")
    p.add_argument("--max-points", type=int, default=256)
    args = p.parse_args(argv)

    reference = load_checkpoint(args.checkpoints[0])
    dataset = frames(reference, args.split, args.scene, args.max_points)
    print(f"{len(dataset)} {args.split} frames; reprojection at the network input "
          f"({preprocess_from_checkpoint(reference).crop} px)\n")
    print(f"{'checkpoint':<48} {'median m':>9} {'median °':>9} {'median px':>10}")
    for path in args.checkpoints:
        model = model_from_checkpoint(load_checkpoint(path)).eval()
        errors = per_frame_errors(model, dataset)
        print(f"{str(path)[-48:]:<48} {np.median(errors['position_m']):9.3f} {np.median(errors['rotation_deg']):9.2f} "
              f"{np.nanmedian(errors['reprojection_px']):10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
