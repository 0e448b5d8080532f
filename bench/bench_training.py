#!/usr/bin/env python3
"""Training throughput: images/s of the data loader alone, of the training step alone, and of both.

    python bench/bench_training.py --config config/train_synthetic.yaml data.root=data/synthetic
    python bench/bench_training.py --config config/train_7scenes.yaml data.root=/data/chess --workers 0 4 8

The loader "keeps up" when it delivers at least as many images/s as the step
consumes; if not, raise ``train.workers`` (or shrink the stored images). The step is
timed on one batch kept in memory (on the training device, with the config's mixed
precision), so it measures the model alone. Prints one table; ``--json`` also writes it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ros2_posenet.data import collate_pose_batch  # noqa: E402
from ros2_posenet.inference import resolve_device  # noqa: E402
from ros2_posenet.losses import build_loss  # noqa: E402
from ros2_posenet.model import ModelConfig, PoseNet  # noqa: E402
from ros2_posenet.preprocess import PreprocessConfig  # noqa: E402
from ros2_posenet.train_config import augmentation  # noqa: E402
from ros2_posenet.train import (  # noqa: E402
    TrainStep, amp_settings, build_dataset, build_optimizer, load_config, move_batch,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(dataset, batch_size: int, workers: int, batches: int) -> float:
    """Images/s the DataLoader delivers (first batch, i.e. worker start-up, excluded)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate_pose_batch)
    it = iter(loader)
    next(it)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            count += next(it)["image"].shape[0]
        except StopIteration:
            break
    return count / (time.perf_counter() - start)


def step_rate(step: TrainStep, optimizer, batch: dict, device: torch.device, steps: int) -> float:
    """Images/s of forward + backward + Adam step on one in-memory batch (2 warm-up steps)."""
    step.train()
    n = batch["image"].shape[0]
    for i in range(steps + 2):
        if i == 2:
            sync(device)
            start = time.perf_counter()
        loss, _ = step(batch["image"], batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return steps * n / (time.perf_counter() - start)


def end_to_end_rate(step: TrainStep, optimizer, dataset, batch_size: int, workers: int, device: torch.device, batches: int) -> float:
    """Images/s of loading + training together, as the trainer runs them."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate_pose_batch,
                        pin_memory=device.type == "cuda", drop_last=True)
    it = iter(loader)
    count = 0
    for i in range(batches + 1):
        try:
            batch = move_batch(next(it), device)
        except StopIteration:
            break
        if i == 1:
            sync(device)
            start, count = time.perf_counter(), 0
        loss, _ = step(batch["image"], batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        count += batch["image"].shape[0]
    sync(device)
    return count / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/train_synthetic.yaml")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="loader worker counts to try (default: the config's)")
    p.add_argument("--batches", type=int, default=20, help="batches timed per measurement")
    p.add_argument("--loss", default=None, help="loss type for the step (default: the first stage's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    device = resolve_device(cfg["train"]["device"])
    autocast, amp_dtype = amp_settings(cfg["train"]["amp"], device)
    loss_cfg = next((s["loss"] for s in cfg["stages"] if s["loss"]["type"] == args.loss), cfg["stages"][0]["loss"]) if args.loss else cfg["stages"][0]["loss"]
    data = cfg["data"]
    dataset = build_dataset(
        data["kind"], data["root"], "train", PreprocessConfig.from_dict(cfg["preprocess"]), augment=augmentation(data),
        max_points=data["max_points"] if loss_cfg["type"] == "reprojection" else 0,
    )
    batch_size = cfg["optim"]["batch_size"]
    model = PoseNet(ModelConfig.from_dict(cfg["model"])).to(device)
    criterion = build_loss(loss_cfg).to(device)
    step = TrainStep(model, criterion, autocast, amp_dtype, device.type)
    optimizer = build_optimizer(model, criterion, cfg, cfg["optim"]["lr"])
    batch = move_batch(collate_pose_batch([dataset[i % len(dataset)] for i in range(batch_size)]), device)

    compute = step_rate(step, optimizer, batch, device, max(3, args.batches // 2))
    rows = []
    for workers in args.workers if args.workers is not None else [cfg["train"]["workers"]]:
        loading = loader_rate(dataset, batch_size, workers, args.batches)
        both = end_to_end_rate(step, optimizer, dataset, batch_size, workers, device, args.batches)
        rows.append({"workers": workers, "loader_img_s": loading, "step_img_s": compute, "train_img_s": both,
                     "keeps_up": loading >= compute})

    threads = torch.get_num_threads()
    print(f"{cfg['model']['backbone']} at {cfg['preprocess']['crop']}px, batch {batch_size}, loss {loss_cfg['type']}, "
          f"device {device}{' autocast ' + str(amp_dtype) if autocast else ''}, {threads} torch threads, "
          f"{len(dataset)} images in {data['root']}")
    print(f"{'workers':>7}  {'loader img/s':>12}  {'step img/s':>10}  {'train img/s':>11}  loader keeps up")
    for r in rows:
        print(f"{r['workers']:>7}  {r['loader_img_s']:>12.1f}  {r['step_img_s']:>10.1f}  {r['train_img_s']:>11.1f}  "
              f"{'yes' if r['keeps_up'] else 'no: raise train.workers'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": cfg, "device": str(device), "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
