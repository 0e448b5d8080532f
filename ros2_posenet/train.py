"""Train PoseNet: the paper's two-stage schedule, checkpoints, resume and multi-GPU.

``train --config config/train_synthetic.yaml [key=value ...] [--stage NAME] [--resume last.pt]``

Kendall & Cipolla (CVPR 2017) recommend training first with the learned
homoscedastic weighting of position and rotation losses (no β to tune), then
fine-tuning those weights with the reprojection loss. The default config runs both
stages one after the other; ``--stage`` runs a single one, starting from the
previous stage's best checkpoint in the same output folder (or ``--init PATH``).

Everything is in one YAML config (see ``config/``) whose keys can be overridden on
the command line (``train.epochs=3``, ``stages.learned.lr=1e-4``, ``loss.type=beta``,
values parsed as YAML). Output folder layout::

    <train.out_dir>/config.yaml        resolved config of the run
    <train.out_dir>/metrics.jsonl      one JSON record per epoch (losses, ŝx, ŝq, val errors)
    <train.out_dir>/<stage>/best.pt    best validation checkpoint of the stage
    <train.out_dir>/<stage>/last.pt    latest checkpoint, with optimiser and RNG state for --resume

Validation: unless ``data.val`` says otherwise, a held-out subset of the *training*
images, so the test split stays untouched for the final report: whole training
sequences, or blocks of consecutive frames with a gap of ``data.val_gap`` frames
dropped on both sides (``data.val_split``, see :mod:`ros2_posenet.data.split`).
Neighbouring video frames are near-duplicates; validation on them would measure
interpolation and look better than deployment. The same held-out predictions select
``best.pt`` and calibrate every per-frame covariance method stored in checkpoints
(``uncertainty`` in the config, :mod:`ros2_posenet.covariance`).

Under ``torchrun --nproc_per_node=N`` the same script trains with
DistributedDataParallel (NCCL on GPUs, gloo on CPU); rank 0 validates and writes.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from .baselines import MeanPoseBaseline
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .covariance import calibrate_methods, unit_covariances
from .data import DatasetError
from .data.split import Split, block_split, split_frames
from .inference import resolve_device
from .losses import build_loss, parameter_groups, variance_head_nll
from .metrics import METHOD_MEAN, METHOD_MODEL, dataset_poses, model_forward, pose_errors, predict_poses, summarize_errors
from .model import ModelConfig, PoseNet
from .preprocess import PreprocessConfig
from .train_config import (  # noqa: F401 (load_config, apply_override: public API of train too)
    ConfigError, apply_override, augmentation, did_you_mean, load_config, stage_epochs, stage_lr, validate_config,
)

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot continue (diverged, missing initial checkpoint, ...)."""


# ----------------------------------------------------------------------------- runtime set-up


class Dist:
    """Process-group facts: ``rank``, ``world_size``, ``local_rank``, ``device``; ``main`` is rank 0."""

    def __init__(self, device_pref: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        device = resolve_device(device_pref)
        if self.enabled and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self._owns_group = False
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self._owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, stage_index: int, epoch: int) -> int:
    """Seed of one epoch: reseeding per epoch makes ``--resume`` replay exactly the same batches."""
    return seed + 1_000_003 * stage_index + 7919 * epoch


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def amp_settings(amp, device: torch.device) -> tuple[bool, torch.dtype]:
    """Whether to autocast, and to which dtype: bf16 where supported, else fp16 (with GradScaler)."""
    if device.type != "cuda" or amp is False:
        return False, torch.float32
    return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ----------------------------------------------------------------------------- data


def sequence_ids(dataset) -> list[str]:
    """Sequence of each frame: the record's ``sequence`` field, else its image's parent folder."""
    ids = []
    for record in dataset.samples:
        get = record.get if isinstance(record, dict) else lambda k, r=record: getattr(r, k, None)
        seq = get("sequence")
        if not seq:
            path = get("image_path") or get("image") or get("path")
            seq = Path(str(path)).parent.as_posix() if path is not None else ""
        ids.append(str(seq))
    return ids


def holdout_split(ids: list[str], fraction: float, block: int, gap: int = 0) -> tuple[list[int], list[int]]:
    """``(train, val)`` indices of the block split (see :func:`ros2_posenet.data.split.block_split`)."""
    split = block_split(ids, fraction, block, gap)
    return split.train, split.val


