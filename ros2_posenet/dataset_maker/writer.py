"""The dataset on disk: the 7-Scenes layout the loaders read, written under a staging name (ROS-free).

Frames are written as they are selected into a hidden ``.frames`` folder (numbered in
recording order), then moved into ``seq-NN/frame-NNNNNN.{color.png,depth.png,pose.txt}``
once the split is known; ``TrainSplit.txt``, ``TestSplit.txt``, ``intrinsics.txt``
(``fx fy cx cy width height``, as the synthetic scene writes it), ``frames.csv`` (each
frame's image header stamp) and ``dataset.yaml`` follow. Everything happens inside :class:`~ros2_posenet.tools.relocalize_bag.StagedPath`,
so the destination appears complete or not at all.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from ..data.seven_scenes import INTRINSICS_FILE, SPLIT_FILES, sequence_folder
from ..data.synthetic import write_pose
from ..bag_io import StagedPath, UsageError

STAGING_FOLDER = ".frames"
DATASET_FILE = "dataset.yaml"
FRAMES_FILE = "frames.csv"  # sequence,frame,stamp: which recorded image each frame is


@dataclass
class FrameRecord:
    index: int  # order of selection (recording order)
    stamp: int  # image header stamp, ns
    pose: np.ndarray | None  # T_map_optical (None until SfM gives one)
    depth: bool = False  # a depth image was written


def check_output(out: str | Path, overwrite: bool, inputs: list[str | Path]) -> Path:
    """The output folder, refused when it exists (without ``overwrite``), has no parent, or holds an input."""
    out = Path(out)
    if not out.parent.is_dir():
        raise UsageError(f"directory of --out {out} does not exist")
    for source in inputs:
        source = Path(source).resolve()
        if source == out.resolve() or source.is_relative_to(out.resolve()):
            raise UsageError(f"--out {out} would replace the input {source}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UsageError(f"--out {out} exists already; choose another path, remove it, or pass --overwrite")
    return out


class DatasetWriter:
    """Writes frames as they come; :meth:`finish` lays them out and moves the dataset into place."""

    def __init__(self, out: Path):
        self.staged = StagedPath(out)
        self.root = self.staged.path
        self.frames = self.root / STAGING_FOLDER
        self.frames.mkdir(parents=True)

    @property
    def workspace(self) -> Path:
        """A scratch folder beside the dataset, removed with the staging (e.g. for SfM)."""
        path = self.staged.folder / "work"
        path.mkdir(exist_ok=True)
        return path

    def colour_path(self, index: int) -> Path:
        return self.frames / f"{index:06d}.color.png"

    def write_colour(self, index: int, rgb: np.ndarray) -> None:
        if not cv2.imwrite(str(self.colour_path(index)), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {self.colour_path(index)}")

    def write_depth(self, index: int, depth_mm: np.ndarray) -> None:
        path = self.frames / f"{index:06d}.depth.png"
        if not cv2.imwrite(str(path), depth_mm.astype(np.uint16)):
            raise OSError(f"cannot write {path}")

    def drop(self, index: int) -> None:
        for path in self.frames.glob(f"{index:06d}.*"):
            path.unlink()

    def finish(self, records: list[FrameRecord], sequences: list[tuple[str, list[int]]], K: np.ndarray,
               size: tuple[int, int], metadata: dict) -> dict:
        """Move ``records`` into the sequences ``[(split, record positions)]``, write the split files, intrinsics and
        ``dataset.yaml``, and move the dataset into place. Returns frames per split."""
        counts = {"train": 0, "test": 0}
        numbers: dict[str, list[int]] = {"train": [], "test": []}
        rows = ["sequence,frame,stamp"]
        for number, (split, positions) in enumerate(sequences, start=1):
            folder = self.root / sequence_folder(number)
            folder.mkdir()
            numbers[split].append(number)
            for i, position in enumerate(positions):
                record = records[position]
                stem = folder / f"frame-{i:06d}"
                self.colour_path(record.index).rename(f"{stem}.color.png")
                if record.depth:
                    (self.frames / f"{record.index:06d}.depth.png").rename(f"{stem}.depth.png")
                write_pose(Path(f"{stem}.pose.txt"), record.pose)
                rows.append(f"{folder.name},frame-{i:06d},{record.stamp // 10**9}.{record.stamp % 10**9:09d}")
            counts[split] += len(positions)
        for split, name in SPLIT_FILES.items():
            (self.root / name).write_text("".join(f"sequence{n}\n" for n in numbers[split]))
        (self.root / INTRINSICS_FILE).write_text(f"{K[0, 0]:.9f} {K[1, 1]:.9f} {K[0, 2]:.9f} {K[1, 2]:.9f} {size[0]} {size[1]}\n")
        shutil.rmtree(self.frames)
        (self.root / FRAMES_FILE).write_text("\n".join(rows) + "\n")
        metadata = {**metadata, "frames": counts,
                    "sequences": {split: [sequence_folder(n) for n in numbers[split]] for split in numbers}}
        (self.root / DATASET_FILE).write_text(yaml.safe_dump(_plain(metadata), sort_keys=False))
        shutil.rmtree(self.staged.folder / "work", ignore_errors=True)  # the staging folder must hold only the dataset
        self.staged.commit()
        return counts

    def discard(self) -> None:
        self.staged.discard()


def _plain(value):
    """YAML-safe copy: numpy scalars and arrays as Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value
