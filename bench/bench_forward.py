"""Raw forward latency per backend and precision: one uint8 crop in, one pose out.

    python bench/bench_forward.py [--backbones googlenet] [--variants torch onnxruntime torch+compile]
                                  [--precisions fp32] [--device cpu] [--size 224] [--iters 50] [--json out.json]

Each figure is ``Relocalizer.forward_crops`` on a (1, size, size, 3) uint8 crop: on CUDA
that is upload + normalisation + network + the 7-float download, synchronised. Variants
that cannot run here (not installed, no GPU) are listed as skipped, not failed.
Weights are random (pretrained=False): latency does not depend on them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ros2_posenet.backends import BackendUnavailableError  # noqa: E402
from ros2_posenet.checkpoint import save_checkpoint  # noqa: E402
from ros2_posenet.inference import Relocalizer  # noqa: E402
from ros2_posenet.model import ModelConfig, PoseNet  # noqa: E402
from ros2_posenet.preprocess import PreprocessConfig  # noqa: E402

# variant name -> Relocalizer keyword arguments
VARIANTS = {
    "torch": {"backend": "torch"},
    "torch-nograph": {"backend": "torch", "cuda_graph": False},
    "torch+compile": {"backend": "torch", "compile": True},
    "torch+max-autotune": {"backend": "torch", "compile": "max-autotune"},
    "onnxruntime": {"backend": "onnxruntime"},
    "tensorrt": {"backend": "tensorrt"},
}


@dataclass
class Timing:
    """Latency figures of one configuration (milliseconds)."""

    backbone: str
    variant: str
    precision: str
    device: str
    size: int
    median_ms: float = float("nan")
    p90_ms: float = float("nan")
    min_ms: float = float("nan")
    hz: float = float("nan")
    setup_s: float = float("nan")
    skipped: str = ""

    def row(self) -> str:
        head = f"{self.backbone:<18} {self.variant:<20} {self.precision:<5} {self.device:<6}"
        if self.skipped:
            return f"{head} skipped: {self.skipped}"
        return f"{head} {self.median_ms:8.3f} {self.p90_ms:8.3f} {self.min_ms:8.3f} {self.hz:8.1f} {self.setup_s:8.1f}"


HEADER = f"{'backbone':<18} {'variant':<20} {'prec':<5} {'device':<6} {'med ms':>8} {'p90 ms':>8} {'min ms':>8} {'Hz':>8} {'setup s':>8}"


def make_checkpoint(backbone: str, size: int, directory: str | Path) -> Path:
    """Random-weight checkpoint whose preprocessing keeps a size×size input as it is."""
    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone=backbone, pretrained=False))
    return save_checkpoint(Path(directory) / f"{backbone}_{size}.pt", model, PreprocessConfig(resize=size, crop=size))


def latencies_ms(fn, iters: int) -> list[float]:
    """Wall-clock milliseconds of ``iters`` calls of ``fn`` (each call returns host data, so it is synchronised)."""
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - start))
    return out


def summarise(timing: Timing, samples: list[float]) -> Timing:
    ordered = sorted(samples)
    timing.median_ms = statistics.median(ordered)
    timing.p90_ms = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    timing.min_ms = ordered[0]
    timing.hz = 1e3 / timing.median_ms
    return timing


def time_variant(checkpoint: Path, backbone: str, variant: str, precision: str, device: str, size: int, iters: int) -> Timing:
    """Build the Relocalizer (setup time includes compilation/engine build) and time its forward."""
    timing = Timing(backbone, variant, precision, device, size)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reloc = Relocalizer(str(checkpoint), device=device, precision=precision, **VARIANTS[variant])
    except (BackendUnavailableError, ValueError, ImportError, RuntimeError) as err:
        timing.skipped = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return timing
    if precision == "fp16" and not reloc.half:
        timing.skipped = "fp16 needs CUDA"
        return timing
    timing.setup_s = time.perf_counter() - start
    crop = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    latencies_ms(lambda: reloc.forward_crops(crop), max(3, iters // 10))  # warm caches beyond Relocalizer.warmup
    return summarise(timing, latencies_ms(lambda: reloc.forward_crops(crop), iters))


def run(backbones, variants, precisions, device: str, size: int, iters: int) -> list[Timing]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in backbones:
            checkpoint = make_checkpoint(backbone, size, tmp)
            for variant in variants:
                for precision in precisions:
                    result = time_variant(checkpoint, backbone, variant, precision, device, size, iters)
                    print(result.row(), flush=True)
                    results.append(result)
    return results


def machine_description() -> str:
    import os
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({torch.get_num_threads()} torch threads), no GPU, torch {torch.__version__}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["googlenet"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["torch", "onnxruntime", "torch+compile"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "fp16"], default=["fp32"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--size", type=int, default=224, help="square input size (no resize/crop)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"forward latency, batch 1, {args.size}x{args.size}, on {machine_description()}, load average {os.getloadavg()[0]:.2f}")
    print(HEADER)
    results = run(args.backbones, args.variants, args.precisions, args.device, args.size, args.iters)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_description(), "results": [asdict(r) for r in results]}, indent=2))
    return 0 if any(not r.skipped for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
