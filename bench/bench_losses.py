#!/usr/bin/env python3
"""The paper's loss comparison (Kendall & Cipolla 2017, Table 2 style) on the synthetic scene.

Trains the same network with the same budget (epochs, optimiser, data) under

* ``β-weighted`` — ``Lx + β·Lq`` for a few β values (the hand-tuned baseline),
* ``learned σ`` — homoscedastic-uncertainty weighting with learned ŝx, ŝq,
* ``learned σ + reprojection`` — the same, the last ~20 % of the epochs spent
  fine-tuning with the reprojection loss (best-on-validation of the two is kept),

then prints one table of test-split errors, beside the mean-pose and
nearest-neighbour retrieval baselines.

    python bench/bench_losses.py                       # generates the scene (2000 training frames)
    python bench/bench_losses.py --scene data/synthetic --epochs 20 --betas 3 30 300

A run takes about (methods × epochs × images / throughput); at 64 px on 2 CPU cores
(~100 img/s) the defaults need ~15–20 minutes. Results also go to ``<out>/results.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ros2_posenet.data import build_dataset  # noqa: E402
from ros2_posenet.data.synthetic import SyntheticSceneConfig, generate_scene  # noqa: E402
from ros2_posenet.evaluate import baseline_predictions  # noqa: E402
from ros2_posenet.metrics import (  # noqa: E402
    METHOD_MEAN, METHOD_MODEL, dataset_poses, pose_errors, summarize_errors, threshold_key,
)
from ros2_posenet.preprocess import PreprocessConfig  # noqa: E402
from ros2_posenet.train import load_config, run_training  # noqa: E402

# The generator's default (the demo's scene): 2000 training frames in 6 sequences.
BENCH_SCENE = SyntheticSceneConfig()


def ensure_scene(path: Path) -> Path:
    if not (path / "scene.yaml").is_file():
        print(f"generating the benchmark scene in {path} ...", flush=True)
        generate_scene(path, BENCH_SCENE, overwrite=path.exists())
    return path


def method_configs(base: dict, epochs: int, betas: list[float], reprojection_share: float) -> dict[str, dict]:
    """One resolved config per method, all with ``epochs`` epochs in total."""
    learned_loss = copy.deepcopy(next(s["loss"] for s in base["stages"] if s["loss"]["type"] == "learned"))
    # The config's fine-tuning stage as is (loss, lr, frozen BatchNorm, dropout); only its length changes.
    reproj_stage = copy.deepcopy(next(
        (s for s in base["stages"] if s["loss"]["type"] == "reprojection"),
        {"name": "reprojection", "loss": {"type": "reprojection", "gamma": 1}, "lr": None},
    ))

    def with_stages(stages):
        cfg = copy.deepcopy(base)
        cfg["stages"] = stages
        return cfg

    configs = {}
    for beta in betas:
        configs[f"β-weighted (β={beta:g})"] = with_stages(
            [{"name": "beta", "loss": {"type": "beta", "beta": float(beta)}, "epochs": epochs, "lr": None, "init": "scratch"}]
        )
    configs["learned σ"] = with_stages([{"name": "learned", "loss": learned_loss, "epochs": epochs, "lr": None, "init": "scratch"}])
    fine = max(1, round(epochs * reprojection_share))
    configs["learned σ + reprojection"] = with_stages([
        {"name": "learned", "loss": learned_loss, "epochs": epochs - fine, "lr": None, "init": "scratch"},
        {**reproj_stage, "name": "reprojection", "epochs": fine, "init": "previous"},
    ])
    return configs


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/train_synthetic.yaml", help="base training config (model, data, optimiser)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value applied to every method")
    p.add_argument("--scene", type=Path, default=Path("runs/bench_losses/scene"), help="synthetic scene (generated if missing)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_losses"))
    p.add_argument("--epochs", type=int, default=10, help="epochs per method (the shared budget)")
    p.add_argument("--betas", type=float, nargs="+", default=[3.0, 30.0, 300.0])
    p.add_argument("--reprojection-share", type=float, default=0.2, help="share of the budget spent fine-tuning")
    p.add_argument("--only", nargs="*", default=None, help="run only methods whose name contains one of these")
    args = p.parse_intermixed_args(argv)

    scene = ensure_scene(args.scene)
    base = load_config(args.config, [f"data.root={scene}", "train.progress=false", "train.test_at_end=true", *args.overrides])
    configs = method_configs(base, args.epochs, args.betas, args.reprojection_share)
    if args.only:
        configs = {k: v for k, v in configs.items() if any(s in k for s in args.only)}

    results = {}
    for name, cfg in configs.items():
        cfg["train"]["out_dir"] = str(args.out / slug(name))
        print(f"\n=== {name}: {sum(s['epochs'] for s in cfg['stages'])} epochs ===", flush=True)
        start = time.perf_counter()
        run = run_training(cfg)
        results[name] = {"test": run["test"][METHOD_MODEL], "seconds": time.perf_counter() - start,
                         "checkpoint": run["checkpoint"], "val": {k: v.get("val") for k, v in run["stages"].items()}}
        results[METHOD_MEAN] = {"test": run["test"][METHOD_MEAN], "seconds": 0.0}

    pre = PreprocessConfig.from_dict(base["preprocess"])
    kind = base["data"]["kind"]
    train_set = build_dataset(kind, scene, "train", pre, max_points=0)
    test_set = build_dataset(kind, scene, "test", pre, max_points=0)
    true_t, true_q = dataset_poses(test_set)
    for name, (t, q) in baseline_predictions(train_set, test_set).items():
        results[name + " (baseline)"] = {"test": summarize_errors(*pose_errors(t, q, true_t, true_q)), "seconds": 0.0}
    results.pop(METHOD_MEAN, None)

    print_table(results, base, args, len(train_set), len(test_set))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"epochs": args.epochs, "results": results}, indent=2, default=str))
    return 0


def print_table(results: dict, base: dict, args, n_train: int, n_test: int) -> None:
    print(f"\nscene {args.scene} ({n_train} train / {n_test} test frames); {base['model']['backbone']} "
          f"{base['preprocess']['crop']}px from scratch={not base['model']['pretrained']}, {args.epochs} epochs per method, "
          f"Adam lr {base['optim']['lr']:g}, batch {base['optim']['batch_size']}")
    bins = [threshold_key(0.25, 2), threshold_key(0.5, 5)]
    header = f"{'method':<34} {'median pos (m)':>14} {'median rot (°)':>14} {'mean pos (m)':>12} {'≤0.25m,2°':>10} {'≤0.5m,5°':>9} {'time (s)':>9}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        t = r["test"]
        print(f"{name:<34} {t['median_position_m']:>14.3f} {t['median_rotation_deg']:>14.2f} {t['mean_position_m']:>12.3f} "
              f"{t[bins[0]]:>10.1%} {t[bins[1]]:>9.1%} {r['seconds']:>9.0f}")


if __name__ == "__main__":
    sys.exit(main())
