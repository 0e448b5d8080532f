"""Validation splits of a scene's training frames that measure what deployment will see.

Deployment asks the network about views it has not seen: a new pass through the
scene, not a frame between two training neighbours. A validation set of frames
interleaved with training frames measures interpolation and flatters the model (on
real data: validation 0.13 m against test 0.29 m, issue #14). Strategies:

* ``sequences``: whole training sequences are held out (needs at least two).
* ``blocks``: every k-th block of ``block`` consecutive frames of each sequence is held
  out, and the ``gap`` frames on either side of a held-out block are dropped from
  both sets, so no training frame is within ``gap`` frames of a validation frame.
  ``gap = 0`` is the project's original split.
* ``auto``: ``sequences`` when the scene has at least three training sequences (two
  stay for training), else ``blocks``.

All functions take the sequence id of every frame in dataset order (frames of one
sequence in capture order) and return dataset indices.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

VAL_SPLITS = ("auto", "sequences", "blocks")
# A split that drops more than this fraction of the training frames (neither set) is worth a warning:
# every dropped frame is a view the network never learns.
DROPPED_WARNING_FRACTION = 0.15
# `auto` holds out whole sequences only when this many exist (one or more stay for training).
MIN_SEQUENCES_FOR_SEQUENCE_SPLIT = 3


@dataclass
class Split:
    """Dataset indices of the training and validation frames, and those dropped as a buffer."""

    train: list[int]
    val: list[int]
    excluded: list[int] = field(default_factory=list)
    description: str = ""

    @property
    def total(self) -> int:
        return len(self.train) + len(self.val) + len(self.excluded)

    @property
    def dropped_fraction(self) -> float:
        return len(self.excluded) / max(self.total, 1)

    def counts(self) -> str:
        """``"training 238, validation 45, dropped 0 of 283 frames"``: what each set got, plainly."""
        return (f"training {len(self.train)}, validation {len(self.val)}, dropped {len(self.excluded)} "
                f"of {self.total} frames")

    def dropped_warning(self) -> str | None:
        """A warning when the split drops more than :data:`DROPPED_WARNING_FRACTION` of the frames, else None."""
        if self.dropped_fraction <= DROPPED_WARNING_FRACTION:
            return None
        return (f"the validation split drops {len(self.excluded)} of {self.total} training frames "
                f"({100 * self.dropped_fraction:.0f} %, neither trained on nor validated); lower data.val_gap, "
                "or set train.refit=true to train the final model on every frame")


def _frames_by_sequence(ids: list[str]) -> dict[str, list[int]]:
    frames: dict[str, list[int]] = defaultdict(list)
    for i, seq in enumerate(ids):
        frames[seq].append(i)
    return dict(frames)


def sequence_split(ids: list[str], fraction: float) -> Split:
    """Hold out whole sequences: about ``fraction`` of the frames, at least one sequence.

    Sequences are taken evenly spaced through the list of sequences (sorted by name) so the
    choice does not depend on frame counts alone; at least one sequence stays for training.
    """
    frames = _frames_by_sequence(ids)
    names = sorted(frames)
    if len(names) < 2:
        raise ValueError(f"a sequence split needs at least two training sequences, the scene has {len(names)}")
    count = min(len(names) - 1, max(1, round(fraction * len(names))))
    step = len(names) / count
    held = [names[min(len(names) - 1, int(step * (k + 0.5)))] for k in range(count)]
    val = sorted(i for name in held for i in frames[name])
    val_set = set(val)
    return Split(
        train=[i for i in range(len(ids)) if i not in val_set], val=val,
        description=f"sequences: {len(val)} frames of {count} whole held-out training sequence(s) ({', '.join(held)})",
    )


def block_split(ids: list[str], fraction: float, block: int, gap: int = 0) -> Split:
    """Hold out every k-th block of ``block`` frames per sequence (k = round(1/fraction)).

    Frames within ``gap`` frames of a held-out block (same sequence) belong to neither set.
    Should no block qualify (sequences shorter than k blocks), every k-th frame is held
    out instead so tiny datasets still get a validation set; there is no room for a gap then.
    """
    if block < 1 or gap < 0:
        raise ValueError(f"block must be >= 1 and gap >= 0, got block={block}, gap={gap}")
    k = max(2, round(1 / fraction))
    frames = _frames_by_sequence(ids)
    held = {seq: [p for p in range(len(f)) if (p // block) % k == k // 2] for seq, f in frames.items()}
    if not any(held.values()):
        held = {seq: [p for p in range(len(f)) if p % k == k // 2] for seq, f in frames.items()}
        gap = 0
    val, excluded = [], []
    for seq, f in frames.items():
        val_positions = set(held[seq])
        near = {p for v in val_positions for p in range(v - gap, v + gap + 1) if 0 <= p < len(f)} - val_positions
        val += [f[p] for p in sorted(val_positions)]
        excluded += [f[p] for p in sorted(near)]
    val, excluded = sorted(val), sorted(excluded)
    dropped = set(val) | set(excluded)
    return Split(
        train=[i for i in range(len(ids)) if i not in dropped], val=val, excluded=excluded,
        description=(f"blocks: {len(val)} frames held out (every {k}th block of {block} consecutive frames per sequence), "
                     f"{len(excluded)} frames within {gap} of them dropped from both sets"),
    )


def split_frames(ids: list[str], strategy: str, fraction: float, block: int, gap: int) -> Split:
    """The validation split named by ``strategy`` (one of :data:`VAL_SPLITS`)."""
    if strategy not in VAL_SPLITS:
        raise ValueError(f"validation split must be one of {VAL_SPLITS}, got {strategy!r}")
    if strategy == "auto":
        strategy = "sequences" if len(set(ids)) >= MIN_SEQUENCES_FOR_SEQUENCE_SPLIT else "blocks"
    if strategy == "sequences":
        return sequence_split(ids, fraction)
    return block_split(ids, fraction, block, gap)
