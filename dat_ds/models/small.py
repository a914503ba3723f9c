"""Small models for the embedded data: fast enough to adversarially train on two CPU cores."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks + MLP head; ~0.4M parameters, ~4M multiply-adds per 28x28 image."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 32, img_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = img_size // 4
        self.num_features = 2 * width * side * side
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(self.num_features, 128), nn.ReLU(inplace=True))
        self.fc = nn.Linear(128, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
