"""Small helpers shared by several test files (imported as `helpers`; pytest puts test/ on sys.path)."""
from __future__ import annotations

from pathlib import Path

import torch

from ros2_posenet.checkpoint import save_checkpoint
from ros2_posenet.data.synthetic import SyntheticSceneConfig, generate_scene
from ros2_posenet.geometry import project_points
from ros2_posenet.model import ModelConfig, PoseNet
from ros2_posenet.preprocess import PreprocessConfig

TINY_SCENE = SyntheticSceneConfig(width=160, height=120, frames_train=16, frames_test=6, train_sequences=2, num_points=600)


def tiny_scene(tmp_path_factory, name: str, config: SyntheticSceneConfig = TINY_SCENE) -> Path:
    """Render a small synthetic scene (both formats) into a fresh folder."""
    root = tmp_path_factory.mktemp(name) / "scene"
    generate_scene(root, config)
    return root


def project_np(points, t, q, K):
    """Project world points (N, 3) with one camera-to-world pose; returns numpy (uv (N, 2), depth (N,))."""
    uv, depth = project_points(
        torch.as_tensor(points, dtype=torch.float64)[None], torch.as_tensor(t)[None],
        torch.as_tensor(q)[None], torch.as_tensor(K)[None],
    )
    return uv[0].numpy(), depth[0].numpy()


def untrained_checkpoint(path: Path, offset, preprocess: PreprocessConfig, **kwargs) -> Path:
    """A tiny random resnet18 PoseNet saved as a checkpoint (its position bias set to ``offset``)."""
    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone="resnet18", pretrained=False, hidden_dim=16))
    model.set_position_offset(torch.tensor(offset, dtype=torch.float32))
    return save_checkpoint(path, model, preprocess, map_frame="scene_map", **kwargs)
