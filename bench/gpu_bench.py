"""GPU benchmark in one go, for a lent GPU machine (run through bench/gpu_bench.sh).

    python3 bench/gpu_bench.py [--backbone googlenet] [--size 224] [--iters 200] [--budget-s 420] [--json out.json]

Sections, most important first, each skipped (with the reason) when it cannot run
or when the time budget is spent; partial results are written after every section:

1. environment: GPU name, driver, torch/CUDA, onnxruntime providers, torch-tensorrt, rclpy;
2. forward: ``Relocalizer.forward_crops`` latency, batch 1 (uint8 crop upload +
   normalisation + network + 7-float download), per backend and fp32/fp16;
3. end to end: with rclpy, the real node (bench_node_latency); without it, the node's
   per-frame pipeline (Image message -> RGB -> pose -> base pose + covariance) without DDS;
4. training: images/s of the project's TrainStep (autocast as `train` uses it, Adam,
   beta loss) on random GPU tensors (data loading excluded).

Goals (issue 7): ≤ 1 ms forward fp16 and ≤ 3 ms end to end on an H100.
"""
from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def activate_carried_sites() -> None:
    """Process .pth files of carried wheel folders on PYTHONPATH (ROS wheels need their bootstrapper)."""
    for entry in list(sys.path):
        if entry and Path(entry, "ros_wheels_bootstrapper.pth").is_file():
            site.addsitedir(entry)


activate_carried_sites()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_forward import Timing, latencies_ms, make_checkpoint, summarise, time_variant  # noqa: E402

# (variant of bench_forward.VARIANTS, precision), in the order they are tried.
FORWARD_PLAN = [
    ("torch", "fp16"), ("torch", "fp32"), ("torch-nograph", "fp16"), ("torch+compile", "fp16"), ("tensorrt", "fp16"),
    ("onnxruntime", "fp16"), ("onnxruntime", "fp32"), ("tensorrt", "fp32"), ("torch+compile", "fp32"),
]
E2E_PLAN = [("torch", "fp16"), ("torch+compile", "fp16")]


def min_seconds_needed(variant: str) -> float:
    """Budget a variant needs to start: compilation / TensorRT engine builds take minutes."""
    from ros2_posenet.backends import onnxruntime_providers, torch_tensorrt_available

    if variant.startswith("torch+"):
        return 150.0
    if variant == "tensorrt" and ("TensorrtExecutionProvider" in onnxruntime_providers() or torch_tensorrt_available()):
        return 150.0
    return 20.0  # includes variants that are not installed: they fail at once with the reason


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ----------------------------------------------------------------------------- 1. environment


def environment() -> dict:
    import importlib.util

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        info["nvidia_smi"] = f"unavailable: {err}"
    from ros2_posenet.backends import onnxruntime_providers, torch_tensorrt_available

    info.update(onnxruntime_providers=onnxruntime_providers(), torch_tensorrt=torch_tensorrt_available(),
                rclpy=importlib.util.find_spec("rclpy") is not None, cpu_count=os.cpu_count())
    return info


# ----------------------------------------------------------------------------- 2. forward


def forward_section(checkpoint: Path, args, budget: Budget) -> list[dict]:
    rows = []
    for variant, precision in FORWARD_PLAN:
        if budget.left() < min_seconds_needed(variant):
            timing = Timing(args.backbone, variant, precision, args.device, args.size, skipped="time budget spent")
        else:
            timing = time_variant(checkpoint, args.backbone, variant, precision, args.device, args.size, args.iters)
        print(timing.row(), flush=True)
        rows.append(vars(timing))
    return rows


# ----------------------------------------------------------------------------- 3. end to end


def fake_image_message(rgb: np.ndarray) -> SimpleNamespace:
    """Duck-typed sensor_msgs/Image (the converter reads only these fields)."""
    h, w = rgb.shape[:2]
    stamp = SimpleNamespace(sec=0, nanosec=0)
    return SimpleNamespace(header=SimpleNamespace(stamp=stamp, frame_id="camera"), height=h, width=w,
                           encoding="rgb8", is_bigendian=0, step=w * 3, data=rgb.tobytes())


def pipeline_frame(reloc, msg, mount) -> None:
    """The node's per-frame work without DDS: decode, predict, base pose and its covariance."""
    from ros2_posenet.frames import base_covariance
    from ros2_posenet.geometry import pose_to_matrix
    from ros2_posenet.ros.image import msg_to_rgb

    prediction = reloc.predict(msg_to_rgb(msg))
    T_map_optical = pose_to_matrix(prediction.position, prediction.quaternion)
    base_covariance(prediction.covariance, T_map_optical, mount.base_pose(T_map_optical))