def validation_split(ids: list[str], data: dict) -> Split:
    """The held-out split the ``data`` config section asks for (``val_split``, ``val_fraction``, ``val_block``, ``val_gap``)."""
    return split_frames(ids, data["val_split"], data["val_fraction"], data["val_block"], data["val_gap"])


def build_dataset(kind: str, root: str, split: str, preprocess: PreprocessConfig, **kwargs):
    """The data module's ``build_dataset``; an unknown kind or split becomes a :class:`ConfigError`."""
    from .data import DatasetError, build_dataset as build

    try:
        return build(kind, root, split, preprocess, **kwargs)
    except DatasetError:
        raise
    except ValueError as err:
        raise ConfigError(f"data: {err}") from None
    except TypeError as err:  # an option this loader does not take (data.options)
        raise ConfigError(f"data.options: {err}") from None


class DataBundle:
    """Training (augmented) and validation datasets plus what the report needs about them."""

    def __init__(self, cfg: dict, needs_points: bool):
        data = cfg["data"]
        preprocess = PreprocessConfig.from_dict(cfg["preprocess"])
        max_points = data["max_points"] if needs_points else 0
        options = data["options"]  # loader-specific (e.g. Bundler's split_file)
        train_full = build_dataset(
            data["kind"], data["root"], "train", preprocess, augment=augmentation(data),
            max_points=max_points, seed=cfg["train"]["seed"], **options,
        )
        if len(train_full) == 0:
            raise TrainingError(f"the training split of {data['root']} has no images")
        self.scene = getattr(train_full, "scene_name", Path(data["root"]).name)
        self.val_description = "none"
        self.val = None
        train_idx = list(range(len(train_full)))
        if data["val"] == "holdout":
            split = validation_split(sequence_ids(train_full), data)
            plain = build_dataset(data["kind"], data["root"], "train", preprocess, augment=False, max_points=0, **options)
            train_idx, self.val = split.train, Subset(plain, split.val)
            if not split.train:
                raise TrainingError(f"the validation split leaves no training frames ({split.description}); "
                                    "lower data.val_gap or data.val_fraction")
            self.val_description = f"holdout by {split.description}"
        elif data["val"] == "test":
            self.val = build_dataset(data["kind"], data["root"], "test", preprocess, augment=False, max_points=0, **options)
            self.val_description = f"test split ({len(self.val)} frames): validation figures are TEST figures"
        self.train = Subset(train_full, train_idx)
        self.train_t, self.train_q = dataset_poses(self.train)
        self.kind, self.root, self.preprocess, self.options = data["kind"], data["root"], preprocess, options

    def test_set(self):
        return build_dataset(self.kind, self.root, "test", self.preprocess, augment=False, max_points=0, **self.options)


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_loader(dataset, cfg: dict, dist_info: Dist, sampler_epoch: int, seed: int) -> DataLoader:
    """Shuffled loader for one epoch; DistributedSampler (also with one process) fixes the order by seed+epoch."""
    from .data import collate_pose_batch

    batch_size = cfg["optim"]["batch_size"]
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=seed)
    sampler.set_epoch(sampler_epoch)
    per_rank = math.ceil(len(dataset) / dist_info.world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=cfg["train"]["workers"],
        collate_fn=collate_pose_batch,
        pin_memory=dist_info.device.type == "cuda",
        # A ragged last batch adds noise (and BatchNorm cannot take a batch of 1).
        drop_last=per_rank > batch_size,
        generator=torch.Generator().manual_seed(sampler_epoch + seed),
    )


# ----------------------------------------------------------------------------- training


