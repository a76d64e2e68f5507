"""The DeepHEMNMA regressor: a timm ResNet34 (1 channel, no classifier) and an MLP head.

``timm.create_model("resnet34", pretrained=False, in_chans=1, num_classes=0)`` gives 512
pooled features; the MLP has hidden layers of 1000, 512 and 128 units with ReLU and dropout
0.5, then a linear output (METHOD.md section 4). No weights are downloaded.

Example
-------
>>> import torch
>>> net = DeepHEMNMANet(n_outputs=9)
>>> net(torch.zeros(2, 1, 64, 64)).shape
torch.Size([2, 9])
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from torch import nn

__all__ = ["DeepHEMNMANet"]


class DeepHEMNMANet(nn.Module):
    """ResNet34 features + MLP head with ``n_outputs`` outputs."""

    def __init__(
        self,
        n_outputs: int,
        *,
        backbone: str = "resnet34",
        hidden: Sequence[int] = (1000, 512, 128),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.backbone = timm.create_model(backbone, pretrained=False, in_chans=1, num_classes=0)
        layers: list[nn.Module] = []
        width = int(self.backbone.num_features)  # type: ignore[arg-type]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.head = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, H, W) -> raw outputs (B, n_outputs)."""
        out: torch.Tensor = self.head(self.backbone(images))
        return out
