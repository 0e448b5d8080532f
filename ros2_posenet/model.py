"""PoseNet: a torchvision backbone with its classifier removed and a pose regression head.

Kendall & Cipolla: GoogLeNet (Inception v1) features -> FC(2048) -> 3 position + 4
quaternion values; the quaternion is normalised to unit length in the forward pass.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torchvision

from .geometry import quat_mean, quat_normalize

log = logging.getLogger(__name__)

# name -> (torchvision constructor name, attribute holding the classifier)
BACKBONES = {
    "googlenet": ("googlenet", "fc"),
    "resnet18": ("resnet18", "fc"),
    "resnet34": ("resnet34", "fc"),
    "resnet50": ("resnet50", "fc"),
    "mobilenet_v3_small": ("mobilenet_v3_small", "classifier"),
    "mobilenet_v3_large": ("mobilenet_v3_large", "classifier"),
    "efficientnet_b0": ("efficientnet_b0", "classifier"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in checkpoints."""

    backbone: str = "googlenet"
    hidden_dim: int = 2048
    dropout: float = 0.5
    pretrained: bool = True
    # A linear layer on the (detached) head features predicting per-frame log-variances of
    # the 6 pose residuals, trained with the Gaussian NLL (losses.VarianceHeadNLL).
    variance_head: bool = False

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be positive, got {self.hidden_dim}")
        if not isinstance(self.variance_head, bool):
            raise ValueError(f"variance_head must be true or false, got {self.variance_head!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)


def _cached_imagenet_weights(name: str):
    """torchvision's DEFAULT ImageNet weights if already in the torch hub cache, else None.

    Never downloads: robots and CI machines are often offline, and a hanging
    download at node start-up is worse than a clear warning.
    """
    weights = torchvision.models.get_model_weights(name).DEFAULT
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    return weights if os.path.isfile(path) else None


def build_backbone(name: str, pretrained: bool) -> tuple[nn.Module, int]:
    """Backbone with its classifier replaced by identity, and its feature width."""
    ctor_name, head_attr = BACKBONES[name]
    weights = _cached_imagenet_weights(ctor_name) if pretrained else None
    if pretrained and weights is None:
        log.warning(
            "ImageNet weights for %s are not in the torch cache (%s); starting from random "
            "initialisation, which trains much worse on real images. Download them once with "
            "torchvision.models.get_model_weights(%r).DEFAULT.get_state_dict().",
            name, torch.hub.get_dir(), ctor_name,
        )
    kwargs = {"weights": weights}
    if ctor_name == "googlenet":
        # Aux classifiers are ImageNet-specific; init_weights avoids a scipy-based slow path warning.
        kwargs.update(aux_logits=False, init_weights=weights is None)
    net = getattr(torchvision.models, ctor_name)(**kwargs)
    head = getattr(net, head_attr)
    if isinstance(head, nn.Sequential):
        in_features = next(m.in_features for m in head if isinstance(m, nn.Linear))
    else:
        in_features = head.in_features
    setattr(net, head_attr, nn.Identity())
    return net, in_features


class PoseNet(nn.Module):
    """Camera pose regressor.

    ``forward(images (B, 3, H, W)) -> (t (B, 3), q (B, 4))``: camera-to-world position
    and unit quaternion (w, x, y, z), see :mod:`ros2_posenet.geometry`.
    Dropout layers are ``nn.Dropout`` modules so ``eval()`` disables them and
    Monte-Carlo dropout can be enabled deliberately with :meth:`enable_mc_dropout`
    (batched and cheap: :meth:`uncertainty_outputs`).

    For fine-tuning, ``freeze_batchnorm`` keeps BatchNorm layers on their running
    statistics and ``train_dropout = False`` switches dropout off even in ``train()``
    mode: the training forward pass then equals the deployed one, so a loss that is
    sensitive to small pose changes (reprojection) optimises the network that is used.
    """

    freeze_batchnorm: bool = False
    train_dropout: bool = True

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        self.backbone, feat_dim = build_backbone(self.config.backbone, self.config.pretrained)
        self.head = nn.Sequential(
            nn.Dropout(self.config.dropout),
            nn.Linear(feat_dim, self.config.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(self.config.dropout),
        )
        self.fc_position = nn.Linear(self.config.hidden_dim, 3)
        self.fc_rotation = nn.Linear(self.config.hidden_dim, 4)
        # Start at the identity rotation so early quaternion normalisation is well defined.
        with torch.no_grad():
            self.fc_rotation.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        self.fc_log_variance = nn.Linear(self.config.hidden_dim, 6) if self.config.variance_head else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pose(self.head(self.features(images)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, F) of images (B, 3, H, W): everything before the head."""
        return torch.flatten(self.backbone(images), 1)

    def pose(self, head_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (B, 3), unit q (B, 4)) from the head's output (B, hidden_dim)."""
        return self.fc_position(head_features), quat_normalize(self.fc_rotation(head_features))

    def forward_with_log_variance(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, q, log_variance (B, 6))``: the variance head's per-frame log-variances of the
        residual (x, y, z in m², rotation vector in rad²). Its input is detached, so training it
        never changes the pose network."""
        if self.fc_log_variance is None:
            raise RuntimeError("this PoseNet has no variance head (ModelConfig.variance_head is false)")
        head_features = self.head(self.features(images))
        t, q = self.pose(head_features)
        return t, q, self.fc_log_variance(head_features.detach())

    def train(self, mode: bool = True) -> "PoseNet":
        super().train(mode)
        if mode:
            for module in self.modules():
                if self.freeze_batchnorm and isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
                if not self.train_dropout and isinstance(module, nn.Dropout):
                    module.eval()
        return self

    def enable_mc_dropout(self) -> None:
        """Keep the network in eval mode but re-activate dropout, for MC-dropout sampling."""
        self.eval()
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.train()

    def uncertainty_outputs(self, images: torch.Tensor, mc_samples: int = 0) -> dict[str, torch.Tensor]:
        """The eval-mode pose and what per-frame uncertainty needs, from one backbone pass.

        Returns ``t`` (B, 3), ``q`` (B, 4) of the deterministic network (the published pose);
        with ``mc_samples`` > 0 the Monte-Carlo dropout samples (Bayesian PoseNet, Kendall &
        Cipolla, ICRA 2016) ``t_samples`` (B, S, 3), ``q_samples`` (B, S, 4); with a variance
        head ``log_variance`` (B, 6).

        Dropout sits after the backbone only (the head, and GoogLeNet's last layer), so the
        backbone runs once and the ``mc_samples`` stochastic copies of its features go through
        the head as one batch: the cost is one forward plus ``mc_samples`` head evaluations.
        """
        was_training = self.training
        self.eval()
        try:
            features = self.features(images)
            head_features = self.head(features)
            t, q = self.pose(head_features)
            out = {"t": t, "q": q}
            if self.fc_log_variance is not None:
                out["log_variance"] = self.fc_log_variance(head_features)
            if mc_samples > 0:
                if self.config.dropout <= 0:
                    raise ValueError("Monte-Carlo dropout needs a model trained with dropout > 0")
                repeated = features.repeat_interleave(mc_samples, dim=0)
                tail = getattr(self.backbone, "dropout", None)  # GoogLeNet drops its pooled features
                if isinstance(tail, nn.Dropout):
                    repeated = nn.functional.dropout(repeated, tail.p, training=True)
                for module in self.head.modules():
                    if isinstance(module, nn.Dropout):
                        module.train()
                t_s, q_s = self.pose(self.head(repeated))
                out["t_samples"] = t_s.view(len(t), mc_samples, 3)
                out["q_samples"] = q_s.view(len(t), mc_samples, 4)
        finally:
            self.train(was_training)
        return out

    def set_position_offset(self, mean_position: torch.Tensor) -> None:
        """Initialise the position bias to the training set's mean position.

        Scenes are rarely centred on the origin; starting from their mean lets the
        network learn offsets rather than absolute coordinates first.
        """
        with torch.no_grad():
            self.fc_position.bias.copy_(torch.as_tensor(mean_position, dtype=self.fc_position.bias.dtype))


class PoseEnsemble(nn.Module):
    """Networks of one architecture trained with different seeds (``train.ensemble``), published as one.

    ``forward`` returns the members' mean position and chordal mean quaternion: independent
    networks err differently on frames unlike their training images, and the mean errs less
    than a typical member (on hololens-office's validation blocks the median rotation error of
    two networks' mean was 28-31° against 35-49° for each; bench/RESULTS.md). It has
    :class:`PoseNet`'s inference interface (``config``, ``uncertainty_outputs``,
    ``forward_with_log_variance``), so everything that runs a checkpoint runs an ensemble.
    """

    def __init__(self, members: list[PoseNet]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 networks, got {len(members)}")
        if any(m.config != members[0].config for m in members[1:]):
            raise ValueError("the networks of an ensemble must share one ModelConfig")
        self.members = nn.ModuleList(members)

    @property
    def config(self) -> ModelConfig:
        return self.members[0].config

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._mean([m(images) for m in self.members])

    @staticmethod
    def _mean(poses: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.stack([p[0] for p in poses]).mean(0)
        return t, quat_mean(torch.stack([p[1] for p in poses]))

    @staticmethod
    def _mean_log_variance(log_variances: list[torch.Tensor]) -> torch.Tensor:
        """The log of the members' mean variance, from their log-variances (B, 6)."""
        return torch.logsumexp(torch.stack(log_variances), 0) - math.log(len(log_variances))

    def forward_with_log_variance(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mean pose and the log of the members' mean variance."""
        outputs = [m.forward_with_log_variance(images) for m in self.members]
        t, q = self._mean([(o[0], o[1]) for o in outputs])
        return t, q, self._mean_log_variance([o[2] for o in outputs])

    def enable_mc_dropout(self) -> None:
        for m in self.members:
            m.enable_mc_dropout()

    def uncertainty_outputs(self, images: torch.Tensor, mc_samples: int = 0) -> dict[str, torch.Tensor]:
        """:meth:`PoseNet.uncertainty_outputs` of the ensemble: the mean pose; every member's Monte-Carlo
        samples together (``mc_samples`` each: their spread includes the members' disagreement); the
        members' mean variance."""
        outputs = [m.uncertainty_outputs(images, mc_samples) for m in self.members]
        t, q = self._mean([(o["t"], o["q"]) for o in outputs])
        out = {"t": t, "q": q}
        if "log_variance" in outputs[0]:
            out["log_variance"] = self._mean_log_variance([o["log_variance"] for o in outputs])
        if mc_samples > 0:
            out["t_samples"] = torch.cat([o["t_samples"] for o in outputs], dim=1)
            out["q_samples"] = torch.cat([o["q_samples"] for o in outputs], dim=1)
        return out