class TrainStep(nn.Module):
    """Model + criterion as one module, so DDP also averages the gradients of ŝx, ŝq."""

    def __init__(self, model: PoseNet, criterion: nn.Module, autocast: bool, amp_dtype: torch.dtype, device_type: str):
        super().__init__()
        self.model, self.criterion = model, criterion
        self.autocast, self.amp_dtype, self.device_type = autocast, amp_dtype, device_type

    def forward(self, images: torch.Tensor, batch: dict):
        log_variance = None
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.autocast):
            if self.model.fc_log_variance is not None:
                t, q, log_variance = self.model.forward_with_log_variance(images)
            else:
                t, q = self.model(images)
        # Losses in fp32: quaternion residuals and pixel errors need the precision.
        loss, stats = self.criterion(t.float(), q.float(), batch)
        if log_variance is not None:
            nll = variance_head_nll(log_variance.float(), t.float(), q.float(), batch["position"], batch["rotation"])
            loss, stats = loss + nll, {**stats, "loss_variance_nll": nll.detach()}
        return loss, stats


def position_lr_scale(cfg: dict, train_t: torch.Tensor) -> float:
    """``optim.position_lr_scale``, with ``auto`` = RMS distance of training positions from their mean (>= 1)."""
    value = cfg["optim"]["position_lr_scale"]
    if value != "auto":
        return float(value)
    spread = (train_t.double() - train_t.double().mean(0)).pow(2).sum(-1).mean().sqrt().item()
    return max(1.0, spread)


