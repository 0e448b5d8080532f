"""Validation splits: which frames train, validate or are dropped, and what the log says about it."""
import pytest

from ros2_posenet.data.split import DROPPED_WARNING_FRACTION, Split, block_split, sequence_split, split_frames


def test_block_split_drops_exactly_the_gap_around_each_held_out_block():
    ids = ["seq"] * 100
    split = block_split(ids, fraction=0.25, block=10, gap=3)
    # k = 4: blocks 2 and 6 (frames 20-29, 60-69) held out; 3 frames either side dropped.
    assert split.val == list(range(20, 30)) + list(range(60, 70))
    assert split.excluded == [17, 18, 19, 30, 31, 32, 57, 58, 59, 70, 71, 72]
    assert sorted(split.train + split.val + split.excluded) == list(range(100))
    nearest = min(abs(t - v) for t in split.train for v in split.val)
    assert nearest == 4  # no training frame within `gap` of a validation frame


def test_counts_say_what_each_set_got():
    split = block_split(["a"] * 100, fraction=0.25, block=10, gap=3)
    assert split.counts() == "training 68, validation 20, dropped 12 of 100 frames"
    assert split.total == 100 and split.dropped_fraction == pytest.approx(0.12)


def test_warning_only_when_more_than_the_threshold_is_dropped():
    ids = ["a"] * 100
    assert block_split(ids, 0.25, 10, gap=3).dropped_warning() is None  # 12 % dropped
    heavy = block_split(ids, 0.25, 10, gap=10)  # frames 10-19, 30-39, 50-59, 70-79 dropped
    assert heavy.dropped_fraction > DROPPED_WARNING_FRACTION
    warning = heavy.dropped_warning()
    assert "40 of 100 training frames (40 %" in warning and "val_gap" in warning and "train.refit" in warning
    # Exactly at the threshold: no warning.
    at_threshold = Split(train=list(range(70)), val=list(range(70, 85)), excluded=list(range(85, 100)))
    assert at_threshold.dropped_fraction == pytest.approx(DROPPED_WARNING_FRACTION)
    assert at_threshold.dropped_warning() is None


def test_sequence_split_holds_out_whole_sequences_and_drops_nothing():
    ids = ["s1"] * 5 + ["s2"] * 6 + ["s3"] * 7
    split = sequence_split(ids, fraction=0.3)
    assert split.val == list(range(5, 11))  # the middle sequence, s2
    assert split.excluded == [] and split.counts() == "training 12, validation 6, dropped 0 of 18 frames"


def test_auto_uses_blocks_below_three_sequences_and_rejects_unknown_strategies():
    two = ["s1"] * 40 + ["s2"] * 40
    assert split_frames(two, "auto", 0.25, 10, 2).description.startswith("blocks")
    assert split_frames(two + ["s3"] * 40, "auto", 0.25, 10, 2).description.startswith("sequences")
    with pytest.raises(ValueError, match="validation split must be one of"):
        split_frames(two, "random", 0.25, 10, 0)
