"""The ``train`` command line (``python -m ros2_posenet.train``, console script ``train``)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

from ..checkpoint import CheckpointError, load_checkpoint
from ..data import DatasetError
from ..train_config import ConfigError, apply_override, load_config, validate_config
from .run import run_training
from .runtime import TrainingError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posenet-train",
        description="Train PoseNet (learned-weighting stage, then reprojection fine-tuning). "
        "Runs under torchrun for multi-GPU.",
        epilog="examples:\n  train --config config/train_synthetic.yaml\n"
        "  train --config config/train_cambridge.yaml data.root=/data/KingsCollege train.epochs=300\n"
        "  train --config config/train_synthetic.yaml --stage reprojection --init runs/x/learned/best.pt\n"
        "  train --resume runs/synthetic/learned/last.pt\n"
        "  torchrun --nproc_per_node=4 -m ros2_posenet.train --config config/train_7scenes.yaml data.root=/data/chess",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config (see config/)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.epochs=3 optim.batch_size=16")
    p.add_argument("--resume", help="continue from a stage's last.pt (its config is used; overrides still apply)")
    p.add_argument("--stage", help="run only this stage (by name)")
    p.add_argument("--init", help="with --stage: checkpoint the stage starts from (default: previous stage's best.pt)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the ``train`` command; returns the exit status (2: bad input, 130: interrupted)."""
    # Intermixed: overrides may come before or after options like --stage.
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.resume:
            payload = load_checkpoint(args.resume)
            cfg = validate_config(payload.get("train_config") or {})
            for override in args.overrides:
                apply_override(cfg, override)
            cfg = validate_config(cfg)
        elif args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            print("train: give --config FILE (see config/) or --resume last.pt", file=sys.stderr)
            return 2
        if args.init:
            if not args.stage:
                print("train: --init needs --stage NAME", file=sys.stderr)
                return 2
            apply_override(cfg, f"stages.{args.stage}.init={args.init}")
            cfg = validate_config(cfg)
        if args.print_config:
            print(yaml.safe_dump(cfg, sort_keys=False), end="")
            return 0
        result = run_training(cfg, resume=args.resume, only_stage=args.stage)
    except (ConfigError, CheckpointError, TrainingError, DatasetError, FileNotFoundError) as err:
        print(f"train: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train: interrupted; continue with --resume <out_dir>/<stage>/last.pt", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
