"""What the network predicts, how labels are scaled, and the loss.

A target layout is an ordered subset of three parts: ``amplitudes`` (M values, standardised
with the training set's mean and standard deviation), ``orientation`` (a unit quaternion
``(w, x, y, z)`` of the RELION matrix, canonical sign ``w >= 0``; the network's 4 outputs are
renormalised, and the loss ``min(|p - q|_1, |p + q|_1)`` does not care about the sign, since
q and -q are the same rotation) and ``shifts`` (RELION origins x, y in Å, standardised). The
loss is the mean absolute error (L1) of each part, weighted.

Example
-------
>>> import numpy as np
>>> spec = TargetSpec.create("all", n_modes=3)
>>> spec.n_outputs, spec.slices["orientation"]
(9, slice(3, 7, None))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from ..conventions import canonical_quaternion, matrix_to_quaternion, quaternion_to_matrix
from ..errors import InputError
from .so3 import OrientationGrid

__all__ = ["PARTS", "TargetSpec", "decode", "encode", "target_loss"]

PARTS = ("amplitudes", "orientation", "shifts")


@dataclass(frozen=True)
class TargetSpec:
    """Parts predicted, their slices in the output vector, label scaling and loss weights."""

    parts: tuple[str, ...]
    n_modes: int
    amplitude_mean: tuple[float, ...] = ()
    amplitude_std: tuple[float, ...] = ()
    shift_mean: tuple[float, float] = (0.0, 0.0)
    shift_std: tuple[float, float] = (1.0, 1.0)
    weights: dict[str, float] = field(default_factory=dict)
    # "quaternion" (the paper's: 4 outputs, L1) or "grid" (scores of the SO(3) grid of
    # ``grid_step_degrees``, cross-entropy; `so3.OrientationGrid`)
    orientation_head: str = "quaternion"
    grid_step_degrees: float = 15.0

    @classmethod
    def create(
        cls,
        target: str,
        *,
        n_modes: int,
        weights: dict[str, float] | None = None,
        orientation_head: str = "quaternion",
        grid_step_degrees: float = 15.0,
    ) -> TargetSpec:
        """``target``: amplitudes, orientation, shifts or all."""
        if orientation_head not in ("quaternion", "grid"):
            raise InputError(f"orientation head must be quaternion or grid: {orientation_head!r}")
        if target == "all":
            parts: tuple[str, ...] = PARTS
        elif target in PARTS:
            parts = (target,)
        else:
            raise InputError(f"--target must be amplitudes, orientation, shifts or all: {target!r}")
        if "amplitudes" in parts and n_modes < 1:
            raise InputError("predicting amplitudes needs at least one mode")
        w = {p: 1.0 for p in parts}
        w.update(weights or {})
        return cls(
            parts=parts,
            n_modes=n_modes,
            weights=w,
            orientation_head=orientation_head,
            grid_step_degrees=float(grid_step_degrees),
        )

    @property
    def grid(self) -> OrientationGrid | None:
        """The SO(3) grid of the grid head (None for the quaternion head)."""
        if self.orientation_head != "grid" or "orientation" not in self.parts:
            return None
        return _grid(self.grid_step_degrees)

    @property
    def sizes(self) -> dict[str, int]:
        """Network outputs per part."""
        grid = self.grid
        size = {
            "amplitudes": self.n_modes,
            "orientation": 4 if grid is None else grid.size,
            "shifts": 2,
        }
        return {p: size[p] for p in self.parts}

    @property
    def slices(self) -> dict[str, slice]:
        """Slices of the network outputs."""
        return _slices(self.sizes)

    @property
    def grid_outputs(self) -> tuple[int, int] | None:
        """(start, stop) of the grid head's scores in the outputs (None: no grid head)."""
        if self.grid is None:
            return None
        sl = self.slices["orientation"]
        return (int(sl.start), int(sl.stop))

    @property
    def label_slices(self) -> dict[str, slice]:
        """Slices of the label vectors (`encode`): the orientation is always a quaternion."""
        size = {"amplitudes": self.n_modes, "orientation": 4, "shifts": 2}
        return _slices({p: size[p] for p in self.parts})

    @property
    def n_outputs(self) -> int:
        return sum(self.sizes.values())

    def fitted(
        self, amplitudes: NDArray[np.float64] | None, shifts: NDArray[np.float64] | None
    ) -> TargetSpec:
        """The same spec with the label scaling of a training set."""
        changes: dict[str, Any] = {}
        if "amplitudes" in self.parts and amplitudes is not None:
            std = np.where(amplitudes.std(0) > 0, amplitudes.std(0), 1.0)
            changes["amplitude_mean"] = tuple(float(v) for v in amplitudes.mean(0))
            changes["amplitude_std"] = tuple(float(v) for v in std)
        if "shifts" in self.parts and shifts is not None:
            std = np.where(shifts.std(0) > 0, shifts.std(0), 1.0)
            changes["shift_mean"] = (float(shifts[:, 0].mean()), float(shifts[:, 1].mean()))
            changes["shift_std"] = (float(std[0]), float(std[1]))
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetSpec:
        fields: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**fields)