def pipeline_latency(checkpoint: Path, variant: str, precision: str, image_shape: tuple[int, int], args) -> dict:
    import warnings

    from bench_forward import VARIANTS
    from ros2_posenet.frames import CameraMount
    from ros2_posenet.inference import Relocalizer

    row = {"mode": "pipeline_no_dds", "variant": variant, "precision": precision, "image": f"{image_shape[1]}x{image_shape[0]}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloc = Relocalizer(str(checkpoint), device=args.device, precision=precision, **VARIANTS[variant])
    rgb = np.random.default_rng(0).integers(0, 256, (*image_shape, 3), dtype=np.uint8)
    msg, mount = fake_image_message(rgb), CameraMount()
    crop = reloc.crop(rgb)[None]
    latencies_ms(lambda: pipeline_frame(reloc, msg, mount), 20)
    raw = summarise(Timing("", variant, precision, args.device, 0), latencies_ms(lambda: reloc.forward_crops(crop), args.iters))
    e2e = summarise(Timing("", variant, precision, args.device, 0), latencies_ms(lambda: pipeline_frame(reloc, msg, mount), args.iters))
    row.update(raw_ms=raw.median_ms, e2e_ms=e2e.median_ms, e2e_p90_ms=e2e.p90_ms, ratio=e2e.median_ms / raw.median_ms, hz=e2e.hz)
    return row


def node_latency(checkpoint: Path, variant: str, precision: str, args) -> dict:
    """The real node over DDS (needs rclpy), as bench_node_latency measures it."""
    import rclpy

    import bench_node_latency as node_bench

    node_args = SimpleNamespace(device=args.device, frames=100, timeout=5.0, rate=100.0, duration=5.0)
    rgb = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    node_bench.isolate_ros_domain()
    rclpy.init()
    try:
        result = node_bench.bench_variant(checkpoint, rgb, variant, precision, node_args)
    finally:
        rclpy.try_shutdown()
    return {"mode": "ros2_node", **vars(result)}


def e2e_section(checkpoint: Path, args, env: dict, budget: Budget) -> list[dict]:
    rows = []
    for variant, precision in E2E_PLAN:
        if budget.left() < min_seconds_needed(variant) + 10:
            rows.append({"variant": variant, "precision": precision, "skipped": "time budget spent"})
            continue
        measurements = [lambda: pipeline_latency(checkpoint, variant, precision, (args.size, args.size), args),
                        lambda: pipeline_latency(checkpoint, variant, precision, (480, 640), args)]
        if env.get("rclpy"):
            measurements.insert(0, lambda: node_latency(checkpoint, variant, precision, args))
        for measure in measurements:
            try:
                rows.append(measure())
            except Exception as err:  # one failing measurement must not lose the others
                rows.append({"variant": variant, "precision": precision, "skipped": f"{type(err).__name__}: {err}"})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------- 4. training


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_throughput(backbone: str, size: int, batch_size: int, steps: int, device: torch.device) -> dict:
    """Images/s of the project's training step on random GPU tensors (no data loading)."""
    from ros2_posenet.losses import build_loss
    from ros2_posenet.model import ModelConfig, PoseNet
    from ros2_posenet.train import TrainStep, amp_settings

    autocast, amp_dtype = amp_settings("auto", device)
    model = PoseNet(ModelConfig(backbone=backbone, pretrained=False)).to(device)
    criterion = build_loss({"type": "beta", "beta": 500.0}).to(device)
    step = TrainStep(model, criterion, autocast, amp_dtype, device.type).train()
    optimizer = torch.optim.Adam(list(model.parameters()) + list(criterion.parameters()), lr=1e-4)
    images = torch.randn(batch_size, 3, size, size, device=device)
    batch = {"position": torch.randn(batch_size, 3, device=device),
             "rotation": torch.nn.functional.normalize(torch.randn(batch_size, 4, device=device), dim=1)}

    def one_step():
        loss, _ = step(images, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        one_step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"backbone": backbone, "batch_size": batch_size, "amp": str(amp_dtype) if autocast else "off",
            "images_per_s": batch_size * steps / seconds, "step_ms": 1e3 * seconds / steps}


def training_section(args, budget: Budget) -> list[dict]:
    rows = []
    for batch_size in args.train_batches:
        if budget.left() < 30:
            rows.append({"batch_size": batch_size, "skipped": "time budget spent"})
            continue
        try:
            rows.append(training_throughput(args.backbone, args.size, batch_size, args.train_steps, torch.device(args.device)))
        except Exception as err:
            rows.append({"batch_size": batch_size, "skipped": f"{type(err).__name__}: {err}"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------- main


def print_summary(results: dict) -> None:
    env = results.get("environment", {})
    print(f"\n=== summary on {env.get('gpu', 'no GPU')} ({env.get('nvidia_smi', '')}) ===")
    for row in results.get("forward", []):
        state = row["skipped"] or f"{row['median_ms']:.3f} ms median, p90 {row['p90_ms']:.3f} ms, setup {row['setup_s']:.0f} s"
        print(f"forward  {row['variant']:<16} {row['precision']}: {state}")
    for row in results.get("end_to_end", []):
        state = row.get("skipped") or f"{row['e2e_ms']:.3f} ms median (raw {row['raw_ms']:.3f} ms, ratio {row['ratio']:.3f})"
        print(f"e2e      {row.get('mode', ''):<16} {row['variant']:<14} {row['precision']} {row.get('image', '')}: {state}")
    for row in results.get("training", []):
        state = row.get("skipped") or f"{row['images_per_s']:.0f} images/s ({row['step_ms']:.1f} ms/step, amp {row['amp']})"
        print(f"training batch {row['batch_size']:<4}: {state}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="googlenet")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a dry run of the code paths")
    parser.add_argument("--train-batches", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new measurements after this many seconds")
    out = os.environ.get("OUT")
    parser.add_argument("--json", default=str(Path(out) / "gpu_bench.json") if out else None)
    return parser.parse_args(argv)


def write(results: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    results: dict = {"environment": environment()}
    print(json.dumps(results["environment"], indent=2), flush=True)
    write(results, args.json)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (use --device cpu for a dry run of the code paths)")
        return 1
    sections = [
        ("forward", lambda ckpt: forward_section(ckpt, args, budget)),
        ("end_to_end", lambda ckpt: e2e_section(ckpt, args, results["environment"], budget)),
        ("training", lambda ckpt: training_section(args, budget)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(args.backbone, args.size, tmp)
        for name, section in sections:
            print(f"\n=== {name} ({budget.left():.0f} s of budget left) ===", flush=True)
            try:
                results[name] = section(checkpoint)
            except Exception:
                results[name + "_error"] = traceback.format_exc()
                print(results[name + "_error"], flush=True)
            write(results, args.json)
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
