"""Small helpers shared by several test files (imported as `helpers`; pytest puts test/ on sys.path)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ros2_posenet.checkpoint import save_checkpoint
from ros2_posenet.data.synthetic import SyntheticScene, SyntheticSceneConfig, generate_scene
from ros2_posenet.geometric.features import FeatureConfig
from ros2_posenet.geometry import project_points
from ros2_posenet.model import ModelConfig, PoseNet
from ros2_posenet.preprocess import PreprocessConfig
from ros2_posenet.geometric.scene_map import SceneMap, SceneMapBuilder, depth_lift

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


# A 320x240 pinhole camera and camera poses in the synthetic room (z-up world).
ROOM_K = np.array([[300.0, 0, 159.5], [0, 300.0, 119.5], [0, 0, 1]])
LOOK_ALONG_X = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # optical axes looking along +x


def room_pose(x, y, z, yaw_deg=0.0) -> np.ndarray:
    """Camera-to-world pose at (x, y, z) looking along +x turned by ``yaw_deg`` about the vertical."""
    c, s = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
    T = np.eye(4)
    T[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ LOOK_ALONG_X
    T[:3, 3] = [x, y, z]
    return T


def room_map(max_features: int = 600) -> tuple[SyntheticScene, SceneMap]:
    """The synthetic room and a depth map of keyframes along a 2.5 m stretch, looking ahead and 25° to either side."""
    scene = SyntheticScene(SyntheticSceneConfig(width=320, height=240, num_points=0))
    builder = SceneMapBuilder(FeatureConfig(max_features=max_features), "depth")
    for x in np.arange(-4.0, -1.49, 0.5):
        for yaw in (-25.0, 0.0, 25.0):
            T = room_pose(x, 0.5, 1.3, yaw)
            rgb, depth = scene.render(T, ROOM_K, 320, 240)
            builder.add_image(f"x{x:.1f}_yaw{yaw:.0f}", rgb, ROOM_K, T, depth_lift(depth, ROOM_K, T))
    return scene, builder.build()
