"""The trainer: one stage at a time, validation, checkpoints and the test-split report.

:class:`Trainer` runs the stages of one resolved config (see :func:`ros2_posenet.training.run.run_training`);
:func:`validate` gives the held-out errors that select ``best.pt`` and calibrate the covariance.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from ..baselines import MeanPoseBaseline
from ..checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from ..covariance import calibrate_methods, unit_covariances
from ..losses import build_loss, variance_head_nll
from ..metrics import METHOD_MEAN, METHOD_MODEL, dataset_poses, model_forward, pose_errors, predict_poses, summarize_errors
from ..model import ModelConfig, PoseNet
from ..train_config import stage_epochs, stage_lr
from .loaders import DataBundle, make_loader, move_batch
from .optim import build_optimizer, build_scheduler, position_lr_scale
from .runtime import Dist, TrainingError, amp_settings, epoch_seed, rng_state, seed_everything, set_rng_state


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
        frame_index=pred["index"].numpy(),  # the held-out blocks ``fixed`` is calibrated across
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
        # A refit pass validates nothing itself: each stage's held-out metrics and covariance
        # come from the validated run's best checkpoint of the same stage.
        self.calibration_dir = Path(cfg["train"]["calibrate_from"]) if cfg["train"]["calibrate_from"] else None

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
        if payload.get("member_states"):
            raise TrainingError(f"stage '{stage['name']}': {source} is an ensemble of {1 + len(payload['member_states'])} "
                                f"networks; start from one of its members: {', '.join(payload.get('members', []))}")
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

    def held_out_calibration(self, stage: dict) -> tuple[dict | None, dict | None, str | None]:
        """``(val metrics, covariance, description)`` of the validated run's ``best.pt`` for ``stage``."""
        if self.calibration_dir is None:
            return None, None, None
        payload = load_checkpoint(self.calibration_dir / stage["name"] / "best.pt")
        return payload.get("val_metrics"), payload.get("covariance"), payload.get("val_split")

    def save(self, path: Path, model, criterion, stage_index: int, epoch: int, val: dict | None, covariance: dict | None, resume_state: dict | None):
        stage = self.cfg["stages"][stage_index]
        val_description = self.data.val_description
        if covariance is None and self.calibration_dir is not None:
            val, covariance, held_out = self.held_out_calibration(stage)
            val_description = f"{held_out} (validated run {self.calibration_dir}; this refit trained on every frame)"
        extra = {
            "scene": self.data.scene,
            "stage": stage["name"],
            "stage_index": stage_index,
            "epoch": epoch,
            "val_metrics": val,
            "val_split": val_description,
            "covariance_source": f"residuals on the validation set ({val_description})" if covariance else None,
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
        # The schedule spans `epochs`; a refit stops where validation chose (stop_after).
        stop = epochs if stage["stop_after"] is None else min(stage["stop_after"], epochs)
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
            elif stop == 0:
                # Validation kept the starting weights (the fine-tuning did not help): so does this run.
                best_epoch = 0
                self.save(out / "best.pt", model, criterion, stage_index, 0, val, covariance, None)
                self.say(f"[{stage['name']}] not trained (stop_after 0): keeps the weights it starts from ({source})")
        for epoch in range(start_epoch, stop):
            seed = epoch_seed(cfg["train"]["seed"], stage_index, epoch)
            seed_everything(seed + self.dist.rank)
            loader = make_loader(self.data.train, cfg, self.dist, sampler_epoch=epoch, seed=epoch_seed(cfg["train"]["seed"], stage_index, 0))
            desc = f"[{stage['name']}] epoch {epoch + 1}/{epochs}" + (f" (stops after {stop})" if stop < epochs else "")
            stats = train_one_epoch(
                step, loader, optimizer, scheduler, scaler, self.dist, desc, self.progress, cfg["optim"]["clip_grad_norm"]
            )
            validated = self.data.val is not None and ((epoch + 1) % cfg["train"]["val_every"] == 0 or epoch + 1 == stop)
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

