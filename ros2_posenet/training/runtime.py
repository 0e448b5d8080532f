"""Process group, seeds, random state and mixed precision: the runtime a training run sets up first."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from ..inference import resolve_device


class TrainingError(RuntimeError):
    """Training cannot continue (diverged, missing initial checkpoint, ...)."""


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

