"""The DeepHEMNMA regressor: a timm ResNet34 (1 channel, no classifier) and an MLP head.

``timm.create_model("resnet34", pretrained=False, in_chans=1, num_classes=0)`` gives 512
pooled features; the MLP has hidden layers of 1000, 512 and 128 units with ReLU and dropout
0.5, then a linear output (METHOD.md section 4). No weights are downloaded.

With the grid head, ``condition_quaternions`` (the grid's rotations) makes the MLP's outputs
(amplitudes, shifts) depend on the orientation: the rotation of the top-scored bin (in training,
the bin nearest the true orientation) is embedded by a small MLP into a scale and an offset of
every backbone feature (FiLM, Perez et al. 2018), so that the head reads a mode's displacement
the way it looks in that view.

Example
-------
>>> import torch
>>> net = DeepHEMNMANet(n_outputs=9)
>>> net(torch.zeros(2, 1, 64, 64)).shape
torch.Size([2, 9])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

from .so3 import quaternion_to_matrix_t

__all__ = ["DeepHEMNMANet"]


class DeepHEMNMANet(nn.Module):
    """ResNet34 features + MLP head with ``n_outputs`` outputs.

    ``grid_slice`` (start, stop): those outputs are the scores of an SO(3) grid (thousands of
    them), read by one linear layer straight from the backbone's features instead of through the
    MLP's 128-unit bottleneck (measured: cross-entropy 6.3 vs 8.2 after 50 batches, resnet18,
    SNR 10); the MLP gives the other outputs.
    """

    def __init__(
        self,
        n_outputs: int,
        *,
        backbone: str = "resnet34",
        hidden: Sequence[int] = (1000, 512, 128),
        dropout: float = 0.5,
        grid_slice: tuple[int, int] | None = None,
        condition_quaternions: torch.Tensor | None = None,
        condition_hidden: int = 256,
    ) -> None:
        super().__init__()
        self.backbone = timm.create_model(backbone, pretrained=False, in_chans=1, num_classes=0)
        # the pooled features' width: num_features, or head_hidden_size where timm puts a
        # pre-logits layer after them (mobilenetv3_small_100: 576 -> 1024)
        bb: Any = self.backbone
        features = int(getattr(bb, "head_hidden_size", None) or bb.num_features)
        self.grid_slice = grid_slice
        n_grid = 0 if grid_slice is None else grid_slice[1] - grid_slice[0]
        if grid_slice is not None and not 0 <= grid_slice[0] < grid_slice[1] <= n_outputs:
            raise ValueError(f"grid outputs {grid_slice} outside the {n_outputs} outputs")
        layers: list[nn.Module] = []
        width = features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, n_outputs - n_grid))
        self.head = nn.Sequential(*layers)
        self.grid_head = nn.Linear(features, n_grid) if n_grid else None
        self.condition: nn.Module | None = None
        if condition_quaternions is not None:
            if self.grid_head is None or condition_quaternions.shape != (n_grid, 4):
                raise ValueError(
                    f"conditioning needs the grid head and its {n_grid} quaternions, got "
                    f"{tuple(condition_quaternions.shape)}"
                )
            self.register_buffer(
                "condition_quaternions", condition_quaternions.float().clone(), persistent=False
            )
            # the last layer starts at zero: an untrained conditioning leaves features as they are
            last = nn.Linear(condition_hidden, 2 * features)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.condition = nn.Sequential(
                nn.Linear(9, condition_hidden), nn.ReLU(inplace=True), last
            )

    @property
    def conditioned(self) -> bool:
        """Whether the MLP's outputs depend on the orientation (`condition_quaternions`)."""
        return self.condition is not None

    def forward(
        self, images: torch.Tensor, orientations: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Images (B, 1, H, W) -> raw outputs (B, n_outputs).

        ``orientations`` (B, 4), unit quaternions, only for a conditioned network in training:
        the bin nearest each conditions the MLP instead of the top-scored one."""
        features = self.backbone(images)
        grid = self.grid_head(features) if self.grid_head is not None else None
        if self.condition is not None and grid is not None:
            q = self.condition_quaternions
            assert isinstance(q, torch.Tensor)
            if orientations is None:
                bins = grid.detach().argmax(dim=1)
            else:
                bins = (orientations.to(q) @ q.T).abs().argmax(dim=1)
            rot = quaternion_to_matrix_t(q[bins]).reshape(len(bins), 9).to(features.dtype)
            scale, offset = self.condition(rot).chunk(2, dim=1)
            head_in = features * (1 + scale) + offset
        else:
            head_in = features
        out: torch.Tensor = self.head(head_in)
        if grid is not None and self.grid_slice is not None:
            start = self.grid_slice[0]
            out = torch.cat([out[:, :start], grid, out[:, start:]], dim=1)
        return out
