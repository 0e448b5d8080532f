"""Self-describing checkpoints: everything the node needs to reproduce training's predictions.

A checkpoint is a ``torch.save`` dict with a format tag and version, the model
config and weights, the preprocessing, the loss config and state (learned ŝx, ŝq),
the pose convention and map frame, the training config, the git revision and the
covariance calibrated on held-out images. Optimiser/scheduler state is included
for ``--resume`` only. An ensemble (``train.ensemble``) is one checkpoint whose ``model_state`` is
its first network's and ``member_states`` the others' (:func:`save_ensemble`).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

from .model import ModelConfig, PoseEnsemble, PoseNet
from .preprocess import PreprocessConfig

FORMAT = "ros2_posenet.checkpoint"
VERSION = 1
POSE_CONVENTION = "camera_to_world, optical camera frame (z fwd, x right, y down), quaternion w,x,y,z, w>=0"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or incompatible; the message says what to do."""


def git_revision(path: str | os.PathLike | None = None) -> str:
    """Short git revision of the source tree (``unknown`` outside a checkout)."""
    cwd = Path(path or __file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_checkpoint(
    path: str | os.PathLike,
    model: PoseNet,
    preprocess: PreprocessConfig,
    *,
    criterion: torch.nn.Module | None = None,
    loss_config: dict | None = None,
    map_frame: str = "map",
    train_config: dict | None = None,
    covariance: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file + rename, so a crash never leaves half a file)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": model.config.to_dict(),
        "model_state": model.state_dict(),
        "preprocess": preprocess.to_dict(),
        "loss_config": dict(loss_config or {}),
        "criterion_state": criterion.state_dict() if criterion is not None else {},
        "pose_convention": POSE_CONVENTION,
        "map_frame": map_frame,
        "train_config": dict(train_config or {}),
        "git_revision": git_revision(),
        "covariance": covariance,
        **(extra or {}),
    }
    return _write(path, payload)


def _write(path: str | os.PathLike, payload: dict) -> Path:
    """``torch.save`` to a temp file, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def save_ensemble(path: str | os.PathLike, members: list[str | os.PathLike]) -> Path:
    """One checkpoint of the networks in the ``members`` checkpoints (:class:`PoseEnsemble`).

    Everything but the weights (preprocessing, covariance calibration, map frame, training
    config) is the first member's; the others must share its network and preprocessing.
    """
    if len(members) < 2:
        raise CheckpointError(f"an ensemble needs at least 2 checkpoints, got {len(members)}")
    payloads = [load_checkpoint(m, setting="the ensemble's members") for m in members]
    first = payloads[0]
    for member, payload in zip(members[1:], payloads[1:]):
        for key in ("model_config", "preprocess", "map_frame"):
            if payload.get(key) != first.get(key):
                raise CheckpointError(f"{member}'s {key} differs from {members[0]}'s: they cannot form one ensemble")
        if payload.get("member_states"):
            raise CheckpointError(f"{member} is an ensemble already")
    ensemble = {k: v for k, v in first.items() if k != "resume"}
    ensemble["member_states"] = [p["model_state"] for p in payloads[1:]]
    ensemble["members"] = [str(m) for m in members]
    return _write(path, ensemble)


# How the node's users choose a checkpoint; command-line tools pass their option (e.g. "--checkpoint").
CHECKPOINT_PARAMETER = "the `checkpoint` parameter"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, setting: str = CHECKPOINT_PARAMETER) -> dict:
    """Read and validate a checkpoint dict; raise :class:`CheckpointError` with advice.

    ``setting`` names where the user gave the path, for the missing-file advice.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; train one with `train --config config/train_synthetic.yaml` "
            f"or set {setting} to an existing .pt file"
        )
    try:
        # weights_only=False: our checkpoints hold plain dicts/lists only, but older torch lacks the allowlist API.
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ros2_posenet checkpoint (no '{FORMAT}' format tag)")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload.get('version')}, this ros2_posenet reads version {VERSION}; "
            "retrain or convert it with the ros2_posenet release that wrote it"
        )
    for key in ("model_config", "model_state", "preprocess"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} lacks '{key}'")
    return payload


def model_from_checkpoint(payload: dict, device: str | torch.device = "cpu") -> PoseNet | PoseEnsemble:
    """Rebuild the network of a loaded checkpoint (an ensemble's :class:`PoseEnsemble`), in eval mode on ``device``."""
    states = [payload.get("model_state"), *(payload.get("member_states") or [])]
    try:
        config = ModelConfig.from_dict({**payload["model_config"], "pretrained": False})
        networks = []
        for state in states:
            networks.append(PoseNet(config))
            networks[-1].load_state_dict(state)
        model = networks[0] if len(networks) == 1 else PoseEnsemble(networks)
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"checkpoint weights do not fit the model they describe: {err}") from None
    return model.to(device).eval()


def preprocess_from_checkpoint(payload: dict) -> PreprocessConfig:
    return PreprocessConfig.from_dict(payload["preprocess"])
