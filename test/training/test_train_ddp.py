"""The training script under torchrun: two CPU processes, gloo backend, DistributedDataParallel."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ros2_posenet.checkpoint import load_checkpoint
from ros2_posenet.data.synthetic import SyntheticSceneConfig, generate_scene

REPO = Path(__file__).resolve().parents[2]


def test_torchrun_two_cpu_processes_train_one_epoch(tmp_path):
    root = tmp_path / "scene"
    generate_scene(root, SyntheticSceneConfig(
        width=64, height=48, frames_train=8, frames_test=4, train_sequences=1, test_sequences=1, num_points=200,
    ))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "ros2_posenet.train",
        "data.kind=7scenes", f"data.root={root}", "data.max_points=0", "data.val=test",
        "model.backbone=resnet18", "model.hidden_dim=16", "model.pretrained=false",
        "preprocess.resize=32", "preprocess.crop=32", "optim.batch_size=2",
        "loss.type=learned", "train.epochs=1", "train.workers=0", "train.device=cpu",
        "train.progress=false", "train.test_at_end=false", f"train.out_dir={out}",
    ]
    config = tmp_path / "base.yaml"
    config.write_text("{}\n")
    proc = subprocess.run(cmd[:7] + ["--config", str(config)] + cmd[7:], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(DDP)" in proc.stdout and "x2" in proc.stdout

    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 1  # only rank 0 writes
    # 8 images over 2 ranks x batch 2: 2 steps per rank, 8 images in all.
    assert log[0]["images"] == 8
    ckpt = load_checkpoint(out / "learned" / "last.pt")
    assert not any(key.startswith("module.") for key in ckpt["model_state"])
    assert torch.isfinite(ckpt["criterion_state"]["sx"]) and ckpt["criterion_state"]["sx"].item() != 0.0