@functools.lru_cache(maxsize=4)
def _grid(step_degrees: float) -> OrientationGrid:
    return OrientationGrid.create(step_degrees)


def _slices(sizes: dict[str, int]) -> dict[str, slice]:
    out, start = {}, 0
    for p, k in sizes.items():
        out[p] = slice(start, start + k)
        start += k
    return out


def encode(
    spec: TargetSpec,
    amplitudes: NDArray[np.float64] | None,
    rotations: NDArray[np.float64] | None,
    shifts: NDArray[np.float64] | None,
) -> NDArray[np.float32]:
    """Label vectors (n, n_outputs) from amplitudes (n, M), matrices (n, 3, 3), origins (n, 2)."""
    cols = []
    for part in spec.parts:
        if part == "amplitudes":
            if amplitudes is None:
                raise InputError("the particles have no _dhnAmplitude columns to learn from")
            cols.append((amplitudes - np.asarray(spec.amplitude_mean)) / spec.amplitude_std)
        elif part == "orientation":
            if rotations is None:
                raise InputError("the particles have no poses (rlnAngleRot/Tilt/Psi) to learn")
            cols.append(matrix_to_quaternion(rotations))
        else:
            if shifts is None:
                raise InputError("the particles have no origins to learn")
            cols.append((shifts - np.asarray(spec.shift_mean)) / np.asarray(spec.shift_std))
    return np.concatenate(cols, axis=1).astype(np.float32)


def decode(
    spec: TargetSpec, outputs: torch.Tensor, *, top_k: int = 4
) -> dict[str, NDArray[np.float64]]:
    """Network outputs (n, n_outputs) -> ``amplitudes`` (n, M) Å, ``rotations`` (n, 3, 3),
    ``shifts`` (n, 2) Å, for the parts predicted. The grid head adds ``candidates``
    (n, top_k, 3, 3), their ``probabilities`` (n, top_k) and ``confidence`` (n,)
    (`so3.OrientationGrid.decode`)."""
    out: dict[str, NDArray[np.float64]] = {}
    grid = spec.grid
    for part, sl in spec.slices.items():
        if part == "orientation" and grid is not None:
            dec = grid.decode(outputs[:, sl].detach().float().cpu(), k=top_k)
            out["rotations"] = dec["rotations"].double().numpy()
            out["candidates"] = dec["candidates"].double().numpy()
            out["probabilities"] = dec["probabilities"].double().numpy()
            out["confidence"] = dec["confidence"].double().numpy()
            continue
        # float64 of this part's columns alone (not of the grid head's thousands of scores)
        v = outputs[:, sl].detach().double().cpu().numpy()
        if part == "amplitudes":
            out["amplitudes"] = v * np.asarray(spec.amplitude_std) + np.asarray(spec.amplitude_mean)
        elif part == "orientation":
            q = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            out["rotations"] = quaternion_to_matrix(canonical_quaternion(q))
        else:
            out["shifts"] = v * np.asarray(spec.shift_std) + np.asarray(spec.shift_mean)
    return out


def target_loss(
    spec: TargetSpec, outputs: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of per-part L1 losses, and the parts (detached)."""
    total = outputs.new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    grid = spec.grid
    label_slices = spec.label_slices
    for part, sl in spec.slices.items():
        p, t = outputs[:, sl].float(), labels[:, label_slices[part]].float()
        if part == "orientation" and grid is not None:
            if grid.quaternions.device != p.device:
                grid = grid.to(p.device)
            loss = grid.loss(p, t)
        elif part == "orientation":
            p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-6)
            loss = torch.minimum((p - t).abs().sum(1), (p + t).abs().sum(1)).mean() / 4
        else:
            loss = (p - t).abs().mean()
        parts[part] = loss.detach()
        total = total + spec.weights.get(part, 1.0) * loss
    return total, parts
