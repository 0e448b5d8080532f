"""Shared dataset machinery: exact intrinsics through preprocessing, randomness, batching, errors."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ros2_posenet.data import Augmentation, DatasetError, build_dataset, collate_pose_batch, color_jitter
from ros2_posenet.data.synthetic import SyntheticScene, SyntheticSceneConfig, generate_scene
from ros2_posenet.geometry import pose_to_matrix
from ros2_posenet.losses import ReprojectionLoss
from ros2_posenet.preprocess import PreprocessConfig

CONFIG = SyntheticSceneConfig(width=160, height=120, frames_train=12, frames_test=4, train_sequences=2, num_points=600)
SMALL = PreprocessConfig(resize=96, crop=80)


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("common") / "scene"
    generate_scene(root, CONFIG)
    return root


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(SMALL.mean).view(3, 1, 1), torch.tensor(SMALL.std).view(3, 1, 1)
    return ((image * std + mean) * 255).permute(1, 2, 0).numpy()


def _subpixel_offset(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Estimated (dx, dy) shift of ``b`` against ``a`` and the error at zero shift vs the best integer shift."""
    a = cv2.GaussianBlur(a.mean(2).astype(np.float32), (0, 0), 1.5)
    b = cv2.GaussianBlur(b.mean(2).astype(np.float32), (0, 0), 1.5)
    m = 6

    def error(dx, dy):
        return float(np.abs(a[m:-m, m:-m] - np.roll(b, (-dy, -dx), (0, 1))[m:-m, m:-m]).mean())

    errors = np.array([[error(dx, dy) for dx in (-1, 0, 1)] for dy in (-1, 0, 1)])
    ex, ey = errors[1], errors[:, 1]
    dx = 0.5 * (ex[0] - ex[2]) / (ex[0] - 2 * ex[1] + ex[2])
    dy = 0.5 * (ey[0] - ey[2]) / (ey[0] - 2 * ey[1] + ey[2])
    return dx, dy, errors[1, 1] / errors.min()


@pytest.mark.parametrize("kind", ["7scenes", "cambridge"])
def test_item_intrinsics_stay_exact_through_resize_and_random_crop(scene_dir, kind):
    """Rendering the scene directly with the item's K and pose reproduces the preprocessed image."""
    scene = SyntheticScene(CONFIG)
    ds = build_dataset(kind, scene_dir, "train", SMALL, augment=True, max_points=0)
    torch.manual_seed(0)
    crops = set()
    for i in range(4):
        item = ds[i]
        T = pose_to_matrix(item["position"].double().numpy(), item["rotation"].double().numpy())
        rendered, _ = scene.render(T, item["K"].double().numpy(), SMALL.crop, SMALL.crop)
        dx, dy, zero_vs_best = _subpixel_offset(_to_uint8(item["image"]), rendered)
        assert zero_vs_best == 1.0
        assert abs(dx) < 0.25 and abs(dy) < 0.25
        crops.add(tuple(item["K"][:2, 2].tolist()))
    assert len(crops) > 1  # the crops really were random


def test_reprojection_loss_is_zero_at_the_true_pose_and_positive_off_it(scene_dir):
    ds = build_dataset("cambridge", scene_dir, "train", SMALL, augment=True, max_points=32)
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=True, collate_fn=collate_pose_batch)))
    criterion = ReprojectionLoss()
    loss, stats = criterion(batch["position"], batch["rotation"], batch)
    assert float(loss) < 1e-3 and stats["points"] > 20
    moved, _ = criterion(batch["position"] + 0.1, batch["rotation"], batch)
    assert float(moved) > 1.0


def test_collate_pads_points_and_masks_them():
    def item(n, index):
        return {"image": torch.zeros(3, 8, 8), "position": torch.zeros(3), "rotation": torch.tensor([1.0, 0, 0, 0]),
                "K": torch.eye(3), "points": torch.arange(3 * n, dtype=torch.float32).view(n, 3), "index": index}

    batch = collate_pose_batch([item(2, 0), item(0, 1), item(5, 2)])
    assert batch["points"].shape == (3, 5, 3)
    assert batch["points_mask"].tolist() == [[1, 1, 0, 0, 0], [0] * 5, [1] * 5]
    assert torch.equal(batch["points"][0, :2], item(2, 0)["points"]) and batch["points"][0, 2:].abs().sum() == 0
    assert batch["index"].tolist() == [0, 1, 2] and batch["image"].shape == (3, 3, 8, 8)
    empty = collate_pose_batch([item(0, 0)])
    assert empty["points"].shape == (1, 1, 3) and not empty["points_mask"].any()
    with pytest.raises(ValueError):
        collate_pose_batch([])


def test_augmentation_is_random_per_epoch_but_reproducible(scene_dir):
    ds = build_dataset("7scenes", scene_dir, "train", SMALL, augment=Augmentation(color_jitter=0.3), max_points=16)
    torch.manual_seed(1)
    first = [ds[0], ds[0]]
    torch.manual_seed(1)
    again = ds[0]
    assert torch.equal(first[0]["image"], again["image"]) and torch.equal(first[0]["points"], again["points"])
    assert not torch.equal(first[0]["image"], first[1]["image"])  # a new crop / jitter each draw


def test_evaluation_items_are_deterministic_and_unjittered(scene_dir):
    test = build_dataset("7scenes", scene_dir, "test", SMALL, augment=False, max_points=16)
    a, b = test[2], test[2]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["points"], b["points"])
    centre, _ = test.preprocessor(test.load_image(2), test.intrinsics(2))  # centre crop, no jitter
    assert torch.equal(a["image"], centre)


def test_color_jitter_changes_colours_not_geometry():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    jittered = color_jitter(image, 0.4, np.random.default_rng(1))
    assert jittered.shape == image.shape and jittered.dtype == np.uint8
    assert not np.array_equal(jittered, image)
    # Brightness/contrast/saturation are monotone per pixel: the ordering of intensities is kept.
    gray, gray_j = image.mean(2).ravel(), jittered.astype(float).mean(2).ravel()
    assert np.corrcoef(gray, gray_j)[0, 1] > 0.9
    assert color_jitter(image, 0.0, np.random.default_rng(1)) is image


def test_dataset_api_for_tools(scene_dir):
    ds = build_dataset("cambridge", scene_dir, "test", SMALL)
    assert ds.positions().shape == (4, 3) and ds.rotations().shape == (4, 4)
    assert np.allclose(np.linalg.norm(ds.rotations(), axis=1), 1.0)
    assert ds.intrinsics(0).shape == (3, 3) and ds.load_image(0).dtype == np.uint8
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="max_points"):
        build_dataset("cambridge", scene_dir, "test", SMALL, max_points=-1)


def test_dataset_error_message_names_file_and_line():
    err = DatasetError("bad value", "/data/x.txt", 7)
    assert isinstance(err, ValueError) and str(err) == "/data/x.txt:7: bad value"
    assert err.path == Path("/data/x.txt") and err.line == 7
    assert str(DatasetError("missing", "/data/y")) == "/data/y: missing"
