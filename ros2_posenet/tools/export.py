"""``export``: checkpoint -> ONNX and TorchScript models with the preprocessing inside.

Contract of both exported files (the graph of :class:`ros2_posenet.backends.PoseInferenceModule`):

* input ``image``: ``uint8 (B, crop, crop, 3)`` RGB, NHWC. Resize the camera image so
  its shorter side is ``preprocess.resize`` pixels (OpenCV ``INTER_AREA`` when
  shrinking, ``INTER_LINEAR`` when enlarging) and take the centre ``crop``×``crop``
  square, exactly as ``Preprocessor.geometric`` does (the metadata's ``preprocessing``
  spells it out; other interpolations move the predictions); ``B`` is dynamic in ONNX.
* outputs ``position`` ``float32 (B, 3)``: camera centre in the map frame (m);
  ``orientation`` ``float32 (B, 4)``: unit quaternion ``(w, x, y, z)``, ``w >= 0``, of the
  camera-to-map rotation of the optical camera frame (z forward, x right, y down).
* metadata (ONNX ``metadata_props``; TorchScript extra file ``metadata.json``):
  ``preprocessing`` (the resize + crop recipe, from ``preprocess.geometric_recipe``),
  ``resize_interpolation``, ``preprocess`` (resize, crop, mean, std), ``map_frame``, ``covariance``,
  ``model_config``, ``pose_convention``, ``git_revision``.

Every export is checked against eager PyTorch on random crops before the command succeeds.

    export runs/ckpt.pt --out-prefix deploy/posenet [--precision fp16] [--format onnx torchscript]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from ..backends import ONNX_OPSET, PRECISIONS, PoseInferenceModule, build_inference_module, export_onnx, export_torchscript
from ..checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from ..inference import export_metadata

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
# Max |difference| to eager fp32 PyTorch accepted by the verification, per precision.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="posenet-export", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("checkpoint", help="ros2_posenet checkpoint (.pt) written by train")
    parser.add_argument("--out-prefix", help="output path without suffix (default: the checkpoint path without .pt)")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), help="what to write (default: both)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp16 halves the weights (for GPUs)")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset (default {ONNX_OPSET})")
    parser.add_argument("--verify-samples", type=int, default=4, help="random crops compared with eager PyTorch (0: skip)")
    return parser.parse_args(argv)


def output_paths(checkpoint: str, prefix: str | None, formats: list[str]) -> dict[str, Path]:
    base = Path(prefix) if prefix else Path(checkpoint).with_suffix("")
    return {fmt: base.with_name(base.name + SUFFIXES[fmt]) for fmt in formats}


def write_onnx(module: PoseInferenceModule, crop: int, path: Path, opset: int, metadata: dict[str, str]) -> None:
    import onnx

    model_bytes = export_onnx(module, crop, opset=opset, metadata=metadata)
    onnx.checker.check_model(onnx.load_from_string(model_bytes))
    path.write_bytes(model_bytes)


def run_exported(fmt: str, path: Path, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Load an exported file with its own runtime and run it on uint8 crops."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return tuple(session.run(["position", "orientation"], {"image": crops}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream; libtorch still loads it
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        t, q = module(torch.from_numpy(crops))
    return t.numpy(), q.numpy()


def reference_outputs(payload: dict, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eager fp32 PyTorch on the same crops: the ground truth of the verification."""
    module = build_inference_module(model_from_checkpoint(payload), preprocess_from_checkpoint(payload), "fp32")
    with torch.no_grad():
        t, q = module(torch.from_numpy(crops))
    return t.numpy(), q.numpy()


def verify(payload: dict, paths: dict[str, Path], precision: str, samples: int) -> list[str]:
    """Compare each export with eager PyTorch; returns the failures (empty when all agree)."""
    crop = preprocess_from_checkpoint(payload).crop
    crops = np.random.default_rng(0).integers(0, 256, (samples, crop, crop, 3), dtype=np.uint8)
    ref_t, ref_q = reference_outputs(payload, crops)
    failures = []
    for fmt, path in paths.items():
        t, q = run_exported(fmt, path, crops)
        err = max(float(np.abs(t - ref_t).max()), float(np.abs(q - ref_q).max()))
        print(f"verify {fmt}: max |difference| to eager PyTorch {err:.2e} over {samples} crops")
        if not err <= TOLERANCE[precision]:
            failures.append(f"{path}: differs from PyTorch by {err:.2e} (> {TOLERANCE[precision]:.0e})")
    return failures


def export_all(args: argparse.Namespace) -> int:
    payload = load_checkpoint(args.checkpoint)
    preprocess = preprocess_from_checkpoint(payload)
    module = build_inference_module(model_from_checkpoint(payload), preprocess, args.precision)
    metadata = {**export_metadata(payload), "precision": args.precision}
    paths = output_paths(args.checkpoint, args.out_prefix, args.format)
    for fmt, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "onnx":
            write_onnx(module, preprocess.crop, path, args.opset, metadata)
        else:
            export_torchscript(module, preprocess.crop, path, metadata)
        print(f"wrote {fmt}: {path} (input uint8 [B,{preprocess.crop},{preprocess.crop},3] RGB -> position, orientation)")
    failures = verify(payload, paths, args.precision, args.verify_samples) if args.verify_samples > 0 else []
    for failure in failures:
        print(f"export: error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return export_all(args)
    except (CheckpointError, OSError, ValueError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
