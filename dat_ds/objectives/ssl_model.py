"""Encoder + projection head for contrastive pre-training, and the linear probe used to fine-tune it.

The encoder is any registered/timm model built with ``num_classes = FEATURE_DIM``: its last linear
layer's output is the representation, which works for every model without knowing its internals. The
projection head (ReLU-Linear-ReLU-Linear, SimCLR's MLP) maps it to the space where NT-Xent is computed
and is thrown away after pre-training. Normalisation stays inside the encoder, so eps is in pixel units.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

FEATURE_DIM = 128  # representation size the linear probe sees
PROJECTION_DIM = 64  # NT-Xent space (SimCLR uses 128 on ImageNet; 64 is plenty for 10-class data)


class ContrastiveModel(nn.Module):
    def __init__(self, encoder: nn.Module, feature_dim: int = FEATURE_DIM, projection_dim: int = PROJECTION_DIM):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, feature_dim), nn.ReLU(),
                                  nn.Linear(feature_dim, projection_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class LinearProbe(nn.Module):
    """A linear classifier on the encoder's representation; ``frozen`` keeps the encoder fixed (and in eval mode)."""

    def __init__(self, encoder: nn.Module, num_classes: int, feature_dim: int = FEATURE_DIM, frozen: bool = True):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(feature_dim, num_classes)
        self.frozen = frozen
        if frozen:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # frozen BatchNorm statistics too, as in standard linear evaluation
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))


def build_encoder(model_name: str, spec, weights: str | None = None, normalization: str = "data",
                  pretrained: bool | None = None, grad_checkpointing: bool = False) -> nn.Module:
    """``normalization``/``pretrained``/``grad_checkpointing``: ``create_model``'s (``model.normalization``; whether
    the run started from ``model.weights``; ``model.grad_checkpointing``)."""
    from ..models import create_model

    return create_model(model_name, dataclasses.replace(spec, num_classes=FEATURE_DIM), weights,
                        normalization=normalization, pretrained=pretrained, grad_checkpointing=grad_checkpointing)


def build_contrastive_model(cfg, spec, model: nn.Module | None = None) -> ContrastiveModel:
    """The model the ``acl`` objective trains: a fresh ``cfg.model.name`` encoder plus projection head."""
    return ContrastiveModel(build_encoder(cfg.model.name, spec, cfg.model.weights, cfg.model.normalization,
                                          grad_checkpointing=cfg.model.grad_checkpointing))
