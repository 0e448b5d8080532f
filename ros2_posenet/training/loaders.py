"""Training data: the held-out validation split, the datasets, and the per-epoch loaders."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ..data import DatasetError
from ..data.split import Split, block_split, split_frames
from ..metrics import dataset_poses
from ..preprocess import PreprocessConfig
from ..train_config import ConfigError, augmentation
from .runtime import Dist, TrainingError



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
    from ..data import build_dataset as build

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
        # What each set got, for the log: every frame trains unless a holdout split takes some.
        self.split = Split(train=train_idx, val=[])
        if data["val"] == "holdout":
            split = validation_split(sequence_ids(train_full), data)
            plain = build_dataset(data["kind"], data["root"], "train", preprocess, augment=False, max_points=0, **options)
            train_idx, self.val, self.split = split.train, Subset(plain, split.val), split
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

    def frames_line(self) -> str:
        """What training used, validation used and the split dropped, in frames."""
        if self.val is not None and not self.split.val:  # the test split validates
            return f"training {len(self.split.train)} frames (all), validation {len(self.val)} test frames, dropped 0"
        return self.split.counts()

    def test_set(self):
        return build_dataset(self.kind, self.root, "test", self.preprocess, augment=False, max_points=0, **self.options)


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_loader(dataset, cfg: dict, dist_info: Dist, sampler_epoch: int, seed: int) -> DataLoader:
    """Shuffled loader for one epoch; DistributedSampler (also with one process) fixes the order by seed+epoch."""
    from ..data import collate_pose_batch

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