def build_optimizer(model: PoseNet, criterion: nn.Module, cfg: dict, lr: float, position_scale: float = 1.0) -> torch.optim.Optimizer:
    """Adam, as in the paper; no weight decay on ŝx, ŝq, which may have their own ``optim.loss_lr``.

    Groups: backbone+head, position layer (lr × ``position_scale``), loss parameters.
    """
    groups = parameter_groups(model, criterion, cfg["optim"]["weight_decay"])
    position_params = {id(p) for p in model.fc_position.parameters()}
    groups[0]["params"] = [p for p in groups[0]["params"] if id(p) not in position_params]
    groups.insert(1, {"params": list(model.fc_position.parameters()), "weight_decay": cfg["optim"]["weight_decay"], "lr": lr * position_scale})
    if len(groups) > 2 and cfg["optim"]["loss_lr"] is not None:
        groups[2]["lr"] = float(cfg["optim"]["loss_lr"])
    return torch.optim.Adam(groups, lr=lr, eps=cfg["optim"]["eps"])


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: 1 (constant) or cosine from 1 to ``final_lr_fraction``."""
    final = float(cfg["optim"]["final_lr_fraction"])
    if cfg["optim"]["schedule"] == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))
    )


def train_one_epoch(
    step, loader, optimizer, scheduler, scaler, dist_info: Dist, desc: str, progress: bool, clip_grad_norm: float | None = None
) -> dict:
    """One pass over ``loader``; returns mean losses, last ŝx/ŝq, images and seconds.

    With ``clip_grad_norm`` the (unscaled) gradient norm is capped and its mean reported as ``grad_norm``
    (averaged over the batches that reported one).
    """
    step.train()
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    last: dict[str, float] = {}
    images_seen, batches, start = 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not (progress and dist_info.main), dynamic_ncols=True)
    for batch in bar:
        batch = move_batch(batch, dist_info.device)
        loss, stats = step(batch["image"], batch)
        if not torch.isfinite(loss):
            raise TrainingError(f"{desc}: the loss became {loss.item()} at batch {batches}; lower the learning rate (optim.lr or the stage's lr)")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            # The variance head is clipped on its own, so it never changes how the pose network is clipped.
            pose_params, variance_params = [], []
            for name, p in step.named_parameters():
                (variance_params if "fc_log_variance" in name else pose_params).append(p)
            norm = torch.nn.utils.clip_grad_norm_(pose_params, clip_grad_norm)
            if variance_params:
                torch.nn.utils.clip_grad_norm_(variance_params, clip_grad_norm)
            if torch.isfinite(norm):  # fp16 overflow steps are skipped by the scaler; keep them out of the mean
                stats["grad_norm"] = norm
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        values = {k: float(v) for k, v in stats.items()}
        for k, v in values.items():
            sums[k] += v
            counts[k] += 1
        last = values
        batches += 1
        images_seen += batch["image"].shape[0]
        bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k in ("loss", "sx", "sq")}, refresh=False)
    bar.close()
    result = {k: v / counts[k] for k, v in sums.items()}
    for k in ("sx", "sq"):  # learned weights: report where they ended, not their average
        if k in last:
            result[k] = last[k]
    result.update(images=images_seen * dist_info.world_size, seconds=time.perf_counter() - start)
    return result


def validation_score(metrics: dict, reference: dict) -> float:
    """Lower is better: median position and rotation errors relative to the mean-pose baseline's.

    Dividing by the baseline puts metres and degrees on one scale-free footing.
    """
    return metrics["median_position_m"] / max(reference["median_position_m"], 1e-9) + metrics[
        "median_rotation_deg"
    ] / max(reference["median_rotation_deg"], 1e-9)


@torch.no_grad()
def validate(model: PoseNet, dataset, cfg: dict, device: torch.device) -> tuple[dict, dict]:
    """Median/mean errors of the eval-mode model on ``dataset`` and the covariance they calibrate.

    Returns ``(metrics, covariance)``; ``covariance`` is the ``fixed`` calibration with every
    per-frame method's calibration under ``covariance["uncertainty"]`` (see
    :func:`ros2_posenet.covariance.calibrate_methods`).
    """
    was_training = model.training
    model.eval()
    unc = cfg["uncertainty"]
    mc_samples = unc["mc_samples"] if model.config.dropout > 0 else 0
    covs: dict[str, list[torch.Tensor]] = defaultdict(list)

    def forward(images: torch.Tensor):
        outputs = model.uncertainty_outputs(images.to(device, non_blocking=True), mc_samples)
        for name, cov in unit_covariances(outputs).items():
            covs[name].append(cov.cpu())
        return outputs["t"].float(), outputs["q"].float()

    pred = predict_poses(forward, dataset, cfg["optim"]["batch_size"], cfg["train"]["workers"])
    model.train(was_training)
    metrics = summarize_errors(*pose_errors(pred["pred_t"], pred["pred_q"], pred["true_t"], pred["true_q"]))
    fixed, uncertainty = calibrate_methods(
        pred["pred_t"], pred["pred_q"], pred["true_t"], pred["true_q"],
        {name: torch.cat(c) for name, c in covs.items()}, unc["method"], unc["mc_samples"],
    )
    return metrics, {**fixed, "uncertainty": uncertainty}


class Trainer:
    """Runs the stages of one resolved config; see :func:`run_training`."""

    def __init__(self, cfg: dict, dist_info: Dist):
        self.cfg, self.dist = cfg, dist_info
        self.out_dir = Path(cfg["train"]["out_dir"])
        self.progress = cfg["train"]["progress"]
        self.autocast, self.amp_dtype = amp_settings(cfg["train"]["amp"], dist_info.device)
        self.model_cfg = ModelConfig.from_dict(cfg["model"])
        needs_points = any(s["loss"]["type"] == "reprojection" for s in cfg["stages"])
        self.data = DataBundle(cfg, needs_points)
        self.position_scale = position_lr_scale(cfg, self.data.train_t)
        self.reference = None  # mean-pose baseline errors on the validation set
        if self.data.val is not None:
            val_t, val_q = dataset_poses(self.data.val)
            t, q = MeanPoseBaseline(self.data.train_t, self.data.train_q).predict(len(val_t))
            self.reference = summarize_errors(*pose_errors(t, q, val_t, val_q))

    # -- output

    def say(self, message: str) -> None:
        if self.dist.main:
            tqdm.write(message)

    def stage_dir(self, stage: dict) -> Path:
        return self.out_dir / stage["name"]

    def append_log(self, record: dict) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- model set-up

    def initial_model(self, stage_index: int) -> tuple[PoseNet, dict | None, str | None]:
        """Fresh model (position bias at the training mean) or weights the stage starts from."""
        stage = self.cfg["stages"][stage_index]
        source = stage["init"]
        if source == "previous":
            if stage_index == 0:
                source = "scratch"
            else:
                source = str(self.stage_dir(self.cfg["stages"][stage_index - 1]) / "best.pt")
                if not Path(source).is_file():
                    raise TrainingError(
                        f"stage '{stage['name']}' starts from the previous stage's best checkpoint {source}, which does "
                        f"not exist; run stage '{self.cfg['stages'][stage_index - 1]['name']}' first, or set "
                        f"stages.{stage['name']}.init to a checkpoint path or to scratch"
                    )
        torch.manual_seed(self.cfg["train"]["seed"] + stage_index)  # same initial weights on every rank
        if source == "scratch":
            model = PoseNet(self.model_cfg)
            model.set_position_offset(self.data.train_t.mean(0))
            return model, None, None
        payload = load_checkpoint(source)
        saved = {**payload["model_config"], "pretrained": self.model_cfg.pretrained}
        if saved != self.model_cfg.to_dict():
            raise TrainingError(f"stage '{stage['name']}': {source} holds a {payload['model_config']} model, the config asks for {self.cfg['model']}")
        model = PoseNet(ModelConfig.from_dict({**saved, "pretrained": False}))
        model.load_state_dict(payload["model_state"])
        self.say(f"[{stage['name']}] starting from {source}")
        return model, payload, source

    def build_stage(self, stage_index: int, resume: dict | None):
        """Model, criterion, optimiser, scaler, train step and the checkpoint the stage started from (or None)."""
        stage = self.cfg["stages"][stage_index]
        init_payload, source = None, None
        if resume is not None:
            model = PoseNet(ModelConfig.from_dict({**resume["model_config"], "pretrained": False}))
            model.load_state_dict(resume["model_state"])
        else:
            model, init_payload, source = self.initial_model(stage_index)
        model.freeze_batchnorm, model.train_dropout = stage["freeze_batchnorm"], stage["dropout"]
        criterion = build_loss(stage["loss"])
        if resume is not None:
            criterion.load_state_dict(resume["criterion_state"])
        elif init_payload is not None and init_payload.get("loss_config", {}).get("type") == stage["loss"]["type"]:
            criterion.load_state_dict(init_payload["criterion_state"])  # carry ŝx, ŝq over
        model.to(self.dist.device)
        criterion.to(self.dist.device)
        optimizer = build_optimizer(model, criterion, self.cfg, stage_lr(self.cfg, stage), self.position_scale)
        scaler = torch.amp.GradScaler("cuda", enabled=self.autocast and self.amp_dtype == torch.float16)
        if resume is not None and resume["resume"].get("scaler"):
            scaler.load_state_dict(resume["resume"]["scaler"])
        step = TrainStep(model, criterion, self.autocast, self.amp_dtype, self.dist.device.type)
        if self.dist.enabled:
            # DDP broadcasts rank 0's weights at construction, so every rank starts identical.
            step = nn.parallel.DistributedDataParallel(
                step, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None
            )
        return model, criterion, optimizer, scaler, step, source

    # -- checkpoints

    def save(self, path: Path, model, criterion, stage_index: int, epoch: int, val: dict | None, covariance: dict | None, resume_state: dict | None):
        stage = self.cfg["stages"][stage_index]
        extra = {
            "scene": self.data.scene,
            "stage": stage["name"],
            "stage_index": stage_index,
            "epoch": epoch,
            "val_metrics": val,
            "val_split": self.data.val_description,
            "covariance_source": f"residuals on the validation set ({self.data.val_description})" if covariance else None,
        }
        if resume_state is not None:
            extra["resume"] = resume_state
        return save_checkpoint(
            path, model, self.data.preprocess, criterion=criterion, loss_config=stage["loss"],
            map_frame=self.cfg["map_frame"], train_config=self.cfg, covariance=covariance, extra=extra,
        )

    # -- stages

    def run_stage(self, stage_index: int, resume: dict | None = None) -> dict:
        cfg, stage = self.cfg, self.cfg["stages"][stage_index]
        epochs = stage_epochs(cfg, stage)
        model, criterion, optimizer, scaler, step, source = self.build_stage(stage_index, resume)
        steps_per_epoch = len(make_loader(self.data.train, cfg, self.dist, 0, 0))
        scheduler = build_scheduler(optimizer, cfg, epochs * steps_per_epoch)
        state = resume["resume"] if resume is not None else {}
        if resume is not None:
            # After the scheduler exists: its constructor rewrites the learning rates.
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        start_epoch = state.get("epoch", 0)
        best_score = state.get("best_score", math.inf)
        best_epoch = state.get("best_epoch")
        best_val = state.get("best_val")
        val, covariance = (resume.get("val_metrics"), resume.get("covariance")) if resume is not None else (None, None)
        if resume is not None:
            set_rng_state(state["rng"])
        out = self.stage_dir(stage)
        if self.dist.main:
            out.mkdir(parents=True, exist_ok=True)
            if source is not None and self.data.val is not None:
                # Fine-tuning must earn its place: the starting weights are the first "best".
                val, covariance = validate(model, self.data.val, cfg, self.dist.device)
                best_score, best_epoch, best_val = validation_score(val, self.reference), 0, val
                self.save(out / "best.pt", model, criterion, stage_index, 0, val, covariance, None)
                self.append_log({"stage": stage["name"], "epoch": 0, "init": source, "val": val})
                self.say(f"[{stage['name']}] before fine-tuning: val median {val['median_position_m']:.3f} m "
                         f"{val['median_rotation_deg']:.2f}°")
        for epoch in range(start_epoch, epochs):
            seed = epoch_seed(cfg["train"]["seed"], stage_index, epoch)
            seed_everything(seed + self.dist.rank)
            loader = make_loader(self.data.train, cfg, self.dist, sampler_epoch=epoch, seed=epoch_seed(cfg["train"]["seed"], stage_index, 0))
            desc = f"[{stage['name']}] epoch {epoch + 1}/{epochs}"
            stats = train_one_epoch(
                step, loader, optimizer, scheduler, scaler, self.dist, desc, self.progress, cfg["optim"]["clip_grad_norm"]
            )
            validated = self.data.val is not None and ((epoch + 1) % cfg["train"]["val_every"] == 0 or epoch + 1 == epochs)
            improved = False
            if self.dist.main:
                if validated:
                    val, covariance = validate(model, self.data.val, cfg, self.dist.device)
                    score = validation_score(val, self.reference)
                    improved = score < best_score
                elif self.data.val is None:
                    improved = True  # nothing to select on: best is the latest
                    score = None
                if improved:
                    best_score, best_epoch, best_val = (score if score is not None else best_score), epoch + 1, val
                    self.save(out / "best.pt", model, criterion, stage_index, epoch + 1, val, covariance, None)
                resume_state = {
                    "epoch": epoch + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rng_state(), "best_score": best_score, "best_epoch": best_epoch, "best_val": best_val,
                }
                last = self.save(out / "last.pt", model, criterion, stage_index, epoch + 1, val, covariance, resume_state)
                keep = cfg["train"]["keep_every"]
                if keep and (epoch + 1) % keep == 0:
                    shutil.copyfile(last, out / f"epoch_{epoch + 1:03d}.pt")
                record = {"stage": stage["name"], "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **stats,
                          "images_per_s": stats["images"] / max(stats["seconds"], 1e-9)}
                if validated:
                    record["val"] = val
                self.append_log(record)
                self.say(self.epoch_line(desc, stats, val if validated else None, improved))
            self.dist.barrier()
        return {
            "best": str(out / "best.pt"), "last": str(out / "last.pt"), "best_epoch": best_epoch,
            "val": best_val, "epochs": epochs,
        }

    def epoch_line(self, desc: str, stats: dict, val: dict | None, improved: bool) -> str:
        parts = [desc, f"loss {stats.get('loss', float('nan')):.4g}"]
        if "loss_position" in stats:
            parts.append(f"Lx {stats['loss_position']:.3g}  Lq {stats['loss_rotation']:.3g}")
        if "loss_reprojection" in stats:
            parts.append(f"reproj {stats['loss_reprojection']:.3g} px")
        if "sx" in stats:
            parts.append(f"ŝx {stats['sx']:+.3f}  ŝq {stats['sq']:+.3f}")
        if "grad_norm" in stats:
            parts.append(f"|grad| {stats['grad_norm']:.3g}")
        parts.append(f"{stats['images'] / max(stats['seconds'], 1e-9):.1f} img/s")
        line = "  ".join(parts)
        if val is not None:
            ref = self.reference
            line += (
                f"  | val median {val['median_position_m']:.3f} m {val['median_rotation_deg']:.2f}°"
                f" (mean pose {ref['median_position_m']:.3f} m {ref['median_rotation_deg']:.2f}°)" + ("  *best" if improved else "")
            )
        return line

    def test_report(self, checkpoint: str) -> dict | None:
        """Errors of a checkpoint on the test split, with the mean-pose baseline beside them."""
        from .checkpoint import model_from_checkpoint

        try:
            test = self.data.test_set()
        except (FileNotFoundError, ValueError) as err:
            self.say(f"no test split to report on ({err})")
            return None
        if len(test) == 0:
            return None
        model = model_from_checkpoint(load_checkpoint(checkpoint), self.dist.device)
        pred = predict_poses(model_forward(model, self.dist.device), test, self.cfg["optim"]["batch_size"], self.cfg["train"]["workers"])
        t, q = MeanPoseBaseline(self.data.train_t, self.data.train_q).predict(len(pred["true_t"]))
        return {
            METHOD_MODEL: summarize_errors(*pose_errors(pred["pred_t"], pred["pred_q"], pred["true_t"], pred["true_q"])),
            METHOD_MEAN: summarize_errors(*pose_errors(t, q, pred["true_t"], pred["true_q"])),
        }


def run_training(config: dict, resume: str | os.PathLike | None = None, only_stage: str | None = None) -> dict:
    """Train every stage of ``config`` (or only ``only_stage``); continue a run with ``resume``.

    Args:
        config: a config as returned by :func:`load_config` (it is validated again).
        resume: a ``last.pt`` checkpoint; training continues exactly where it stopped.
        only_stage: name of the single stage to run.

    Returns:
        ``{"out_dir", "checkpoint" (best of the final stage), "stages": {name: {"best", "last",
        "best_epoch", "val", "epochs"}}, "val_split", "val_mean_pose", "test"}`` — ``test``
        holds the final checkpoint's test-split errors and the mean-pose baseline's (rank 0
        with ``train.test_at_end``; else None).
    """
    cfg = validate_config(config)
    names = [s["name"] for s in cfg["stages"]]
    if only_stage is not None and only_stage not in names:
        raise ConfigError(f"no stage named '{only_stage}'" + did_you_mean(only_stage, names))
    resume_payload = load_checkpoint(resume) if resume is not None else None
    if resume_payload is not None and "resume" not in resume_payload:
        raise CheckpointError(f"{resume} has no training state; resume from a stage's last.pt, not best.pt")
    dist_info = Dist(cfg["train"]["device"])
    try:
        if cfg["train"]["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        elif dist_info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_everything(cfg["train"]["seed"])
        trainer = Trainer(cfg, dist_info)
        if dist_info.main:
            trainer.out_dir.mkdir(parents=True, exist_ok=True)
            (trainer.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            trainer.say(f"scene {trainer.data.scene}: {len(trainer.data.train)} training images, validation: {trainer.data.val_description}; "
                        f"device {dist_info.device}" + (f" x{dist_info.world_size} (DDP)" if dist_info.enabled else "")
                        + (f", autocast {trainer.amp_dtype}" if trainer.autocast else ""))
        indices = [names.index(only_stage)] if only_stage else list(range(len(names)))
        start_stage = resume_payload["stage_index"] if resume_payload is not None else indices[0]
        results = {}
        for i in indices:
            stage_dir = trainer.stage_dir(cfg["stages"][i])
            if i < start_stage:  # finished before the resumed stage
                results[names[i]] = {"best": str(stage_dir / "best.pt"), "last": str(stage_dir / "last.pt")}
                continue
            resumed = resume_payload if resume_payload is not None and i == start_stage else None
            results[names[i]] = trainer.run_stage(i, resumed)
        final = results[names[indices[-1]]]["best"]
        test = trainer.test_report(final) if (dist_info.main and cfg["train"]["test_at_end"]) else None
        if test is not None:
            m, b = test[METHOD_MODEL], test[METHOD_MEAN]
            trainer.say(f"test split: median {m['median_position_m']:.3f} m {m['median_rotation_deg']:.2f}° "
                        f"(mean-pose baseline {b['median_position_m']:.3f} m {b['median_rotation_deg']:.2f}°) -> {final}")
        dist_info.barrier()
        return {
            "out_dir": str(trainer.out_dir), "checkpoint": final, "stages": results,
            "val_split": trainer.data.val_description, "val_mean_pose": trainer.reference, "test": test,
        }
    finally:
        dist_info.close()


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train",
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
