"""An orientation output that can say "one of these": scores over a discrete SO(3) grid.

Quaternion regression averages between look-alike views (a view and its near-mirror give the
network the same image and opposite targets, and the L1 optimum lies between them). Here the
network scores every rotation of a grid (`alignment.hemnma.rotation_grid`, the HEMNMA search grid:
4,416 rotations at 15°) and is trained by cross-entropy against a soft target, a Gaussian of the
angle to the true rotation (``sigma = step / 2``, cut at ``3 sigma``), which rewards neighbours
of the truth and so keeps the scores smooth over the grid. Decoding returns the top-k
orientations, each refined below the grid step as the probability-weighted mean quaternion of the
bins within ``1.5 step`` of it, with the probability mass around it; the mass around the first
is the particle's confidence.

Example
-------
>>> import torch
>>> grid = OrientationGrid.create(30.0)
>>> logits = torch.zeros(2, grid.size)
>>> out = grid.decode(logits, k=2)
>>> out["candidates"].shape, out["probabilities"].shape, out["confidence"].shape
(torch.Size([2, 2, 3, 3]), torch.Size([2, 2]), torch.Size([2]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["OrientationGrid", "quaternion_to_matrix_t"]


def quaternion_to_matrix_t(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) of unit quaternions (..., 4) ``(w, x, y, z)`` (the same
    convention as ``conventions.quaternion_to_matrix``)."""
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


@dataclass(frozen=True, eq=False)
class OrientationGrid:
    """The rotations scored by the grid head: ``quaternions`` (G, 4), ``step_degrees``."""

    step_degrees: float
    quaternions: torch.Tensor

    @classmethod
    def create(cls, step_degrees: float, device: torch.device | str = "cpu") -> OrientationGrid:
        from ..alignment.hemnma import rotation_grid
        from ..conventions import matrix_to_quaternion

        if not 1.0 <= step_degrees <= 90.0:
            raise ValueError(f"grid step must be within 1-90°, got {step_degrees}")
        q = matrix_to_quaternion(rotation_grid(step_degrees))
        return cls(float(step_degrees), torch.tensor(q, dtype=torch.float32, device=device))

    @property
    def size(self) -> int:
        return int(self.quaternions.shape[0])

    def to(self, device: torch.device | str) -> OrientationGrid:
        return OrientationGrid(self.step_degrees, self.quaternions.to(device))

    def angles(self, q: torch.Tensor) -> torch.Tensor:
        """Angles (radians) (..., G) between rotations ``q`` (..., 4) and every grid rotation."""
        dot = (q.float() @ self.quaternions.T).abs().clamp(max=1.0)
        return 2 * torch.arccos(dot)

    def soft_targets(self, q: torch.Tensor) -> torch.Tensor:
        """(B, G) target distributions: a Gaussian of the angle to ``q`` (B, 4), sigma half a
        step, cut at three sigma (the nearest bin always kept)."""
        sigma = math.radians(self.step_degrees) / 2
        a = self.angles(q)
        w = torch.exp(-0.5 * (a / sigma) ** 2) * (a <= 3 * sigma)
        nearest = a.argmin(dim=-1, keepdim=True)
        w = w.scatter(-1, nearest, w.gather(-1, nearest).clamp_min(1e-6))
        return w / w.sum(dim=-1, keepdim=True)

    def loss(self, logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (mean over the batch) of ``logits`` (B, G) against `soft_targets`."""
        target = self.soft_targets(q)
        return -(target * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()

    @torch.no_grad()
    def decode(
        self, logits: torch.Tensor, k: int = 4, separation_degrees: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Top-``k`` orientations of ``logits`` (B, G), at least ``separation_degrees`` apart
        (default two steps): ``rotations`` (B, 3, 3) the first, ``candidates`` (B, k, 3, 3),
        ``probabilities`` (B, k) the mass within 1.5 steps of each (bins an earlier candidate
        took excluded), ``confidence`` (B,) that of the first."""
        k = max(1, min(k, self.size))
        p = torch.softmax(logits.float(), dim=-1)  # (B, G)
        sep_degrees = 2 * self.step_degrees if separation_degrees is None else separation_degrees
        sep = math.radians(sep_degrees)
        near = math.radians(1.5 * self.step_degrees)
        free = torch.ones_like(p, dtype=torch.bool)  # bins a next candidate may sit on
        claimed = torch.zeros_like(p, dtype=torch.bool)  # bins an earlier candidate averaged
        quats, masses = [], []
        for _ in range(k):
            idx = torch.where(free, p, torch.full_like(p, -1.0)).argmax(dim=-1)  # (B,)
            centre = self.quaternions[idx]  # (B, 4)
            a = self.angles(centre)  # (B, G)
            w = p * ((a <= near) & ~claimed)
            sign = torch.sign(self.quaternions @ centre.T).T  # (B, G): same hemisphere
            sign = torch.where(sign == 0, torch.ones_like(sign), sign)
            mean = (w * sign) @ self.quaternions  # (B, 4)
            quats.append(mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            masses.append(w.sum(-1))
            free &= a > sep
            claimed |= a <= near
        q = torch.stack(quats, 1)  # (B, k, 4)
        cand = quaternion_to_matrix_t(q)
        mass = torch.stack(masses, 1)
        return {
            "rotations": cand[:, 0],
            "candidates": cand,
            "probabilities": mass,
            "confidence": mass[:, 0],
        }
