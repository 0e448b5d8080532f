#!/usr/bin/env python3
"""Honest uncertainty on the synthetic scene: which validation split predicts test, which covariance is calibrated.

For each validation split strategy (``data.val_split`` / ``data.val_gap``) it trains the
config's first stage on the same scene (model with dropout *and* a variance head, so one run
calibrates every uncertainty method), then on the scene's separate test trajectory reports

* split table: validation vs test median errors and their ratio (how well validation
  predicts deployment), and the test calibration of each method under that split's scales;
* method table (the ``--default-split`` run; bench/RESULTS.md times the whole-sequence
  runs): accuracy, calibration (position/rotation NEES
  median, share inside the 68/95/99 % chi-square bounds) and CPU cost per frame of
  ``Relocalizer.predict`` for ``fixed``, ``mc_dropout`` and ``variance_head``.

    python bench/bench_uncertainty.py                      # renders a 600-frame scene, 3 runs at 32 px
    python bench/bench_uncertainty.py train.seed=1 --scene runs/bench_uncertainty/scene --out runs/bu_seed1
    python bench/bench_uncertainty.py --scene data/synthetic --crop 64   # the demo's scene and size (slow on a CPU)

The figures in bench/RESULTS.md are the defaults, seeds 0 and 1 (≈ 7 min per run on 2 busy cores).

Results also go to ``<out>/results.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ros2_posenet.checkpoint import load_checkpoint, preprocess_from_checkpoint  # noqa: E402
from ros2_posenet.covariance import REPORT_LEVELS, available_methods, calibration_metrics, pose_residuals, within_bounds  # noqa: E402
from ros2_posenet.data import build_dataset  # noqa: E402
from ros2_posenet.data.synthetic import SyntheticSceneConfig, generate_scene  # noqa: E402
from ros2_posenet.evaluate import covariance_forward
from ros2_posenet.metrics import pose_errors, predict_poses, summarize_errors  # noqa: E402
from ros2_posenet.inference import Relocalizer  # noqa: E402
from ros2_posenet.train import load_config, run_training  # noqa: E402

# (name, data.val_split, data.val_gap): the default split first.
SPLITS = (
    ("blocks, no gap (default)", "blocks", 0),
    ("blocks, gap 10", "blocks", 10),
    ("whole sequences", "sequences", 0),
)


def ensure_scene(path: Path, frames: int, sequences: int) -> Path:
    if not (path / "scene.yaml").is_file():
        print(f"generating the scene in {path} ...", flush=True)
        generate_scene(path, SyntheticSceneConfig(frames_train=frames, train_sequences=sequences), overwrite=path.exists())
    return path


def test_calibration(checkpoint: str, test_set, method: str) -> dict:
    """Accuracy and calibration of one uncertainty method on the test frames."""
    reloc = Relocalizer(checkpoint, device="cpu", uncertainty=method, warmup=False)
    covs: list[torch.Tensor] = []
    pred = predict_poses(covariance_forward(reloc, covs), test_set, batch_size=32)
    residuals = pose_residuals(pred["pred_t"], pred["pred_q"], pred["true_t"], pred["true_q"])
    cov = torch.cat(covs)
    # Does a larger predicted σ go with a larger error? (Spearman's rank correlation; nan for a constant σ)
    sigma = torch.diagonal(cov[:, :3, :3], dim1=1, dim2=2).sum(-1).sqrt().numpy()
    error = residuals[:, :3].norm(dim=1).numpy()
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731
    rank_corr = float(np.corrcoef(ranks(sigma), ranks(error))[0, 1]) if np.ptp(sigma) > 0 else float("nan")
    return {**summarize_errors(*pose_errors(pred["pred_t"], pred["pred_q"], pred["true_t"], pred["true_q"])),
            **calibration_metrics(residuals, cov), "sigma_error_rank_corr_position": rank_corr}


def cost_per_frame_ms(checkpoint: str, test_set, method: str, frames: int) -> float:
    """Median wall time of ``Relocalizer.predict`` (raw image in, pose + covariance out)."""
    reloc = Relocalizer(checkpoint, device="cpu", uncertainty=method)
    images = [test_set.load_image(i) for i in range(min(frames, len(test_set)))]
    times = []
    for image in images:
        start = time.perf_counter()
        reloc.predict(image)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


@torch.inference_mode()
def forward_cost_ms(backbone: str, crop: int, samples: int, iters: int) -> dict[str, float]:
    """Batch-1 CPU cost of one deterministic forward, MC dropout as this project runs it (backbone once,
    ``samples`` head passes) and naive MC dropout (the whole network on a batch of ``samples`` copies)."""
    from ros2_posenet.model import ModelConfig, PoseNet

    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone=backbone, pretrained=False, variance_head=True)).eval()
    x = torch.randn(1, 3, crop, crop)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return float(np.median(times))

    def naive():
        model.enable_mc_dropout()
        model(x.expand(samples, -1, -1, -1))
        model.eval()

    return {
        "deterministic": timed(lambda: model(x)),
        "variance_head": timed(lambda: model.forward_with_log_variance(x)),
        f"mc_dropout_{samples}_head_passes": timed(lambda: model.uncertainty_outputs(x, samples)),
        f"naive_mc_dropout_{samples}_full_passes": timed(naive),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/train_synthetic.yaml")
    p.add_argument("overrides", nargs="*", help="config overrides key=value applied to every run")
    p.add_argument("--scene", type=Path, default=Path("runs/bench_uncertainty/scene"))
    p.add_argument("--frames", type=int, default=600, help="training frames of a generated scene")
    p.add_argument("--sequences", type=int, default=6, help="training sequences of a generated scene")
    p.add_argument("--out", type=Path, default=Path("runs/bench_uncertainty"))
    p.add_argument("--epochs", type=int, default=16, help="epochs of the (single, learned-weighting) stage")
    p.add_argument("--crop", type=int, default=32, help="network input size (preprocess.resize = crop)")
    p.add_argument("--only", nargs="*", default=None, help="run only splits whose name contains one of these")
    p.add_argument("--default-split", default="blocks, no gap (default)", help="split whose run fills the method table")
    p.add_argument("--timing-frames", type=int, default=40)
    p.add_argument("--cost-backbone", default="googlenet", help="network of the forward-cost table (paper size, random weights)")
    p.add_argument("--cost-crop", type=int, default=224)
    p.add_argument("--cost-iters", type=int, default=10)
    args = p.parse_intermixed_args(argv)

    scene = ensure_scene(args.scene, args.frames, args.sequences)
    results: dict = {"splits": {}, "methods": {}}
    test_set = None
    for name, strategy, gap in SPLITS:
        if args.only and not any(s in name for s in args.only):
            continue
        out = args.out / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        cfg = load_config(args.config, [
            f"data.root={scene}", "train.progress=false", "train.test_at_end=false", f"train.out_dir={out}",
            "model.variance_head=true", f"data.val_split={strategy}", f"data.val_gap={gap}",
            f"preprocess.resize={args.crop}", f"preprocess.crop={args.crop}", "train.val_every=4",
            *args.overrides,
        ])
        cfg["stages"] = [{**cfg["stages"][0], "epochs": args.epochs}]
        print(f"\n=== {name}: {args.epochs} epochs ===", flush=True)
        start = time.perf_counter()
        run = run_training(cfg)
        seconds = time.perf_counter() - start
        ckpt = run["checkpoint"]
        payload = load_checkpoint(ckpt)
        if test_set is None:
            test_set = build_dataset(cfg["data"]["kind"], scene, "test", preprocess_from_checkpoint(payload), augment=False, max_points=0)
        methods = available_methods(payload["model_config"]["dropout"], payload["model_config"]["variance_head"])
        unc = payload["covariance"]["uncertainty"]
        results["splits"][name] = {
            "val_split": run["val_split"], "seconds": seconds, "best_epoch": run["stages"][cfg["stages"][0]["name"]]["best_epoch"],
            "val": payload["val_metrics"], "val_calibration": unc["val_metrics"],
            "test": {m: test_calibration(ckpt, test_set, m) for m in methods},
        }
        if name == args.default_split:
            results["methods"] = {m: {**results["splits"][name]["test"][m],
                                      "ms_per_frame": cost_per_frame_ms(ckpt, test_set, m, args.timing_frames)}
                                  for m in methods}
            results["methods"]["mc_dropout"]["mc_samples"] = unc["mc_samples"]
    if args.cost_iters > 0:
        results["forward_cost_ms"] = forward_cost_ms(args.cost_backbone, args.cost_crop, 32, args.cost_iters)
    print_tables(results, args, len(test_set) if test_set is not None else 0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


def print_tables(results: dict, args, n_test: int) -> None:
    print(f"\nscene {args.scene} ({n_test} test frames, separate trajectory); {args.epochs} epochs of stage 1 per split")
    print("\nvalidation vs test (median errors of the best checkpoint; ratio = test / val)")
    header = f"{'split':<28} {'val frames':>10} {'val m':>7} {'val °':>6} {'test m':>7} {'test °':>7} {'ratio m':>8} {'ratio °':>8}"
    print(header + "   test pos. NEES median / within 95 % per method")
    print("-" * (len(header) + 50))
    for name, r in results["splits"].items():
        v, t = r["val"], r["test"]["fixed"]
        cal = "  ".join(f"{m}: {c['nees_position_median']:.2f}/{c['position_within_95']:.0%}" for m, c in r["test"].items())
        print(f"{name:<28} {v['frames']:>10} {v['median_position_m']:>7.3f} {v['median_rotation_deg']:>6.2f} "
              f"{t['median_position_m']:>7.3f} {t['median_rotation_deg']:>7.2f} "
              f"{t['median_position_m'] / v['median_position_m']:>8.2f} {t['median_rotation_deg'] / v['median_rotation_deg']:>8.2f}   {cal}")
    if "forward_cost_ms" in results:
        print(f"\nCPU cost per frame, {args.cost_backbone} at {args.cost_crop} px, batch 1 (median ms): "
              + ", ".join(f"{k} {v:.1f}" for k, v in results["forward_cost_ms"].items()))
    if not results["methods"]:
        return
    levels = "/".join(f"{round(level * 100)}" for level in REPORT_LEVELS)
    print(f"\nmethods on the test trajectory (split: {args.default_split}); ideal NEES median 2.37, within = {levels} %")
    header = (f"{'method':<14} {'med m':>6} {'med °':>6} {'pos NEES':>8} {'pos within':>14} {'rot NEES':>8} "
              f"{'rot within':>14} {'σ-error ρ':>9} {'ms/frame':>9}")
    print(header)
    print("-" * len(header))
    for m, r in results["methods"].items():
        print(f"{m:<14} {r['median_position_m']:>6.3f} {r['median_rotation_deg']:>6.2f} {r['nees_position_median']:>8.2f} "
              f"{within_bounds(r, 'position'):>14} {r['nees_rotation_median']:>8.2f} {within_bounds(r, 'rotation'):>14} "
              f"{r['sigma_error_rank_corr_position']:>9.2f} {r['ms_per_frame']:>9.2f}")


if __name__ == "__main__":
    sys.exit(main())
