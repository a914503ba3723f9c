"""Small models for the embedded data: fast enough to adversarially train on two CPU cores."""

from __future__ import annotations

import torch
from torch import nn

from .checkpointing import checkpoint_segments


class SmallCNN(nn.Module):
    """Two conv blocks + MLP head; ~0.4M parameters, ~4M multiply-adds per 28x28 image.

    ``pool="avg"`` replaces max pooling by average pooling. Max pooling passes the input gradient through
    one pixel per window and switches it as soon as another pixel wins, which makes the input-loss surface
    rougher for gradient attacks: on the demo, the average-pooling model left PGD-20 1.5 pp above
    APGD-CE + APGD-DLR on the 2,000 test images, the max-pooling one 1.95 pp (see docs/evaluation.md).
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 32, img_size: int = 28,
                 pool: str = "max"):
        super().__init__()
        pools = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
        if pool not in pools:
            raise ValueError(f"pool={pool!r}; choose one of {sorted(pools)}")
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(inplace=True), pools[pool](2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), pools[pool](2),
        )
        side = img_size // 4
        self.num_features = 2 * width * side * side
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(self.num_features, 128), nn.ReLU(inplace=True))
        self.fc = nn.Linear(128, num_classes)

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """``model.grad_checkpointing``: each conv block (conv-ReLU-pool) is a checkpointed segment."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint_segments((self.features[:3], self.features[3:]), x, self.grad_checkpointing))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
